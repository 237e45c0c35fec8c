// ISA-neutral declarations shared by the kernels and the bindings.
//
// Each area (attention, quant, ...) describes its kernels as a struct of function pointers in
// its api.h, and every ISA variant defines a getter returning its table:
//   FF_DECLARE_KERNEL_TABLE(AttentionKernels, attention_kernels)
// declares ff::generic::attention_kernels(), ff::avx2::... and ff::avx512::...; the bindings
// pick one at run time with FF_KERNELS(attention_kernels) (csrc/dispatch.h).
#pragma once

#include <cstdint>

#if defined(FF_HAVE_AVX2) || defined(__x86_64__) || defined(_M_X64)
#define FF_IF_AVX2(...) __VA_ARGS__
#else
#define FF_IF_AVX2(...)
#endif

#define FF_DECLARE_KERNEL_TABLE(Type, getter)                                                \
  namespace ff {                                                                              \
  namespace generic {                                                                         \
  const Type& getter();                                                                       \
  }                                                                                           \
  FF_IF_AVX2(namespace avx2 { const Type& getter(); } namespace avx512 { const Type& getter(); }) \
  }

// AMX intrinsics and __builtin_cpu_supports("amx-*") arrived in GCC 11 and clang 12; older
// compilers (manylinux2014's GCC 10) build everything else, without the avx512_amx variant.
#if (defined(__clang__) && __clang_major__ >= 12) || \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define FF_COMPILER_HAS_AMX 1
#endif

namespace ff {

// Storage types the kernels accept: fp32, IEEE fp16 and bfloat16 (as raw 16-bit words).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// The thread pool lives in csrc/; kernels only see this entry point. fn(ctx, begin, end) is
// called on sub-ranges of [0, n) of at most `grain` indices, on the pool's threads (the caller
// included). Kernels make every index's result independent of which thread computes it, so
// results do not depend on the thread count.
using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
void parallel_for_raw(int64_t n, int64_t grain, RangeFn fn, void* ctx);
int num_threads();
// True when the active variant is avx512_bf16 or avx512_amx: the avx512 kernels may use
// AVX512_BF16 instructions (the variant is chosen only on CPUs that have them).
bool bf16_dot();
// True when the active variant is avx512_amx: the avx512 kernels may use AMX-BF16 tiles (the
// CPU has them and the OS has granted this process the tile registers).
bool amx_tiles();

// Machine-limit probes, per ISA variant (kernels/cpu/probe.cpp).
struct ProbeKernels {
  // Runs `iters` iterations of independent FMA chains; returns a checksum. flops_per_iter()
  // flops per iteration.
  float (*fma_chains)(int64_t iters);
  int64_t (*flops_per_iter)();
  // Sums n floats with wide loads (a streaming read).
  float (*sum)(const float* x, int64_t n);
  // The same for bf16-pair dot products (vdpbf16ps) where the variant has them, else null:
  // run only on CPUs with AVX512_BF16.
  float (*bf16_dot_chains)(int64_t iters);
  int64_t (*bf16_dot_flops_per_iter)();
  // The same for AMX-BF16 tiles (tdpbf16ps) where the variant has them, else null: run only on
  // CPUs with AMX-BF16 whose OS granted the tile registers.
  float (*amx_bf16_chains)(int64_t iters);
  int64_t (*amx_bf16_flops_per_iter)();
};

}  // namespace ff

FF_DECLARE_KERNEL_TABLE(ProbeKernels, probe_kernels)
