// Quantized matmul y = x @ W.T with W decoded inside the kernel, tile by tile.
//
// GEMV (m <= 8): each task owns kGemvRows rows of W; a row is decoded kGemvChunk values at a
// time into an L1 buffer and dotted with every x row while it is hot.
// GEMM: each task owns a panel of kPanel rows of W; for every K chunk of kKc the panel is
// decoded and packed k-major in sub-panels of 16 columns (64 KB, L2), then a 6x16
// register-blocked micro-kernel sweeps all rows of x over it.
// Work is split by fixed row counts of W, so results do not depend on the thread count.
#include <algorithm>
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

struct Problem {
  const float* x;  // fp32 [m, k], row stride ldx
  int64_t m, ldx;
  const QWeight* w;
  float* y;  // fp32 [m, n]
};

// ---- GEMV --------------------------------------------------------------------------------
template <int MR>
void gemv_rows(const Problem& p, int64_t n0, int64_t n1) {
  const QWeight& w = *p.w;
  alignas(32) float buf[kGemvChunk];
  for (int64_t n = n0; n < n1; ++n) {
    f32x8 acc[MR];
    float tail[MR];
    for (int r = 0; r < MR; ++r) acc[r] = simd::zero(), tail[r] = 0;
    for (int64_t k0 = 0; k0 < w.k; k0 += kGemvChunk) {
      const int64_t len = std::min(kGemvChunk, w.k - k0);
      quant::decode_row(w, n, k0, len, buf);
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

void gemv(const Problem& p) {
  auto run = [&](auto mr) {
    constexpr int MR = decltype(mr)::value;
    parallel_for((p.w->n + kGemvRows - 1) / kGemvRows, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) gemv_rows<MR>(p, t * kGemvRows, std::min(p.w->n, (t + 1) * kGemvRows));
    });
  };
  switch (p.m) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 3: return run(std::integral_constant<int, 3>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 5: return run(std::integral_constant<int, 5>{});
    case 6: return run(std::integral_constant<int, 6>{});
    case 7: return run(std::integral_constant<int, 7>{});
    default: return run(std::integral_constant<int, 8>{});
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
  parallel_for((p.w->n + kPanel - 1) / kPanel, 1, [&](int64_t b, int64_t e) {
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
