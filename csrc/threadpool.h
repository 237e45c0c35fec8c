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
// CPUs this process may run on (affinity mask), at least 1.
int available_cpus();

}  // namespace ff
