// Register-blocked micro-kernels of the flash-attention forward, on the f32x8 abstraction.
//
// Two shapes of work:
//  * many query rows (prefill): K tile packed transposed as fp32 Kt[D][kKeyTile]; S = Q Kt is
//    a small GEMM with kMr rows x 16 keys of accumulators (broadcast q, vector of keys). V is
//    read as fp32 rows (packed when the storage type is not fp32 or D is not a multiple of 16);
//    O += P V keeps kMr rows x 16 columns of O in registers while it walks the keys. Callers
//    loop column blocks outside and row blocks inside, so the 16-wide slice of Kt or V a tile
//    reads (8 KiB / 4 KiB at D = 128) stays in L1 across the row blocks.
//  * few query rows (decode): K and V are streamed from their storage once, converted on the
//    fly (bf16 in the split order, split16); S rows are dot products over D (one fp32 row: a
//    row x 8 keys of accumulators, else kDotRows rows x 2 keys); O += P V reads each V vector
//    once for kDotRows rows (pv_stream), or walks V a row at a time (pv_stream_rows: one row,
//    or short fp32 blocks; D a multiple of 64). AVX-512 builds have a wide form (qk_wide,
//    pv_wide): whole rows of O in zmm registers.
// Every function on f32x8 is the same algorithm on all backends (generic is the AVX2 oracle).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels/cpu/simd/vec.h"

namespace ff {
namespace FF_ISA_NS {
namespace attention {

using simd::f32x8;

constexpr int kKeyTile = 64;   // keys per K/V tile
constexpr int kMr = 6;         // query rows per register block (prefill)
constexpr int kDotRows = 4;    // query rows per register block (decode)
constexpr int kMaxHeadDim = 256;

// Keys per column panel of the packed K tile, and columns per panel of the packed V tile of
// the ymm prefill tiles. A 6x16 register tile reads a 16-key (16-column) slice; as a
// contiguous panel its rows are one stream of lines instead of lines 256 B apart (measured
// 3-5% faster on D128 prefill on a Zen 3 class AVX2 machine). V is packed in panels where it
// is packed anyway (fp16/bf16) and where its rows are a multiple of 512 bytes apart (attend);
// other fp32 V is read in place (packing contiguous D64 rows measured 1.05-1.07x slower). The
// zmm tiles of AVX-512 builds read whole 64-key rows, so there a K panel is the whole tile,
// and V is packed in panels of 64 columns (pack_v_wide) whatever its storage type: at D128
// the 64-column halves of fp32 V rows in place (256 B of every 512) made B1 H8 L2048 D128
// prefill 1.02x slower than packing them.
#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int kKPanel = kKeyTile;
#else
constexpr int kKPanel = 16;
#endif
constexpr int kVPanel = 16;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The online-softmax state of a block's rows: running max m, running sum l, and the factor
// alpha the accumulator of each row is rescaled by for the current tile.
struct RowState {
  float* m = nullptr;
  float* l = nullptr;
  float* alpha = nullptr;
  int64_t keys = 0;  // the tile's keys: score columns from here on are padding, not keys
  // On tiles the causal diagonal or the window's edge crosses: each row's keys [lo, hi) of the
  // tile (counted from its start, within [0, keys]); the others are -inf. Null elsewhere.
  const int32_t* lo = nullptr;
  const int32_t* hi = nullptr;
  // With a mask contiguous along the keys: each row's mask at the tile's first key, bool keep
  // (nonzero = attend) or additive (added in base 2). Null without one.
  const uint8_t* const* keep = nullptr;
  const float* const* add = nullptr;
  RowState offset(int64_t r) const {
    return {m + r, l + r, alpha + r, keys, lo ? lo + r : nullptr, hi ? hi + r : nullptr,
            keep ? keep + r : nullptr, add ? add + r : nullptr};
  }
};

// One row's mask over a tile's keys, read where it is contiguous along the keys: keep bytes
// (non-zero keeps) or fp32 values added to the scaled scores (natural-log units); both null
// without a mask (the AMX tiles' softmax_amx_row).
struct MaskRow {
  const uint8_t* keep = nullptr;
  const float* add = nullptr;
};

// An additive mask entry in the kernels' base 2 (times log2 e). Entries finite in fp32 stay
// finite: those below -FLT_MAX / log2 e (about -2.36e38; torch.finfo(float32).min, the mask
// value of Hugging Face models) would overflow to -inf, which drops a key, and are taken as
// fp32's lowest instead. Such keys all weigh the same, as in torch's fp32 (a score plus
// finfo.min is finfo.min), and a row whose largest score is among them gets lse fp32's lowest
// (write_row). -inf stays -inf, NaN NaN.
inline float mask_base2(float a) {
  const float r = a * simd::exp2_poly::kLog2e;
  return r == -std::numeric_limits<float>::infinity() && a != r ? std::numeric_limits<float>::lowest() : r;
}

// How far (base 2) a tile's scores may rise above a row's running max m before m moves: up to
// then the tile's probabilities are taken against the old m (values up to 2^8, exact in fp32
// and in a bf16 P, whose relative rounding does not depend on size), so the row keeps alpha = 1
// and its accumulator is not rescaled, and m is known before the scores are reduced (the
// threshold of FlashAttention-4's conditional rescaling). The rows' O grow at most 2^8 x past
// the exact algorithm's, which cannot overflow short of |V| near the fp32 limit.
constexpr float kMaxSlack = 8.0f;

// One row's online-softmax step once its new max m_new (finite) and the sum of 2^(s - m_new)
// over the tile are known: l = alpha l + sum, m = m_new; returns alpha = 2^(m_old - m_new)
// (0 on the row's first finite tile, where m_old = -inf).
inline float advance_row(float* m, float* l, float m_new, float sum) {
  const float alpha = simd::exp2_scalar(*m - m_new);
  *l = *l * alpha + sum;
  *m = m_new;
  return alpha;
}

// n (< 8) elements of storage type T as fp32 lanes, the rest 0.
template <DType T>
inline f32x8 load_n(const typename Elem<T>::type* p, int64_t n) {
  float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) buf[i] = Elem<T>::to_f32(p[i]);
  return simd::load(buf);
}

// Prefetches rows [0, n) of a strided tile (row_bytes each) towards L1 (kLocality 3) or L2
// (2). Tiles are walked column block by column block, a pattern hardware prefetchers do not
// follow; touching the next tile's lines while this one computes keeps decode at memory speed.
// (always_inline here and on prefetch_rows_ahead: GCC takes a function whose only effects are
// prefetches for one without side effects and drops calls to it that it has not inlined.)
template <int kLocality = 3>
__attribute__((always_inline)) inline void prefetch_rows(const void* base, int64_t stride_bytes, int64_t n, int64_t row_bytes) {
  const char* p = static_cast<const char*>(base);
  for (int64_t j = 0; j < n; ++j, p += stride_bytes)
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(p + b, 0, kLocality);
}

// Keys ahead of the rows being read that the decode kernels request into L2 (measured: the
// wide path's notes below, StreamAhead's here).
constexpr int64_t kDecodePrefetchKeys = 128;

// The K and V rows of a decode tile (the stream path: few rows, K/V read from storage), for
// requests into L2 kDecodePrefetchKeys keys ahead of the keys S = Q K^T reads (default: none).
// Both streams are requested there, so that V's lines are on their way while K is read: on a
// Zen 3 class AVX2 VM, two threads reading a tile of K, then its tile of V, streamed 18-22 GB/s
// where the two read in lockstep streamed 25-27 (scratch read loop). Cold GQA 32/8 D128 decode
// (build_ab 7-15 rounds) against requesting each stream's own rows in its own kernel: bf16 and
// fp16 0.80x the time, MHA 32/32 bf16 0.85x, fp32 1.02-1.05x (against the whole-tile bursts
// before either, fp32 took 0.82x at Lk 16384 and 0.96x at Lk 4096). Against no requests at all
// (hardware prefetchers alone), requesting each stream's own took 0.84-0.95x; 64 keys ahead
// measured as 128, 256 1.03-1.14x slower. (fp32 blocks of several rows over long runs of keys
// request each stream from its own kernel, spread over its loop instead: LineAhead, in attend.)
struct StreamAhead {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t k_stride = 0, v_stride = 0, row_bytes = 0;  // bytes
  int64_t keys = 0;  // rows that exist from the tile's first

  // Requests rows [j, j + n) + kDecodePrefetchKeys of K and V (always_inline: prefetch_rows).
  __attribute__((always_inline)) void rows(int64_t j, int64_t n) const {
    if (j + n + kDecodePrefetchKeys > keys) return;
    const char* kp = k + (j + kDecodePrefetchKeys) * k_stride;
    const char* vp = v + (j + kDecodePrefetchKeys) * v_stride;
    for (int64_t i = 0; i < n; ++i, kp += k_stride, vp += v_stride)
      for (int64_t b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch(kp + b, 0, 2);
        __builtin_prefetch(vp + b, 0, 2);
      }
  }
};

// A run of cache lines requested into L2 `per` at a time, one step per iteration of a kernel's
// inner loop, so that the requests spread evenly over the compute instead of in bursts.
struct LineAhead {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t per = 0;
  __attribute__((always_inline)) void step() {
    for (int64_t i = 0; i < per && p < end; ++i, p += 64) __builtin_prefetch(p, 0, 2);
  }
  // The lines of [begin, begin + bytes) over `steps` steps.
  static LineAhead over(const void* begin, int64_t bytes, int64_t steps) {
    const char* b = static_cast<const char*>(begin);
    const int64_t lines = (bytes + 63) / 64;
    return {b, b + bytes, steps > 0 ? (lines + steps - 1) / steps : 0};
  }
};

// ... and none: kernels take the one or the other as a type, so that without requests their
// inner loops carry no state for them.
struct NoLines {
  void step() const {}
};

// A strip loop's per-strip work when the caller has none (for_score_strips).
struct NoStripWork {
  void operator()(int64_t) const {}
};

// ---- packing ----------------------------------------------------------------------------

// dst[x] = scale * src[x] for x < d, 0 up to dp (a multiple of 8).
template <DType T>
inline void pack_row_scaled(const typename Elem<T>::type* src, int64_t d, float scale, float* dst,
                            int64_t dp) {
  const f32x8 s = simd::set1(scale);
  int64_t x = 0;
  for (; x + 8 <= d; x += 8) simd::store(dst + x, simd::mul(Elem<T>::load(src + x), s));
  if (x < d) {
    simd::store(dst + x, simd::mul(load_n<T>(src + x, d - x), s));
    x += 8;
  }
  for (; x < dp; x += 8) simd::store(dst + x, simd::zero());
}

// Decode rows of bf16 storage with whole 32-column blocks (split_cols) keep each block's columns
// in the split order: its 16 even columns, then its 16 odd ones. A bf16 row read as 32-bit
// words gives the even columns as fp32 by a shift and the odd ones by a mask, two instructions
// per 32 columns where widening (vpmovzxwd, then a shift) takes four; dot products do not see
// the order, and O = diag(alpha) O + P V splits O's blocks on load and joins them on store.
inline bool split_cols(DType t, int64_t d) { return t == DType::bf16 && d % 32 == 0; }

// dst = scale * src (d bf16, a multiple of `block`) in the split order of blocks of `block`
// columns (32: split_cols; 16: split16).
inline void pack_row_split(const uint16_t* src, int64_t d, float scale, float* dst, int64_t block = 32) {
  const int64_t half = block / 2;
  for (int64_t c = 0; c < d; c += block)
    for (int64_t i = 0; i < half; ++i) {
      dst[c + i] = scale * bf16_to_f32(src[c + 2 * i]);
      dst[c + half + i] = scale * bf16_to_f32(src[c + 2 * i + 1]);
    }
}

// The stream path (decode on f32x8) reads bf16 K and V of whole 16-column blocks in the split
// order of 16 columns (load_bf16_split: a shift and a mask per 16 values, where load_bf16
// takes a widening shuffle and a shift per 8): q rows are packed in that order, and P V splits
// O's blocks on load and joins them on store. With qk_dot's one reduction of a 4 x 2 block, on
// a Zen 3 class AVX2 VM with K/V in cache (GQA 32/8 D128 Lk 256 / 1024, scratch A/B of two
// builds, 21 rounds) bf16 took 0.89-0.93x the time on 2 threads and 0.91-0.92x on one; with
// K/V from memory, bound by bandwidth, no change beyond the noise (0.99-1.05x, fp32 rows of
// unchanged code 1.01-1.06x).
inline bool split16(DType t, int64_t d) { return t == DType::bf16 && d % 16 == 0; }

// 16 elements of storage type T as two vectors: columns 0-7 and 8-15, or with kSplit (bf16) in
// the split order.
template <DType T, bool kSplit>
__attribute__((always_inline)) inline void load16(const typename Elem<T>::type* p, f32x8* a, f32x8* b) {
  if constexpr (kSplit) {
    static_assert(T == DType::bf16, "the split order is bf16's");
    simd::load_bf16_split(p, a, b);
  } else {
    *a = Elem<T>::load(p);
    *b = Elem<T>::load(p + 8);
  }
}

// The packed K tile in column panels of kKPanel keys: Kt[j / kKPanel][x][j % kKPanel] = k[j][x]
// for j < nk, x < d (panel p starts at kt + p * d * kKPanel, rows of kKPanel floats); keys
// nk..kKeyTile are 0. Works in 8x8 blocks (8 keys x 8 dims loaded as rows, transposed in
// registers).
template <DType T>
inline void pack_k_transposed(const typename Elem<T>::type* k, int64_t k_stride, int64_t nk,
                              int64_t d, float* kt) {
  for (int64_t j = 0; j < kKeyTile; j += 8) {
    const int64_t keys = nk - j < 8 ? (nk - j > 0 ? nk - j : 0) : 8;
    for (int64_t x = 0; x < d; x += 8) {
      const int64_t dims = d - x < 8 ? d - x : 8;
      f32x8 blk[8];
      for (int64_t i = 0; i < 8; ++i) {
        const auto* src = k + (j + i) * k_stride + x;
        blk[i] = i >= keys ? simd::zero() : dims == 8 ? Elem<T>::load(src) : load_n<T>(src, dims);
      }
      simd::transpose8x8(blk);
      float* panel = kt + j / kKPanel * d * kKPanel + j % kKPanel;
      for (int64_t i = 0; i < dims; ++i) simd::store(panel + (x + i) * kKPanel, blk[i]);
    }
  }
}

// Key tiles per P V step of the zmm tiles (a group; kGroupKeys keys): the group's probabilities
// wait side by side in the score rows and its V rows in the panels of pack_v_wide, so that each
// row's O is loaded, rescaled and stored once per 128 keys instead of per 64. On B1 H32 L2048
// D128 causal fp32 prefill two tiles took 0.972-0.978x the time of one, four 0.994x of two.
constexpr int64_t kGroupTiles = 2;
constexpr int64_t kGroupKeys = kGroupTiles * kKeyTile;

// The V tile in the column panels pv_f32_wide reads: 64 columns each (the last dp % 64 wide),
// panel c (a multiple of 64) at vp + c * kGroupKeys with rows of 64 floats (room for the keys of
// a group of tiles: tile h of a group passes vp + h * kKeyTile * 64); vp's row j of a panel
// holds v[j][c..] as fp32 for j < nk (rows past nk are not read), columns d..dp are 0.
template <DType T>
inline void pack_v_wide(const typename Elem<T>::type* v, int64_t v_stride, int64_t nk, int64_t d,
                        int64_t dp, float* vp) {
  for (int64_t c = 0; c < dp; c += 64) {
    const int64_t w = dp - c < 64 ? dp - c : 64;
    const int64_t n = d - c < w ? (d - c > 0 ? d - c : 0) : w;  // of v's columns
    for (int64_t j = 0; j < nk; ++j) {
      float* dst = vp + c * kGroupKeys + j * 64;
      to_f32<T>(v + j * v_stride + c, dst, n);
      for (int64_t x = n; x < w; ++x) dst[x] = 0.0f;
    }
  }
}

// The V tile in column panels of kVPanel: vp[x / kVPanel][j][x % kVPanel] = v[j][x] as fp32
// for j < nk, x < dp (a multiple of kVPanel; columns d..dp are 0). Panel c starts at
// vp + c * kKeyTile * kVPanel. Whole panels are copied two vectors at a time with the
// destination stepped a panel on, where a loop over 8-column vectors computing each one's place
// (x / kVPanel, x % kVPanel) spent a dozen integer instructions per vector: causal B1 H8 / H12
// L1024 D128 / D64 fp32 prefill with the [B, L, H, D] view's rows (V packed) took 0.963 /
// 0.960 the time (build_ab 15 rounds, per-round medians; 0.987 / 0.970 in 11 rounds), other
// cases within the noise.
template <DType T>
inline void pack_v_panels(const typename Elem<T>::type* v, int64_t v_stride, int64_t nk, int64_t d,
                          int64_t dp, float* vp) {
  constexpr int64_t kPanelFloats = kKeyTile * kVPanel;
  static_assert(kVPanel == 16, "a panel row is two vectors");
  for (int64_t j = 0; j < nk; ++j) {
    const auto* src = v + j * v_stride;
    float* dst = vp + j * kVPanel;
    int64_t x = 0;
    for (; x + kVPanel <= d; x += kVPanel, dst += kPanelFloats) {  // whole panels: no index math
      simd::store(dst, Elem<T>::load(src + x));
      simd::store(dst + 8, Elem<T>::load(src + x + 8));
    }
    if (x < dp)  // the last panel, partial (d..dp, fewer than kVPanel columns, are 0)
      for (int64_t h = 0; h < kVPanel; h += 8) {
        const int64_t n = d - x - h < 8 ? (d - x - h > 0 ? d - x - h : 0) : 8;
        simd::store(dst + h, n == 8 ? Elem<T>::load(src + x + h) : load_n<T>(src + x + h, n));
      }
  }
}

// ---- S = Q K^T --------------------------------------------------------------------------

// One register tile of S = Q Kt: s[r][0..16) = sum_x q[r][x] * kt[x][0..16) for R rows
// (R <= kMr); kt points at 16 keys of a panel of the packed tile (row pitch kKPanel).
template <int R>
inline void qk_packed(const float* q, int64_t q_stride, const float* kt, int64_t d, float* s,
                      int64_t s_stride) {
  f32x8 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = simd::zero();
  for (int64_t x = 0; x < d; ++x, kt += kKPanel) {
    const f32x8 k0 = simd::load(kt), k1 = simd::load(kt + 8);
    for (int r = 0; r < R; ++r) {
      const f32x8 qb = simd::set1(q[r * q_stride + x]);
      acc[r][0] = simd::fmadd(qb, k0, acc[r][0]);
      acc[r][1] = simd::fmadd(qb, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    simd::store(s + r * s_stride, acc[r][0]);
    simd::store(s + r * s_stride + 8, acc[r][1]);
  }
}

// s[r][j] = q[r] . k[j] for R rows (R <= kDotRows), nk keys read from storage; q rows are
// zero-padded to a multiple of 8 (with kSplit, which needs d a multiple of 16: in the split
// order of 16 columns, split16). Each pair of keys requests the K/V rows `ahead` of it, and
// steps `lines` once per 16 columns (LineAhead: fp32 blocks over long runs of keys).
template <DType T, int R, bool kSplit = false, class Lines = NoLines>
inline void qk_dot(const float* q, int64_t q_stride, const typename Elem<T>::type* k,
                   int64_t k_stride, int64_t nk, int64_t d, float* s, int64_t s_stride,
                   const StreamAhead& ahead = {}, Lines lines = {}) {
  const int64_t d16 = d / 16 * 16, dv = d / 8 * 8;
  int64_t j = 0;
  for (; j + 2 <= nk; j += 2) {
    const auto* k0p = k + j * k_stride;
    const auto* k1p = k0p + k_stride;
    ahead.rows(j, 2);
    f32x8 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = simd::zero();
    auto step = [&](int64_t x, f32x8 k0, f32x8 k1) {
      for (int r = 0; r < R; ++r) {
        const f32x8 qv = simd::load(q + r * q_stride + x);
        acc[r][0] = simd::fmadd(qv, k0, acc[r][0]);
        acc[r][1] = simd::fmadd(qv, k1, acc[r][1]);
      }
    };
    for (int64_t x = 0; x < d16; x += 16) {
      lines.step();
      f32x8 k0a, k0b, k1a, k1b;
      load16<T, kSplit>(k0p + x, &k0a, &k0b);
      load16<T, kSplit>(k1p + x, &k1a, &k1b);
      step(x, k0a, k1a);
      step(x + 8, k0b, k1b);
    }
    if (d16 < dv) step(d16, Elem<T>::load(k0p + d16), Elem<T>::load(k1p + d16));
    if (dv < d) step(dv, load_n<T>(k0p + dv, d - dv), load_n<T>(k1p + dv, d - dv));
    if constexpr (R == 4) {  // the 8 scores in one reduction: lane 2r + i = row r's, key j + i
      alignas(32) float sums[8];
      simd::store(sums, simd::reduce_add8(&acc[0][0]));
      for (int r = 0; r < R; ++r) {
        s[r * s_stride + j] = sums[2 * r];
        s[r * s_stride + j + 1] = sums[2 * r + 1];
      }
    } else {
      for (int r = 0; r < R; ++r) {
        s[r * s_stride + j] = simd::reduce_add(acc[r][0]);
        s[r * s_stride + j + 1] = simd::reduce_add(acc[r][1]);
      }
    }
  }
  if (j < nk) {
    const auto* kp = k + j * k_stride;
    f32x8 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = simd::zero();
    auto step = [&](int64_t x, f32x8 kv) {
      for (int r = 0; r < R; ++r) acc[r] = simd::fmadd(simd::load(q + r * q_stride + x), kv, acc[r]);
    };
    for (int64_t x = 0; x < d16; x += 16) {
      f32x8 ka, kb;
      load16<T, kSplit>(kp + x, &ka, &kb);
      step(x, ka);
      step(x + 8, kb);
    }
    if (d16 < dv) step(d16, Elem<T>::load(kp + d16));
    if (dv < d) step(dv, load_n<T>(kp + dv, d - dv));
    for (int r = 0; r < R; ++r) s[r * s_stride + j] = simd::reduce_add(acc[r]);
  }
}

// s[j] = q . k[j] for one row and nk keys of fp32 storage (decode with one row per kv head:
// MHA); q is zero-padded to a multiple of 8. Eight keys at a time: eight accumulators over the
// head dim, reduced together into one vector of eight scores (reduce_add8); keys past the last
// eight, or rows that are not whole vectors, are copied to a zero-padded block first. Blocks of
// several rows take qk_dot, which loads each K vector once for kDotRows rows (attend has the
// measurements). Each 8-key block requests the K/V rows `ahead` of it.
inline void qk_dot_f32(const float* q, const float* k, int64_t k_stride, int64_t nk, int64_t d, float* s,
                       const StreamAhead& ahead = {}) {
  const int64_t d8 = round_up(d, 8);
  alignas(32) float block[8 * kMaxHeadDim];
  for (int64_t j = 0; j < nk; j += 8) {
    const int64_t keys = nk - j < 8 ? nk - j : 8;
    const float* kb = k + j * k_stride;
    int64_t kb_stride = k_stride;
    ahead.rows(j, 8);
    if (keys < 8 || d < d8) {
      for (int64_t i = 0; i < 8; ++i) {
        float* dst = block + i * d8;
        if (i < keys) {
          pack_row_scaled<DType::f32>(kb + i * k_stride, d, 1.0f, dst, d8);  // scale 1: a copy
        } else {
          for (int64_t x = 0; x < d8; x += 8) simd::store(dst + x, simd::zero());
        }
      }
      kb = block;
      kb_stride = d8;
    }
    f32x8 acc[8];
    for (auto& a : acc) a = simd::zero();
    for (int64_t x = 0; x < d8; x += 8) {
      const f32x8 qv = simd::load(q + x);
      for (int i = 0; i < 8; ++i) acc[i] = simd::fmadd(qv, simd::load(kb + i * kb_stride + x), acc[i]);
    }
    const f32x8 sums = simd::reduce_add8(acc);
    if (keys == 8) {
      simd::store(s + j, sums);
    } else {
      alignas(32) float out[8];
      simd::store(out, sums);
      for (int64_t i = 0; i < keys; ++i) s[j + i] = out[i];
    }
  }
}

// ---- O = diag(alpha) O + P V ------------------------------------------------------------

// One register tile of O = diag(alpha) O + P V over 16 columns: for R rows (R <= kMr),
// o[r][0..16) = alpha[r] * o[r][0..16) + sum_{j < nk} p[r][j] * v[j][0..16); v is fp32 with
// row pitch v_stride and o, v point at the 16-column block.
template <int R>
inline void pv_f32(float* o, int64_t o_stride, const float* alpha, const float* p,
                   int64_t p_stride, const float* v, int64_t v_stride, int64_t nk) {
  f32x8 acc[R][2];
  for (int r = 0; r < R; ++r) {
    const f32x8 a = simd::set1(alpha[r]);
    acc[r][0] = simd::mul(simd::load(o + r * o_stride), a);
    acc[r][1] = simd::mul(simd::load(o + r * o_stride + 8), a);
  }
  for (int64_t j = 0; j < nk; ++j, v += v_stride) {
    const f32x8 v0 = simd::load(v), v1 = simd::load(v + 8);
    for (int r = 0; r < R; ++r) {
      const f32x8 pb = simd::set1(p[r * p_stride + j]);
      acc[r][0] = simd::fmadd(pb, v0, acc[r][0]);
      acc[r][1] = simd::fmadd(pb, v1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    simd::store(o + r * o_stride, acc[r][0]);
    simd::store(o + r * o_stride + 8, acc[r][1]);
  }
}

// The same for R rows (R <= kDotRows) with V streamed from storage (d columns, any d); o rows
// have round_up(d, 8) columns, the padding stays 0. With kSplit (bf16, d a multiple of 16) V is
// read in the split order (split16) and O's 16-column blocks are split and joined around it.
template <DType T, int R, bool kSplit = false, class Lines = NoLines>
inline void pv_stream(float* o, int64_t o_stride, const float* alpha, const float* p,
                      int64_t p_stride, const typename Elem<T>::type* v, int64_t v_stride,
                      int64_t nk, int64_t d, Lines lines = {}) {
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    f32x8 acc[R][2];
    for (int r = 0; r < R; ++r) {
      const f32x8 a = simd::set1(alpha[r]);
      acc[r][0] = simd::mul(simd::load(o + r * o_stride + c), a);
      acc[r][1] = simd::mul(simd::load(o + r * o_stride + c + 8), a);
      if constexpr (kSplit) simd::split_pairs(acc[r][0], acc[r][1], &acc[r][0], &acc[r][1]);
    }
    const auto* vp = v + c;
    for (int64_t j = 0; j < nk; ++j, vp += v_stride) {
      lines.step();
      f32x8 v0, v1;
      load16<T, kSplit>(vp, &v0, &v1);
      for (int r = 0; r < R; ++r) {
        const f32x8 pb = simd::set1(p[r * p_stride + j]);
        acc[r][0] = simd::fmadd(pb, v0, acc[r][0]);
        acc[r][1] = simd::fmadd(pb, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      if constexpr (kSplit) simd::join_pairs(acc[r][0], acc[r][1], &acc[r][0], &acc[r][1]);
      simd::store(o + r * o_stride + c, acc[r][0]);
      simd::store(o + r * o_stride + c + 8, acc[r][1]);
    }
  }
  for (; c < d; c += 8) {  // at most one full and one partial vector of columns
    const int64_t n = d - c < 8 ? d - c : 8;
    f32x8 acc[R];
    for (int r = 0; r < R; ++r)
      acc[r] = simd::mul(simd::load(o + r * o_stride + c), simd::set1(alpha[r]));
    const auto* vp = v + c;
    for (int64_t j = 0; j < nk; ++j, vp += v_stride) {
      const f32x8 vv = n == 8 ? Elem<T>::load(vp) : load_n<T>(vp, n);
      for (int r = 0; r < R; ++r) acc[r] = simd::fmadd(simd::set1(p[r * p_stride + j]), vv, acc[r]);
    }
    for (int r = 0; r < R; ++r) simd::store(o + r * o_stride + c, acc[r]);
  }
}

// The same with V read key by key (decode, d a multiple of 64): for one row at a time, 64
// columns of O in eight registers while the keys are walked in order, so each V row's bytes are
// read front to back (pv_stream reads them a 16-column block at a time, 512 bytes apart at
// D128). For K/V read from memory, as in a model's decode step where the weights stream
// through the cache between layers, that order keeps more lines in flight. kSplit: as
// pv_stream's.
template <DType T, bool kSplit = false>
inline void pv_stream_rows(float* o, int64_t o_stride, const float* alpha, const float* p,
                           int64_t p_stride, const typename Elem<T>::type* v, int64_t v_stride,
                           int64_t nk, int64_t d, int64_t nr) {
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t c = 0; c < d; c += 64) {
      float* orow = o + r * o_stride + c;
      const f32x8 a = simd::set1(alpha[r]);
      f32x8 acc[8];
      for (int u = 0; u < 8; ++u) acc[u] = simd::mul(simd::load(orow + 8 * u), a);
      if constexpr (kSplit)
        for (int u = 0; u < 8; u += 2) simd::split_pairs(acc[u], acc[u + 1], &acc[u], &acc[u + 1]);
      const auto* vp = v + c;
      const float* pr = p + r * p_stride;
      for (int64_t j = 0; j < nk; ++j, vp += v_stride) {
        const f32x8 pb = simd::set1(pr[j]);
        for (int u = 0; u < 8; u += 2) {
          f32x8 v0, v1;
          load16<T, kSplit>(vp + 8 * u, &v0, &v1);
          acc[u] = simd::fmadd(pb, v0, acc[u]);
          acc[u + 1] = simd::fmadd(pb, v1, acc[u + 1]);
        }
      }
      if constexpr (kSplit)
        for (int u = 0; u < 8; u += 2) simd::join_pairs(acc[u], acc[u + 1], &acc[u], &acc[u + 1]);
      for (int u = 0; u < 8; ++u) simd::store(orow + 8 * u, acc[u]);
    }
}

// Calls f(Rows<R>{}) with R = min(n, kMax) as a compile-time row count (1 <= n).
template <int N>
struct Rows {
  static constexpr int value = N;
};
template <int kMax, class F>
inline void with_rows(int n, const F& f) {
  static_assert(kMax >= 1 && kMax <= 6, "row blocks of 1..6");
  switch (n < kMax ? n : kMax) {
    case 1: f(Rows<1>{}); break;
    case 2: f(Rows<(kMax >= 2 ? 2 : 1)>{}); break;
    case 3: f(Rows<(kMax >= 3 ? 3 : 1)>{}); break;
    case 4: f(Rows<(kMax >= 4 ? 4 : 1)>{}); break;
    case 5: f(Rows<(kMax >= 5 ? 5 : 1)>{}); break;
    default: f(Rows<kMax>{}); break;
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// mask_base2 on 16 lanes.
inline __m512 mask_base2(__m512 a) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 r = _mm512_mul_ps(a, _mm512_set1_ps(simd::exp2_poly::kLog2e));
  const __mmask16 overflow = _mm512_cmp_ps_mask(r, neg_inf, _CMP_EQ_OQ) & _mm512_cmp_ps_mask(a, neg_inf, _CMP_NEQ_OQ);
  return _mm512_mask_mov_ps(r, overflow, _mm512_set1_ps(std::numeric_limits<float>::lowest()));
}

// Lane indices 0..15.
inline __m512i kLanes16() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

// Which of the 16 keys at lane indices idx lie in [a, e) (two compares, no scalar mask math).
inline __mmask16 lanes_in(__m512i idx, __m512i a, __m512i e) {
  return _mm512_mask_cmplt_epi32_mask(_mm512_cmpge_epi32_mask(idx, a), idx, e);
}

// ---- AVX-512 decode: whole rows in zmm registers ----------------------------------------
// O = diag(alpha) O + P V keeps R rows x the whole head dim of O in registers and walks the
// keys in order, so each V row is read once, front to back (pv_stream reads V a 16-column
// block at a time, 512 bytes apart). Decode time goes to keeping enough cache lines in flight:
// each line read prefetches the one kDecodePrefetchKeys rows ahead, and 16-wide vectors halve
// the instructions per byte. S = Q K^T takes 4 keys x R rows per register block and reduces
// the accumulators eight at a time.
// (GCC 12 warns about its own intrinsics' self-initialised temporaries here; they are not.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

template <DType T>
inline __m512 load16(const typename Elem<T>::type* p) {
  if constexpr (T == DType::f32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (T == DType::f16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
}

// Zmm columns per load of a decode row of NV zmm: two in the split order where split_cols, else 1.
template <DType T, int NV>
constexpr int kColStep = T == DType::bf16 && NV % 2 == 0 ? 2 : 1;

// Columns [0, 16 N) at p as fp32: load16, or (N = 2) a bf16 block in the split order.
template <DType T, int N>
inline void load_cols(const typename Elem<T>::type* p, __m512 (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = load16<T>(p);
  } else {
    static_assert(N == 2 && T == DType::bf16, "the split order is for bf16 blocks");
    const __m512i w = _mm512_loadu_si512(p);
    out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    out[1] = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
}

// The fp32 block of 32 columns at p, split into its even and odd columns (out[0], out[1]) ...
inline void split32(const float* p, __m512 (&out)[2]) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512 lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16);
  out[0] = _mm512_permutex2var_ps(lo, even, hi);
  out[1] = _mm512_permutex2var_ps(lo, _mm512_add_epi32(even, _mm512_set1_epi32(1)), hi);
}

// ... and joined back from them.
inline void join32(float* p, const __m512 (&in)[2]) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  _mm512_storeu_ps(p, _mm512_permutex2var_ps(in[0], lo, in[1]));
  _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(in[0], _mm512_add_epi32(lo, _mm512_set1_epi32(8)), in[1]));
}

// s[r][j + b] = scale * (the sum of acc[r][b]'s lanes) for R rows x KB keys, the accumulators
// reduced eight at a time.
template <int R, int KB>
inline void store_lane_sums(const __m512 (&acc)[R][KB], float scale, float* s, int64_t s_stride, int64_t j) {
  constexpr int N = R * KB, N8 = (N + 7) / 8 * 8;
  f32x8 half[N8];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < KB; ++b)
      half[r * KB + b] = {_mm256_add_ps(_mm512_castps512_ps256(acc[r][b]), _mm512_extractf32x8_ps(acc[r][b], 1))};
  for (int i = N; i < N8; ++i) half[i] = simd::zero();
  __m256 sums[N8 / 8];
  for (int i = 0; i < N8; i += 8) sums[i / 8] = _mm256_mul_ps(simd::reduce_add8(half + i).v, _mm256_set1_ps(scale));
  // Rows of 8 or 4 keys leave the registers as whole vectors: a scalar loop over stored sums
  // compiled to a zmm load across the two ymm stores, which missed store forwarding (13% of
  // qk_dot_zmm_block's samples on bf16 GQA decode sat on the instruction after it).
  if constexpr (KB == 8) {
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(s + r * s_stride + j, sums[r]);
  } else if constexpr (KB == 4) {
    for (int r = 0; r < R; ++r)
      _mm_storeu_ps(s + r * s_stride + j, r % 2 ? _mm256_extractf128_ps(sums[r / 2], 1) : _mm256_castps256_ps128(sums[r / 2]));
  } else {
    alignas(32) float lanes[N8];
    for (int i = 0; i < N8; i += 8) _mm256_store_ps(lanes + i, sums[i / 8]);
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < KB; ++b) s[r * s_stride + j + b] = lanes[r * KB + b];
  }
}

// Decode blocks stream K and V from memory, and their time goes to keeping enough lines in
// flight: in the wide (zmm) kernels each line read also touches its line kDecodePrefetchKeys
// (defined with StreamAhead) keys ahead into L2 (rows
// below pf_keys only). Decode from memory (isa_ab's cold decode cases, build_ab 9 rounds, 2
// threads): GQA 32/8 Lk 16384 D128 took 0.84x the time in bf16 (with the split order), 0.82x in
// fp16, 0.95x in fp32; MHA 32/32 Lk 4096 bf16 0.90x. 64 or 256 keys ahead measured 1.0-1.05x the
// time of 128, and prefetching into L1 1.1x. The cost: K/V still in L2 from the call before (a
// benchmark's loop; a model's layers read theirs from memory) take the prefetches as extra
// loads, MHA 32/32 Lk 257 D64 fp32 1.055x the time; GQA 32/4 (TinyLlama's heads) 1.004x, GQA
// 32/8 Lk 4096 (in L3) 0.99x.

// Whether zmm u of a row of storage type S starts a cache line (and so is the one to prefetch).
template <class S>
constexpr bool starts_line(int u) { return 16 * u * sizeof(S) % 64 == 0; }

// Prefetches into L2 the line at p of each of the KB rows kDecodePrefetchKeys rows past p's.
template <int KB, class S>
__attribute__((always_inline)) inline void prefetch_rows_ahead(const S* p, int64_t stride) {
  for (int b = 0; b < KB; ++b)
    _mm_prefetch(reinterpret_cast<const char*>(p + (b + kDecodePrefetchKeys) * stride), _MM_HINT_T1);
}

// s[r][j + b] = q[r] . k[j + b] for R rows x KB keys, D = NV*16 (q in the split order where
// kColStep is 2); the rows kDecodePrefetchKeys past them are prefetched below pf_keys.
template <DType T, int NV, int R, int KB>
inline void qk_dot_zmm_block(const float* q, int64_t q_stride, const typename Elem<T>::type* k,
                             int64_t k_stride, float* s, int64_t s_stride, int64_t j, int64_t pf_keys) {
  using S = typename Elem<T>::type;
  constexpr int N = kColStep<T, NV>;
  const S* kp = k + j * k_stride;
  const bool pf = j + KB + kDecodePrefetchKeys <= pf_keys;
  __m512 acc[R][KB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < KB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int u = 0; u < NV; u += N) {
    __m512 kv[KB][N];
    for (int b = 0; b < KB; ++b) load_cols<T, N>(kp + b * k_stride + 16 * u, kv[b]);
    if (pf && starts_line<S>(u)) prefetch_rows_ahead<KB>(kp + 16 * u, k_stride);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < N; ++i) {
        const __m512 qv = _mm512_loadu_ps(q + r * q_stride + 16 * (u + i));
        for (int b = 0; b < KB; ++b) acc[r][b] = _mm512_fmadd_ps(qv, kv[b][i], acc[r][b]);
      }
  }
  store_lane_sums<R, KB>(acc, 1.0f, s, s_stride, j);
}

// s[r][j] = q[r] . k[j] for R rows and nk keys: blocks of KB keys (R*KB accumulators, reduced
// eight at a time), then one key at a time.
template <DType T, int NV, int R>
inline void qk_dot_zmm(const float* q, int64_t q_stride, const typename Elem<T>::type* k,
                       int64_t k_stride, int64_t nk, float* s, int64_t s_stride, int64_t pf_keys) {
  constexpr int KB = R == 1 ? 8 : 4;
  int64_t j = 0;
  for (; j + KB <= nk; j += KB) qk_dot_zmm_block<T, NV, R, KB>(q, q_stride, k, k_stride, s, s_stride, j, pf_keys);
  for (; j < nk; ++j) qk_dot_zmm_block<T, NV, R, 1>(q, q_stride, k, k_stride, s, s_stride, j, pf_keys);
}

// R rows x NV*16 columns (the whole head dim) of O in registers over nk keys (V rows prefetched
// kDecodePrefetchKeys ahead below pf_keys).
template <DType T, int NV, int R>
inline void pv_rows_zmm(float* o, int64_t o_stride, const float* alpha, const float* p,
                        int64_t p_stride, const typename Elem<T>::type* v, int64_t v_stride,
                        int64_t nk, int64_t pf_keys) {
  using S = typename Elem<T>::type;
  constexpr int N = kColStep<T, NV>;  // 2: O's blocks split while they are in registers
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int u = 0; u < NV; u += N) {
      __m512 ov[N];
      if constexpr (N == 2) split32(o + r * o_stride + 16 * u, ov);
      else ov[0] = _mm512_loadu_ps(o + r * o_stride + 16 * u);
      for (int i = 0; i < N; ++i) acc[r][u + i] = _mm512_mul_ps(ov[i], a);
    }
  }
  for (int64_t j = 0; j < nk; ++j, v += v_stride) {
    __m512 pb[R];
    for (int r = 0; r < R; ++r) pb[r] = _mm512_set1_ps(p[r * p_stride + j]);
    for (int u = 0; u < NV; u += N) {
      __m512 vv[N];
      load_cols<T, N>(v + 16 * u, vv);
      if (starts_line<S>(u) && j + kDecodePrefetchKeys < pf_keys) prefetch_rows_ahead<1>(v + 16 * u, v_stride);
      for (int i = 0; i < N; ++i)
        for (int r = 0; r < R; ++r) acc[r][u + i] = _mm512_fmadd_ps(pb[r], vv[i], acc[r][u + i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; u += N) {
      if constexpr (N == 2) join32(o + r * o_stride + 16 * u, {acc[r][u], acc[r][u + 1]});
      else _mm512_storeu_ps(o + r * o_stride + 16 * u, acc[r][u]);
    }
}

// All nr rows of a decode block: S = Q K^T and O = diag(alpha) O + P V, in register blocks
// (the first block of rows prefetches, below pf_keys).
template <DType T, int NV>
inline void qk_dot_zmm_all(const float* q, int64_t q_stride, const typename Elem<T>::type* k,
                           int64_t k_stride, int64_t nk, float* s, int64_t s_stride, int64_t nr,
                           int64_t pf_keys) {
  for (int64_t r = 0; r < nr; r += 4)
    with_rows<4>(static_cast<int>(nr - r), [&](auto R) {
      qk_dot_zmm<T, NV, decltype(R)::value>(q + r * q_stride, q_stride, k, k_stride, nk,
                                            s + r * s_stride, s_stride, r == 0 ? pf_keys : 0);
    });
}
template <DType T, int NV>
inline void pv_rows_zmm_all(float* o, int64_t o_stride, const float* alpha, const float* p,
                            int64_t p_stride, const typename Elem<T>::type* v, int64_t v_stride,
                            int64_t nk, int64_t nr, int64_t pf_keys) {
  constexpr int kRows = NV >= 16 ? 1 : 16 / NV > 6 ? 6 : 16 / NV;  // 16 accumulators
  // fp16/bf16 blocks of more rows take the columns in halves, twice the rows per pass, so that
  // each V element is converted once per 2 kRows rows (isa_ab's cold decode cases, build_ab 9
  // rounds: GQA 32/8 Lk 16384 D128 bf16 0.938x, fp16 0.973x the time, Lk 4096 bf16 0.974x; fp32,
  // with nothing to convert, 1.01x).
  if constexpr (T != DType::f32 && NV >= 8 && NV % 4 == 0) {
    if (nr > kRows) {
      constexpr int kHalf = NV / 2, kRows2 = 16 / kHalf;
      for (int c = 0; c < NV; c += kHalf)
        for (int64_t r = 0; r < nr; r += kRows2)
          with_rows<kRows2>(static_cast<int>(nr - r), [&](auto R) {
            pv_rows_zmm<T, kHalf, decltype(R)::value>(o + r * o_stride + 16 * c, o_stride, alpha + r,
                                                      p + r * p_stride, p_stride, v + 16 * c, v_stride, nk,
                                                      r == 0 ? pf_keys : 0);
          });
      return;
    }
  }
  for (int64_t r = 0; r < nr; r += kRows)
    with_rows<kRows>(static_cast<int>(nr - r), [&](auto R) {
      pv_rows_zmm<T, NV, decltype(R)::value>(o + r * o_stride, o_stride, alpha + r, p + r * p_stride,
                                             p_stride, v, v_stride, nk, r == 0 ? pf_keys : 0);
    });
}

// 2^x on 16 lanes for x <= 127 (softmax exponents are at most kMaxSlack), exactly 0 below
// -126 (so 2^-inf == 0) through the mask of the final scale. x = y + r with y = x rounded to a
// multiple of 1/32 (adding 1.5 2^18 leaves its 32nds j in the low five bits of the sum) and
// |r| <= 1/64 exact; 2^x = 2^floor(y) (vscalefps) 2^(j/32) (a 32-entry table, vpermt2ps)
// 2^r, with 2^r by a degree-2 polynomial fitted for relative error on [-1/64, 1/64] (5.3e-8).
// Nine instructions where simd::exp2's degree-6 polynomial takes eleven (vrndscaleps is two);
// 1.73 ulp at worst against float64 over every float in [-126, 127] (under 1 before; the
// online softmax rounds more than that elsewhere). test_softmax_exp2_within_two_ulp samples it.
namespace exp2_table {
constexpr float kRound = 0x1.8p18f;  // x + kRound: x to 1/32
constexpr float kC1 = 0.6931573f, kC2 = 0.24022676f;
alignas(64) inline constexpr float kPow[32] = {
    0x1.000000p+0f, 0x1.059b0ep+0f, 0x1.0b5586p+0f, 0x1.11301ep+0f, 0x1.172b84p+0f, 0x1.1d4874p+0f,
    0x1.2387a6p+0f, 0x1.29e9e0p+0f, 0x1.306fe0p+0f, 0x1.371a74p+0f, 0x1.3dea64p+0f, 0x1.44e086p+0f,
    0x1.4bfdaep+0f, 0x1.5342b6p+0f, 0x1.5ab07ep+0f, 0x1.6247ecp+0f, 0x1.6a09e6p+0f, 0x1.71f75ep+0f,
    0x1.7a1148p+0f, 0x1.82589ap+0f, 0x1.8ace54p+0f, 0x1.93737cp+0f, 0x1.9c4918p+0f, 0x1.a5503cp+0f,
    0x1.ae89fap+0f, 0x1.b7f770p+0f, 0x1.c199bep+0f, 0x1.cb720ep+0f, 0x1.d5818ep+0f, 0x1.dfc974p+0f,
    0x1.ea4afap+0f, 0x1.f50766p+0f};
}  // namespace exp2_table

inline __m512 exp2_16_low(__m512 x) {
  namespace c = exp2_table;
  // lanes not below kLo, NaN included (unordered: NLT_UQ), so NaN stays NaN as in simd::exp2
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(simd::exp2_poly::kLo), _CMP_NLT_UQ);
  const __m512 t = _mm512_add_ps(x, _mm512_set1_ps(c::kRound));
  const __m512 y = _mm512_sub_ps(t, _mm512_set1_ps(c::kRound));
  const __m512 r = _mm512_sub_ps(x, y);
  const __m512 f = _mm512_permutex2var_ps(_mm512_load_ps(c::kPow), _mm512_castps_si512(t),
                                          _mm512_load_ps(c::kPow + 16));
  const __m512 q = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_set1_ps(c::kC2), r, _mm512_set1_ps(c::kC1)), r);
  return _mm512_maskz_scalef_ps(keep, _mm512_fmadd_ps(q, f, f), y);
}

// 2^x on 16 lanes for any x: exp2_16_low with inputs above 127 clamped there (NaN stays NaN:
// vminps returns its second operand, x, where either is NaN).
inline __m512 exp2_16(__m512 x) {
  return exp2_16_low(_mm512_min_ps(_mm512_set1_ps(simd::exp2_poly::kHi), x));
}

// s[j] = 2^(s[j] - m) for j < n (a multiple of 8); returns their sum.
inline float exp_sum_zmm(float* s, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? 0xFFFF : 0x00FF;
    const __m512 e = exp2_16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + j), mv));
    _mm512_mask_storeu_ps(s + j, lanes, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(lanes, e));
  }
  return _mm512_reduce_add_ps(sum);
}

// The online-softmax step of R rows whose scores over a tile of st.keys keys are in registers
// (16 NC columns; those past st.keys, and on a clipped or masked tile each row's keys outside
// [lo, hi) or masked out, set to -inf first, an additive mask added): m, l updated,
// the scores (base 2) turned into p = 2^(s - m_new) and stored to s, alpha = 2^(m_old - m_new)
// set. A row with a running max whose scores rise at most kMaxSlack above it keeps it (alpha =
// 1, no reduction for the max); otherwise m_new is the max of m_old and the tile's.
template <int R, int NC>
inline void softmax_rows_zmm(__m512 (&acc)[R][NC], float* s, int64_t s_stride, const RowState& st) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  if (st.lo) {  // each row's own keys (vector compares of the lane indices)
    for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_set1_epi32(st.lo[r]), e = _mm512_set1_epi32(st.hi[r]);
      for (int u = 0; u < NC; ++u) {
        const __m512i idx = _mm512_add_epi32(kLanes16(), _mm512_set1_epi32(16 * u));
        acc[r][u] = _mm512_mask_mov_ps(_mm512_set1_ps(-kInf), lanes_in(idx, a, e), acc[r][u]);
      }
    }
  } else if (st.keys < 16 * NC) {  // a short last tile: its padding columns are no keys
    const __mmask16 pad = static_cast<__mmask16>(~((1u << (st.keys - 16 * (NC - 1))) - 1));
    for (int r = 0; r < R; ++r)
      acc[r][NC - 1] = _mm512_mask_mov_ps(acc[r][NC - 1], pad, _mm512_set1_ps(-kInf));
  }
  if (st.keep || st.add) {  // the mask, read only over the tile's keys
    for (int u = 0; u < NC; ++u) {
      const int64_t n = st.keys - 16 * u;
      const __mmask16 live = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
      for (int r = 0; r < R; ++r) {
        if (st.keep) {
          const __m128i b = _mm_maskz_loadu_epi8(live, st.keep[r] + 16 * u);
          acc[r][u] = _mm512_mask_mov_ps(_mm512_set1_ps(-kInf), _mm_mask_test_epi8_mask(live, b, b), acc[r][u]);
        } else {
          const __m512 a = _mm512_maskz_loadu_ps(live, st.add[r] + 16 * u);
          const __mmask16 drop = _mm512_cmp_ps_mask(a, _mm512_set1_ps(-kInf), _CMP_EQ_OQ);  // (NaN + -inf: NaN)
          acc[r][u] = _mm512_mask_mov_ps(_mm512_add_ps(acc[r][u], mask_base2(a)), drop, _mm512_set1_ps(-kInf));
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float m_old = st.m[r];
    float m_new = m_old;
    if (m_old != -kInf) {
      const __m512 limit = _mm512_set1_ps(m_old + kMaxSlack);
      __mmask16 rise = 0;
      for (int u = 0; u < NC; ++u) rise |= _mm512_cmp_ps_mask(acc[r][u], limit, _CMP_GT_OQ);
      if (rise) m_new = -kInf;
    }
    if (m_new == -kInf) {
      __m512 mx = acc[r][0];
      for (int u = 1; u < NC; ++u) mx = _mm512_max_ps(mx, acc[r][u]);
      m_new = std::fmax(m_old, _mm512_reduce_max_ps(mx));
    }
    float* p = s + r * s_stride;
    if (m_new == -kInf) {  // no finite score yet; a NaN one (which the max passes over) makes l NaN
      __mmask16 nan = 0;
      for (int u = 0; u < NC; ++u) nan |= _mm512_cmp_ps_mask(acc[r][u], acc[r][u], _CMP_UNORD_Q);
      if (nan) st.l[r] = std::numeric_limits<float>::quiet_NaN();
      for (int u = 0; u < NC; ++u) _mm512_storeu_ps(p + 16 * u, _mm512_setzero_ps());
      st.alpha[r] = 1.0f;
      continue;
    }
    const __m512 mv = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int u = 0; u < NC; ++u) {
      const __m512 e = exp2_16_low(_mm512_sub_ps(acc[r][u], mv));
      _mm512_storeu_ps(p + 16 * u, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (m_new == m_old) {
      st.l[r] += _mm512_reduce_add_ps(sum);
      st.alpha[r] = 1.0f;
    } else {
      st.alpha[r] = advance_row(st.m + r, st.l + r, m_new, _mm512_reduce_add_ps(sum));
    }
  }
}

// The scores of an R x 16 NC register tile: stored to s, or (st given) through the online
// softmax into probabilities.
template <int R, int NC>
inline void finish_scores_zmm(__m512 (&acc)[R][NC], float* s, int64_t s_stride, const RowState* st) {
  if (st) {
    softmax_rows_zmm<R, NC>(acc, s, s_stride, *st);
  } else {
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NC; ++u) _mm512_storeu_ps(s + r * s_stride + 16 * u, acc[r][u]);
  }
}

// ---- AVX-512 prefill micro-kernels ------------------------------------------------------
// The forms of qk_packed and pv_f32 for 64 keys / 64 columns (4 zmm) per row: 24 accumulators
// for 6 rows, a quarter of the loads and broadcasts per FMA of the 16-wide ymm tiles.

// acc[r][u] += sum_{i < n} a[r][i] * b[i][16u .. 16u+16): R x NC zmm accumulators, rank-1
// updates (a broadcast, a row of b loaded once per i).
template <int R, int NC>
inline void rank1_tile_zmm(__m512 (&acc)[R][NC], const float* a, int64_t a_stride, const float* b,
                           int64_t b_stride, int64_t n) {
  for (int64_t i = 0; i < n; ++i, b += b_stride) {
    __m512 row[NC];
    for (int u = 0; u < NC; ++u) row[u] = _mm512_loadu_ps(b + 16 * u);
    for (int r = 0; r < R; ++r) {
      const __m512 ab = _mm512_set1_ps(a[r * a_stride + i]);
      for (int u = 0; u < NC; ++u) acc[r][u] = _mm512_fmadd_ps(ab, row[u], acc[r][u]);
    }
  }
}

// s[r][0..16*NC) = sum_x q[r][x] * kt[x][0..16*NC) for R rows (kt: the packed tile, pitch
// kKeyTile; NC = 4 for a full tile, fewer for the last keys of a short sequence), finished by
// finish_scores_zmm.
template <int R, int NC>
inline void qk_packed_zmm(const float* q, int64_t q_stride, const float* kt, int64_t d, float* s,
                          int64_t s_stride, const RowState* st) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NC; ++u) acc[r][u] = _mm512_setzero_ps();
  rank1_tile_zmm<R, NC>(acc, q, q_stride, kt, kKeyTile, d);
  finish_scores_zmm<R, NC>(acc, s, s_stride, st);
}

// acc[r][u] = alpha[r] * o[r][16u .. 16u+16): the O tile a PV step starts from, rescaled.
template <int R, int NC>
inline void load_rescaled_zmm(__m512 (&acc)[R][NC], const float* o, int64_t o_stride, const float* alpha) {
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int u = 0; u < NC; ++u) acc[r][u] = _mm512_mul_ps(_mm512_loadu_ps(o + r * o_stride + 16 * u), a);
  }
}

template <int R, int NC>
inline void store_zmm(float* o, int64_t o_stride, const __m512 (&acc)[R][NC]) {
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NC; ++u) _mm512_storeu_ps(o + r * o_stride + 16 * u, acc[r][u]);
}

// o[r][16u .. 16u+16) = alpha[r] * o[r] + acc[r][u]: a P V step's sums added to the rescaled O
// tile at its end, so that the loads of O (from L2) are off the path of the step's FMAs (fp32
// causal B1 H32 L2048 D128 prefill took 0.977-0.978x the time of starting from the rescaled O,
// D256 0.981x, B4 H12 L1024 D64 0.987x; build_ab 5-7 rounds).
template <int R, int NC>
inline void store_rescaled_zmm(float* o, int64_t o_stride, const float* alpha, const __m512 (&acc)[R][NC]) {
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int u = 0; u < NC; ++u) {
      float* x = o + r * o_stride + 16 * u;
      _mm512_storeu_ps(x, _mm512_fmadd_ps(_mm512_loadu_ps(x), a, acc[r][u]));
    }
  }
}

// o[r][0..16*NC) = alpha[r] * o[r] + sum_{j < nk} p[r][j] * v[j][0..16*NC) for R rows.
template <int R, int NC>
inline void pv_f32_zmm(float* o, int64_t o_stride, const float* alpha, const float* p,
                       int64_t p_stride, const float* v, int64_t v_stride, int64_t nk) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NC; ++u) acc[r][u] = _mm512_setzero_ps();
  rank1_tile_zmm<R, NC>(acc, p, p_stride, v, v_stride, nk);
  store_rescaled_zmm<R, NC>(o, o_stride, alpha, acc);
}

// ---- AVX512_BF16 prefill micro-kernels (bf16 inputs) -------------------------------------
// vdpbf16ps multiplies bf16 pairs exactly and adds both products to fp32 lanes: twice the
// multiply-adds per instruction of an fp32 FMA. Operands are pairs along the reduction dim, one
// 32-bit word each. Q K^T pairs head dims: q and K rows are read as words, unconverted, and the
// scale is applied to the fp32 scores. P V pairs keys: P is rounded to bf16 (as torch's bf16
// path does) and V rows are interleaved two by two. These functions carry the avx512bf16
// target and run only when bf16_dot() says the CPU has it.
#define FF_BF16_DOT __attribute__((target("avx512bf16")))

// Kp[x2][j] = the word (k[j][2 x2], k[j][2 x2 + 1]) for x2 < d / 2 (d even), j < nk, rows of
// `keys` words (a multiple of 8, >= nk); key columns nk..keys are 0. 8 keys x 8 words per
// in-register transpose.
inline void pack_k_pairs(const uint16_t* k, int64_t k_stride, int64_t nk, int64_t d, uint32_t* kp,
                         int64_t keys = kKeyTile) {
  const int64_t d2 = d / 2;
  for (int64_t j = 0; j < keys; j += 8) {
    const int64_t live_keys = nk - j < 8 ? (nk - j > 0 ? nk - j : 0) : 8;
    for (int64_t x = 0; x < d2; x += 8) {
      const int64_t words = d2 - x < 8 ? d2 - x : 8;
      const __mmask8 live = static_cast<__mmask8>((1u << words) - 1);
      f32x8 blk[8];
      for (int64_t i = 0; i < 8; ++i) {
        const uint16_t* src = k + (j + i) * k_stride + 2 * x;
        blk[i] = i >= live_keys ? simd::zero() : f32x8{_mm256_castsi256_ps(_mm256_maskz_loadu_epi32(live, src))};
      }
      simd::transpose8x8(blk);
      for (int64_t i = 0; i < words; ++i)
        simd::store(reinterpret_cast<float*>(kp + (x + i) * keys + j), blk[i]);
    }
  }
}

// vp[j2][x] = the word (v[2 j2][x], v[2 j2 + 1][x]) for j2 < ceil(nk / 2), x < dp (a multiple of
// 16); columns d..dp and the partner of an odd last key are 0.
inline void pack_v_pairs(const uint16_t* v, int64_t v_stride, int64_t nk, int64_t d, uint32_t* vp,
                         int64_t dp) {
  for (int64_t j = 0; j < nk; j += 2) {
    const uint16_t* a = v + j * v_stride;
    const uint16_t* b = a + v_stride;
    const bool pair = j + 1 < nk;
    for (int64_t x = 0; x < dp; x += 16) {
      const int64_t n = d - x < 16 ? (d - x > 0 ? d - x : 0) : 16;
      const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, a + x));
      const __m512i hi = pair ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, b + x))
                              : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + j / 2 * dp + x, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// The probabilities of nr rows (pitch p_stride floats, nk of them) rounded to bf16 pairs in
// place: row r's words are at reinterpret_cast<uint32_t*>(p + r * p_stride)[0 .. ceil(nk / 2)).
// Entries nk..round_up(nk, 8) must be 0 (softmax_update leaves them so).
FF_BF16_DOT inline void round_p_pairs(float* p, int64_t p_stride, int64_t nk, int64_t nr) {
  for (int64_t r = 0; r < nr; ++r) {
    float* row = p + r * p_stride;
    for (int64_t j = 0; j < nk; j += 32) {
      const __m512 a = _mm512_loadu_ps(row + j), b = _mm512_loadu_ps(row + j + 16);
      _mm512_storeu_si512(row + j / 2, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
  }
}

// acc[r][u] += sum_{i < n} dot2(a[r][i], b[i][16u .. 16u+16)) over words holding bf16 pairs.
template <int R, int NC>
FF_BF16_DOT inline void rank2_tile_bf16(__m512 (&acc)[R][NC], const uint32_t* a, int64_t a_stride,
                                        const uint32_t* b, int64_t b_stride, int64_t n) {
  for (int64_t i = 0; i < n; ++i, b += b_stride) {
    __m512i row[NC];
    for (int u = 0; u < NC; ++u) row[u] = _mm512_loadu_si512(b + 16 * u);
    for (int r = 0; r < R; ++r) {
      const __m512bh ab = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * a_stride + i]));
      for (int u = 0; u < NC; ++u) acc[r][u] = _mm512_dpbf16_ps(acc[r][u], ab, (__m512bh)row[u]);
    }
  }
}

// s[r][0..16*NC) = scale * (q[r] . k[j]) from q rows of d2 words and the packed Kp tile.
template <int R, int NC>
FF_BF16_DOT inline void qk_bf16_zmm(const uint32_t* q, int64_t q_stride, const uint32_t* kp,
                                    int64_t d2, float scale, float* s, int64_t s_stride,
                                    const RowState* st) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NC; ++u) acc[r][u] = _mm512_setzero_ps();
  rank2_tile_bf16<R, NC>(acc, q, q_stride, kp, kKeyTile, d2);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NC; ++u) acc[r][u] = _mm512_mul_ps(acc[r][u], sc);
  finish_scores_zmm<R, NC>(acc, s, s_stride, st);
}

// o[r][0..16*NC) = alpha[r] * o[r] + sum_{j2 < n2} dot2(p[r][j2], vp[j2][..]) for R rows.
template <int R, int NC>
FF_BF16_DOT inline void pv_bf16_zmm(float* o, int64_t o_stride, const float* alpha, const uint32_t* p,
                                    int64_t p_stride, const uint32_t* vp, int64_t vp_stride, int64_t n2) {
  __m512 acc[R][NC];
  load_rescaled_zmm<R, NC>(acc, o, o_stride, alpha);
  rank2_tile_bf16<R, NC>(acc, p, p_stride, vp, vp_stride, n2);
  store_zmm<R, NC>(o, o_stride, acc);
}

// bf16 decode on vdpbf16ps: s[j + b] = scale (q . k[j + b]) for one row of q words (bf16 pairs)
// and KB keys whose bf16 rows are read in place as words; the head dim is 32 NW. The rows
// kDecodePrefetchKeys past them are prefetched below pf_keys.
template <int NW, int KB>
FF_BF16_DOT inline void qk_dot_bf16_block(const uint32_t* q, const uint16_t* k, int64_t k_stride, float scale,
                                          float* s, int64_t j, int64_t pf_keys) {
  const uint16_t* kp = k + j * k_stride;
  const bool pf = j + KB + kDecodePrefetchKeys <= pf_keys;
  __m512 acc[1][KB];
  for (int b = 0; b < KB; ++b) acc[0][b] = _mm512_setzero_ps();
  for (int u = 0; u < NW; ++u) {
    __m512i kv[KB];
    for (int b = 0; b < KB; ++b) kv[b] = _mm512_loadu_si512(kp + b * k_stride + 32 * u);
    if (pf) prefetch_rows_ahead<KB>(kp + 32 * u, k_stride);
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + 16 * u);
    for (int b = 0; b < KB; ++b) acc[0][b] = _mm512_dpbf16_ps(acc[0][b], qv, (__m512bh)kv[b]);
  }
  store_lane_sums<1, KB>(acc, scale, s, 0, j);
}

// Decode rows of bf16 inputs through vdpbf16ps: the CPU has AVX512_BF16 and d is one of the
// head dims below (whole zmm of bf16 pairs).
inline bool bf16_wide_dot(int64_t d) { return (d == 64 || d == 96 || d == 128 || d == 256) && bf16_dot(); }

// S = scale q K^T for a decode block of one row (q words, d / 2) against nk keys of bf16 storage
// read in place (d: bf16_wide_dot), pf_keys as qk_wide's. One vdpbf16ps takes 32 products where
// the split order takes two FMAs and a conversion per key; with more rows the conversion is
// shared and the FMAs win (see attend).
FF_BF16_DOT inline void qk_wide_bf16(const uint32_t* q, const uint16_t* k, int64_t k_stride, int64_t nk,
                                     int64_t d, float scale, float* s, int64_t pf_keys) {
  auto row = [&](auto NW) {
    constexpr int kNW = decltype(NW)::value;
    int64_t j = 0;
    for (; j + 8 <= nk; j += 8) qk_dot_bf16_block<kNW, 8>(q, k, k_stride, scale, s, j, pf_keys);
    for (; j < nk; ++j) qk_dot_bf16_block<kNW, 1>(q, k, k_stride, scale, s, j, pf_keys);
  };
  switch (d) {
    case 64: return row(Rows<2>{});
    case 96: return row(Rows<3>{});
    case 128: return row(Rows<4>{});
    default: return row(Rows<8>{});
  }
}

// Calls f(Rows<NV>{}) with NV = d / 16 when the head dim d has a zmm decode path (a multiple
// of 16 up to 128, or 256) and returns true; false otherwise.
template <class F>
inline bool with_zmm_width(int64_t d, const F& f) {
  switch (d) {
    case 32: f(Rows<2>{}); return true;
    case 48: f(Rows<3>{}); return true;
    case 64: f(Rows<4>{}); return true;
    case 80: f(Rows<5>{}); return true;
    case 96: f(Rows<6>{}); return true;
    case 112: f(Rows<7>{}); return true;
    case 128: f(Rows<8>{}); return true;
    case 256: f(Rows<16>{}); return true;
    default: return false;
  }
}
#pragma GCC diagnostic pop
#endif  // AVX-512

// ---- entry points of the wide (zmm) tiles ------------------------------------------------
// AVX-512 builds run decode blocks with wide_rows(D) through qk_wide / pv_wide, and prefill
// tiles through qk_packed_wide / pv_f32_wide; other builds have stubs that are never called
// (kZmmTiles and wide_rows say false there).
#if defined(__AVX512F__) && defined(__AVX512BW__)
inline bool wide_rows(int64_t d) { return with_zmm_width(d, [](auto) {}); }

// The prefill tiles are the zmm forms (qk_packed_wide, pv_f32_wide), and the score tiles can
// finish a whole unmasked tile with the online softmax.
constexpr bool kZmmTiles = true;
constexpr bool kFusedSoftmax = true;

// The decode rows (pf_keys: the keys from k / v whose rows exist, for the prefetch ahead).
template <DType T>
inline void qk_wide(const float* q, int64_t q_stride, const typename Elem<T>::type* k,
                    int64_t k_stride, int64_t nk, int64_t d, float* s, int64_t s_stride,
                    int64_t nr, int64_t pf_keys) {
  with_zmm_width(d, [&](auto NV) {
    qk_dot_zmm_all<T, decltype(NV)::value>(q, q_stride, k, k_stride, nk, s, s_stride, nr, pf_keys);
  });
}

template <DType T>
inline void pv_wide(float* o, int64_t o_stride, const float* alpha, const float* p,
                    int64_t p_stride, const typename Elem<T>::type* v, int64_t v_stride,
                    int64_t nk, int64_t d, int64_t nr, int64_t pf_keys) {
  with_zmm_width(d, [&](auto NV) {
    pv_rows_zmm_all<T, decltype(NV)::value>(o, o_stride, alpha, p, p_stride, v, v_stride, nk, nr, pf_keys);
  });
}

// Calls f(Rows<NC>{}) with NC = ceil(n / 16) zmm columns, 1 <= n <= 64.
template <class F>
inline void with_zmm_columns(int64_t n, const F& f) {
  switch ((n + 15) / 16) {
    case 1: return f(Rows<1>{});
    case 2: return f(Rows<2>{});
    case 3: return f(Rows<3>{});
    default: return f(Rows<4>{});
  }
}

// Calls f(Rows<R>{}, Rows<NC>{}, r, st_r) for each kMr-row strip of nr rows that has keys:
// R rows from row r, NC = ceil(strip_keys[r / kMr] / 16) zmm columns, st_r its rows' softmax
// state (nullptr without st; with it, the rows of strips without keys get alpha = 1). Before
// each strip, keys or not, calls before(r / kMr): work the caller spreads over the strips.
template <class F, class Before = NoStripWork>
inline void for_score_strips(const int64_t* strip_keys, int64_t nr, const RowState* st, const F& f,
                             const Before& before = Before{}) {
  for (int64_t r = 0; r < nr; r += kMr) {
    before(r / kMr);
    const int64_t n = strip_keys[r / kMr];
    if (n == 0) {  // no keys for these rows: nothing to add, nothing to rescale
      for (int64_t i = r; st && i < r + kMr && i < nr; ++i) st->alpha[i] = 1.0f;
      continue;
    }
    const RowState at = st ? st->offset(r) : RowState{};
    with_zmm_columns(n, [&](auto NC) {
      with_rows<kMr>(static_cast<int>(nr - r), [&](auto R) { f(R, NC, r, st ? &at : nullptr); });
    });
  }
}

// S = Q K^T for nr rows against the packed K tile: the rows of strip r / kMr over its first
// strip_keys[r / kMr] keys (rounded up to 16; a strip with none is skipped). With st (on a
// clipped tile st->lo / hi give each row's keys, and st->keep / add a mask) the rows' online
// softmax runs on the scores in registers and s receives the probabilities. before(i) runs
// ahead of strip i (for_score_strips).
template <class Before = NoStripWork>
inline void qk_packed_wide(const float* q, int64_t q_stride, const float* kt, int64_t d, float* s,
                           int64_t s_stride, const int64_t* strip_keys, int64_t nr,
                           const RowState* st, const Before& before = Before{}) {
  for_score_strips(
      strip_keys, nr, st,
      [&](auto R, auto NC, int64_t r, const RowState* st_r) {
        qk_packed_zmm<decltype(R)::value, decltype(NC)::value>(q + r * q_stride, q_stride, kt, d,
                                                               s + r * s_stride, s_stride, st_r);
      },
      before);
}

// O = diag(alpha) O + P V for nr rows over V of dp columns (a multiple of 16): fp32 rows in
// place at v_stride, or (v_stride 0) the column panels of pack_v_wide; the rows of strip
// r / kMr take the first strip_keys[r / kMr] keys (their other p are 0).
inline void pv_f32_wide(float* o, int64_t o_stride, const float* alpha, const float* p,
                        int64_t p_stride, const float* v, int64_t v_stride,
                        const int64_t* strip_keys, int64_t dp, int64_t nr) {
  for (int64_t c = 0; c < dp; c += 64) {
    const float* vc = v_stride ? v + c : v + c * kGroupKeys;
    const int64_t vc_stride = v_stride ? v_stride : 64;
    for (int64_t r = 0; r < nr; r += kMr)
      with_rows<kMr>(static_cast<int>(nr - r), [&](auto R) {
        constexpr int kR = decltype(R)::value;
        float* oc = o + r * o_stride + c;
        const float* pr = p + r * p_stride;
        with_zmm_columns(dp - c, [&](auto NC) {
          pv_f32_zmm<kR, decltype(NC)::value>(oc, o_stride, alpha + r, pr, p_stride, vc, vc_stride,
                                              strip_keys[r / kMr]);
        });
      });
  }
}

// Prefill tiles of bf16 inputs through vdpbf16ps: when the CPU has AVX512_BF16 and d is even.
inline bool bf16_tiles(int64_t d) { return d % 2 == 0 && bf16_dot(); }

// S = scale Q K^T for nr rows of q words (d / 2 per row, pitch q_stride) against nk keys of
// bf16 storage, strip by strip as qk_packed_wide; kp is the scratch for the packed tile
// (d / 2 x kKeyTile words).
FF_BF16_DOT inline void qk_bf16_tile(const uint32_t* q, int64_t q_stride, const uint16_t* k,
                                     int64_t k_stride, int64_t nk, int64_t d, float scale,
                                     uint32_t* kp, float* s, int64_t s_stride,
                                     const int64_t* strip_keys, int64_t nr, const RowState* st) {
  pack_k_pairs(k, k_stride, nk, d, kp);
  for_score_strips(strip_keys, nr, st, [&](auto R, auto NC, int64_t r, const RowState* st_r) {
    qk_bf16_zmm<decltype(R)::value, decltype(NC)::value>(q + r * q_stride, q_stride, kp, d / 2,
                                                         scale, s + r * s_stride, s_stride, st_r);
  });
}

// O = diag(alpha) O + P V for nr rows over nk keys of bf16 V storage (strip r / kMr over its
// first strip_keys[r / kMr]); P (pitch p_stride) is rounded to bf16 in place; vp is the
// scratch for the paired tile (ceil(nk / 2) x dp words).
FF_BF16_DOT inline void pv_bf16_tile(float* o, int64_t o_stride, const float* alpha, float* p,
                                     int64_t p_stride, const uint16_t* v, int64_t v_stride,
                                     int64_t nk, int64_t d, int64_t dp, uint32_t* vp,
                                     const int64_t* strip_keys, int64_t nr) {
  pack_v_pairs(v, v_stride, nk, d, vp, dp);
  round_p_pairs(p, p_stride, nk, nr);
  const uint32_t* pw = reinterpret_cast<const uint32_t*>(p);
  for (int64_t c = 0; c < dp; c += 64)
    for (int64_t r = 0; r < nr; r += kMr)
      with_rows<kMr>(static_cast<int>(nr - r), [&](auto R) {
        with_zmm_columns(dp - c, [&](auto NC) {
          pv_bf16_zmm<decltype(R)::value, decltype(NC)::value>(o + r * o_stride + c, o_stride, alpha + r,
                                                               pw + r * p_stride, p_stride, vp + c, dp,
                                                               (strip_keys[r / kMr] + 1) / 2);
        });
      });
}
#else
inline bool bf16_tiles(int64_t) { return false; }
inline bool bf16_wide_dot(int64_t) { return false; }
inline void qk_wide_bf16(const uint32_t*, const uint16_t*, int64_t, int64_t, int64_t, float, float*, int64_t) {}
inline void qk_bf16_tile(const uint32_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float,
                         uint32_t*, float*, int64_t, const int64_t*, int64_t, const RowState*) {}
inline void pv_bf16_tile(float*, int64_t, const float*, float*, int64_t, const uint16_t*, int64_t,
                         int64_t, int64_t, int64_t, uint32_t*, const int64_t*, int64_t) {}
inline bool wide_rows(int64_t) { return false; }
constexpr bool kZmmTiles = false;
constexpr bool kFusedSoftmax = false;
template <DType T>
inline void qk_wide(const float*, int64_t, const typename Elem<T>::type*, int64_t, int64_t, int64_t,
                    float*, int64_t, int64_t, int64_t) {}
template <DType T>
inline void pv_wide(float*, int64_t, const float*, const float*, int64_t,
                    const typename Elem<T>::type*, int64_t, int64_t, int64_t, int64_t, int64_t) {}
template <class Before = NoStripWork>
inline void qk_packed_wide(const float*, int64_t, const float*, int64_t, float*, int64_t,
                           const int64_t*, int64_t, const RowState*, const Before& = Before{}) {}
inline void pv_f32_wide(float*, int64_t, const float*, const float*, int64_t, const float*, int64_t,
                        const int64_t*, int64_t, int64_t) {}
#endif

}  // namespace attention
}  // namespace FF_ISA_NS
}  // namespace ff
