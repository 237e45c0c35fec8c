// The one small vector abstraction the kernels are written on: f32x8, eight fp32 lanes.
// Backends (simd/generic.h, simd/avx2.h) provide the primitives; what is derived from them
// (exp, partial loads, fp16/bf16 where the hardware has no instruction) is written once here,
// so the generic and AVX2 builds of a kernel run the same algorithm.
#pragma once

#include "kernels/cpu/isa.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/simd/half.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "kernels/cpu/simd/avx2.h"
#else
#include "kernels/cpu/simd/generic.h"
#endif

namespace ff {
namespace FF_ISA_NS {
namespace simd {

constexpr int kWidth = 8;

// 2^x: x = n + r with n = round(x), so |r| <= 1/2 and r is exact; 2^r by a degree-6
// polynomial fitted for relative error on [-1/2, 1/2] (under 1 ulp evaluated in fp32,
// 1.0e-7 at worst against float64). Attention works in the base-2 domain (scores carry a
// factor log2 e folded into the query scale), which takes exp's ln2 range reduction off the
// inner loop.
namespace exp2_poly {
constexpr float kLo = -126.0f, kHi = 127.0f;  // 2^x is 0 below kLo (AVX-512 forms); inputs clamp to kHi
constexpr float kFloor = -127.0f;  // f32x8 exp2's lower clamp: n = -127 scales by 0
constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
constexpr float kP[6] = {1.5353360504e-4f, 1.3398875017e-3f, 9.6184369177e-3f,
                         5.5503323674e-2f, 2.4022647738e-1f, 6.9314718246e-1f};
}  // namespace exp2_poly

// 2^x for fp32: exactly 0 below -126.5 (so exp2(-inf) == 0), subnormal from there to -126;
// inputs above 127 are clamped; NaN stays NaN. x clamps to kFloor below, where n = -127 makes
// ldexp's scale 2^-127's bits 0, so underflow takes no compare and select (the online
// softmax's exponents, 15 vector operations instead of 17). The clamps take x second: max and
// min return their second operand where either is NaN (vmaxps, and generic.h alike), so a NaN
// score reaches the row's sum, which sdpa's write_row checks, instead of dropping out as 0.
inline f32x8 exp2(f32x8 x) {
  namespace c = exp2_poly;
  x = min(set1(c::kHi), max(set1(c::kFloor), x));
  const f32x8 n = round(x);
  const f32x8 r = sub(x, n);
  f32x8 p = set1(c::kP[0]);
  for (int i = 1; i < 6; ++i) p = fmadd(p, r, set1(c::kP[i]));
  p = fmadd(p, r, set1(1.0f));
  return ldexp(p, n);
}

inline float exp2_scalar(float x) {
  float buf[8] = {x, x, x, x, x, x, x, x};
  store(buf, exp2(load(buf)));
  return buf[0];
}

// The first n (0 <= n <= 8) lanes from p, the rest 0; and the converse store.
inline f32x8 load_partial(const float* p, int n) {
  float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < n; ++i) buf[i] = p[i];
  return load(buf);
}
inline void store_partial(float* p, f32x8 a, int n) {
  float buf[8];
  store(buf, a);
  for (int i = 0; i < n; ++i) p[i] = buf[i];
}

#ifndef FF_SIMD_HAS_F16C
inline f32x8 load_f16(const uint16_t* p) {
  float buf[8];
  for (int i = 0; i < 8; ++i) buf[i] = f16_to_f32(p[i]);
  return load(buf);
}
inline void store_f16(uint16_t* p, f32x8 a) {
  float buf[8];
  store(buf, a);
  for (int i = 0; i < 8; ++i) p[i] = f32_to_f16(buf[i]);
}
#endif

#ifndef FF_SIMD_HAS_BF16
inline f32x8 load_bf16(const uint16_t* p) {
  float buf[8];
  for (int i = 0; i < 8; ++i) buf[i] = bf16_to_f32(p[i]);
  return load(buf);
}
inline void store_bf16(uint16_t* p, f32x8 a) {
  float buf[8];
  store(buf, a);
  for (int i = 0; i < 8; ++i) p[i] = f32_to_bf16(buf[i]);
}
// 16 bf16 in the split order (split_pairs)
inline void load_bf16_split(const uint16_t* p, f32x8* even, f32x8* odd) {
  split_pairs(load_bf16(p), load_bf16(p + 8), even, odd);
}
#endif

}  // namespace simd

using ::ff::DType;

// Load/store of 8 (or, for the tail, n) elements of storage type T as fp32 lanes.
template <DType T>
struct Elem;
template <>
struct Elem<DType::f32> {
  using type = float;
  static simd::f32x8 load(const float* p) { return simd::load(p); }
  static void store(float* p, simd::f32x8 a) { simd::store(p, a); }
  static float to_f32(float x) { return x; }
  static float from_f32(float x) { return x; }
};
template <>
struct Elem<DType::f16> {
  using type = uint16_t;
  static simd::f32x8 load(const uint16_t* p) { return simd::load_f16(p); }
  static void store(uint16_t* p, simd::f32x8 a) { simd::store_f16(p, a); }
  static float to_f32(uint16_t x) { return f16_to_f32(x); }
  static uint16_t from_f32(float x) { return f32_to_f16(x); }
};
template <>
struct Elem<DType::bf16> {
  using type = uint16_t;
  static simd::f32x8 load(const uint16_t* p) { return simd::load_bf16(p); }
  static void store(uint16_t* p, simd::f32x8 a) { simd::store_bf16(p, a); }
  static float to_f32(uint16_t x) { return bf16_to_f32(x); }
  static uint16_t from_f32(float x) { return f32_to_bf16(x); }
};

// Converts n elements of storage type T to fp32 (and back), vectorized with a scalar tail.
template <DType T>
inline void to_f32(const typename Elem<T>::type* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) simd::store(dst + i, Elem<T>::load(src + i));
  for (; i < n; ++i) dst[i] = Elem<T>::to_f32(src[i]);
}
template <DType T>
inline void from_f32(const float* src, typename Elem<T>::type* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) Elem<T>::store(dst + i, simd::load(src + i));
  for (; i < n; ++i) dst[i] = Elem<T>::from_f32(src[i]);
}

// Runs f(begin, end) over [0, n) on the thread pool, in chunks of at most `grain`.
template <class F>
inline void parallel_for(int64_t n, int64_t grain, const F& f) {
  ff::parallel_for_raw(
      n, grain, [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); },
      const_cast<F*>(&f));
}

// Compile-time switch on a runtime dtype (flash-attention's static_switch idea).
#define FF_DTYPE_SWITCH(dtype, T, ...)                 \
  [&] {                                                \
    switch (dtype) {                                   \
      case ::ff::DType::f16: {              \
        constexpr auto T = ::ff::DType::f16; \
        return __VA_ARGS__();                          \
      }                                                \
      case ::ff::DType::bf16: {             \
        constexpr auto T = ::ff::DType::bf16; \
        return __VA_ARGS__();                          \
      }                                                \
      default: {                                       \
        constexpr auto T = ::ff::DType::f32; \
        return __VA_ARGS__();                          \
      }                                                \
    }                                                  \
  }()

#define FF_BOOL_SWITCH(cond, NAME, ...) \
  [&] {                                 \
    if (cond) {                         \
      constexpr bool NAME = true;       \
      return __VA_ARGS__();             \
    } else {                            \
      constexpr bool NAME = false;      \
      return __VA_ARGS__();             \
    }                                   \
  }()

}  // namespace FF_ISA_NS
}  // namespace ff
