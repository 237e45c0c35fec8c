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

// Cephes' expf: x = n ln2 + r (ln2 in two parts, so n ln2 is exact), exp(r) by a polynomial.
namespace exp_poly {
constexpr float kLo = -87.33654475f, kHi = 88.0f;  // exp is 0 below kLo; inputs clamp to kHi
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_poly

// exp(x) for fp32, relative error ~2 ulp on [-87, 88]; exactly 0 below -87.3 (so
// exp(-inf) == 0), inputs above 88 are clamped.
inline f32x8 exp(f32x8 x) {
  namespace c = exp_poly;
  const f32x8 lo = set1(c::kLo);
  const m32x8 underflow = cmp_lt(x, lo);
  x = min(max(x, lo), set1(c::kHi));
  const f32x8 n = round(mul(x, set1(c::kLog2e)));
  f32x8 r = fmadd(n, set1(-c::kLn2Hi), x);
  r = fmadd(n, set1(-c::kLn2Lo), r);
  f32x8 p = set1(c::kP[0]);
  for (int i = 1; i < 6; ++i) p = fmadd(p, r, set1(c::kP[i]));
  p = fmadd(p, mul(r, r), add(r, set1(1.0f)));
  return select(underflow, ldexp(p, n), zero());
}

inline float exp_scalar(float x) {
  float buf[8] = {x, x, x, x, x, x, x, x};
  store(buf, exp(load(buf)));
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
