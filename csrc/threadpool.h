// One persistent thread pool for every kernel (ff::parallel_for_raw in kernels/cpu/dispatch.h).
#pragma once

#include <cstdint>

namespace ff {

// Threads the pool uses (the calling thread included).
int num_threads();
// Resizes the pool; n >= 1.
void set_num_threads(int n);
// How long idle pool threads spin before they sleep, microseconds (0: sleep at once).
void set_spin_us(int64_t us);
// Run jobs as parallel regions of the process's OpenMP team when one is loaded (torch's),
// instead of on the pool's own threads (FUSEDFORMER_POOL=openmp).
void set_use_openmp(bool on);
// "openmp" when jobs run on the OpenMP team (asked for, and a runtime is loaded), else "own".
const char* pool_backend();
// CPUs this process may run on (affinity mask), at least 1.
int available_cpus();

}  // namespace ff
