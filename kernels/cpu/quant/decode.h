// Decoding of compressed weight rows into fp32, eight values at a time. The generic build
// extracts codes with scalar shifts; the AVX2 build uses variable shifts, byte shuffles and
// register LUTs for the same result (the generic one is its oracle).
#pragma once

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
template <int B>
inline i32x8 codes8(const uint8_t* stream, int64_t index) {
  if constexpr (B == 8) {
    return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(stream + index)))};
  } else {
    const uint64_t u = load_code_bytes<B>(stream, index);
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

// Pruned rows: walk the mask a byte (8 columns) at a time; each kept column takes the next
// code of the row's survivors. Invariants of the inner format are hoisted per row / group.
inline void decode_sparse(const QWeight& w, int64_t n, int64_t k0, int64_t len, float* out) {
  const uint8_t* mask = w.mask + (n * w.k + k0) / 8;  // rows and k0 start on a byte (K % 8 == 0)
  int64_t p = w.row_offsets[n];
  for (const uint8_t* b = w.mask + n * w.k / 8; b < mask; ++b) p += __builtin_popcount(*b);
  const uint8_t* stream = static_cast<const uint8_t*>(w.codes);
  const float* values = static_cast<const float*>(w.codes);
  const int64_t groups = w.codes_kind == QCodes::affine ? w.k / w.group : 1;
  const float* sc = w.scales ? w.scales + n * groups : nullptr;
  const float* bi = w.biases ? w.biases + n * groups : nullptr;
  const float* lut = w.lut ? w.lut + ((n / w.group) << w.bits) : nullptr;
  for (int64_t i = 0; i < len; i += 8) {
    const unsigned bits = mask[i / 8];
    for (int j = 0; j < 8; ++j) out[i + j] = 0.0f;
    if (!bits) continue;
    const int64_t g = w.codes_kind == QCodes::affine ? (k0 + i) / w.group : 0;  // 8 | group
    for (unsigned m = bits; m; m &= m - 1) {
      const int j = __builtin_ctz(m);
      float v;
      if (w.codes_kind == QCodes::affine) {
        const float sq = sc[g] * static_cast<float>(code_at(stream, p, w.bits));
        v = sq + bi[g];
      } else if (w.codes_kind == QCodes::lut) {
        v = lut[code_at(stream, p, w.bits)];
      } else {
        v = values[p];
      }
      ++p;
      out[i + j] = v;
    }
  }
}

inline void decode_row(const QWeight& w, int64_t n, int64_t k0, int64_t len, float* out) {
  if (w.mask) return decode_sparse(w, n, k0, len, out);
  const int64_t base = n * w.k + k0;
  const uint8_t* stream = static_cast<const uint8_t*>(w.codes);
  int64_t i = 0;
  switch (w.codes_kind) {
    case QCodes::affine: {
      const float* sc = w.scales + n * (w.k / w.group);
      const float* bi = w.biases + n * (w.k / w.group);
      bits_switch(w.bits, [&](auto b) {
        constexpr int B = decltype(b)::value;
        for (; i + 8 <= len; i += 8) {
          const int64_t g = (k0 + i) / w.group;
          const f32x8 q = to_f32(codes8<B>(stream, base + i));
          simd::store(out + i, simd::add(simd::mul(simd::set1(sc[g]), q), simd::set1(bi[g])));
        }
      });
      break;
    }
    case QCodes::int8: {
      const int8_t* q = static_cast<const int8_t*>(w.codes) + base;
      const float zp = w.zero_points ? static_cast<float>(w.zero_points[n]) : 0.0f;
      const f32x8 s = simd::set1(w.scales[n]), z = simd::set1(zp);
      for (; i + 8 <= len; i += 8) simd::store(out + i, simd::mul(simd::sub(simd::load_i8(q + i), z), s));
      break;
    }
    case QCodes::lut: {
      const float* lut = w.lut + ((n / w.group) << w.bits);
      bits_switch(w.bits, [&](auto b) {
        constexpr int B = decltype(b)::value;
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
