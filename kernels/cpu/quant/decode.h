// Decoding of compressed weight rows into fp32, eight values at a time. The generic build
// extracts codes with scalar shifts; the AVX2 build uses variable shifts, byte shuffles and
// register LUTs for the same result (the generic one is its oracle).
#pragma once

#include <cstring>

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

// The eight codes starting at element `index` (a multiple of 8) of a b-bit stream (b <= 8):
// they fill exactly b bytes.
inline uint64_t load_code_bytes(const uint8_t* stream, int64_t index, int bits) {
  uint64_t u = 0;
  std::memcpy(&u, stream + (index >> 3) * bits, bits);
  return u;
}

#if defined(__AVX2__)
struct i32x8 {
  __m256i v;
};
inline i32x8 codes8(const uint8_t* stream, int64_t index, int bits) {
  if (bits == 8) {
    return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(stream + index)))};
  }
  const uint64_t u = load_code_bytes(stream, index, bits);
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  if (bits <= 4) {
    const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
    return {_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(u)), shifts), mask)};
  }
  // 5, 6, 7 bits: lane i takes the 16-bit window at byte (i*b)/8 and shifts by (i*b)%8.
  alignas(32) int8_t ctrl[32];
  alignas(32) int32_t sh[8];
  for (int i = 0; i < 8; ++i) {
    const int byte = (i * bits) >> 3;
    ctrl[4 * i] = static_cast<int8_t>(byte);
    ctrl[4 * i + 1] = static_cast<int8_t>(byte + 1);
    ctrl[4 * i + 2] = ctrl[4 * i + 3] = -1;
    sh[i] = (i * bits) & 7;
  }
  const __m128i bytes = _mm_cvtsi64_si128(static_cast<int64_t>(u));
  const __m256i both = _mm256_set_m128i(bytes, bytes);
  const __m256i win = _mm256_shuffle_epi8(both, _mm256_load_si256(reinterpret_cast<const __m256i*>(ctrl)));
  return {_mm256_and_si256(_mm256_srlv_epi32(win, _mm256_load_si256(reinterpret_cast<const __m256i*>(sh))), mask)};
}
inline f32x8 to_f32(i32x8 c) { return {_mm256_cvtepi32_ps(c.v)}; }
// lut[c] for 8 codes, lut with 2^bits entries.
inline f32x8 lookup(const float* lut, i32x8 c, int bits) {
  if (bits <= 3) return {_mm256_permutevar8x32_ps(_mm256_loadu_ps(lut), c.v)};
  if (bits == 4) {
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(lut), c.v);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(lut + 8), c.v);
    return {_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c.v, 28)))};
  }
  return {_mm256_i32gather_ps(lut, c.v, 4)};
}
#else
struct i32x8 {
  int32_t v[8];
};
inline i32x8 codes8(const uint8_t* stream, int64_t index, int bits) {
  const uint64_t u = load_code_bytes(stream, index, bits);
  i32x8 c;
  for (int i = 0; i < 8; ++i) c.v[i] = static_cast<int32_t>((u >> (i * bits)) & ((1u << bits) - 1));
  return c;
}
inline f32x8 to_f32(i32x8 c) {
  float f[8];
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(c.v[i]);
  return simd::load(f);
}
inline f32x8 lookup(const float* lut, i32x8 c, int bits) {
  (void)bits;
  float f[8];
  for (int i = 0; i < 8; ++i) f[i] = lut[c.v[i]];
  return simd::load(f);
}
#endif

// W[n, k0 : k0 + len] -> out (fp32, exactly QuantizedWeight.dequantize()'s values).
// Dense: k0 is a multiple of 8; len may end in a tail only for int8 (K % 8 != 0).
inline void decode_row(const QWeight& w, int64_t n, int64_t k0, int64_t len, float* out);

inline float value_at(const QWeight& w, int64_t n, int64_t k, int64_t code_index) {
  switch (w.codes_kind) {
    case QCodes::affine: {
      const int64_t g = n * (w.k / w.group) + k / w.group;
      const float q = static_cast<float>(code_at(static_cast<const uint8_t*>(w.codes), code_index, w.bits));
      const float sq = w.scales[g] * q;  // two roundings, like mx.dequantize
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

inline void decode_sparse(const QWeight& w, int64_t n, int64_t k0, int64_t len, float* out) {
  const uint8_t* mask = w.mask;
  const int64_t base = n * w.k;
  // survivors of row n before k0 (rows start on a byte: K % 8 == 0, and so does k0)
  int64_t p = w.row_offsets[n];
  for (int64_t b = base >> 3; b < (base + k0) >> 3; ++b) p += __builtin_popcount(mask[b]);
  for (int64_t k = k0; k < k0 + len; ++k) {
    const bool kept = (mask[(base + k) >> 3] >> ((base + k) & 7)) & 1;
    out[k - k0] = kept ? value_at(w, n, k, p++) : 0.0f;
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
      for (; i + 8 <= len; i += 8) {
        const int64_t g = (k0 + i) / w.group;
        const f32x8 q = to_f32(codes8(stream, base + i, w.bits));
        simd::store(out + i, simd::add(simd::mul(simd::set1(sc[g]), q), simd::set1(bi[g])));
      }
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
      for (; i + 8 <= len; i += 8) simd::store(out + i, lookup(lut, codes8(stream, base + i, w.bits), w.bits));
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
