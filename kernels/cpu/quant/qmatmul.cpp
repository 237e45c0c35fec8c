// Quantized matmul y = x @ W.T with W decoded inside the kernel, tile by tile.
//
// GEMV (m <= 8): each task owns kGemvRows rows of W; dense rows are decoded eight codes at a
// time (sixteen for byte codes in zmm) straight into registers and FMA'd with every x row.
// Pruned rows: with one or two x rows, x is compacted to each row's kept columns and dotted with
// the survivors' codes (gemv_compact, AVX2 and AVX-512); otherwise rows are expanded into an L1 buffer of
// kGemvChunk values first.
// GEMM: x is packed once into blocks of kMr rows, k-major per K chunk (pack_x). Each task owns a
// panel of kPanel rows of W; for every K chunk of kKc the panel is decoded and packed k-major in
// sub-panels of kNr columns (128 KB: L2), then a 6 x kNr register-blocked micro-kernel (16
// columns in ymm, 64 in zmm) sweeps all rows of x over it, accumulating into a contiguous panel
// of y copied out at the end. Work is split by fixed row counts of W, so results do not depend
// on the thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "kernels/cpu/quant/api.h"
#include "kernels/cpu/quant/decode.h"
#include "kernels/cpu/scratch.h"

namespace ff {
namespace FF_ISA_NS {

void quant_kmeans1d(const float* v, int64_t n, int k, float* centroids);  // kmeans.cpp

namespace {

using simd::f32x8;

constexpr int64_t kGemvRows = 16;
constexpr int64_t kGemvChunk = 512;
constexpr int64_t kPanel = 64;  // a whole number of kNr-column sub-panels
// K chunk of the GEMM. Each chunk ends in a load, add and store of the y tile, so longer chunks
// pay that less often: 512x4096 . 4096^2 4-bit (benchmarks/build_ab.py, 5 rounds) took 0.90x
// the time with 256 as with 128 (y written in place), and with y in a contiguous panel 512 took
// 0.97x the time of 256.
constexpr int64_t kKc = 512;
// GEMM register tile: kMr rows of x by kNr columns of W (6 x 16 in ymm registers; AVX-512
// builds 6 x 64 in zmm, 24 accumulators: a quarter of the loads and broadcasts per FMA).
#if defined(__AVX512F__)
constexpr int kMr = 6, kNr = 64;
#else
constexpr int kMr = 6, kNr = 16;
#endif
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

// How far ahead of the codes being read the GEMV touches W (bytes), into L2. The hardware
// prefetchers alone leave a decode-shaped 4-bit GEMV from memory at 15-16 GB/s on Zen 4 (2048 x
// 5632: 0.48 ms cold against 0.27 ms from cache); touching the codes 2 KiB ahead measured about
// 15% faster over the 1.1B model's shapes (/tmp diagnostic, alternating rounds). Every dense GEMV
// path does it (the pruned paths are bound by their compute). On a Sapphire Rapids class VM the
// 1 x 4096 . 4096^2 GEMV from memory took, without it / 2 KiB ahead into L1 (scratch, alternating
// rounds): int8 1.38 / 0.94 ms, 8-bit affine 2.06 / 1.09 ms, 4-bit LUT 1.88 / 0.76 ms; then 4 KiB
// ahead into L2 against 2 KiB into L1 (benchmarks/build_ab.py, 7 rounds): int8 0.80x, 4-bit LUT
// 0.90x, integer 4-bit affine 0.98-1.01x. (8 KiB into L2 and 4 KiB into L3 were slower; 6 KiB the
// same.)
constexpr int64_t kPrefetchAhead = 4096;

// Touches the code stream kPrefetchAhead bytes past `at` into L2 (a hint: it never faults).
FF_ALWAYS_INLINE void prefetch_codes(const uint8_t* at) { __builtin_prefetch(at + kPrefetchAhead, 0, 2); }
// ... or `ahead` bytes past it.
FF_ALWAYS_INLINE void prefetch_codes(const uint8_t* at, int64_t ahead) { __builtin_prefetch(at + ahead, 0, 2); }

// Codes per pass over a task's W rows (avx512 int8, 8-bit affine and 4-bit LUT GEMVs). x rows
// that do not fit L1 (MR K floats over 48 KiB) are taken in passes of equal parts (multiples of
// 64) of at most 32 KiB, each adding its partial dots to y: with x streaming from L2, 8 rows of
// K 4096 took 1.44x (4-bit LUT) and 1.63x (int8) the time per code of K 1024.
template <int MR>
int64_t l1_codes(int64_t k) {
  if (MR * k <= 12288) return k;
  const int64_t passes = (MR * k + 8191) / 8192;
  return ((k + passes - 1) / passes + 63) / 64 * 64;
}

template <int MR>
constexpr int unroll() {
  return MR == 1 ? 4 : MR == 2 ? 2 : 1;
}

// acc[r][u] += x_r[k + 8u] * v(k + 8u) over [k0, k1), steps of 8 * U; `codes` is the row's
// code stream of B-bit codes (element k at codes + k * B / 8), prefetched ahead.
template <int MR, int B, class V>
FF_ALWAYS_INLINE void dot_span(const Problem& p, const uint8_t* codes, int64_t k0, int64_t k1, const V& v,
                               f32x8 (&acc)[MR][unroll<MR>()]) {
  constexpr int U = unroll<MR>();
  for (int64_t k = k0; k < k1; k += 8 * U) {
    prefetch_codes(codes + k * B / 8);
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
      dot_span<MR, B>(p, stream + base * B / 8, g * span, (g + 1) * span, [&](int64_t k) __attribute__((always_inline)) { return quant::to_f32(quant::codes8<B>(stream, base + k)); },
                   gacc);
      const f32x8 s = simd::set1(sc[g]);
      for (int r = 0; r < MR; ++r) {
        acc[r] = simd::fmadd(sum_chains<MR>(gacc, r), s, acc[r]);
      }
    }
    for (int r = 0; r < MR; ++r) p.y[r * w.n + n] = simd::reduce_add(acc[r]) + dot(bi, xsum + r * groups, groups);
  }
}

#if defined(__AVX512F__)
// Byte codes (int8 when Signed, else uint8) of R W rows in 16 lanes: acc[j][r][u] += x_r[k + 16u]
// * code_j(k + 16u) over [k0, k1), steps of 16 * U: a third of the instructions per code of the
// 8-lane form. With R = 2 each x load feeds two W rows (with 4-8 x rows the loads of x, one per
// FMA, bound the one-row form).
template <int MR, int U, bool Signed, int R = 1>
FF_ALWAYS_INLINE void dot_bytes_wide(const Problem& p, const uint8_t* const (&codes)[R], int64_t k0, int64_t k1,
                                     __m512 (&acc)[R][MR][U], int64_t ahead = kPrefetchAhead) {
  for (int64_t k = k0; k < k1; k += 16 * U) {
    for (int j = 0; j < R; ++j) prefetch_codes(codes[j] + k, ahead);
    for (int u = 0; u < U; ++u) {
      __m512 wv[R];
      for (int j = 0; j < R; ++j) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes[j] + k + 16 * u));
        wv[j] = _mm512_cvtepi32_ps(Signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
      }
      for (int r = 0; r < MR; ++r) {
        const __m512 xv = _mm512_loadu_ps(p.x + r * p.ldx + k + 16 * u);
        for (int j = 0; j < R; ++j) acc[j][r][u] = _mm512_fmadd_ps(xv, wv[j], acc[j][r][u]);
      }
    }
  }
}

// 8-bit affine rows on 16 lanes: per group, the codes' dots with x (dot_bytes_wide, two chains
// of 16: groups are multiples of 32), scaled by the group's scale; plus the bias term.
// In passes over whole groups of K for x rows over 48 KiB (l1_codes), as the int8 GEMV.
template <int MR>
void gemv_affine8_wide(const Problem& p, const float* xsum, int64_t n0, int64_t n1) {
  constexpr int U = 2;
  const QWeight& w = *p.w;
  const int64_t groups = w.k / w.group;
  const int64_t part = std::max<int64_t>(1, l1_codes<MR>(w.k) / w.group);  // groups per pass
  const int64_t ahead = part == groups ? kPrefetchAhead : 2 * w.k;
  for (int64_t g0 = 0; g0 < groups; g0 += part) {
    const int64_t g1 = std::min(groups, g0 + part);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* codes = static_cast<const uint8_t*>(w.codes) + n * w.k;
      const float* sc = w.scales + n * groups;
      __m512 acc[MR];
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int64_t g = g0; g < g1; ++g) {
        __m512 gacc[1][MR][U];
        for (auto& row : gacc[0])
          for (auto& a : row) a = _mm512_setzero_ps();
        dot_bytes_wide<MR, U, false>(p, {codes}, g * w.group, (g + 1) * w.group, gacc, ahead);
        const __m512 s = _mm512_set1_ps(sc[g]);
        for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_add_ps(gacc[0][r][0], gacc[0][r][1]), s, acc[r]);
      }
      for (int r = 0; r < MR; ++r) {
        float& y = p.y[r * w.n + n];
        const float d = g0 == 0 ? _mm512_reduce_add_ps(acc[r]) : y + _mm512_reduce_add_ps(acc[r]);
        y = g1 < groups ? d : d + dot(w.biases + n * groups, xsum + r * groups, groups);
      }
    }
  }
}
#endif

// d[j][r] = x_r . q_j[k0, end) for R int8 rows q_j (R = 2 only in the avx512 builds) over the
// whole vector steps of [k0, k1) (codes prefetched `ahead` bytes on); returns end (the caller
// adds the tail). The generic and avx2 builds take k0 = 0, k1 = K.
template <int MR, int R>
FF_ALWAYS_INLINE int64_t int8_dots(const Problem& p, const int8_t* const (&q)[R], int64_t k0, int64_t k1,
                                   int64_t ahead, float (&d)[R][MR]) {
  constexpr int U = unroll<MR>();
#if defined(__AVX512F__)
  const int64_t body = k0 + (k1 - k0) / (16 * U) * (16 * U);
  __m512 acc[R][MR][U];
  for (auto& rows : acc)
    for (auto& row : rows)
      for (auto& a : row) a = _mm512_setzero_ps();
  const uint8_t* codes[R];
  for (int j = 0; j < R; ++j) codes[j] = reinterpret_cast<const uint8_t*>(q[j]);
  dot_bytes_wide<MR, U, true, R>(p, codes, k0, body, acc, ahead);
  for (int j = 0; j < R; ++j)
    for (int r = 0; r < MR; ++r) {
      __m512 s = acc[j][r][0];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[j][r][u]);
      d[j][r] = _mm512_reduce_add_ps(s);
    }
#else
  static_assert(R == 1, "two-row int8 dots are the avx512 builds'");
  (void)k0;
  (void)ahead;
  const int64_t body = k1 / (8 * U) * (8 * U);
  f32x8 acc[MR][U];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = simd::zero();
  const int8_t* q0 = q[0];
  dot_span<MR, 8>(p, reinterpret_cast<const uint8_t*>(q0), 0, body, [&](int64_t k) __attribute__((always_inline)) { return simd::load_i8(q0 + k); }, acc);
  for (int r = 0; r < MR; ++r) d[0][r] = simd::reduce_add(sum_chains<MR>(acc, r));
#endif
  return body;
}

// Int8 rows [n, n + R) over codes [k0, k1) of a pass (see l1_codes): y = scale * (x . q -
// zero_point * sum x) once the last pass (k1 = K) adds its part to those before, kept in y.
template <int MR, int R>
FF_ALWAYS_INLINE void int8_rows(const Problem& p, const float* xsum, int64_t n, int64_t k0, int64_t k1, int64_t ahead) {
  const QWeight& w = *p.w;
  const int8_t* q[R];
  for (int j = 0; j < R; ++j) q[j] = static_cast<const int8_t*>(w.codes) + (n + j) * w.k;
  float dots[R][MR];
  const int64_t body = int8_dots<MR, R>(p, q, k0, k1, ahead, dots);
  for (int j = 0; j < R; ++j) {
    const float zp = w.zero_points ? static_cast<float>(w.zero_points[n + j]) : 0.0f;
    for (int r = 0; r < MR; ++r) {
      float& y = p.y[r * w.n + n + j];
      float d = k0 == 0 ? dots[j][r] : y + dots[j][r];
      if (k1 < w.k) {
        y = d;
        continue;
      }
      for (int64_t k = body; k < w.k; ++k) d += p.x[r * p.ldx + k] * static_cast<float>(q[j][k]);
      y = w.scales[n + j] * (d - zp * xsum[r]);
    }
  }
}

// Two W rows at a time with four or more x rows in the avx512 builds (each x load feeds both),
// in passes over K there (l1_codes) with the codes prefetched from the same part two rows on.
template <int MR>
void gemv_int8(const Problem& p, const float* xsum, int64_t n0, int64_t n1) {
  const int64_t k = p.w->k;
#if defined(__AVX512F__)
  constexpr int R = MR >= 4 ? 2 : 1;
  const int64_t part = l1_codes<MR>(k);
#else
  constexpr int R = 1;
  const int64_t part = k;
#endif
  const int64_t ahead = part == k ? kPrefetchAhead : 2 * k;
  for (int64_t k0 = 0; k0 < k; k0 += part) {
    const int64_t k1 = std::min(k, k0 + part);
    int64_t n = n0;
    for (; n + R <= n1; n += R) int8_rows<MR, R>(p, xsum, n, k0, k1, ahead);
    for (; n < n1; ++n) int8_rows<MR, 1>(p, xsum, n, k0, k1, ahead);
  }
}

// LUT: v(k) decodes eight values of row n.
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
    dot_span<MR, B>(p, stream + base * B / 8, 0, body, [&](int64_t k) __attribute__((always_inline)) { return quant::lookup<B>(lut, quant::codes8<B>(stream, base + k)); }, acc);
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
  alignas(64) float buf[kGemvChunk];
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
// Pruned rows against one or two x rows, without expanding W: each x row is first compacted to
// the row's kept columns (vcompressps, 16 columns per step; AVX2, which has none: a permutation
// from a table per 8 columns), so the survivors' codes, which sit contiguous in the stream, are
// decoded eight at a time and dotted with it directly: no zeros multiplied, no buffer pass. Affine sums are split at the group boundaries
// (kept-column counts at every 32 columns), each scaled by its group's scale, with the bias
// times the group's kept x sum. Rows within 64 codes of the stream's end take gemv_buffered
// (the 8-byte code reads stay inside the stream).
constexpr int64_t kCompactSpan = 32;  // columns per boundary: affine groups are multiples of it

// True when gemv_compact takes this weight (else gemv_buffered does).
bool compact_fits(const QWeight& w, int64_t m) {
  return m <= 2 && w.k % 64 == 0 && (w.codes_kind != QCodes::affine || w.group % kCompactSpan == 0);
}

#if !defined(__AVX512F__)
// For each byte of mask bits, the lane order that puts its set lanes first (vpermps indices).
struct CompactOrder {
  alignas(32) int32_t lanes[256][8];
  CompactOrder() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int i = 0; i < 8; ++i)
        if (m >> i & 1) lanes[m][n++] = i;
      for (int i = n; i < 8; ++i) lanes[m][i] = 0;
    }
  }
};
const CompactOrder kCompactOrder;
#endif

// x_r's kept columns of one W row (its mask bits), for r < MR, into xc + r * ldxc (each store
// writes 16 lanes, 8 on AVX2: ldxc leaves 16 floats of room past k); at[t] = kept columns
// before column 32 t (t = 0 .. k / 32).
template <int MR>
FF_ALWAYS_INLINE void compact_x(const Problem& p, const uint8_t* mask, float* xc, int64_t ldxc, int64_t* at) {
  const int64_t k = p.w->k;
  int64_t kept = 0;
  for (int64_t c = 0; c < k; c += 64) {
    const uint64_t m = quant::load_le<uint64_t>(mask + c / 8);
    const uint64_t incl = quant::inclusive_counts(m), before = incl << 8;
    at[c / 32] = kept;
    at[c / 32 + 1] = kept + static_cast<int64_t>((before >> 32) & 0xff);
#if defined(__AVX512F__)
    for (int j = 0; j < 4; ++j) {
      const __mmask16 m16 = static_cast<__mmask16>(m >> (16 * j));
      const int64_t to = kept + static_cast<int64_t>((before >> (16 * j)) & 0xff);
      for (int r = 0; r < MR; ++r)
        _mm512_storeu_ps(xc + r * ldxc + to, _mm512_maskz_compress_ps(m16, _mm512_loadu_ps(p.x + r * p.ldx + c + 16 * j)));
    }
#else
    for (int j = 0; j < 8; ++j) {
      const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompactOrder.lanes[(m >> (8 * j)) & 0xff]));
      const int64_t to = kept + static_cast<int64_t>((before >> (8 * j)) & 0xff);
      for (int r = 0; r < MR; ++r)
        _mm256_storeu_ps(xc + r * ldxc + to, _mm256_permutevar8x32_ps(_mm256_loadu_ps(p.x + r * p.ldx + c + 8 * j), order));
    }
#endif
    kept += static_cast<int64_t>(incl >> 56);
  }
  at[k / 32] = kept;
}

// The first n (1..8) floats at p, the other lanes 0 (lanes past n are never read).
FF_ALWAYS_INLINE __m256 load_first(const float* p, int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes));
}

// acc[r] += xc_r[i] * v(i) over survivors [i0, i1) (i relative to the row's first survivor),
// eight at a time, the last step masked; with XSums also sx[r] += xc_r[i] (affine bias terms).
template <bool XSums, int MR, class Values>
FF_ALWAYS_INLINE void compact_dot(const float* xc, int64_t ldxc, int64_t i0, int64_t i1, const Values& v,
                                  __m256 (&acc)[MR], __m256 (&sx)[MR]) {
  auto step = [&](int64_t i, int64_t lanes) __attribute__((always_inline)) {
    const __m256 wv = v(i);
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = lanes == 8 ? _mm256_loadu_ps(xc + r * ldxc + i) : load_first(xc + r * ldxc + i, lanes);
      acc[r] = _mm256_fmadd_ps(xv, wv, acc[r]);
      if constexpr (XSums) sx[r] = _mm256_add_ps(sx[r], xv);
    }
  };
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) step(i, 8);
  if (i < i1) step(i, i1 - i);
}

template <int MR, int B>
void gemv_compact(const Problem& p, int64_t n0, int64_t n1) {
  const QWeight& w = *p.w;
  const int64_t k = w.k, count = w.row_offsets[w.n];
  const int64_t ldxc = k + 16;
  AlignedArray<float> xc = aligned_array<float>(MR * ldxc);
  AlignedArray<int64_t> at = aligned_array<int64_t>(k / kCompactSpan + 1);
  const uint8_t* stream = static_cast<const uint8_t*>(w.codes);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t first = w.row_offsets[n];
    if (w.codes_kind != QCodes::f32 && w.row_offsets[n + 1] + 64 > count) {
      gemv_buffered<MR>(p, n, n + 1);
      continue;
    }
    prefetch_codes(stream + (first * B) / 8);
    compact_x<MR>(p, w.mask + n * k / 8, xc.get(), ldxc, at.get());
    float out[MR] = {};
    __m256 acc[MR], sx[MR];
    for (int r = 0; r < MR; ++r) acc[r] = sx[r] = _mm256_setzero_ps();
    if (w.codes_kind == QCodes::affine) {
      const int64_t groups = k / w.group, per = w.group / kCompactSpan;
      const float* sc = w.scales + n * groups;
      const float* bi = w.biases + n * groups;
      __m256 ys[MR], yb[MR];
      for (int r = 0; r < MR; ++r) ys[r] = yb[r] = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        for (int r = 0; r < MR; ++r) acc[r] = sx[r] = _mm256_setzero_ps();
        compact_dot<true, MR>(xc.get(), ldxc, at[g * per], at[(g + 1) * per], [stream, first](int64_t i) __attribute__((always_inline)) {
          return quant::to_f32(quant::codes8_at<B>(stream, first + i)).v;
        }, acc, sx);
        for (int r = 0; r < MR; ++r) {
          ys[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(sc[g]), ys[r]);
          yb[r] = _mm256_fmadd_ps(sx[r], _mm256_set1_ps(bi[g]), yb[r]);
        }
      }
      for (int r = 0; r < MR; ++r) out[r] = simd::reduce_add({_mm256_add_ps(ys[r], yb[r])});
    } else if (w.codes_kind == QCodes::lut) {
      const float* lut = w.lut + ((n / w.group) << B);
      compact_dot<false, MR>(xc.get(), ldxc, 0, at[k / kCompactSpan], [lut, stream, first](int64_t i) __attribute__((always_inline)) {
        return quant::lookup<B>(lut, quant::codes8_at<B>(stream, first + i)).v;
      }, acc, sx);
      for (int r = 0; r < MR; ++r) out[r] = simd::reduce_add({acc[r]});
    } else {
      const float* values = static_cast<const float*>(w.codes) + first;
      const int64_t kept = at[k / kCompactSpan];
      compact_dot<false, MR>(xc.get(), ldxc, 0, kept, [values, kept](int64_t i) __attribute__((always_inline)) {
        return i + 8 <= kept ? _mm256_loadu_ps(values + i) : load_first(values + i, kept - i);
      }, acc, sx);
      for (int r = 0; r < MR; ++r) out[r] = simd::reduce_add({acc[r]});
    }
    for (int r = 0; r < MR; ++r) p.y[r * w.n + n] = out[r];
  }
}
#endif

// x in blocks of 2 Half elements, each as its Half even elements then its Half odd ones (the
// order of (b & 15, b >> 4) over Half code bytes): the 4-bit GEMVs' x, contiguous rows of K.
template <int Half>
AlignedArray<float> permuted_x(const Problem& p) {
  AlignedArray<float> out = aligned_array<float>(p.m * p.w->k);
  float* xp = out.get();
  for (int64_t r = 0; r < p.m; ++r)
    for (int64_t k = 0; k < p.w->k; k += 2 * Half)
      for (int i = 0; i < Half; ++i) {
        xp[r * p.w->k + k + i] = p.x[r * p.ldx + k + 2 * i];
        xp[r * p.w->k + k + Half + i] = p.x[r * p.ldx + k + 2 * i + 1];
      }
  return out;
}

#if defined(__AVX2__)
// 4-bit GEMV, AVX2: eight bytes hold sixteen codes; zero-extended to lanes, (b & 15) are the
// even elements and (b >> 4) the odd ones, so x is read in a per-16 permuted copy
// [x0 x2 .. x14 x1 x3 .. x15] (permuted_x<8>) and each code costs neither a broadcast nor a
// variable shift. `values(c)` maps eight codes (i32x8) to the fp32 factors (raw q for affine,
// LUT entries).

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
    prefetch_codes(b + at / 2);
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

#if defined(__AVX512F__)
// The same on zmm (AVX-512 builds, K % 32 == 0): sixteen bytes hold 32 codes, x is read in a
// per-32 permuted copy [x0 x2 .. x30 x1 x3 .. x31] (permuted_x<16>), and a 4-bit LUT row is one
// register, so each 16 codes cost one vpermps: half the instructions per code of the ymm form,
// whose 8-row GEMV ran at a fifth of the FMA peak.
//
// acc[r][c..c+1] += x_r . W over [0, k) for one W row of 4-bit codes mapped by the 16 entries of
// lut; with one or two x rows two steps interleave on separate accumulators (four chains per row).
template <int MR>
FF_ALWAYS_INLINE void dot_nibbles_wide(const float* xp, int64_t ldx, const uint8_t* b, int64_t k, __m512 lut,
                                       int64_t ahead, __m512 (&acc)[MR][4]) {
  const __m512i low = _mm512_set1_epi32(15);
  auto step = [&](const uint8_t* at, const float* x, int c) __attribute__((always_inline)) {
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
    const __m512 even = _mm512_permutexvar_ps(_mm512_and_si512(codes, low), lut);
    const __m512 odd = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), lut);
    for (int r = 0; r < MR; ++r) {
      acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx), even, acc[r][c]);
      acc[r][c + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + 16), odd, acc[r][c + 1]);
    }
  };
  int64_t i = 0;
  if (MR <= 2)
    for (; i + 64 <= k; i += 64, b += 32) {
      prefetch_codes(b, ahead);
      step(b, xp + i, 0), step(b + 16, xp + i + 32, 2);
    }
  for (; i < k; i += 32, b += 16) {
    prefetch_codes(b, ahead);
    step(b, xp + i, 0);
  }
}

template <int MR>
void gemv_lut_nibbles_wide(const Problem& p, const float* xp, int64_t n0, int64_t n1) {
  const QWeight& w = *p.w;
  const int64_t part = l1_codes<MR>(w.k);
  // the codes read next: further along the row, or (in passes) the same part two rows on
  const int64_t ahead = part == w.k ? kPrefetchAhead : w.k;
  for (int64_t k0 = 0; k0 < w.k; k0 += part) {
    const int64_t kc = std::min(part, w.k - k0);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* bytes = static_cast<const uint8_t*>(w.codes) + (n * w.k + k0) / 2;
      const __m512 lut = _mm512_loadu_ps(w.lut + ((n / w.group) << 4));
      __m512 acc[MR][4];
      for (auto& row : acc)
        for (auto& a : row) a = _mm512_setzero_ps();
      dot_nibbles_wide<MR>(xp + k0, w.k, bytes, kc, lut, ahead, acc);
      for (int r = 0; r < MR; ++r) {
        const float d = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
        p.y[r * w.n + n] = k0 == 0 ? d : p.y[r * w.n + n] + d;
      }
    }
  }
}
#endif

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

#if defined(__AVX2__)
// ---- 4-bit affine GEMV on exact integer dot products ----------------------------------------
// The codes are used as integers and x as integer parts per group, scaled by the group's max |x|
// (sx): x ~= sx * (sum of parts, each weighted by a power of the part's range). Each part's dot
// with the codes is exact in integer lanes, converted and scaled once per group by
// scales[g] * sx[g]. x is split into three int8 parts (split32); two forms take them, AVX-512
// VNNI (vpdpbusd) and AVX2 (vpmaddubsw), each described below with its layout of the parts. Both
// take MLX's group sizes and whole 64-code blocks; the fp32 nibble path stays for K % 64 != 0
// and for x the split cannot hold exactly (non-finite values, or a group whose max |x| is below
// 2^-100).
constexpr int64_t kSplitBlock = 64;

// The shapes the integer GEMVs take: MLX's group sizes, whole 64-code blocks.
bool split_fits(const QWeight& w) { return (w.group == 32 || w.group == 64 || w.group == 128) && w.k % kSplitBlock == 0; }

// sx[g] = max |x| over group g of one row of x, divided by `levels` (the largest first part);
// false if x holds an inf or NaN or a nonzero group is too small for its parts' scales.
bool group_scales(const float* x, int64_t k, int64_t group, float levels, float* sx) {
  const __m256 finite = _mm256_set1_ps(std::numeric_limits<float>::max());
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t g = 0; g < k / group; ++g) {
    __m256 m = _mm256_setzero_ps(), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int64_t i = g * group; i < (g + 1) * group; i += 8) {
      const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(a, finite, _CMP_LE_OQ));  // false for NaN
      m = _mm256_max_ps(m, a);
    }
    if (_mm256_movemask_ps(ok) != 0xFF) return false;
    const float amax = simd::reduce_max({m});
    if (amax != 0.f && amax < 0x1p-100f) return false;
    sx[g] = amax / levels;
  }
  return true;
}

// f[r * groups + g] = scales[g] * sx_r[g]: the factor of group g's integer sums, for one W row.
template <int MR>
FF_ALWAYS_INLINE void group_factors(const float* scales, const float* sx, int64_t groups, float* f) {
  for (int r = 0; r < MR; ++r) {
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8)
      simd::store(f + r * groups + g, simd::mul(simd::load(scales + g), simd::load(sx + r * groups + g)));
    for (; g < groups; ++g) f[r * groups + g] = scales[g] * sx[r * groups + g];
  }
}

// W rows [n0, n1) against the split x rows: Dot::row<MR, G> gives the MR dots x_r . q of one
// row from its codes and group factors; the bias term sum_g bias[g] * xsum_r[g] is added here.
template <class Dot, int MR, int G>
void gemv_affine4_int(const Problem& p, const typename Dot::Split& xs, const float* xsum, int64_t n0, int64_t n1) {
  const QWeight& w = *p.w;
  const int64_t k = w.k, groups = k / G;
  AlignedArray<float> factors = aligned_array<float>(MR * groups);
  for (int64_t n = n0; n < n1; ++n) {
    group_factors<MR>(w.scales + n * groups, xs.scale.get(), groups, factors.get());
    float dots[MR];
    Dot::template row<MR, G>(static_cast<const uint8_t*>(w.codes) + n * k / 2, xs, k, factors.get(), groups, dots);
    for (int r = 0; r < MR; ++r) p.y[r * w.n + n] = dots[r] + dot(w.biases + n * groups, xsum + r * groups, groups);
  }
}

// The integer GEMV if the shape fits and x splits exactly; false (nothing written) otherwise.
template <class Dot, int MR>
bool gemv_affine4_int_all(const Problem& p, const float* xsum) {
  typename Dot::Split xs;
  if (!split_fits(*p.w) || !Dot::split(p, p.w->group, xs)) return false;
  switch (p.w->group) {
    case 32: over_rows(p, [&](int64_t a, int64_t e) { gemv_affine4_int<Dot, MR, 32>(p, xs, xsum, a, e); }); break;
    case 64: over_rows(p, [&](int64_t a, int64_t e) { gemv_affine4_int<Dot, MR, 64>(p, xs, xsum, a, e); }); break;
    default: over_rows(p, [&](int64_t a, int64_t e) { gemv_affine4_int<Dot, MR, 128>(p, xs, xsum, a, e); }); break;
  }
  return true;
}

// x is split per group into three int8 parts, x ~= sx * (p0 + p1 / 254 + p2 / 254^2) with
// |p_i| <= 127 and sx = max|x| / 127: an error of at most sx / (2 * 254^2) ~ max|x| * 2^-24 per
// element, the fp32 rounding of the group's largest element. The codes meet the parts as
// unsigned bytes (AVX2: vpmaddubsw; AVX-512 VNNI: vpdpbusd).
// The int8 of 8 rounded, clamped fp32 lanes as int32 lanes.
FF_ALWAYS_INLINE __m256i part8(__m256 v) {
  const __m256 top = _mm256_set1_ps(127.f), bottom = _mm256_set1_ps(-127.f);
  return _mm256_cvtps_epi32(_mm256_min_ps(top, _mm256_max_ps(bottom, _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))));
}

// Splits 32 consecutive elements of x (one group, scale sx) into three parts, each 32 bytes in
// natural order.
FF_ALWAYS_INLINE void split32(const float* x, float sx, __m256i (&parts)[3]) {
  const float to0 = sx == 0.f ? 0.f : 1.f / sx, to1 = to0 * 254.f, to2 = to1 * 254.f;
  const __m256 s0 = _mm256_set1_ps(sx), s1 = _mm256_set1_ps(sx / 254.f);
  __m256i q[3][4];
  for (int i = 0; i < 4; ++i) {
    const __m256 v = _mm256_loadu_ps(x + 8 * i);
    const __m256 p0 = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(to0)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r1 = _mm256_fnmadd_ps(p0, s0, v);  // |r1| <= sx / 2
    const __m256 p1 = _mm256_round_ps(_mm256_mul_ps(r1, _mm256_set1_ps(to1)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r2 = _mm256_fnmadd_ps(p1, s1, r1);  // |r2| <= sx / 508
    q[0][i] = part8(p0);
    q[1][i] = part8(p1);
    q[2][i] = part8(_mm256_mul_ps(r2, _mm256_set1_ps(to2)));
  }
  // int32 -> int8 within 128-bit lanes, then the dwords back in order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int j = 0; j < 3; ++j) {
    const __m256i a = _mm256_packs_epi32(q[j][0], q[j][1]), b = _mm256_packs_epi32(q[j][2], q[j][3]);
    parts[j] = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
  }
}

// Writes 64 bytes (two halves in natural order) as their 32 even ones at `even` and their 32 odd
// ones at `odd`.
FF_ALWAYS_INLINE void store_even_odd(__m256i a, __m256i b, int8_t* even, int8_t* odd) {
  // per 128-bit lane: the 8 even bytes, then the 8 odd ones
  const __m256i lanes = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i ea = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(a, lanes), 0xD8);  // evens | odds
  const __m256i eb = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, lanes), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(even), _mm256_permute2x128_si256(ea, eb, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(odd), _mm256_permute2x128_si256(ea, eb, 0x31));
}

// x split for the integer GEMVs: per row, three parts of kp bytes each, then sx per group.
struct Int8Split {
  AlignedArray<int8_t> parts;  // [m][3][kp], permuted per block or superblock
  AlignedArray<float> scale;   // sx [m, k / group]
};

// Splits the m rows of x (split32); 64-element block b's 32 even elements go to byte even_at(b)
// of each part and its 32 odd ones odd_gap bytes after them, each part's last `zero_tail` bytes
// zeroed first. False (and the fp32 path runs) where the split would not be exact.
template <class EvenAt>
bool split_x(const Problem& p, int64_t group, int64_t kp, int64_t odd_gap, int64_t zero_tail, const EvenAt& even_at,
             Int8Split& out) {
  const int64_t k = p.w->k, groups = k / group;
  out.parts = aligned_array<int8_t>(p.m * 3 * kp);
  out.scale = aligned_array<float>(p.m * groups);
  for (int64_t r = 0; r < p.m; ++r) {
    const float* x = p.x + r * p.ldx;
    const float* sx = out.scale.get() + r * groups;
    if (!group_scales(x, k, group, 127.f, out.scale.get() + r * groups)) return false;
    int8_t* dst = out.parts.get() + r * 3 * kp;
    for (int j = 0; zero_tail > 0 && j < 3; ++j) std::memset(dst + j * kp + kp - zero_tail, 0, zero_tail);
    for (int64_t b = 0; b < k; b += kSplitBlock) {
      __m256i lo[3], hi[3];  // elements [b, b + 32) and [b + 32, b + 64)
      split32(x + b, sx[b / group], lo);
      split32(x + b + 32, sx[(b + 32) / group], hi);
      int8_t* even = dst + even_at(b);
      for (int j = 0; j < 3; ++j) store_even_odd(lo[j], hi[j], even + j * kp, even + j * kp + odd_gap);
    }
  }
  return true;
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// AVX-512 VNNI: vpdpbusd multiplies 64 unsigned codes by 64 signed parts of x and adds each four
// neighbouring products into a 32-bit lane, exact over any group. x is laid out per 128-code
// superblock as its 64 even elements, then its 64 odd ones (per part), matching (byte & 15,
// byte >> 4) of 64 code bytes; a last superblock of 64 codes is zero-padded. Per 128 codes: 3 ops
// to decode, 2 per part, and 3 converts and FMAs per row, against 14 and 8 for two int16 parts on
// vpdpwssd (x ~= sx (hi + lo / 65536), exact to 2^-32), all on the port 0 that bounds this loop
// on the Sapphire Rapids class VM: from memory, 4096^2 group 64 took 0.94x the time with one x
// row and 0.85x with three (scratch A/B, 5 rounds). A superblock holds 128 / G groups, their
// sums in lanes of 16 G / 128.
constexpr int64_t kSuperBlock = 2 * kSplitBlock;
// GCC 12 flags _mm512_undefined_ps() inside its own intrinsics as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

struct BusdDot {
  using Split = Int8Split;

  static int64_t padded(int64_t k) { return (k + kSuperBlock - 1) / kSuperBlock * kSuperBlock; }

  // The split in superblocks; a last half one's missing half meets zero codes: zero parts.
  static bool split(const Problem& p, int64_t group, Split& out) {
    const int64_t k = p.w->k, kp = padded(k);
    return split_x(p, group, kp, kSplitBlock, kp > k ? kSuperBlock : 0,
                   [](int64_t b) { return b / kSuperBlock * kSuperBlock + b % kSuperBlock / 2; }, out);
  }

  // The factors of a superblock's groups from fr (fr[0] for its first) in their lanes; `half`:
  // a last superblock of 64 codes, whose groups stop at its middle.
  template <int64_t kPerBlock>
  static FF_ALWAYS_INLINE __m512 lane_factors(const float* fr, bool half) {
    if constexpr (kPerBlock == 1) {
      return _mm512_set1_ps(fr[0]);
    } else if constexpr (kPerBlock == 2) {
      return half ? _mm512_set1_ps(fr[0]) : _mm512_mask_broadcastss_ps(_mm512_set1_ps(fr[0]), 0xFF00, _mm_load_ss(fr + 1));
    } else {
      const __m512i quarter = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2);
      const __m128 four = half ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(fr))) : _mm_loadu_ps(fr);
      return _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(four));
    }
  }

  // acc[r][i] += part i of x row r . the superblock's codes w (zero past a half superblock),
  // scaled by its groups' factors.
  template <int MR, int G>
  static FF_ALWAYS_INLINE void superblock(__m512i w, const int8_t* x, int64_t kp, const float* f, int64_t groups,
                                          bool half, __m512 (&acc)[MR][3]) {
    const __m512i low = _mm512_set1_epi8(15);
    const __m512i even = _mm512_and_si512(w, low), odd = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
    for (int r = 0; r < MR; ++r) {
      const __m512 fg = lane_factors<kSuperBlock / G>(f + r * groups, half);
      for (int i = 0; i < 3; ++i) {
        const int8_t* xi = x + (r * 3 + i) * kp;
        __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(xi));
        sum = _mm512_dpbusd_epi32(sum, odd, _mm512_loadu_si512(xi + kSplitBlock));
        acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), fg, acc[r][i]);
      }
    }
  }

  // One W row's dots with MR x rows, for groups of G codes (see above).
  template <int MR, int G>
  static FF_ALWAYS_INLINE void row(const uint8_t* bytes, const Split& xs, int64_t k, const float* f, int64_t groups,
                                   float* dots) {
    rows<MR, G>(bytes, xs.parts.get(), k, f, groups, dots);
  }

  // ... from the parts x of the first of them, at most kPassRows x rows per pass over the codes
  // (their 3 kPassRows accumulators stay in registers). From memory (4096^2 and 2048x5632,
  // groups 32 and 64, scratch A/B 5 rounds), 8 rows took 0.86-0.88x the time in two passes of 4
  // as in one; 7 rows in one pass 0.94-0.95x of passes of 4 and 3, 5 rows 0.93-0.96x of 4 and 1.
  static constexpr int kPassRows = 7;
  template <int MR, int G>
  static FF_ALWAYS_INLINE void rows(const uint8_t* bytes, const int8_t* x, int64_t k, const float* f, int64_t groups,
                                    float* dots) {
    const int64_t kp = padded(k), whole = k / kSuperBlock * kSuperBlock;
    if constexpr (MR > kPassRows) {  // two passes of about half the rows each
      constexpr int kFirst = (MR + 1) / 2;
      rows<kFirst, G>(bytes, x, k, f, groups, dots);
      return rows<MR - kFirst, G>(bytes, x + kFirst * 3 * kp, k, f + kFirst * groups, groups, dots + kFirst);
    }
    __m512 acc[MR][3];
    for (auto& a : acc) a[0] = a[1] = a[2] = _mm512_setzero_ps();
    for (int64_t at = 0; at < whole; at += kSuperBlock, bytes += kSuperBlock / 2) {
      prefetch_codes(bytes);
      superblock<MR, G>(_mm512_loadu_si512(bytes), x + at, kp, f + at / G, groups, false, acc);
    }
    if (whole < k)  // 64 codes: the load stops at the row's end
      superblock<MR, G>(_mm512_maskz_loadu_epi8(0xFFFFFFFFull, bytes), x + whole, kp, f + whole / G, groups, true, acc);
    const __m512 w1 = _mm512_set1_ps(1.f / 254.f), w2 = _mm512_set1_ps(1.f / (254.f * 254.f));
    for (int r = 0; r < MR; ++r)
      dots[r] = _mm512_reduce_add_ps(_mm512_fmadd_ps(acc[r][2], w2, _mm512_fmadd_ps(acc[r][1], w1, acc[r][0])));
  }
};
using IntDot = BusdDot;
constexpr int kIntDotMaxRows = kMaxGemvRows;
#pragma GCC diagnostic pop
#elif defined(__AVX2__)
// AVX2: vpmaddubsw multiplies 32 unsigned codes by 32 signed parts of x and adds neighbouring
// products into 16-bit lanes (vpmaddwd + vpaddd on int16 parts measured no faster than the fp32
// nibble path). x is laid out per 64-code block as its 32 even elements, then its 32 odd ones
// (per part). Lanes stay 16-bit over a group (|lane| <= 2 * 15 * 127 per instruction, two per
// block: <= 15240 for groups of 128) and are widened, converted and scaled once per group. Per
// 64 codes: 4 ops to decode, 4 per part, and 9 per group: from cache, 4.5 cycles per 32 codes
// against 7.5 for the fp32 nibble path (Zen 3 class, one thread, /tmp microbenchmark).
// One x row per pass: the fp32 nibble path shares its decode over several rows.

struct ByteDot {
  using Split = Int8Split;

  static bool split(const Problem& p, int64_t group, Split& out) {
    return split_x(p, group, p.w->k, 32, 0, [](int64_t b) { return b; }, out);
  }

  // One W row's dot with one x row (MR = 1), groups of G codes: G = 64 and 128 are one and two
  // blocks per group; a block's two groups of 32 sit in 32-bit lanes 0-3 and 4-7.
  template <int MR, int G>
  static FF_ALWAYS_INLINE void row(const uint8_t* bytes, const Split& xs, int64_t k, const float* f, int64_t groups,
                                   float* dots) {
    static_assert(MR == 1, "one x row per pass");
    constexpr int64_t kBlocks = G >= kSplitBlock ? G / kSplitBlock : 1, kGroups = G >= kSplitBlock ? 1 : kSplitBlock / G;
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const int8_t* x = xs.parts.get();
    __m256 acc[3];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g += kGroups) {
      prefetch_codes(bytes);
      __m256i s[3];
      for (auto& v : s) v = _mm256_setzero_si256();
      for (int64_t j = 0; j < kBlocks; ++j, bytes += kSplitBlock / 2, x += kSplitBlock) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
        const __m256i even = _mm256_and_si256(w, low), odd = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
        for (int i = 0; i < 3; ++i) {
          const int8_t* xi = x + i * k;
          const __m256i pe = _mm256_maddubs_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi)));
          const __m256i po = _mm256_maddubs_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi + 32)));
          s[i] = _mm256_add_epi16(s[i], _mm256_add_epi16(pe, po));
        }
      }
      const __m256 fg = kGroups == 2 ? _mm256_setr_m128(_mm_set1_ps(f[g]), _mm_set1_ps(f[g + 1])) : _mm256_set1_ps(f[g]);
      for (int i = 0; i < 3; ++i) acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s[i], ones)), fg, acc[i]);
    }
    const __m256 t = _mm256_fmadd_ps(acc[2], _mm256_set1_ps(1.f / (254.f * 254.f)), _mm256_fmadd_ps(acc[1], _mm256_set1_ps(1.f / 254.f), acc[0]));
    dots[0] = simd::reduce_add({t});
  }
};
using IntDot = ByteDot;
constexpr int kIntDotMaxRows = 1;
#endif

template <int MR, int B>
void gemv_affine_all(const Problem& p) {
  const QWeight& w = *p.w;
  AlignedArray<float> xsum = aligned_array<float>(p.m * (w.k / w.group));
  x_group_sums(p, w.group, xsum.get());
  const float* xs = xsum.get();
#if defined(__AVX2__)
  if constexpr (B == 4 && MR <= kIntDotMaxRows)
    if (gemv_affine4_int_all<IntDot, MR>(p, xs)) return;
#endif
#if defined(__AVX2__)
  if (B == 4) {  // group sizes are multiples of 16
    const AlignedArray<float> xperm = permuted_x<8>(p);
    const float* xp = xperm.get();
    return over_rows(p, [&](int64_t a, int64_t e) { gemv_affine_nibbles<MR>(p, xp, xs, a, e); });
  }
#endif
#if defined(__AVX512F__)
  if (B == 8 && w.group % 32 == 0)
    return over_rows(p, [&](int64_t a, int64_t e) { gemv_affine8_wide<MR>(p, xs, a, e); });
#endif
  over_rows(p, [&](int64_t a, int64_t e) { gemv_affine<MR, B>(p, xs, a, e); });
}

template <int MR, int B>
void gemv_lut_all(const Problem& p) {
#if defined(__AVX512F__)
  if (B == 4 && p.w->k % 32 == 0) {
    const AlignedArray<float> xperm = permuted_x<16>(p);
    const float* xp = xperm.get();
    return over_rows(p, [&](int64_t a, int64_t e) { gemv_lut_nibbles_wide<MR>(p, xp, a, e); });
  }
#endif
#if defined(__AVX2__)
  if (B == 4 && p.w->k % 16 == 0) {
    const AlignedArray<float> xperm = permuted_x<8>(p);
    const float* xp = xperm.get();
    return over_rows(p, [&](int64_t a, int64_t e) { gemv_lut_nibbles<MR>(p, xp, a, e); });
  }
#endif
  over_rows(p, [&](int64_t a, int64_t e) { gemv_lut<MR, B>(p, a, e); });
}

template <int MR>
void gemv_int8_all(const Problem& p) {
  AlignedArray<float> xsum = aligned_array<float>(p.m);
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
#if defined(__AVX2__)
  if constexpr (MR <= 2) {
    if (w.mask && compact_fits(w, p.m)) {
      return quant::bits_switch(w.codes_kind == QCodes::f32 ? 8 : w.bits, [&](auto b) {
        over_rows(p, [&](int64_t a, int64_t e) { gemv_compact<MR, decltype(b)::value>(p, a, e); });
      });
    }
  }
#endif
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
// y[0:MR, 0:cols] (+)= A @ B over kc: A packed k-major [kc][MR] (pack_x), B [kc][kNr] (pack_panel).
#if defined(__AVX512F__)
template <int MR>
void micro_kernel(const float* a, const float* b, int64_t kc, float* y, int64_t ldy, int cols, bool accumulate) {
  constexpr int NV = kNr / 16;
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 bv[NV];
    for (int u = 0; u < NV; ++u) bv[u] = _mm512_loadu_ps(b + k * kNr + 16 * u);
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(a[k * MR + r]);
      for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_fmadd_ps(ar, bv[u], acc[r][u]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* yr = y + r * ldy;
    for (int u = 0; u < NV; ++u) {
      const int live = cols - 16 * u;
      if (live <= 0) break;
      const __mmask16 m = live >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << live) - 1);
      __m512 out = acc[r][u];
      if (accumulate) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(m, yr + 16 * u));
      _mm512_mask_storeu_ps(yr + 16 * u, m, out);
    }
  }
}
#else
template <int MR>
void micro_kernel(const float* a, const float* b, int64_t kc, float* y, int64_t ldy, int cols, bool accumulate) {
  f32x8 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = simd::zero();
  for (int64_t k = 0; k < kc; ++k) {
    const f32x8 b0 = simd::load(b + k * kNr), b1 = simd::load(b + k * kNr + 8);
    for (int r = 0; r < MR; ++r) {
      const f32x8 ar = simd::set1(a[k * MR + r]);
      acc[r][0] = simd::fmadd(ar, b0, acc[r][0]);
      acc[r][1] = simd::fmadd(ar, b1, acc[r][1]);
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
      alignas(64) float out[kNr];
      simd::store(out, acc[r][0]);
      simd::store(out + 8, acc[r][1]);
      for (int c = 0; c < cols; ++c) yr[c] = accumulate ? yr[c] + out[c] : out[c];
    }
  }
}
#endif

using MicroFn = void (*)(const float*, const float*, int64_t, float*, int64_t, int, bool);
constexpr MicroFn kMicro[kMr + 1] = {nullptr,          micro_kernel<1>, micro_kernel<2>, micro_kernel<3>,
                                     micro_kernel<4>, micro_kernel<5>, micro_kernel<6>};

// Decodes rows [n0, n0 + rows) x [k0, k0 + kc) into sub-panels of kNr columns, k-major: eight
// rows at a time into a row-major buffer, then 8 x 8 blocks transposed in registers (a scalar
// scatter with a kNr stride cost a fifth of the GEMM's time). Rows past `rows` are 0.
void pack_panel(const QWeight& w, int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* packed) {
  alignas(64) float buf[8 * kKc];
  const int64_t padded = (rows + kNr - 1) / kNr * kNr;
  const int64_t kc8 = kc / 8 * 8;
  for (int64_t j0 = 0; j0 < padded; j0 += 8) {
    for (int64_t i = 0; i < 8; ++i) {
      float* row = buf + i * kKc;
      if (j0 + i < rows) {
        quant::decode_row(w, n0 + j0 + i, k0, kc, row);
      } else {
        for (int64_t k = 0; k < kc; ++k) row[k] = 0.0f;
      }
    }
    float* dst = packed + (j0 / kNr) * kc * kNr + (j0 % kNr);
    for (int64_t k = 0; k < kc8; k += 8) {
      f32x8 blk[8];
      for (int i = 0; i < 8; ++i) blk[i] = simd::load(buf + i * kKc + k);
      simd::transpose8x8(blk);
      for (int i = 0; i < 8; ++i) simd::store(dst + (k + i) * kNr, blk[i]);
    }
    for (int64_t k = kc8; k < kc; ++k)
      for (int64_t i = 0; i < 8; ++i) dst[k * kNr + i] = buf[i * kKc + k];
  }
}

// dst[i * mr + r] = x[r * ldx + i] for r < mr (<= 8), i < kc: eight columns at a time through
// an in-register transpose, each column stored as 8 floats whose last 8 - mr the next columns
// overwrite (the columns whose 8 would pass the block's end store only their mr).
void pack_x_block(const float* x, int64_t ldx, int64_t mr, int64_t kc, float* dst) {
  static_assert(kMr <= 8, "a block's rows are one column vector");
  int64_t i = 0;
  for (; i + 8 <= kc; i += 8) {
    f32x8 col[8];
    for (int64_t r = 0; r < 8; ++r) col[r] = r < mr ? simd::load(x + r * ldx + i) : simd::zero();
    simd::transpose8x8(col);
    for (int64_t j = 0; j < 8; ++j) {
      if ((i + j) * mr + 8 <= kc * mr) {
        simd::store(dst + (i + j) * mr, col[j]);
      } else {
        simd::store_partial(dst + (i + j) * mr, col[j], static_cast<int>(mr));
      }
    }
  }
  for (; i < kc; ++i)
    for (int64_t r = 0; r < mr; ++r) dst[i * mr + r] = x[r * ldx + i];
}

// x packed for the micro-kernel: per K chunk of kKc (at offset m * k0), per block of kMr rows (at
// m0 * kc within it; the last block has the rows left), element (k, r) at k * rows + r. The
// micro-kernel then broadcasts from one contiguous stream instead of kMr rows K floats apart
// (every W panel sweeps all of x: from L2/L3, not L1).
void pack_x(const Problem& p, float* xp) {
  const int64_t k = p.w->k;
  parallel_for((k + kKc - 1) / kKc, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t k0 = c * kKc, kc = std::min(kKc, k - k0);
      for (int64_t m0 = 0; m0 < p.m; m0 += kMr) {
        const int64_t mr = std::min<int64_t>(kMr, p.m - m0);
        pack_x_block(p.x + m0 * p.ldx + k0, p.ldx, mr, kc, xp + p.m * k0 + m0 * kc);
      }
    }
  });
}

// The panel's y columns accumulate in a contiguous [m][kPanel] buffer, copied to y at the end:
// y's rows are N floats apart, so the tiles of one panel fall in the same few cache sets.
void gemm_panel(const Problem& p, const float* xp, int64_t n0, float* packed, float* ypanel) {
  const QWeight& w = *p.w;
  const int64_t rows = std::min(kPanel, w.n - n0);
  for (int64_t k0 = 0; k0 < w.k; k0 += kKc) {
    const int64_t kc = std::min(kKc, w.k - k0);
    pack_panel(w, n0, rows, k0, kc, packed);
    for (int64_t s = 0; s * kNr < rows; ++s) {
      const int cols = static_cast<int>(std::min<int64_t>(kNr, rows - s * kNr));
      for (int64_t m0 = 0; m0 < p.m; m0 += kMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, p.m - m0));
        kMicro[mr](xp + p.m * k0 + m0 * kc, packed + s * kc * kNr, kc, ypanel + m0 * kPanel + s * kNr, kPanel, cols,
                   k0 > 0);
      }
    }
  }
  for (int64_t r = 0; r < p.m; ++r)
    std::copy(ypanel + r * kPanel, ypanel + r * kPanel + rows, p.y + r * w.n + n0);
}

void gemm(const Problem& p) {
  AlignedArray<float> xp = aligned_array<float>(p.m * p.w->k);
  pack_x(p, xp.get());
  parallel_for((p.w->n + kPanel - 1) / kPanel, grain_for(kPanel * p.w->k * p.m), [&](int64_t b, int64_t e) {
    AlignedArray<float> packed = aligned_array<float>(kKc * kPanel), ypanel = aligned_array<float>(p.m * kPanel);
    for (int64_t t = b; t < e; ++t) gemm_panel(p, xp.get(), t * kPanel, packed.get(), ypanel.get());
  });
}

// Whether x[0..k) holds no infinity or NaN (exponent bits all ones).
inline bool all_finite(const float* x, int64_t k) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < k; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, sizeof u);
    bad |= (u & 0x7f800000u) == 0x7f800000u;
  }
  return bad == 0;
}

// Outputs the fast paths cannot be trusted with, recomputed as plain dot products over W's
// decoded rows (in double: a product of floats is exact there, and the sum does not overflow
// on the way to a result float holds):
//  * every output of a row of x with an infinity or a NaN. IEEE arithmetic gives such a row
//    +-inf wherever its infinities meet weights of one sign and NaN where infinities of both
//    signs meet, one meets a zero weight or x has a NaN (x @ W.T in float64, the reference).
//    The factored affine / int8 sums (scale * sum x q + bias * sum x) met inf * 0 or inf - inf
//    in most columns and gave NaN, and the compacted pruned GEMV never reads x at pruned
//    columns, so a NaN or inf there was lost at 1-2 rows and not at 3;
//  * a non-finite output of a finite row: those factored sums overflow first (sum x q runs up
//    to 255x past the result: x ~ 1e36 gave -inf where y = 6.4e37).
// Rare, so scalar sums, each W row decoded once for all the outputs that need it. GEMV rows
// only: the GEMM multiplies W's decoded values as x @ W.T does (and scanning its x and y took
// 512 x 4096 @ 4096^2 2-5% longer).
void redo_non_finite(const Problem& p) {
  const QWeight& w = *p.w;
  const int64_t k = w.k, n = w.n;
  std::vector<int64_t> whole_rows, cells;  // cells: r * n + j
  for (int64_t r = 0; r < p.m; ++r) {
    if (!all_finite(p.x + r * p.ldx, k)) {
      whole_rows.push_back(r);
      continue;
    }
    const float* y = p.y + r * n;
    if (all_finite(y, n)) continue;
    for (int64_t j = 0; j < n; ++j)
      if (!std::isfinite(y[j])) cells.push_back(r * n + j);
  }
  if (whole_rows.empty() && cells.empty()) return;
  std::sort(cells.begin(), cells.end(), [n](int64_t a, int64_t b) { return a % n < b % n; });
  AlignedArray<float> wrow = aligned_array<float>(k);
  auto dot = [&](int64_t r) {
    const float* x = p.x + r * p.ldx;
    double acc = 0.0;
    for (int64_t i = 0; i < k; ++i) acc += static_cast<double>(x[i]) * wrow[i];
    return static_cast<float>(acc);
  };
  auto cell = cells.begin();
  for (int64_t j = 0; j < n; ++j) {
    const bool needed = !whole_rows.empty() || (cell != cells.end() && *cell % n == j);
    if (!needed) continue;
    quant::decode_row(w, j, 0, k, wrow.get());
    for (const int64_t r : whole_rows) p.y[r * n + j] = dot(r);
    for (; cell != cells.end() && *cell % n == j; ++cell) p.y[*cell] = dot(*cell / n);
  }
}

void qmatmul(const QMatmulArgs& a) {
  const int64_t m = a.m, k = a.w.k, n = a.w.n;
  if (m == 0 || n == 0) return;
  AlignedArray<float> xbuf, ybuf;
  Problem p{nullptr, m, a.ldx, &a.w, nullptr};
  FF_DTYPE_SWITCH(a.dtype, T, [&] {
    using E = typename Elem<T>::type;
    if (T == DType::f32) {
      p.x = static_cast<const float*>(a.x);
      p.y = static_cast<float*>(a.y);
    } else {
      xbuf = aligned_array<float>(m * k);
      ybuf = aligned_array<float>(m * n);
      for (int64_t r = 0; r < m; ++r) to_f32<T>(static_cast<const E*>(a.x) + r * a.ldx, xbuf.get() + r * k, k);
      p.x = xbuf.get();
      p.ldx = k;
      p.y = ybuf.get();
    }
  });
  if (m <= kMaxGemvRows) {
    gemv(p);
    redo_non_finite(p);  // (the GEMM multiplies decoded W values: IEEE's own answer already)
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
