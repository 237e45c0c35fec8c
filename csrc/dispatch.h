// Run-time choice of the kernel ISA variant: the best the CPU supports, or FUSEDFORMER_ISA.
#pragma once

#include <string>
#include <vector>

#include "kernels/cpu/dispatch.h"

namespace ff {

// avx512_bf16 runs the avx512 kernels with AVX512_BF16 dot products allowed (bf16_dot());
// avx512_amx those with AMX-BF16 tiles allowed too (amx_tiles()). Ordered: each name runs
// everything the one before it does.
enum class Isa { generic, avx2, avx512, avx512_bf16, avx512_amx };

// Chosen once at import (select_isa) and fixed afterwards.
Isa active_isa();
const char* isa_name(Isa isa);
// Variants compiled into this build, and those this CPU can run.
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();
// Reads FUSEDFORMER_ISA ("auto", "generic", "avx2", "avx512", "avx512_bf16", "avx512_amx"); throws
// std::invalid_argument with a message naming the variable and the allowed values.
void select_isa();
// Test hook: switch the variant at run time (not while kernels run on other threads).
void set_isa(const std::string& name);
// Reads FUSEDFORMER_NUM_THREADS (positive integer) and sizes the pool; throws likewise.
void select_num_threads();
// Reads FUSEDFORMER_SPIN_US (0 to 1000000) and sets how long idle pool threads spin; throws likewise.
void select_spin();
// Reads FUSEDFORMER_POOL ("auto", the default: the process's OpenMP team where one is loaded
// and spins between regions, else the pool's threads; "own": the pool's threads; "openmp": the
// team where one is loaded); throws likewise.
void select_pool();

}  // namespace ff

#ifdef FF_HAVE_AVX512
#define FF_KERNELS(getter)                                              \
  (::ff::active_isa() >= ::ff::Isa::avx512 ? ::ff::avx512::getter()    \
   : ::ff::active_isa() == ::ff::Isa::avx2 ? ::ff::avx2::getter()      \
                                           : ::ff::generic::getter())
#elif defined(FF_HAVE_AVX2)
#define FF_KERNELS(getter) \
  (::ff::active_isa() == ::ff::Isa::avx2 ? ::ff::avx2::getter() : ::ff::generic::getter())
#else
#define FF_KERNELS(getter) (::ff::generic::getter())
#endif
