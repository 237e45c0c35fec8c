// ISA-neutral interface of the quant kernels: a compressed weight described by raw pointers
// (layouts: python/fusedformer/quant/__init__.py), the quantized matmul and 1-D k-means.
#pragma once

#include <cstdint>

#include "kernels/cpu/dispatch.h"

namespace ff {

// How the stored values of W are coded.
enum class QCodes : int {
  affine = 0,  // b-bit q, W = scale[n, k / group] * q + bias[n, k / group]
  int8 = 1,    // int8 q, W = (q - zero_point[n]) * scale[n]
  lut = 2,     // b-bit index, W = lut[n / group][index]
  f32 = 3,     // raw float32 values (pruned weights without quantization)
};

// A compressed W [n, k]. Dense: code i of row n is element n * k + i of its stream.
// Sparse (mask != nullptr): codes are the survivors' only, row n's from row_offsets[n].
struct QWeight {
  QCodes codes_kind;
  int64_t n, k;
  int bits;        // code width: affine 2..8, lut 1..8, int8 8, f32 32
  int group;       // affine: columns per scale/bias; lut: rows per LUT
  const void* codes;             // LSB-first bitstream (affine, lut), int8[], float[]
  const float* scales;           // affine [n, k / group]; int8 [n]
  const float* biases;           // affine [n, k / group]
  const int8_t* zero_points;     // int8 [n] or nullptr
  const float* lut;              // [n / group, 2^bits]
  const uint8_t* mask;           // 1-bit stream over [n, k] (1 = kept), nullptr when dense
  const int64_t* row_offsets;    // [n + 1] when sparse
};

// y[m, :] = x[m, :] @ W.T; x [m, k] with row stride ldx, y [m, n] contiguous, both of x_dtype.
struct QMatmulArgs {
  const void* x;
  int64_t m, ldx;
  DType dtype;
  QWeight w;
  void* y;
};

struct QuantKernels {
  void (*qmatmul)(const QMatmulArgs& args);
  // Optimal 1-D k-means of v[0..n) into k ascending centroids (duplicates if fewer values).
  void (*kmeans1d)(const float* v, int64_t n, int k, float* centroids);
};

}  // namespace ff

FF_DECLARE_KERNEL_TABLE(QuantKernels, quant_kernels)
