// AMX-BF16 prefill tiles of the flash-attention forward (bf16 inputs, head dim a multiple of 32).
//
// tdpbf16ps multiplies a 16 x 32 bf16 tile by a 32 x 16 one (pairs along the reduction dim) into
// a 16 x 16 fp32 tile: 8192 multiply-adds per instruction, against 32 for a zmm vdpbf16ps.
// The operands are the layouts the vdpbf16ps tiles already pack (tiles.h):
//   S = Q K^T:  A = q rows as bf16 words (pitch dp / 2 words), B = pack_k_pairs' Kp[x2][j];
//   O += P V:   A = P as bf16 pairs, written by softmax_amx_row, B = pack_v_pairs' Vp[j2][x];
// C is the fp32 score tile, or the O accumulator itself (loaded, accumulated, stored back:
// rows whose running max moved are rescaled in memory first). Register blocking 2 x 2: C in
// tmm0..3, A in tmm4..5, B in tmm6..7, all configured 16 rows x 64 bytes.
//
// Row tiles are 16 rows; a block's last tile may reach past its nr rows into the scratch's
// other rows (kRowTile of them are allocated): those rows compute garbage that only lands in
// rows of S and O nobody reads. Key steps are 32 keys: the P columns and V pair rows from a
// tile's last key up to the next multiple of 32 are zeroed first, so stale scratch never meets
// a live row. These functions carry the AMX target and run only when amx_tiles() says the CPU
// has AMX-BF16 and the OS granted this process the tile registers.
#pragma once

#include <limits>

#include "kernels/cpu/attention/tiles.h"
#include "kernels/cpu/simd/amx.h"

namespace ff {
namespace FF_ISA_NS {
namespace attention {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(FF_COMPILER_HAS_AMX)
// Applies op(c, i, j, a, b) to each C tile of an RT x CT block (1 or 2 tiles of 16 each way):
// C tile (i, j) is tmm c = 2i + j, its A tile tmm a = 4 + i, its B tile tmm b = 6 + j. Tile
// numbers are literals: the intrinsics paste them into the instruction text.
#define FF_AMX_FOR_C(RT, CT, op)                  \
  do {                                            \
    op(0, 0, 0, 4, 6);                            \
    if constexpr (CT > 1) op(1, 0, 1, 4, 7);      \
    if constexpr (RT > 1) op(2, 1, 0, 5, 6);      \
    if constexpr (RT > 1 && CT > 1) op(3, 1, 1, 5, 7); \
  } while (0)

// c (RT x CT tiles of 16 x 16 fp32, pitch c_stride floats) += the products of a's rows (pitch
// a_stride words) and b's columns (pitch b_stride words) over n words: a's rows read 16 words
// (32 bf16) at a time, b in steps of 16 rows; n is a multiple of 16. With zero_c, c starts at 0.
template <int RT, int CT>
FF_AMX inline void tile_dot_amx(float* c, int64_t c_stride, bool zero_c, const uint32_t* a,
                                int64_t a_stride, const uint32_t* b, int64_t b_stride, int64_t n) {
  const int64_t cs = c_stride * 4, as = a_stride * 4, bs = b_stride * 4;
  // Long reductions (P V over 64+ keys) touch the next step's A and B lines while this step's
  // tiles multiply: the operands stream from L2, and the tile loads otherwise wait for them
  // (B1 H32 L2048 D128 bf16 prefill 0.74x, D64 0.82x in alternating runs of two builds). The
  // short Q K^T reductions measured slower with it.
  const bool prefetch = n >= 64;
#define FF_C_AT(i, j) (c + (i) * 16 * c_stride + (j) * 16)
#define FF_C_INIT(t, i, j, ta, tb) \
  {                                \
    if (zero_c)                    \
      _tile_zero(t);               \
    else                           \
      _tile_loadd(t, FF_C_AT(i, j), cs); \
  }
#define FF_C_DOT(t, i, j, ta, tb) _tile_dpbf16ps(t, ta, tb)
#define FF_C_STORE(t, i, j, ta, tb) _tile_stored(t, FF_C_AT(i, j), cs)
  FF_AMX_FOR_C(RT, CT, FF_C_INIT);
  for (int64_t k = 0; k < n; k += 16) {
    if (prefetch && k + 16 < n) {
      for (int i = 0; i < 16 * RT; ++i) _mm_prefetch(reinterpret_cast<const char*>(a + i * a_stride + k + 16), _MM_HINT_T0);
      for (int i = 0; i < 16; ++i) _mm_prefetch(reinterpret_cast<const char*>(b + (k + 16 + i) * b_stride), _MM_HINT_T0);
      if constexpr (CT > 1)
        for (int i = 0; i < 16; ++i) _mm_prefetch(reinterpret_cast<const char*>(b + (k + 16 + i) * b_stride + 16), _MM_HINT_T0);
    }
    _tile_loadd(4, a + k, as);
    if constexpr (RT > 1) _tile_loadd(5, a + 16 * a_stride + k, as);
    _tile_loadd(6, b + k * b_stride, bs);
    if constexpr (CT > 1) _tile_loadd(7, b + k * b_stride + 16, bs);
    FF_AMX_FOR_C(RT, CT, FF_C_DOT);
  }
  FF_AMX_FOR_C(RT, CT, FF_C_STORE);
#undef FF_C_AT
#undef FF_C_INIT
#undef FF_C_DOT
#undef FF_C_STORE
}
#undef FF_AMX_FOR_C

// Calls tile_dot_amx with RT = min(2, ceil(rows / 16)), CT = min(2, ceil(cols / 16)).
FF_AMX inline void tile_dot_amx_any(int64_t rows, int64_t cols, float* c, int64_t c_stride,
                                    bool zero_c, const uint32_t* a, int64_t a_stride, const uint32_t* b,
                                    int64_t b_stride, int64_t n) {
  if (rows > 16) {
    if (cols > 16) return tile_dot_amx<2, 2>(c, c_stride, zero_c, a, a_stride, b, b_stride, n);
    return tile_dot_amx<2, 1>(c, c_stride, zero_c, a, a_stride, b, b_stride, n);
  }
  if (cols > 16) return tile_dot_amx<1, 2>(c, c_stride, zero_c, a, a_stride, b, b_stride, n);
  tile_dot_amx<1, 1>(c, c_stride, zero_c, a, a_stride, b, b_stride, n);
}

// The keys the rows [r0, r1) of a block need in this tile: the most of their strips' keys.
inline int64_t rows_keys(const int64_t* strip_keys, int64_t r0, int64_t r1) {
  int64_t n = 0;
  for (int64_t st = r0 / kMr; st * kMr < r1; ++st) n = strip_keys[st] > n ? strip_keys[st] : n;
  return n;
}

// The K and V of one tile in the operand layouts of the AMX tiles: kp = Kp[x2][j] (pack_k_pairs,
// rows of `pitch` words: pitch >= round_up(nk, 32), a multiple of 16), vp = Vp[j2][x] (pack_v_pairs,
// rows of dp words) with the pair rows from ceil(nk / 2) up to round_up(nk, 32) / 2 zeroed, so a
// 32-key step past the tile's last key multiplies zeros.
inline void pack_amx_kv(const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride,
                        int64_t nk, int64_t d, int64_t dp, int64_t pitch, uint32_t* kp, uint32_t* vp) {
  pack_k_pairs(k, k_stride, nk, d, kp, pitch);
  pack_v_pairs(v, v_stride, nk, d, vp, dp);
  for (int64_t j2 = (nk + 1) / 2; j2 < round_up(nk, 32) / 2; ++j2)
    for (int64_t x = 0; x < dp; x += 16) _mm512_storeu_si512(vp + j2 * dp + x, _mm512_setzero_si512());
}

// 2^x on the lanes of `keep` where x >= -126 (or NaN: it stays NaN), 0 on the others: the
// probabilities of the P operand (x <= kMaxSlack), which are rounded to bf16 (up to 2^-9
// relative) right after. A degree-3 polynomial for 2^r on [-1/2, 1/2] (1.0e-4 relative
// error, a twentieth of that rounding; fitted for it by iteratively reweighted least squares),
// and no clamping: lanes below -126 are masked, and a pass whose x rise past the slack (to inf
// above 127) is redone. 8 instructions where exp2_16 takes 13 and a masked move.
inline __m512 exp2_p16(__m512 x, __mmask16 keep) {
  constexpr float kC[3] = {5.500858e-2f, 2.4221037e-1f, 6.932829e-1f};
  keep = _mm512_mask_cmp_ps_mask(keep, x, _mm512_set1_ps(simd::exp2_poly::kLo), _CMP_NLT_UQ);  // NaN kept
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kC[0]), r, _mm512_set1_ps(kC[1]));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC[2]));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// x = scale s[j..j+16) - m (in base 2, plus the additive mask) on the lanes of `in` the mask
// keeps; `in` loses the lanes the bool mask drops. Lanes outside `in` are left unread.
FF_BF16_DOT inline __m512 scaled_scores(const float* s, int64_t j, __mmask16* in, __m512 scale,
                                        __m512 neg_m, const MaskRow& mr) {
  if (mr.keep) {
    const __m128i b = _mm_maskz_loadu_epi8(*in, mr.keep + j);
    *in = _mm_mask_test_epi8_mask(*in, b, b);
  }
  if (!mr.add) return _mm512_fmadd_ps(_mm512_maskz_loadu_ps(*in, s + j), scale, neg_m);
  // the mask before m, as the other tiles add them (mask_base2: fp32's lowest takes -m back to 0);
  // a -inf entry drops its lane as a bool False does (a NaN score there would make NaN + -inf)
  const __m512 add = _mm512_maskz_loadu_ps(*in, mr.add + j);
  *in = _mm512_mask_cmp_ps_mask(*in, add, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_UQ);
  const __m512 x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(*in, s + j), scale, mask_base2(add));
  return _mm512_add_ps(x, neg_m);
}

// The largest scale s (plus the mask) over the lanes of s in [a, e) the mask keeps, among the
// 16-key steps [from, to) (-inf if none).
FF_BF16_DOT inline float scaled_max(const float* s, int64_t a, int64_t e, int64_t from, int64_t to,
                                    float scale, const MaskRow& mr) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const __m512i av = _mm512_set1_epi32(static_cast<int>(a)), ev = _mm512_set1_epi32(static_cast<int>(e));
  const __m512i sixteen = _mm512_set1_epi32(16);
  const __m512 sv = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
  __m512i idx = _mm512_add_epi32(kLanes16(), _mm512_set1_epi32(static_cast<int>(from)));
  __m512 hi = _mm512_set1_ps(-kInf);
  for (int64_t j = from; j < to; j += 16, idx = _mm512_add_epi32(idx, sixteen)) {
    __mmask16 in = lanes_in(idx, av, ev);
    const __m512 x = scaled_scores(s, j, &in, sv, zero, mr);
    hi = _mm512_mask_max_ps(hi, in, hi, x);
  }
  return _mm512_reduce_max_ps(hi);
}

// Whether any lane of s in [a, e) the mask keeps scales to NaN (scale s plus the mask): the max
// of scaled_max passes over NaN lanes (vmaxps drops a NaN first operand).
FF_BF16_DOT inline bool scaled_has_nan(const float* s, int64_t a, int64_t e, float scale, const MaskRow& mr) {
  const __m512i av = _mm512_set1_epi32(static_cast<int>(a)), ev = _mm512_set1_epi32(static_cast<int>(e));
  const __m512i sixteen = _mm512_set1_epi32(16);
  const __m512 sv = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
  __m512i idx = _mm512_add_epi32(kLanes16(), _mm512_set1_epi32(static_cast<int>(a / 16 * 16)));
  for (int64_t j = a / 16 * 16; j < e; j += 16, idx = _mm512_add_epi32(idx, sixteen)) {
    __mmask16 in = lanes_in(idx, av, ev);
    const __m512 x = scaled_scores(s, j, &in, sv, zero, mr);
    if (_mm512_mask_cmp_ps_mask(in, x, x, _CMP_UNORD_Q)) return true;
  }
  return false;
}

// p = 2^(scale s - m) (plus the mask) over the 32-key steps [j_lo, j_hi) of one score row, 0
// outside [a, e) and where the mask drops a key, written to pw as bf16 pairs (words [j / 2,
// j / 2 + 16) per step); returns their sum. With rise, also the largest scale s - m among the
// lanes kept.
FF_BF16_DOT inline float exp_pairs(const float* s, int64_t a, int64_t e, int64_t j_lo, int64_t j_hi,
                                   float scale, float m, const MaskRow& mr, uint32_t* pw, float* rise) {
  const __m512i av = _mm512_set1_epi32(static_cast<int>(a)), ev = _mm512_set1_epi32(static_cast<int>(e));
  const __m512i sixteen = _mm512_set1_epi32(16);
  const __m512 sv = _mm512_set1_ps(scale), mv = _mm512_set1_ps(-m);
  __m512 sum = _mm512_setzero_ps(), top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i idx = _mm512_add_epi32(kLanes16(), _mm512_set1_epi32(static_cast<int>(j_lo)));
  for (int64_t j = j_lo; j < j_hi; j += 32) {
    __mmask16 in0 = 0xFFFF, in1 = 0xFFFF;  // steps wholly inside [a, e) keep every lane
    if (j < a || j + 32 > e) {
      in0 = lanes_in(idx, av, ev);
      in1 = lanes_in(_mm512_add_epi32(idx, sixteen), av, ev);
    }
    idx = _mm512_add_epi32(idx, _mm512_add_epi32(sixteen, sixteen));
    const __m512 x0 = scaled_scores(s, j, &in0, sv, mv, mr);
    const __m512 x1 = scaled_scores(s, j + 16, &in1, sv, mv, mr);
    if (rise) {
      top = _mm512_mask_max_ps(top, in0, top, x0);
      top = _mm512_mask_max_ps(top, in1, top, x1);
    }
    const __m512 p0 = exp2_p16(x0, in0), p1 = exp2_p16(x1, in1);
    sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
    _mm512_storeu_si512(pw + j / 2, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
  }
  if (rise) *rise = _mm512_reduce_max_ps(top);
  return _mm512_reduce_add_ps(sum);
}

// The online-softmax step of one row of an AMX tile's raw scores s (Q K^T, not yet scaled),
// only keys [a, e) seen: the running max m and sum l updated, the returned alpha = 2^(m_old -
// m_new), and p = 2^(scale s - m_new) written to pw as the P operand of pv_amx_tile, bf16 pairs
// in its first nk32 / 2 words (0 outside [a, e), up to nk32, a multiple of 32). m moves only
// when the scores rise more than kMaxSlack above it: one pass, against the old m, computes P
// and how far they rose, and only a rise past the slack takes a second pass against the new
// max. A row's first tile (m = -inf) takes m from its first 16 keys in range (all of them
// when those are -inf: masked). The scale rides on the exponent's multiply-add. A row with no
// finite score yet keeps m = -inf, l = 0 and gets p = 0, alpha = 1, as softmax_update.
FF_BF16_DOT inline float softmax_amx_row(const float* s, int64_t a, int64_t e, int64_t nk32, float scale,
                                         const MaskRow& mr, float* m, float* l, uint32_t* pw) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float m_new = *m;
  if (m_new == -kInf && a < e) m_new = scaled_max(s, a, e, a / 16 * 16, a / 16 * 16 + 16, scale, mr);
  if (m_new == -kInf && a < e) m_new = scaled_max(s, a, e, a / 16 * 16, e, scale, mr);
  // 32-key steps wholly outside [a, e) (the causal diagonal's far side) are zeros, not computed
  const int64_t j_lo = m_new == -kInf ? nk32 : a / 32 * 32;
  const int64_t j_hi = m_new == -kInf ? nk32 : round_up(e, 32);
  for (int64_t j = 0; j < j_lo; j += 32) _mm512_storeu_si512(pw + j / 2, _mm512_setzero_si512());
  for (int64_t j = j_hi; j < nk32; j += 32) _mm512_storeu_si512(pw + j / 2, _mm512_setzero_si512());
  if (m_new == -kInf) {  // a NaN score (which the max passes over) makes l NaN
    if (a < e && scaled_has_nan(s, a, e, scale, mr)) *l = std::numeric_limits<float>::quiet_NaN();
    return 1.0f;
  }
  float rise = 0.0f;
  float sum = exp_pairs(s, a, e, j_lo, j_hi, scale, m_new, mr, pw, &rise);
  if (rise > kMaxSlack) {
    m_new += rise;
    sum = exp_pairs(s, a, e, j_lo, j_hi, scale, m_new, mr, pw, nullptr);
  }
  if (m_new == *m) {
    *l += sum;
    return 1.0f;
  }
  return advance_row(m, l, m_new, sum);
}

// S = Q K^T (unscaled) for nr rows of q words (d / 2 per row, pitch q_stride words) against a
// packed K tile (pack_amx_kv, rows of s_stride words); each 32-row group goes as far as its
// strips' keys (in 16-key tiles).
FF_AMX inline void qk_amx_tile(const uint32_t* q, int64_t q_stride, const uint32_t* kp, int64_t d,
                               float* s, int64_t s_stride, const int64_t* strip_keys, int64_t nr) {
  amx_fence();
  for (int64_t r = 0; r < nr; r += 32) {
    const int64_t rows = nr - r, n = rows_keys(strip_keys, r, r + (rows < 32 ? rows : 32));
    for (int64_t c = 0; c < n; c += 32)
      tile_dot_amx_any(rows, n - c, s + r * s_stride + c, s_stride, true, q + r * q_stride, q_stride,
                       kp + c, s_stride, d / 2);
  }
  amx_fence();
}

// O = diag(alpha) O + P V for nr rows over nk keys of a packed V tile (pack_amx_kv), each 32-row
// group over its strips' keys (in 32-key steps). P (pitch p_stride words) holds each row's
// probabilities as bf16 pairs (softmax_amx_row), 0 up to round_up(nk, 32).
FF_AMX inline void pv_amx_tile(float* o, int64_t o_stride, const float* alpha, const uint32_t* pw,
                               int64_t p_stride, const uint32_t* vp, int64_t dp,
                               const int64_t* strip_keys, int64_t nr) {
  for (int64_t r = 0; r < nr; ++r) {
    if (alpha[r] == 1.0f) continue;
    const __m512 a = _mm512_set1_ps(alpha[r]);
    float* orow = o + r * o_stride;
    for (int64_t x = 0; x < dp; x += 16) _mm512_storeu_ps(orow + x, _mm512_mul_ps(_mm512_loadu_ps(orow + x), a));
  }
  amx_fence();
  for (int64_t r = 0; r < nr; r += 32) {
    const int64_t rows = nr - r;
    const int64_t n2 = round_up(rows_keys(strip_keys, r, r + (rows < 32 ? rows : 32)), 32) / 2;
    if (n2 == 0) continue;
    for (int64_t c = 0; c < dp; c += 32)
      tile_dot_amx_any(rows, dp - c, o + r * o_stride + c, o_stride, false, pw + r * p_stride,
                       p_stride, vp + c, dp, n2);
  }
  amx_fence();
}

// Prefill tiles of bf16 inputs on AMX: when the variant allows it and d is a multiple of 32.
inline bool amx_bf16_tiles(int64_t d) { return d % 32 == 0 && amx_tiles(); }
#else
class AmxTiles {};
inline bool amx_bf16_tiles(int64_t) { return false; }
inline void pack_amx_kv(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, int64_t,
                        int64_t, uint32_t*, uint32_t*) {}
inline void qk_amx_tile(const uint32_t*, int64_t, const uint32_t*, int64_t, float*, int64_t,
                        const int64_t*, int64_t) {}
inline void pv_amx_tile(float*, int64_t, const float*, const uint32_t*, int64_t, const uint32_t*,
                        int64_t, const int64_t*, int64_t) {}
inline float softmax_amx_row(const float*, int64_t, int64_t, int64_t, float, const MaskRow&, float*, float*,
                             uint32_t*) {
  return 1.0f;
}
#endif

}  // namespace attention
}  // namespace FF_ISA_NS
}  // namespace ff
