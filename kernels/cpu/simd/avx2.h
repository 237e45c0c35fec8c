// AVX2 + FMA + F16C backend of the vector abstraction. Included only through simd/vec.h, in
// translation units compiled with -mavx2 -mfma -mf16c.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace ff {
namespace FF_ISA_NS {
namespace simd {

constexpr const char* kBackend = "avx2";

struct f32x8 {
  __m256 v;
};
struct m32x8 {
  __m256 v;
};

inline f32x8 zero() { return {_mm256_setzero_ps()}; }
inline f32x8 set1(float x) { return {_mm256_set1_ps(x)}; }
inline f32x8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void store(float* p, f32x8 a) { _mm256_storeu_ps(p, a.v); }
// Streaming stores (p, dst 16-byte aligned, as numpy's large arrays are): around the caches,
// without reading the lines they write first. stream_fence orders them before later stores (as
// a task's end is published to the thread waiting on it). stream_copy: bytes, a multiple of 16,
// from src to dst.
// (32-byte stores where p is on a 32-byte boundary, as torch's tensors are: against 16-byte ones
// always, causal B1 H32 L2048 D128 and B4 H12 L1024 D64 fp32 prefill took 0.99x the time, D256
// 1.008x: build_ab 9 rounds, within its noise.)
inline void stream(float* p, f32x8 a) {
  if (reinterpret_cast<uintptr_t>(p) % 32 == 0) {
    _mm256_stream_ps(p, a.v);
  } else {
    _mm_stream_ps(p, _mm256_castps256_ps128(a.v));
    _mm_stream_ps(p + 4, _mm256_extractf128_ps(a.v, 1));
  }
}
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  if (reinterpret_cast<uintptr_t>(d) % 32 == 0 && bytes % 32 == 0) {
    for (int64_t i = 0; i < bytes; i += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    return;
  }
  for (int64_t i = 0; i < bytes; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
}
inline void stream_fence() { _mm_sfence(); }
inline f32x8 add(f32x8 a, f32x8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline f32x8 sub(f32x8 a, f32x8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline f32x8 mul(f32x8 a, f32x8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline f32x8 fmadd(f32x8 a, f32x8 b, f32x8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline f32x8 max(f32x8 a, f32x8 b) { return {_mm256_max_ps(a.v, b.v)}; }
inline f32x8 min(f32x8 a, f32x8 b) { return {_mm256_min_ps(a.v, b.v)}; }
inline f32x8 round(f32x8 a) {
  return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline f32x8 ldexp(f32x8 a, f32x8 n) {
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(a.v, _mm256_castsi256_ps(e))};
}
inline m32x8 cmp_lt(f32x8 a, f32x8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline f32x8 select(m32x8 m, f32x8 a, f32x8 b) { return {_mm256_blendv_ps(a.v, b.v, m.v)}; }

inline float reduce_add(f32x8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));  // 0+4 ...
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));  // (0+4)+(2+6), (1+5)+(3+7)
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// Lane i = the sum of a[i]'s lanes, for eight vectors at once, added as
// ((0+1) + (2+3)) + ((4+5) + (6+7)): six hadds and one 128-bit swap instead of eight reductions.
inline f32x8 reduce_add8(const f32x8* a) {
  const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0].v, a[1].v), _mm256_hadd_ps(a[2].v, a[3].v));
  const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4].v, a[5].v), _mm256_hadd_ps(a[6].v, a[7].v));
  // h0 = the sums of lanes 0-3 of a[0..3], then of lanes 4-7; h1 the same for a[4..7]
  return {_mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31))};
}
// 16 values held as a (0-7) and b (8-15), in the split order: the even-indexed ones (0, 2, ...,
// 14), then the odd ones; join_pairs is the inverse.
inline void split_pairs(f32x8 a, f32x8 b, f32x8* even, f32x8* odd) {
  even->v = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a.v, b.v, 0x88)), 0xD8));
  odd->v = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a.v, b.v, 0xDD)), 0xD8));
}
inline void join_pairs(f32x8 even, f32x8 odd, f32x8* a, f32x8* b) {
  const __m256 lo = _mm256_unpacklo_ps(even.v, odd.v), hi = _mm256_unpackhi_ps(even.v, odd.v);
  a->v = _mm256_permute2f128_ps(lo, hi, 0x20);
  b->v = _mm256_permute2f128_ps(lo, hi, 0x31);
}
inline float reduce_max(f32x8 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline f32x8 load_u8(const uint8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b))};
}
inline f32x8 load_i8(const int8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))};
}

// In-place transpose of an 8x8 block held as 8 rows: r[i].lane[j] <- r[j].lane[i].
inline void transpose8x8(f32x8* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0].v, r[1].v), t1 = _mm256_unpackhi_ps(r[0].v, r[1].v);
  const __m256 t2 = _mm256_unpacklo_ps(r[2].v, r[3].v), t3 = _mm256_unpackhi_ps(r[2].v, r[3].v);
  const __m256 t4 = _mm256_unpacklo_ps(r[4].v, r[5].v), t5 = _mm256_unpackhi_ps(r[4].v, r[5].v);
  const __m256 t6 = _mm256_unpacklo_ps(r[6].v, r[7].v), t7 = _mm256_unpackhi_ps(r[6].v, r[7].v);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0].v = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1].v = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2].v = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3].v = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4].v = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5].v = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6].v = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7].v = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Hardware fp16 conversion (F16C), round to nearest even.
#define FF_SIMD_HAS_F16C 1
inline f32x8 load_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline void store_f16(uint16_t* p, f32x8 a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}

}  // namespace simd
}  // namespace FF_ISA_NS
}  // namespace ff

namespace ff {
namespace FF_ISA_NS {
namespace simd {

#define FF_SIMD_HAS_BF16 1
inline f32x8 load_bf16(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
// 16 bf16 in the split order (split_pairs): a shift and a mask of their 32-bit words, where
// load_bf16 widens and shifts each half.
inline void load_bf16_split(const uint16_t* p, f32x8* even, f32x8* odd) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even->v = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  odd->v = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
// round to nearest even; NaN stays a (quiet) NaN
inline void store_bf16(uint16_t* p, f32x8 a) {
  __m256i x = _mm256_castps_si256(a.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, _mm256_and_si256(qnan, _mm256_set1_epi32(0xffff)), nan);
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

}  // namespace simd
}  // namespace FF_ISA_NS
}  // namespace ff
