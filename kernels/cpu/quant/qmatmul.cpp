// Quantized matmul y = x @ W.T with W decoded inside the kernel, tile by tile.
//
// GEMV (m <= 8): each task owns kGemvRows rows of W; dense rows are decoded eight codes at a
// time straight into registers and FMA'd with every x row (pruned rows go through an L1
// buffer of kGemvChunk values).
// GEMM: each task owns a panel of kPanel rows of W; for every K chunk of kKc the panel is
// decoded and packed k-major in sub-panels of 16 columns (64 KB, L2), then a 6x16
// register-blocked micro-kernel sweeps all rows of x over it.
// Work is split by fixed row counts of W, so results do not depend on the thread count.
#include <algorithm>
#include <limits>
#include <memory>

#include "kernels/cpu/quant/api.h"
#include "kernels/cpu/quant/decode.h"

namespace ff {
namespace FF_ISA_NS {

void quant_kmeans1d(const float* v, int64_t n, int k, float* centroids);  // kmeans.cpp

namespace {

using simd::f32x8;

constexpr int64_t kGemvRows = 16;
constexpr int64_t kGemvChunk = 512;
constexpr int64_t kPanel = 64;
constexpr int64_t kKc = 256;
constexpr int kMr = 6, kNr = 16;
constexpr int64_t kMaxGemvRows = 8;
// Fewer multiply-adds than this per pool chunk are not worth waking a thread for.
constexpr int64_t kMinChunkWork = int64_t{1} << 18;

// Pool grain (tasks per chunk) for tasks of `work` multiply-adds each.
int64_t grain_for(int64_t work) { return std::max<int64_t>(1, kMinChunkWork / std::max<int64_t>(work, 1)); }

struct Problem {
  const float* x;  // fp32 [m, k], row stride ldx
  int64_t m, ldx;
  const QWeight* w;
  float* y;  // fp32 [m, n]
};

// ---- GEMV --------------------------------------------------------------------------------
// Dense formats decode eight codes straight into a register and FMA them with every x row
// (kUnroll independent chains per row when few rows). Affine factors the group out:
// sum_k x*(s*q + b) = s * sum_k x*q + b * sum_k x (the x group sums are computed once).
// Int8 likewise: scale * (sum_k x*q - zero_point * sum_k x). Pruned weights decode rows into
// an L1 buffer first.

#define FF_ALWAYS_INLINE inline __attribute__((always_inline))

template <int MR>
constexpr int unroll() {
  return MR == 1 ? 4 : MR == 2 ? 2 : 1;
}

// acc[r][u] += x_r[k + 8u] * v(k + 8u) over [k0, k1), steps of 8 * U.
template <int MR, class V>
FF_ALWAYS_INLINE void dot_span(const Problem& p, int64_t k0, int64_t k1, const V& v, f32x8 (&acc)[MR][unroll<MR>()]) {
  constexpr int U = unroll<MR>();
  for (int64_t k = k0; k < k1; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const f32x8 wv = v(k + 8 * u);
      for (int r = 0; r < MR; ++r) acc[r][u] = simd::fmadd(simd::load(p.x + r * p.ldx + k + 8 * u), wv, acc[r][u]);
    }
  }
}

template <int MR>
FF_ALWAYS_INLINE f32x8 sum_chains(f32x8 (&acc)[MR][unroll<MR>()], int r) {
  f32x8 s = acc[r][0];
  for (int u = 1; u < unroll<MR>(); ++u) s = simd::add(s, acc[r][u]);
  return s;
}

// x row sums per affine group (xsum[r * groups + g]) or per row (groups == 1, whole K).
void x_group_sums(const Problem& p, int64_t group, float* xsum) {
  const int64_t groups = p.w->k / group;
  for (int64_t r = 0; r < p.m; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float* x = p.x + r * p.ldx + g * group;
      f32x8 s = simd::zero();
      int64_t i = 0;
      for (; i + 8 <= group; i += 8) s = simd::add(s, simd::load(x + i));
      float t = simd::reduce_add(s);
      for (; i < group; ++i) t += x[i];
      xsum[r * groups + g] = t;
    }
}

// a . b over n floats, vectorised: the bias term sum_g bias[g] * xsum[g] of an affine row (as
// a scalar loop it is one long FMA latency chain per row, a third of the GEMV's time).
FF_ALWAYS_INLINE float dot(const float* a, const float* b, int64_t n) {
  f32x8 acc0 = simd::zero(), acc1 = simd::zero();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = simd::fmadd(simd::load(a + i), simd::load(b + i), acc0);
    acc1 = simd::fmadd(simd::load(a + i + 8), simd::load(b + i + 8), acc1);
  }
  if (i + 8 <= n) acc0 = simd::fmadd(simd::load(a + i), simd::load(b + i), acc0), i += 8;
  float t = simd::reduce_add(simd::add(acc0, acc1));
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

template <int MR, int B>
void gemv_affine(const Problem& p, const float* xsum, int64_t n0, int64_t n1) {
  constexpr int U = unroll<MR>();
  const QWeight& w = *p.w;
  const int64_t groups = w.k / w.group;
  const uint8_t* stream = static_cast<const uint8_t*>(w.codes);
  const int64_t span = std::max<int64_t>(w.group, 8 * U);  // group >= 32 >= 8 * U
  for (int64_t n = n0; n < n1; ++n) {
    const float* sc = w.scales + n * groups;
    const float* bi = w.biases + n * groups;
    const int64_t base = n * w.k;
    f32x8 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = simd::zero();
    for (int64_t g = 0; g < groups; ++g) {
      f32x8 gacc[MR][U];
      for (int r = 0; r < MR; ++r)
        for (int u = 0; u < U; ++u) gacc[r][u] = simd::zero();
      dot_span<MR>(p, g * span, (g + 1) * span, [&](int64_t k) __attribute__((always_inline)) { return quant::to_f32(quant::codes8<B>(stream, base + k)); },
                   gacc);
      const f32x8 s = simd::set1(sc[g]);
      for (int r = 0; r < MR; ++r) {
        acc[r] = simd::fmadd(sum_chains<MR>(gacc, r), s, acc[r]);
      }
    }
    for (int r = 0; r < MR; ++r) p.y[r * w.n + n] = simd::reduce_add(acc[r]) + dot(bi, xsum + r * groups, groups);
  }
}

// Int8 and LUT: v(k) decodes eight values of row n; `post` maps the dot to y.
template <int MR>
void gemv_int8(const Problem& p, const float* xsum, int64_t n0, int64_t n1) {
  constexpr int U = unroll<MR>();
  const QWeight& w = *p.w;
  const int64_t body = w.k / (8 * U) * (8 * U);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = static_cast<const int8_t*>(w.codes) + n * w.k;
    f32x8 acc[MR][U];
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = simd::zero();
    dot_span<MR>(p, 0, body, [&](int64_t k) __attribute__((always_inline)) { return simd::load_i8(q + k); }, acc);
    const float zp = w.zero_points ? static_cast<float>(w.zero_points[n]) : 0.0f;
    for (int r = 0; r < MR; ++r) {
      float d = simd::reduce_add(sum_chains<MR>(acc, r));
      for (int64_t k = body; k < w.k; ++k) d += p.x[r * p.ldx + k] * static_cast<float>(q[k]);
      p.y[r * w.n + n] = w.scales[n] * (d - zp * xsum[r]);
    }
  }
}

template <int MR, int B>
void gemv_lut(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int U = unroll<MR>();
  const QWeight& w = *p.w;
  const uint8_t* stream = static_cast<const uint8_t*>(w.codes);
  const int64_t body = w.k / (8 * U) * (8 * U);
  for (int64_t n = n0; n < n1; ++n) {
    const float* lut = w.lut + ((n / w.group) << B);
    const int64_t base = n * w.k;
    f32x8 acc[MR][U];
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = simd::zero();
    dot_span<MR>(p, 0, body, [&](int64_t k) __attribute__((always_inline)) { return quant::lookup<B>(lut, quant::codes8<B>(stream, base + k)); }, acc);
    for (int r = 0; r < MR; ++r) {
      float d = simd::reduce_add(sum_chains<MR>(acc, r));
      for (int64_t k = body; k < w.k; k += 8) {  // K % 8 == 0 for LUT weights
        alignas(32) float v[8];
        simd::store(v, quant::lookup<B>(lut, quant::codes8<B>(stream, base + k)));
        for (int i = 0; i < 8; ++i) d += p.x[r * p.ldx + k + i] * v[i];
      }
      p.y[r * w.n + n] = d;
    }
  }
}

// Any format (pruned ones): rows decoded into an L1 buffer, then dotted.
template <int MR>
void gemv_buffered(const Problem& p, int64_t n0, int64_t n1) {
  const QWeight& w = *p.w;
  alignas(32) float buf[kGemvChunk];
  for (int64_t n = n0; n < n1; ++n) {
    f32x8 acc[MR];
    float tail[MR];
    for (int r = 0; r < MR; ++r) acc[r] = simd::zero(), tail[r] = 0;
    int64_t next = w.mask ? w.row_offsets[n] : 0;  // survivor cursor of pruned rows
    for (int64_t k0 = 0; k0 < w.k; k0 += kGemvChunk) {
      const int64_t len = std::min(kGemvChunk, w.k - k0);
      if (w.mask) {
        next = quant::decode_sparse(w, n, k0, len, buf, next);
      } else {
        quant::decode_row(w, n, k0, len, buf);
      }
      const float* x = p.x + k0;
      int64_t i = 0;
      for (; i + 8 <= len; i += 8) {
        const f32x8 b = simd::load(buf + i);
        for (int r = 0; r < MR; ++r) acc[r] = simd::fmadd(simd::load(x + r * p.ldx + i), b, acc[r]);
      }
      for (; i < len; ++i)
        for (int r = 0; r < MR; ++r) tail[r] += x[r * p.ldx + i] * buf[i];
    }
    for (int r = 0; r < MR; ++r) p.y[r * w.n + n] = simd::reduce_add(acc[r]) + tail[r];
  }
}

#if defined(__AVX2__)
// 4-bit GEMV, AVX2: eight bytes hold sixteen codes; zero-extended to lanes, (b & 15) are the
// even elements and (b >> 4) the odd ones, so x is read in a per-16 permuted copy
// [x0 x2 .. x14 x1 x3 .. x15] and each code costs neither a broadcast nor a variable shift.
// `values(c)` maps eight codes (i32x8) to the fp32 factors (raw q for affine, LUT entries).
void permute_x16(const Problem& p, float* xp) {
  for (int64_t r = 0; r < p.m; ++r)
    for (int64_t k = 0; k < p.w->k; k += 16)
      for (int i = 0; i < 8; ++i) {
        xp[r * p.w->k + k + i] = p.x[r * p.ldx + k + 2 * i];
        xp[r * p.w->k + k + 8 + i] = p.x[r * p.ldx + k + 2 * i + 1];
      }
}

// Sixteen codes per step; with one or two x rows two steps run interleaved on separate
// accumulators (acc[r][2..3]), four FMA chains per row. On Zen 4 this measured the same as two
// chains: the loop is bound by its vector ops (about 4.3 cycles per 32 codes), not FMA latency.
// (Decoding several W rows at once instead reads as many interleaved streams, which measured
// slower there.)
template <int MR>
constexpr int nibble_chains() {
  return MR <= 2 ? 4 : 2;
}

template <int MR, class Values>
FF_ALWAYS_INLINE void dot_nibbles(const float* xp, int64_t ldx, const uint8_t* bytes, int64_t k0, int64_t k1,
                                  const Values& values, f32x8 (&acc)[MR][nibble_chains<MR>()]) {
  constexpr int C = nibble_chains<MR>();
  const __m256i low = _mm256_set1_epi32(15);
  // Pointers advance with k (k / 2 on a signed index costs four instructions per step).
  const uint8_t* b = bytes + k0 / 2;
  const float* x = xp + k0;
  auto step = [&](int64_t at, int c) __attribute__((always_inline)) {
    const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + at / 2)));
    const f32x8 even = values(quant::i32x8{_mm256_and_si256(codes, low)});
    const f32x8 odd = values(quant::i32x8{_mm256_srli_epi32(codes, 4)});
    for (int r = 0; r < MR; ++r) {
      acc[r][c] = simd::fmadd(simd::load(x + r * ldx + at), even, acc[r][c]);
      acc[r][c + 1] = simd::fmadd(simd::load(x + r * ldx + at + 8), odd, acc[r][c + 1]);
    }
  };
  int64_t k = k0;
  if (C == 4)
    for (; k + 32 <= k1; k += 32, b += 16, x += 32) step(0, 0), step(16, 2);
  for (; k < k1; k += 16, b += 8, x += 16) step(0, 0);
}

template <int MR>
FF_ALWAYS_INLINE f32x8 sum_nibble_chains(f32x8 (&acc)[MR][nibble_chains<MR>()], int r) {
  f32x8 s = simd::add(acc[r][0], acc[r][1]);
  if (nibble_chains<MR>() == 4) s = simd::add(s, simd::add(acc[r][2], acc[r][3]));
  return s;
}

template <int MR>
void gemv_affine_nibbles(const Problem& p, const float* xp, const float* xsum, int64_t n0, int64_t n1) {
  const QWeight& w = *p.w;
  const int64_t groups = w.k / w.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* bytes = static_cast<const uint8_t*>(w.codes) + n * w.k / 2;
    const float* sc = w.scales + n * groups;
    const float* bi = w.biases + n * groups;
    f32x8 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = simd::zero();
    for (int64_t g = 0; g < groups; ++g) {
      f32x8 gacc[MR][nibble_chains<MR>()];
      for (auto& row : gacc)
        for (auto& a : row) a = simd::zero();
      dot_nibbles<MR>(xp, w.k, bytes, g * w.group, (g + 1) * w.group,
                      [](quant::i32x8 c) __attribute__((always_inline)) { return quant::to_f32(c); }, gacc);
      const f32x8 s = simd::set1(sc[g]);
      for (int r = 0; r < MR; ++r) {
        acc[r] = simd::fmadd(sum_nibble_chains<MR>(gacc, r), s, acc[r]);
      }
    }
    for (int r = 0; r < MR; ++r) p.y[r * w.n + n] = simd::reduce_add(acc[r]) + dot(bi, xsum + r * groups, groups);
  }
}

template <int MR>
void gemv_lut_nibbles(const Problem& p, const float* xp, int64_t n0, int64_t n1) {
  const QWeight& w = *p.w;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* bytes = static_cast<const uint8_t*>(w.codes) + n * w.k / 2;
    const float* lut = w.lut + ((n / w.group) << 4);
    f32x8 acc[MR][nibble_chains<MR>()];
    for (auto& row : acc)
      for (auto& a : row) a = simd::zero();
    dot_nibbles<MR>(xp, w.k, bytes, 0, w.k,
                    [lut](quant::i32x8 c) __attribute__((always_inline)) { return quant::lookup<4>(lut, c); }, acc);
    for (int r = 0; r < MR; ++r) p.y[r * w.n + n] = simd::reduce_add(sum_nibble_chains<MR>(acc, r));
  }
}
#endif


// Runs rows_fn(n0, n1) over all rows of W in tasks of kGemvRows. (Plain templates rather than
// generic lambdas keep the symbols demangleable for the build's ISA-leak check.)
template <class RowsFn>
void over_rows(const Problem& p, const RowsFn& rows_fn) {
  const QWeight& w = *p.w;
  parallel_for((w.n + kGemvRows - 1) / kGemvRows, grain_for(kGemvRows * w.k * p.m), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) rows_fn(t * kGemvRows, std::min(w.n, (t + 1) * kGemvRows));
  });
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 4-bit affine GEMV, AVX-512 VNNI. The codes are used as 16-bit integers and x as two int16
// parts per group, x ~= sx * (hi + lo / 65536) with |hi|, |lo| <= 32767 and sx = max|x| / 32767
// over the group: an error of at most max|x| * 2^-32 per element, below the fp32 rounding of
// the sum. Then sum_k x*q = sx * (sum hi*q + sum lo*q / 65536): two exact integer dot products
// (vpdpwssd, 32 code pairs per instruction; |partial sums| < 2^23 for groups of up to 128),
// converted and scaled once per group. That is 7 vector ops per 64 codes, against 14 per 32 in
// the fp32 nibble path, which stays for K % 64 != 0 and for x the split cannot hold exactly
// (non-finite values, or a group whose max |x| is below 2^-100).
// Split x layout: per 64-code block the 32 even elements, then the 32 odd ones, matching
// (byte & 15, byte >> 4) of 32 zero-extended bytes.
constexpr int64_t kVnniBlock = 64;
// GCC 12 flags _mm512_undefined_ps() inside its own intrinsics as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

struct SplitX {
  std::unique_ptr<int16_t[]> hi, lo;  // [m, k], permuted per block
  std::unique_ptr<float[]> scale;     // sx [m, k / group]
};

// Max |x| over each group of one row of x into amax[groups]; false if x holds an inf or NaN.
bool group_amax(const float* x, int64_t k, int64_t group, float* amax) {
  const __m512 finite = _mm512_set1_ps(std::numeric_limits<float>::max());
  for (int64_t g = 0; g < k / group; ++g) {
    __m512 m = _mm512_setzero_ps();
    __mmask16 ok = 0xFFFF;
    for (int64_t i = g * group; i < (g + 1) * group; i += 16) {
      const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
      ok &= _mm512_cmp_ps_mask(a, finite, _CMP_LE_OQ);  // false for NaN
      m = _mm512_max_ps(m, a);
    }
    if (ok != 0xFFFF) return false;
    amax[g] = _mm512_reduce_max_ps(m);
  }
  return true;
}

// 16 elements of x as 16 int16 parts hi (or lo): x ~= sx * (hi + lo / 65536).
FF_ALWAYS_INLINE void split16(__m512 x, float sx, float amax, __m256i* hi, __m256i* lo) {
  const __m512 top = _mm512_set1_ps(32767.f), bottom = _mm512_set1_ps(-32767.f);
  const float to_hi = amax == 0.f ? 0.f : 32767.f / amax, to_lo = amax == 0.f ? 0.f : 65536.f / sx;
  const __m512 h = _mm512_min_ps(top, _mm512_max_ps(bottom, _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(to_hi)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
  const __m512 rest = _mm512_fnmadd_ps(h, _mm512_set1_ps(sx), x);  // |rest| <= sx / 2, one rounding
  const __m512 l = _mm512_min_ps(top, _mm512_max_ps(bottom, _mm512_mul_ps(rest, _mm512_set1_ps(to_lo))));
  *hi = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(h));
  *lo = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(l));  // rounds to nearest
}

// Stores 64 int16 (natural order, as four quarters) as the 32 even ones then the 32 odd ones.
FF_ALWAYS_INLINE void store_even_odd(const __m256i (&q)[4], int16_t* out) {
  alignas(64) static constexpr int16_t kEven[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                                    32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  const __m512i even = _mm512_load_si512(kEven), odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
  const __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(q[0]), q[1], 1);
  const __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(q[2]), q[3], 1);
  _mm512_storeu_si512(out, _mm512_permutex2var_epi16(a, even, b));
  _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(a, odd, b));
}

// Splits the m rows of x; false (and the fp32 path runs) where the split would not be exact.
bool split_x(const Problem& p, int64_t group, SplitX& out) {
  const int64_t k = p.w->k, groups = k / group;
  out.hi.reset(new int16_t[p.m * k]);
  out.lo.reset(new int16_t[p.m * k]);
  out.scale.reset(new float[p.m * groups]);
  std::unique_ptr<float[]> amax(new float[groups]);
  for (int64_t r = 0; r < p.m; ++r) {
    const float* x = p.x + r * p.ldx;
    float* sx = out.scale.get() + r * groups;
    if (!group_amax(x, k, group, amax.get())) return false;
    for (int64_t g = 0; g < groups; ++g) {
      if (amax[g] != 0.f && amax[g] < 0x1p-100f) return false;
      sx[g] = amax[g] / 32767.f;
    }
    for (int64_t b = 0; b < k; b += kVnniBlock) {
      __m256i hi[4], lo[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t g = (b + 16 * q) / group;
        split16(_mm512_loadu_ps(x + b + 16 * q), sx[g], amax[g], &hi[q], &lo[q]);
      }
      store_even_odd(hi, out.hi.get() + r * k + b);
      store_even_odd(lo, out.lo.get() + r * k + b);
    }
  }
  return true;
}

// h[r] += hi_r . q, l[r] += lo_r . q over one 64-code block. One accumulator per part: each
// group starts fresh ones, so groups overlap in the out-of-order window.
template <int MR>
FF_ALWAYS_INLINE void dot_block_vnni(const uint8_t* bytes, const int16_t* hi, const int16_t* lo, int64_t ldx,
                                     __m512i (&h)[MR], __m512i (&l)[MR]) {
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  const __m512i even = _mm512_and_si512(w, _mm512_set1_epi16(15));
  const __m512i odd = _mm512_srli_epi16(w, 4);
  for (int r = 0; r < MR; ++r) {
    h[r] = _mm512_dpwssd_epi32(h[r], even, _mm512_loadu_si512(hi + r * ldx));
    h[r] = _mm512_dpwssd_epi32(h[r], odd, _mm512_loadu_si512(hi + r * ldx + 32));
    l[r] = _mm512_dpwssd_epi32(l[r], even, _mm512_loadu_si512(lo + r * ldx));
    l[r] = _mm512_dpwssd_epi32(l[r], odd, _mm512_loadu_si512(lo + r * ldx + 32));
  }
}

// f[r * groups + g] = scales[g] * sx_r[g]: the factor of group g's integer sums, for one W row.
template <int MR>
FF_ALWAYS_INLINE void group_factors(const float* scales, const float* sx, int64_t groups, float* f) {
  for (int r = 0; r < MR; ++r) {
    int64_t g = 0;
    for (; g + 16 <= groups; g += 16)
      _mm512_storeu_ps(f + r * groups + g,
                       _mm512_mul_ps(_mm512_loadu_ps(scales + g), _mm512_loadu_ps(sx + r * groups + g)));
    for (; g < groups; ++g) f[r * groups + g] = scales[g] * sx[r * groups + g];
  }
}

// How far ahead of the codes being read the GEMV touches W (bytes). The hardware prefetchers
// alone leave a decode-shaped 4-bit GEMV from memory at 15-16 GB/s on Zen 4 (2048 x 5632:
// 0.48 ms cold against 0.27 ms from cache); touching the codes 2 KiB ahead measured about 15%
// faster over the 1.1B model's shapes (/tmp diagnostic, alternating rounds).
constexpr int64_t kPrefetchAhead = 2048;

// One W row's dot with MR x rows, for groups of G codes: G = 64 and 128 are one and two
// blocks per group; a block holds two groups of 32, whose sums sit in lanes 0-7 and 8-15.
template <int MR, int G>
FF_ALWAYS_INLINE void row_affine4_vnni(const uint8_t* bytes, const int16_t* hi, const int16_t* lo, int64_t k,
                                       const float* f, int64_t groups, __m512 (&acc_h)[MR], __m512 (&acc_l)[MR]) {
  constexpr int64_t kBlocks = G >= kVnniBlock ? G / kVnniBlock : 1, kGroups = G >= kVnniBlock ? 1 : kVnniBlock / G;
  for (int64_t g = 0; g < groups; g += kGroups) {
    _mm_prefetch(reinterpret_cast<const char*>(bytes) + kPrefetchAhead, _MM_HINT_T0);  // never faults
    __m512i h[MR], l[MR];
    for (int r = 0; r < MR; ++r) h[r] = l[r] = _mm512_setzero_si512();
    for (int64_t j = 0; j < kBlocks; ++j, bytes += kVnniBlock / 2, hi += kVnniBlock, lo += kVnniBlock)
      dot_block_vnni<MR>(bytes, hi, lo, k, h, l);
    for (int r = 0; r < MR; ++r) {
      const float* fr = f + r * groups + g;
      const __m512 fg = kGroups == 2 ? _mm512_mask_broadcastss_ps(_mm512_set1_ps(fr[0]), 0xFF00, _mm_load_ss(fr + 1))
                                     : _mm512_set1_ps(fr[0]);
      acc_h[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h[r]), fg, acc_h[r]);
      acc_l[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l[r]), fg, acc_l[r]);
    }
  }
}

template <int MR, int G>
void gemv_affine4_vnni(const Problem& p, const SplitX& xs, const float* xsum, int64_t n0, int64_t n1) {
  const QWeight& w = *p.w;
  const int64_t k = w.k, groups = k / G;
  std::unique_ptr<float[]> factors(new float[MR * groups]);
  const __m512 lo_weight = _mm512_set1_ps(1.f / 65536);
  for (int64_t n = n0; n < n1; ++n) {
    group_factors<MR>(w.scales + n * groups, xs.scale.get(), groups, factors.get());
    __m512 acc_h[MR], acc_l[MR];
    for (int r = 0; r < MR; ++r) acc_h[r] = acc_l[r] = _mm512_setzero_ps();
    row_affine4_vnni<MR, G>(static_cast<const uint8_t*>(w.codes) + n * k / 2, xs.hi.get(), xs.lo.get(), k,
                            factors.get(), groups, acc_h, acc_l);
    for (int r = 0; r < MR; ++r)
      p.y[r * w.n + n] = _mm512_reduce_add_ps(_mm512_fmadd_ps(acc_l[r], lo_weight, acc_h[r])) +
                         dot(w.biases + n * groups, xsum + r * groups, groups);
  }
}

// The shapes the VNNI GEMV takes: MLX's group sizes, whole 64-code blocks.
bool vnni_fits(const QWeight& w) { return (w.group == 32 || w.group == 64 || w.group == 128) && w.k % kVnniBlock == 0; }

template <int MR>
void gemv_affine4_vnni_all(const Problem& p, const SplitX& xs, const float* xsum) {
  switch (p.w->group) {
    case 32: return over_rows(p, [&](int64_t a, int64_t e) { gemv_affine4_vnni<MR, 32>(p, xs, xsum, a, e); });
    case 64: return over_rows(p, [&](int64_t a, int64_t e) { gemv_affine4_vnni<MR, 64>(p, xs, xsum, a, e); });
    default: return over_rows(p, [&](int64_t a, int64_t e) { gemv_affine4_vnni<MR, 128>(p, xs, xsum, a, e); });
  }
}
#pragma GCC diagnostic pop
#endif

template <int MR, int B>
void gemv_affine_all(const Problem& p) {
  const QWeight& w = *p.w;
  std::unique_ptr<float[]> xsum(new float[p.m * (w.k / w.group)]);
  x_group_sums(p, w.group, xsum.get());
  const float* xs = xsum.get();
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  SplitX split;
  if (B == 4 && vnni_fits(w) && split_x(p, w.group, split)) return gemv_affine4_vnni_all<MR>(p, split, xs);
#endif
#if defined(__AVX2__)
  if (B == 4) {  // group sizes are multiples of 16
    std::unique_ptr<float[]> xperm(new float[p.m * w.k]);
    permute_x16(p, xperm.get());
    const float* xp = xperm.get();
    return over_rows(p, [&](int64_t a, int64_t e) { gemv_affine_nibbles<MR>(p, xp, xs, a, e); });
  }
#endif
  over_rows(p, [&](int64_t a, int64_t e) { gemv_affine<MR, B>(p, xs, a, e); });
}

template <int MR, int B>
void gemv_lut_all(const Problem& p) {
#if defined(__AVX2__)
  if (B == 4 && p.w->k % 16 == 0) {
    std::unique_ptr<float[]> xperm(new float[p.m * p.w->k]);
    permute_x16(p, xperm.get());
    const float* xp = xperm.get();
    return over_rows(p, [&](int64_t a, int64_t e) { gemv_lut_nibbles<MR>(p, xp, a, e); });
  }
#endif
  over_rows(p, [&](int64_t a, int64_t e) { gemv_lut<MR, B>(p, a, e); });
}

template <int MR>
void gemv_int8_all(const Problem& p) {
  std::unique_ptr<float[]> xsum(new float[p.m]);
  x_group_sums(p, p.w->k, xsum.get());
  const float* xs = xsum.get();
  over_rows(p, [&](int64_t a, int64_t e) { gemv_int8<MR>(p, xs, a, e); });
}

template <int MR>
void gemv_mr(const Problem& p) {
  using Fn = void (*)(const Problem&);
  static constexpr Fn kAffine[9] = {nullptr,
                                    gemv_affine_all<MR, 1>, gemv_affine_all<MR, 2>, gemv_affine_all<MR, 3>,
                                    gemv_affine_all<MR, 4>, gemv_affine_all<MR, 5>, gemv_affine_all<MR, 6>,
                                    gemv_affine_all<MR, 7>, gemv_affine_all<MR, 8>};
  static constexpr Fn kLut[9] = {nullptr,
                                 gemv_lut_all<MR, 1>, gemv_lut_all<MR, 2>, gemv_lut_all<MR, 3>,
                                 gemv_lut_all<MR, 4>, gemv_lut_all<MR, 5>, gemv_lut_all<MR, 6>,
                                 gemv_lut_all<MR, 7>, gemv_lut_all<MR, 8>};
  const QWeight& w = *p.w;
  if (w.mask) return over_rows(p, [&](int64_t a, int64_t e) { gemv_buffered<MR>(p, a, e); });
  switch (w.codes_kind) {
    case QCodes::affine: return kAffine[w.bits](p);
    case QCodes::lut: return kLut[w.bits](p);
    case QCodes::int8: return gemv_int8_all<MR>(p);
    default: return over_rows(p, [&](int64_t a, int64_t e) { gemv_buffered<MR>(p, a, e); });
  }
}

void gemv(const Problem& p) {
  switch (p.m) {
    case 1: return gemv_mr<1>(p);
    case 2: return gemv_mr<2>(p);
    case 3: return gemv_mr<3>(p);
    case 4: return gemv_mr<4>(p);
    case 5: return gemv_mr<5>(p);
    case 6: return gemv_mr<6>(p);
    case 7: return gemv_mr<7>(p);
    default: return gemv_mr<8>(p);
  }
}

// ---- GEMM --------------------------------------------------------------------------------
// y[0:MR, 0:cols] (+)= x[0:MR, 0:kc] @ B, B packed k-major [kc][16].
template <int MR>
void micro_kernel(const float* x, int64_t ldx, const float* b, int64_t kc, float* y, int64_t ldy,
                  int cols, bool accumulate) {
  f32x8 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = simd::zero();
  for (int64_t k = 0; k < kc; ++k) {
    const f32x8 b0 = simd::load(b + k * kNr), b1 = simd::load(b + k * kNr + 8);
    for (int r = 0; r < MR; ++r) {
      const f32x8 a = simd::set1(x[r * ldx + k]);
      acc[r][0] = simd::fmadd(a, b0, acc[r][0]);
      acc[r][1] = simd::fmadd(a, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* yr = y + r * ldy;
    if (cols == kNr) {
      if (accumulate) {
        acc[r][0] = simd::add(acc[r][0], simd::load(yr));
        acc[r][1] = simd::add(acc[r][1], simd::load(yr + 8));
      }
      simd::store(yr, acc[r][0]);
      simd::store(yr + 8, acc[r][1]);
    } else {
      alignas(32) float out[kNr];
      simd::store(out, acc[r][0]);
      simd::store(out + 8, acc[r][1]);
      for (int c = 0; c < cols; ++c) yr[c] = accumulate ? yr[c] + out[c] : out[c];
    }
  }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int, bool);
constexpr MicroFn kMicro[kMr + 1] = {nullptr,          micro_kernel<1>, micro_kernel<2>, micro_kernel<3>,
                                     micro_kernel<4>, micro_kernel<5>, micro_kernel<6>};

// Decodes rows [n0, n0 + rows) x [k0, k0 + kc) into sub-panels of 16 columns, k-major.
void pack_panel(const QWeight& w, int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* packed) {
  alignas(32) float row[kKc];
  const int64_t padded = (rows + kNr - 1) / kNr * kNr;
  for (int64_t j = 0; j < padded; ++j) {
    float* dst = packed + (j / kNr) * kc * kNr + (j % kNr);
    if (j < rows) {
      quant::decode_row(w, n0 + j, k0, kc, row);
      for (int64_t k = 0; k < kc; ++k) dst[k * kNr] = row[k];
    } else {
      for (int64_t k = 0; k < kc; ++k) dst[k * kNr] = 0.0f;
    }
  }
}

void gemm_panel(const Problem& p, int64_t n0) {
  const QWeight& w = *p.w;
  const int64_t rows = std::min(kPanel, w.n - n0);
  alignas(32) float packed[kKc * kPanel];
  for (int64_t k0 = 0; k0 < w.k; k0 += kKc) {
    const int64_t kc = std::min(kKc, w.k - k0);
    pack_panel(w, n0, rows, k0, kc, packed);
    for (int64_t s = 0; s * kNr < rows; ++s) {
      const int cols = static_cast<int>(std::min<int64_t>(kNr, rows - s * kNr));
      for (int64_t m0 = 0; m0 < p.m; m0 += kMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, p.m - m0));
        kMicro[mr](p.x + m0 * p.ldx + k0, p.ldx, packed + s * kc * kNr, kc, p.y + m0 * w.n + n0 + s * kNr, w.n,
                   cols, k0 > 0);
      }
    }
  }
}

void gemm(const Problem& p) {
  parallel_for((p.w->n + kPanel - 1) / kPanel, grain_for(kPanel * p.w->k * p.m), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) gemm_panel(p, t * kPanel);
  });
}

void qmatmul(const QMatmulArgs& a) {
  const int64_t m = a.m, k = a.w.k, n = a.w.n;
  if (m == 0 || n == 0) return;
  std::unique_ptr<float[]> xbuf, ybuf;
  Problem p{nullptr, m, a.ldx, &a.w, nullptr};
  FF_DTYPE_SWITCH(a.dtype, T, [&] {
    using E = typename Elem<T>::type;
    if (T == DType::f32) {
      p.x = static_cast<const float*>(a.x);
      p.y = static_cast<float*>(a.y);
    } else {
      xbuf.reset(new float[m * k]);
      ybuf.reset(new float[m * n]);
      for (int64_t r = 0; r < m; ++r) to_f32<T>(static_cast<const E*>(a.x) + r * a.ldx, xbuf.get() + r * k, k);
      p.x = xbuf.get();
      p.ldx = k;
      p.y = ybuf.get();
    }
  });
  if (m <= kMaxGemvRows) {
    gemv(p);
  } else {
    gemm(p);
  }
  FF_DTYPE_SWITCH(a.dtype, T, [&] {
    if (T != DType::f32) from_f32<T>(p.y, static_cast<typename Elem<T>::type*>(a.y), m * n);
  });
}

}  // namespace

const QuantKernels& quant_kernels() {
  static const QuantKernels k{qmatmul, quant_kmeans1d};
  return k;
}

}  // namespace FF_ISA_NS
}  // namespace ff
