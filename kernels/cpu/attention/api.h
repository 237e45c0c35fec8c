// Fused scaled-dot-product attention: the ISA-neutral interface of the kernels.
//
// Flash-attention forward on raw pointers: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], out like q,
// Hq % Hkv == 0 (query head h reads kv head h / (Hq / Hkv)); every tensor is strided with a
// contiguous last dimension. Semantics are those of reference.sdpa (bottom-right causal, window,
// bool/additive mask, fully masked rows -> 0 and lse -inf).
#pragma once

#include <cstdint>

#include "kernels/cpu/dispatch.h"

namespace ff {

// Element strides of a 4-d tensor [B, H, L, D] whose last dimension is contiguous.
struct SdpaTensor {
  const void* data;
  int64_t stride_b, stride_h, stride_l;
};

enum class SdpaMaskKind : int { none = 0, keep = 1, add = 2 };

// A mask broadcast to [B, Hq, Lq, Lk] by element strides (0 along broadcast dimensions):
// `keep` reads uint8 (non-zero keeps the score), `add` reads fp32 added to the scaled score.
struct SdpaMask {
  SdpaMaskKind kind = SdpaMaskKind::none;
  const void* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_q = 0, stride_k = 0;
};

struct SdpaParams {
  DType dtype;  // of q, k, v and out
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim;
  SdpaTensor q, k, v;
  void* out;  // strided like SdpaTensor (out_stride_*)
  int64_t out_stride_b, out_stride_h, out_stride_l;
  float* lse;  // nullable; contiguous fp32 [B, Hq, Lq], natural log
  SdpaMask mask;
  bool causal;
  int64_t window;  // 0: none; else only keys j > i + Lk - Lq - window
  float scale;
  // Split-KV (flash-decoding): -1 chooses by shape, 0 never splits, n > 0 splits the keys into
  // chunks of n (a multiple of the key tile). The chunk size never depends on the thread count.
  int64_t kv_chunk;
};

struct AttentionKernels {
  void (*sdpa)(const SdpaParams& p);
  // Largest supported head dim, and the key-tile size kv_chunk must be a multiple of.
  int64_t max_head_dim;
  int64_t key_tile;
  // y[i] = 2^x[i] for i < n as the online softmax computes it (tests check its error).
  void (*softmax_exp2)(const float* x, float* y, int64_t n);
};

}  // namespace ff

FF_DECLARE_KERNEL_TABLE(AttentionKernels, attention_kernels)
