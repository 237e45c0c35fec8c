// Portable backend of the vector abstraction: 8 floats in a plain array. Written so that the
// compiler's auto-vectorizer maps it onto the baseline ISA (SSE2 on x86-64, NEON on aarch64).
// Included only through simd/vec.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace ff {
namespace FF_ISA_NS {
namespace simd {

constexpr const char* kBackend = "generic";

struct f32x8 {
  float v[8];
};

#define FF_LANES(expr)                 \
  f32x8 r;                             \
  for (int i = 0; i < 8; ++i) r.v[i] = (expr); \
  return r

inline f32x8 zero() { FF_LANES(0.0f); }
inline f32x8 set1(float x) { FF_LANES(x); }
inline f32x8 load(const float* p) { FF_LANES(p[i]); }
inline void store(float* p, f32x8 a) {
  for (int i = 0; i < 8; ++i) p[i] = a.v[i];
}
// (the AVX2 backend's streaming stores; here plain stores and nothing to order)
inline void stream(float* p, f32x8 a) { store(p, a); }
inline void stream_copy(void* dst, const void* src, int64_t bytes) { std::memcpy(dst, src, bytes); }
inline void stream_fence() {}
inline f32x8 add(f32x8 a, f32x8 b) { FF_LANES(a.v[i] + b.v[i]); }
inline f32x8 sub(f32x8 a, f32x8 b) { FF_LANES(a.v[i] - b.v[i]); }
inline f32x8 mul(f32x8 a, f32x8 b) { FF_LANES(a.v[i] * b.v[i]); }
// a * b + c (fused where the hardware has it; here two roundings)
inline f32x8 fmadd(f32x8 a, f32x8 b, f32x8 c) { FF_LANES(a.v[i] * b.v[i] + c.v[i]); }
inline f32x8 max(f32x8 a, f32x8 b) { FF_LANES(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline f32x8 min(f32x8 a, f32x8 b) { FF_LANES(a.v[i] < b.v[i] ? a.v[i] : b.v[i]); }
// round to nearest integer (ties to even), as a float
inline f32x8 round(f32x8 a) {
  // ties to even for |a| < 2^22, the range the kernels use it in (exp's exponent)
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  FF_LANES((a.v[i] + kMagic) - kMagic);
}
// a * 2^n for integral-valued n in [-126, 127]; n = -127 gives 0 (the scale's bits are 0); a
// NaN n scales by 1, as avx2.h's does (exp2 of NaN: a is NaN there too; converting NaN to int
// would be undefined)
inline f32x8 ldexp(f32x8 a, f32x8 n) {
  f32x8 r;
  for (int i = 0; i < 8; ++i) {
    const int32_t e = n.v[i] == n.v[i] ? static_cast<int32_t>(n.v[i]) : 0;
    int32_t bits = (e + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    r.v[i] = a.v[i] * scale;
  }
  return r;
}
// lanes where mask is set take b, the others a; mask from cmp_lt
struct m32x8 {
  bool v[8];
};
inline m32x8 cmp_lt(f32x8 a, f32x8 b) {
  m32x8 m;
  for (int i = 0; i < 8; ++i) m.v[i] = a.v[i] < b.v[i];
  return m;
}
inline f32x8 select(m32x8 m, f32x8 a, f32x8 b) { FF_LANES(m.v[i] ? b.v[i] : a.v[i]); }

inline float reduce_add(f32x8 a) {
  // pairwise, the same order as the AVX2 backend
  float s0 = (a.v[0] + a.v[4]) + (a.v[2] + a.v[6]);
  float s1 = (a.v[1] + a.v[5]) + (a.v[3] + a.v[7]);
  return s0 + s1;
}
inline f32x8 reduce_add8(const f32x8* a) {
  // the same order as the AVX2 backend
  FF_LANES(((a[i].v[0] + a[i].v[1]) + (a[i].v[2] + a[i].v[3])) + ((a[i].v[4] + a[i].v[5]) + (a[i].v[6] + a[i].v[7])));
}
// 16 values held as a (0-7) and b (8-15), in the split order: the even-indexed ones (0, 2, ...,
// 14), then the odd ones; join_pairs is the inverse.
inline void split_pairs(f32x8 a, f32x8 b, f32x8* even, f32x8* odd) {
  for (int i = 0; i < 4; ++i) {
    even->v[i] = a.v[2 * i], odd->v[i] = a.v[2 * i + 1];
    even->v[4 + i] = b.v[2 * i], odd->v[4 + i] = b.v[2 * i + 1];
  }
}
inline void join_pairs(f32x8 even, f32x8 odd, f32x8* a, f32x8* b) {
  for (int i = 0; i < 4; ++i) {
    a->v[2 * i] = even.v[i], a->v[2 * i + 1] = odd.v[i];
    b->v[2 * i] = even.v[4 + i], b->v[2 * i + 1] = odd.v[4 + i];
  }
}
inline float reduce_max(f32x8 a) {
  float m = a.v[0];
  for (int i = 1; i < 8; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}

// 8 unsigned bytes -> 8 floats
inline f32x8 load_u8(const uint8_t* p) { FF_LANES(static_cast<float>(p[i])); }
// 8 signed bytes -> 8 floats
inline f32x8 load_i8(const int8_t* p) { FF_LANES(static_cast<float>(p[i])); }

// In-place transpose of an 8x8 block held as 8 rows: r[i].v[j] <- r[j].v[i].
inline void transpose8x8(f32x8* r) {
  for (int i = 0; i < 8; ++i)
    for (int j = i + 1; j < 8; ++j) {
      const float t = r[i].v[j];
      r[i].v[j] = r[j].v[i];
      r[j].v[i] = t;
    }
}

#undef FF_LANES

}  // namespace simd
}  // namespace FF_ISA_NS
}  // namespace ff
