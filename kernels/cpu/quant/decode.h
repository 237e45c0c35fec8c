// Decoding of compressed weight rows into fp32, eight values at a time. The generic build
// extracts codes with scalar shifts; the AVX2 build uses variable shifts, byte shuffles and
// register LUTs for the same result (the generic one is its oracle); AVX-512 builds decode
// dense 4-bit affine, 4-bit LUT and int8 rows sixteen values at a time (decode_row).
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "kernels/cpu/quant/api.h"
#include "kernels/cpu/simd/vec.h"

namespace ff {
namespace FF_ISA_NS {
namespace quant {

using simd::f32x8;

// Code number `index` (any position) of a b-bit LSB-first stream.
inline uint32_t code_at(const uint8_t* stream, int64_t index, int bits) {
  const int64_t bit = index * bits;
  const uint8_t* p = stream + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  uint32_t v = p[0];
  if (shift + bits > 8) v |= static_cast<uint32_t>(p[1]) << 8;
  return (v >> shift) & ((1u << bits) - 1);
}

// The eight codes starting at element `index` (a multiple of 8) of a B-bit stream (B <= 8):
// they fill exactly B bytes.
// Composed from power-of-two loads so the value stays in registers (a B-byte memcpy goes
// through the stack and stalls store forwarding).
template <class T>
inline uint64_t load_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <int B>
inline uint64_t load_code_bytes(const uint8_t* stream, int64_t index) {
  const uint8_t* p = stream + (index >> 3) * B;
  if constexpr (B == 1) return p[0];
  if constexpr (B == 2) return load_le<uint16_t>(p);
  if constexpr (B == 3) return load_le<uint16_t>(p) | uint64_t{p[2]} << 16;
  if constexpr (B == 4) return load_le<uint32_t>(p);
  if constexpr (B == 5) return load_le<uint32_t>(p) | uint64_t{p[4]} << 32;
  if constexpr (B == 6) return load_le<uint32_t>(p) | load_le<uint16_t>(p + 4) << 32;
  if constexpr (B == 7) return load_le<uint32_t>(p) | load_le<uint16_t>(p + 4) << 32 | uint64_t{p[6]} << 48;
  return load_le<uint64_t>(p);
}

#if defined(__AVX2__)
struct i32x8 {
  __m256i v;
};
// Eight B-bit codes packed LSB-first in u (B < 8).
template <int B>
inline i32x8 codes_from_bits(uint64_t u);
template <int B>
inline i32x8 codes8(const uint8_t* stream, int64_t index) {
  if constexpr (B == 8) {
    return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(stream + index)))};
  } else {
    return codes_from_bits<B>(load_code_bytes<B>(stream, index));
  }
}
template <int B>
inline i32x8 codes_from_bits(uint64_t u) {
  {
    const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
    if constexpr (B <= 4) {
      const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
      return {_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(u)), shifts), mask)};
    } else {
      // 5..7 bits: lane i takes the 16-bit window at byte (i*B)/8, shifted by (i*B)%8.
#define FF_W(i) static_cast<char>(((i) * B) >> 3), static_cast<char>((((i) * B) >> 3) + 1), -1, -1
      const __m256i ctrl = _mm256_setr_epi8(FF_W(0), FF_W(1), FF_W(2), FF_W(3), FF_W(4), FF_W(5), FF_W(6), FF_W(7));
#undef FF_W
      const __m256i sh = _mm256_setr_epi32(0, B & 7, (2 * B) & 7, (3 * B) & 7, (4 * B) & 7, (5 * B) & 7,
                                           (6 * B) & 7, (7 * B) & 7);
      const __m128i bytes = _mm_cvtsi64_si128(static_cast<int64_t>(u));
      const __m256i win = _mm256_shuffle_epi8(_mm256_set_m128i(bytes, bytes), ctrl);
      return {_mm256_and_si256(_mm256_srlv_epi32(win, sh), mask)};
    }
  }
}
inline f32x8 to_f32(i32x8 c) { return {_mm256_cvtepi32_ps(c.v)}; }
// lut[c] for 8 codes; the LUT has 2^B entries.
template <int B>
inline f32x8 lookup(const float* lut, i32x8 c) {
  if constexpr (B <= 3) {
    // masked load: the LUT row has only 2^B entries
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(1 << B), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return {_mm256_permutevar8x32_ps(_mm256_maskload_ps(lut, live), c.v)};
#if defined(__AVX512VL__)
  } else if constexpr (B == 4) {  // one two-table permute: bit 3 of the index picks the table
    return {_mm256_permutex2var_ps(_mm256_loadu_ps(lut), c.v, _mm256_loadu_ps(lut + 8))};
#endif
  } else if constexpr (B == 4) {
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(lut), c.v);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(lut + 8), c.v);
    return {_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c.v, 28)))};
  } else {
    return {_mm256_i32gather_ps(lut, c.v, 4)};
  }
}
#else
struct i32x8 {
  int32_t v[8];
};
template <int B>
inline i32x8 codes8(const uint8_t* stream, int64_t index) {
  const uint64_t u = load_code_bytes<B>(stream, index);
  i32x8 c;
  for (int i = 0; i < 8; ++i) c.v[i] = static_cast<int32_t>((u >> (i * B)) & ((1u << B) - 1));
  return c;
}
inline f32x8 to_f32(i32x8 c) {
  float f[8];
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(c.v[i]);
  return simd::load(f);
}
template <int B>
inline f32x8 lookup(const float* lut, i32x8 c) {
  float f[8];
  for (int i = 0; i < 8; ++i) f[i] = lut[c.v[i]];
  return simd::load(f);
}
#endif

// Calls f(std::integral_constant<int, B>) for the runtime code width (1..8).
template <class F>
inline void bits_switch(int bits, const F& f) {
  switch (bits) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// W[n, k0 : k0 + len] -> out (fp32: QuantizedWeight.dequantize()'s values, to an FMA rounding).
// Dense: k0 is a multiple of 8; len may end in a tail only for int8 (K % 8 != 0).
inline void decode_row(const QWeight& w, int64_t n, int64_t k0, int64_t len, float* out);

inline float value_at(const QWeight& w, int64_t n, int64_t k, int64_t code_index) {
  switch (w.codes_kind) {
    case QCodes::affine: {
      const int64_t g = n * (w.k / w.group) + k / w.group;
      const float q = static_cast<float>(code_at(static_cast<const uint8_t*>(w.codes), code_index, w.bits));
      const float sq = w.scales[g] * q;  // (the compiler may fuse this into an FMA)
      return sq + w.biases[g];
    }
    case QCodes::int8: {
      int32_t q = static_cast<const int8_t*>(w.codes)[code_index];
      if (w.zero_points) q -= w.zero_points[n];
      return static_cast<float>(q) * w.scales[n];
    }
    case QCodes::lut:
      return w.lut[(n / w.group) << w.bits |
                   code_at(static_cast<const uint8_t*>(w.codes), code_index, w.bits)];
    default:
      return static_cast<const float*>(w.codes)[code_index];
  }
}

inline int popcount8(unsigned b) {
  static constexpr uint8_t kNibble[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};
  return kNibble[b & 15] + kNibble[(b >> 4) & 15];
}

// Survivors among the mask bytes [b, e) (the baseline ISA has no popcount instruction).
inline int64_t count_kept(const uint8_t* b, const uint8_t* e) {
  int64_t c = 0;
  for (; b + 8 <= e; b += 8) {
    uint64_t v = load_le<uint64_t>(b);  // SWAR popcount of 64 bits
    v = v - ((v >> 1) & 0x5555555555555555ull);
    v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
    v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0full;
    c += static_cast<int64_t>((v * 0x0101010101010101ull) >> 56);
  }
  for (; b < e; ++b) c += popcount8(*b);
  return c;
}

// Pruned rows: walk the mask a byte (8 columns) at a time; each kept column takes the next
// code of the row's survivors. The scalar byte decoder is the generic build's path and the
// AVX2 build's fallback near the end of the code stream.
struct SparseRow {
  const QWeight& w;
  const uint8_t* stream;
  const float* sc;   // affine scales of the row
  const float* bi;   // affine biases of the row
  const float* lut;  // LUT of the row
  SparseRow(const QWeight& w_, int64_t n)
      : w(w_),
        stream(static_cast<const uint8_t*>(w_.codes)),
        sc(w_.scales ? w_.scales + n * (w_.k / w_.group) : nullptr),
        bi(w_.biases ? w_.biases + n * (w_.k / w_.group) : nullptr),
        lut(w_.lut ? w_.lut + ((n / w_.group) << w_.bits) : nullptr) {}

  // Columns k .. k+7 (mask byte m) from survivor p on; returns the next survivor.
  int64_t byte_scalar(unsigned m, int64_t k, int64_t p, float* out) const {
    for (int j = 0; j < 8; ++j) out[j] = 0.0f;
    const int64_t g = w.codes_kind == QCodes::affine ? k / w.group : 0;  // 8 | group
    for (; m; m &= m - 1) {
      const int j = __builtin_ctz(m);
      float v;
      if (w.codes_kind == QCodes::affine) {
        const float sq = sc[g] * static_cast<float>(code_at(stream, p, w.bits));
        v = sq + bi[g];
      } else if (w.codes_kind == QCodes::lut) {
        v = lut[code_at(stream, p, w.bits)];
      } else {
        v = static_cast<const float*>(w.codes)[p];
      }
      ++p;
      out[j] = v;
    }
    return p;
  }
};

#if defined(__AVX2__)
// For a mask byte m, lane j takes the survivor of rank popcount(m & ((1 << j) - 1)).
struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m)
      for (int j = 0; j < 8; ++j) idx[m][j] = __builtin_popcount(m & ((1 << j) - 1)) & 7;
  }
};
inline const ExpandTable& expand_table() {
  static const ExpandTable t;
  return t;
}

// Eight consecutive codes from element p (any position) of a B-bit stream; reads 8 bytes.
template <int B>
inline i32x8 codes8_at(const uint8_t* stream, int64_t p) {
  if constexpr (B == 8) {
    return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(stream + p)))};
  } else {
    const int64_t bit = p * B;
    return codes_from_bits<B>(load_le<uint64_t>(stream + (bit >> 3)) >> (bit & 7));
  }
}

// Mask byte m of the 8 columns at k, whose first survivor is number p of the stream: the kept
// values land in the lanes of m's set bits, the others are 0. (The caller keeps every 8-byte
// code read inside the stream.)
template <int B>
inline void expand_byte(const SparseRow& row, unsigned m, int64_t k, int64_t p, float* out) {
  const QWeight& w = row.w;
  if (!m) {
    simd::store(out, simd::zero());
    return;
  }
  __m256 v;
  if (w.codes_kind == QCodes::affine) {
    const int64_t g = k / w.group;
    v = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(row.sc[g]), to_f32(codes8_at<B>(row.stream, p)).v),
                      _mm256_set1_ps(row.bi[g]));
  } else if (w.codes_kind == QCodes::lut) {
    v = lookup<B>(row.lut, codes8_at<B>(row.stream, p)).v;
  } else {
#if defined(__AVX512VL__)
    _mm256_storeu_ps(out, _mm256_maskz_expandloadu_ps(static_cast<__mmask8>(m), static_cast<const float*>(w.codes) + p));
    return;
#else
    const __m256i first = _mm256_cmpgt_epi32(_mm256_set1_epi32(popcount8(m)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    v = _mm256_maskload_ps(static_cast<const float*>(w.codes) + p, first);
#endif
  }
#if defined(__AVX512VL__)
  _mm256_storeu_ps(out, _mm256_maskz_expand_ps(static_cast<__mmask8>(m), v));
#else
  const __m256i bitv = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 e = _mm256_permutevar8x32_ps(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(expand_table().idx[m])));
  const __m256i live = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bitv), bitv);
  _mm256_storeu_ps(out, _mm256_and_ps(e, _mm256_castsi256_ps(live)));
#endif
}

// Per-byte survivor counts of 8 mask bytes, summed from byte 0 up: byte j of the result is the
// number of survivors in bytes 0..j (at most 64: no byte overflows).
inline uint64_t inclusive_counts(uint64_t m) {
  m = m - ((m >> 1) & 0x5555555555555555ull);
  m = (m & 0x3333333333333333ull) + ((m >> 2) & 0x3333333333333333ull);
  m = (m + (m >> 4)) & 0x0f0f0f0f0f0f0f0full;
  return m * 0x0101010101010101ull;
}

// 64 columns at a time, each byte's first survivor from the prefix counts of the word, so the
// eight decodes do not wait on one another (a survivor cursor advanced byte by byte made every
// decode wait for the one before); bytes whose 8-byte code read could leave the stream go
// through the scalar decoder.
template <int B>
inline int64_t decode_sparse_simd(const SparseRow& row, const uint8_t* mask, int64_t k0, int64_t len, int64_t p,
                               float* out) {
  const QWeight& w = row.w;
  const int64_t count = w.row_offsets[w.n];
  const bool codes = w.codes_kind != QCodes::f32;
  int64_t i = 0;
  for (; i + 64 <= len && (!codes || p + 64 + 64 <= count); i += 64) {
    const uint64_t m = load_le<uint64_t>(mask + i / 8);
    const uint64_t incl = inclusive_counts(m), before = incl << 8;
    for (int j = 0; j < 8; ++j)
      expand_byte<B>(row, static_cast<unsigned>(m >> (8 * j)) & 0xff, k0 + i + 8 * j,
                     p + static_cast<int64_t>((before >> (8 * j)) & 0xff), out + i + 8 * j);
    p += static_cast<int64_t>(incl >> 56);
  }
  for (; i < len; i += 8) {
    const unsigned m = mask[i / 8];
    if (codes && m && p + 64 > count) {  // an 8-byte read could leave the stream
      p = row.byte_scalar(m, k0 + i, p, out + i);
      continue;
    }
    expand_byte<B>(row, m, k0 + i, p, out + i);
    p += popcount8(m);
  }
  return p;
}
#endif

// Decodes columns [k0, k0 + len) of pruned row n whose first survivor there is number p of
// the stream (p < 0: counted from the row start). Returns the survivor after the span.
inline int64_t decode_sparse(const QWeight& w, int64_t n, int64_t k0, int64_t len, float* out, int64_t p = -1) {
  const uint8_t* mask = w.mask + (n * w.k + k0) / 8;  // rows and k0 start on a byte (K % 8 == 0)
  if (p < 0) p = w.row_offsets[n] + count_kept(w.mask + n * w.k / 8, mask);
  const SparseRow row(w, n);
#if defined(__AVX2__)
  bits_switch(w.codes_kind == QCodes::f32 ? 8 : w.bits,
              [&](auto b) { p = decode_sparse_simd<decltype(b)::value>(row, mask, k0, len, p, out); });
#else
  for (int64_t i = 0; i < len; i += 8) p = row.byte_scalar(mask[i / 8], k0 + i, p, out + i);
#endif
  return p;
}

#if defined(__AVX512F__)
// Sixteen codes from element `index` (a multiple of 8) of a 4-bit stream, as int32 lanes: the
// eight bytes' two dwords spread over the lanes and each lane's nibble shifted down.
inline __m512i codes16_nibbles(const uint8_t* stream, int64_t index) {
  const __m512i dwords = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(stream + index / 2)));
  const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  return _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(pick, dwords), shifts), _mm512_set1_epi32(15));
}
#endif

inline void decode_row(const QWeight& w, int64_t n, int64_t k0, int64_t len, float* out) {
  if (w.mask) {
    decode_sparse(w, n, k0, len, out);
    return;
  }
  const int64_t base = n * w.k + k0;
  const uint8_t* stream = static_cast<const uint8_t*>(w.codes);
  int64_t i = 0;
  switch (w.codes_kind) {
    case QCodes::affine: {
      const float* sc = w.scales + n * (w.k / w.group);
      const float* bi = w.biases + n * (w.k / w.group);
      // Group by group, on locals: captured by reference, i and the weight's fields were
      // reloaded (and i stored) around every 8 codes, as the stores to out may alias them, and
      // the group was divided out each time.
      const int64_t group = w.group;
      i = len / 8 * 8;
      bits_switch(w.bits, [=](auto b) {
        constexpr int B = decltype(b)::value;
        for (int64_t j = 0; j + 8 <= len;) {
          const int64_t g = (k0 + j) / group, end = std::min(len, (g + 1) * group - k0);
          const f32x8 s = simd::set1(sc[g]), o = simd::set1(bi[g]);
#if defined(__AVX512F__)
          if constexpr (B == 4) {  // 16 codes a step (half the instructions of two 8-code steps)
            const __m512 s16 = _mm512_set1_ps(sc[g]), o16 = _mm512_set1_ps(bi[g]);
            for (; j + 16 <= end; j += 16)
              _mm512_storeu_ps(out + j, _mm512_add_ps(_mm512_mul_ps(s16, _mm512_cvtepi32_ps(codes16_nibbles(stream, base + j))), o16));
          }
#endif
          for (; j + 8 <= end; j += 8) simd::store(out + j, simd::add(simd::mul(s, to_f32(codes8<B>(stream, base + j))), o));
        }
      });
      break;
    }
    case QCodes::int8: {
      const int8_t* q = static_cast<const int8_t*>(w.codes) + base;
      const float zp = w.zero_points ? static_cast<float>(w.zero_points[n]) : 0.0f;
      const f32x8 s = simd::set1(w.scales[n]), z = simd::set1(zp);
#if defined(__AVX512F__)
      const __m512 s16 = _mm512_set1_ps(w.scales[n]), z16 = _mm512_set1_ps(zp);
      for (; i + 16 <= len; i += 16) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i))));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_sub_ps(v, z16), s16));
      }
#endif
      for (; i + 8 <= len; i += 8) simd::store(out + i, simd::mul(simd::sub(simd::load_i8(q + i), z), s));
      break;
    }
    case QCodes::lut: {
      const float* lut = w.lut + ((n / w.group) << w.bits);
      bits_switch(w.bits, [&](auto b) {
        constexpr int B = decltype(b)::value;
#if defined(__AVX512F__)
        if constexpr (B == 4) {  // the 16 entries in one register: one vpermps per 16 codes
          const __m512 table = _mm512_loadu_ps(lut);
          for (; i + 16 <= len; i += 16) _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(codes16_nibbles(stream, base + i), table));
        }
#endif
        for (; i + 8 <= len; i += 8) simd::store(out + i, lookup<B>(lut, codes8<B>(stream, base + i)));
      });
      break;
    }
    default: {
      const float* v = static_cast<const float*>(w.codes) + base;
      for (; i + 8 <= len; i += 8) simd::store(out + i, simd::load(v + i));
    }
  }
  for (; i < len; ++i) out[i] = value_at(w, n, k0 + i, base + i);
}

}  // namespace quant
}  // namespace FF_ISA_NS
}  // namespace ff
