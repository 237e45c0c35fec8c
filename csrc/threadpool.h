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
// Where jobs run (FUSEDFORMER_POOL): on the pool's own threads; as parallel regions of the
// process's OpenMP team where a runtime is loaded (torch's); or, the default, on that team where
// one is loaded and its threads spin between regions (OMP_WAIT_POLICY not passive), else on ours.
enum class PoolMode { own, openmp, automatic };
void set_pool_mode(PoolMode mode);
PoolMode pool_mode();
// "openmp" when jobs run on the OpenMP team now, else "own".
const char* pool_backend();
// CPUs this process may run on (affinity mask), at least 1.
int available_cpus();

}  // namespace ff
