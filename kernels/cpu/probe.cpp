// Machine-limit probes: FMA throughput and streaming-read bandwidth, per ISA variant.
#include "kernels/cpu/simd/amx.h"
#include "kernels/cpu/simd/vec.h"

namespace ff {
namespace FF_ISA_NS {
namespace {

// Enough independent accumulators to cover FMA latency x ports (4 cycles x 2 ports on
// Haswell..Zen4 needs 8; 12 leaves headroom) without spilling 16 ymm registers.
constexpr int kChains = 12;

#if defined(__AVX512F__)
// (GCC 12 warns about its own intrinsics' self-initialised temporaries here; they are not.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The avx512 variants' peak is that of zmm FMAs (their prefill tiles and GEMMs run on them).
float fma_chains(int64_t iters) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(0.001f * static_cast<float>(c + 1));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  }
  __m512 s = _mm512_setzero_ps();
  for (int c = 0; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
  return _mm512_reduce_add_ps(s);
}

int64_t flops_per_iter() { return int64_t{kChains} * 16 * 2; }
#pragma GCC diagnostic pop
#else
float fma_chains(int64_t iters) {
  simd::f32x8 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = simd::set1(0.001f * static_cast<float>(c + 1));
  const simd::f32x8 a = simd::set1(0.999999f), b = simd::set1(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
    for (int c = 0; c < kChains; ++c) acc[c] = simd::fmadd(acc[c], a, b);
  }
  simd::f32x8 s = simd::zero();
  for (int c = 0; c < kChains; ++c) s = simd::add(s, acc[c]);
  return simd::reduce_add(s);
}

int64_t flops_per_iter() { return int64_t{kChains} * simd::kWidth * 2; }
#endif

// The streaming read touches each line 16 KiB ahead into L2, as the decode kernels do theirs:
// with the hardware prefetchers alone it read 19.5-21 GB/s on 2 threads where the attention
// decode read 22; with it 23-25 GB/s (4, 16 or 64 KiB ahead alike).
constexpr int64_t kPrefetchFloats = 4096;

// Sum of x[0, n): four streams a quarter of the span apart, read in lockstep. On a Sapphire
// Rapids class VM (2 threads, 1 GiB) one stream per thread read 24.6 GB/s where MKL's sgemv
// (torch linear, 1 x 4096 . 4096^2) read the same buffer at 26.9; four streams read 26.4 against
// MKL's 27.2 in the same rounds, two 25.5 and eight 25.2 (scratch, alternating rounds): the
// probe is the limit the kernels' % BW refers to, so it reads as fast as we know how.
float sum(const float* x, int64_t n) {
  constexpr int kStreams = 4;
  const int64_t part = n / kStreams / 16 * 16;
  simd::f32x8 a[kStreams][2];
  for (auto& s : a) s[0] = s[1] = simd::zero();
  for (int64_t i = 0; i < part; i += 16) {
    for (int s = 0; s < kStreams; ++s) {
      const float* p = x + s * part + i;
      __builtin_prefetch(p + kPrefetchFloats, 0, 2);
      a[s][0] = simd::add(a[s][0], simd::load(p));
      a[s][1] = simd::add(a[s][1], simd::load(p + 8));
    }
  }
  simd::f32x8 t = simd::zero();
  for (auto& s : a) t = simd::add(t, simd::add(s[0], s[1]));
  float total = simd::reduce_add(t);
  for (int64_t i = kStreams * part; i < n; ++i) total += x[i];
  return total;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// (GCC 12 warns about its own intrinsics' self-initialised temporaries here; they are not.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// kChains zmm chains of vdpbf16ps: 16 lanes x 2 products x 2 flops each per instruction.
__attribute__((target("avx512bf16"))) float bf16_dot_chains(int64_t iters) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(0.001f * static_cast<float>(c + 1));
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80);  // 1.0
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3380);  // 2^-24
  for (int64_t i = 0; i < iters; ++i) {
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  }
  __m512 s = _mm512_setzero_ps();
  for (int c = 0; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
  return _mm512_reduce_add_ps(s);
}

int64_t bf16_dot_flops_per_iter() { return int64_t{kChains} * 16 * 4; }
#pragma GCC diagnostic pop

#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(FF_COMPILER_HAS_AMX)
// Four chains of tdpbf16ps on tiles that stay in registers (tmm0..3 += tmm4/5 x tmm6/7): 16 x 16
// outputs x 32 products x 2 flops each per instruction. Four accumulators cover the
// instruction's latency at its issue rate (about 16 cycles each on Sapphire Rapids).
FF_AMX float amx_bf16_chains(int64_t iters) {
  alignas(64) uint16_t ones[16 * 32];
  for (uint16_t& x : ones) x = 0x3f80;  // bf16 1.0: accumulators grow by 32 an instruction
  alignas(64) float out[16 * 16];
  amx_fence();
  AmxTiles tiles;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  amx_fence();
  return out[0];
}

int64_t amx_bf16_flops_per_iter() { return int64_t{4} * 16 * 16 * 32 * 2; }
#else
constexpr float (*amx_bf16_chains)(int64_t) = nullptr;
constexpr int64_t (*amx_bf16_flops_per_iter)() = nullptr;
#endif
#if !(defined(__AVX512F__) && defined(__AVX512BW__))
constexpr float (*bf16_dot_chains)(int64_t) = nullptr;
constexpr int64_t (*bf16_dot_flops_per_iter)() = nullptr;
#endif

}  // namespace

const ProbeKernels& probe_kernels() {
  static const ProbeKernels k{fma_chains,      flops_per_iter,          sum,
                              bf16_dot_chains, bf16_dot_flops_per_iter, amx_bf16_chains,
                              amx_bf16_flops_per_iter};
  return k;
}

}  // namespace FF_ISA_NS
}  // namespace ff
