// Measured machine limits: fp32 FMA throughput and streaming-read bandwidth (all pool threads).
#pragma once

#include <cstdint>

namespace ff {
double peak_gflops(double seconds);
// The same for bf16-pair dot products (AVX512_BF16 vdpbf16ps); 0 when the CPU lacks them.
double peak_gflops_bf16_dot(double seconds);
// AMX-BF16 tile throughput (tdpbf16ps) of all pool threads; 0 where the CPU or OS lacks it.
double peak_gflops_amx_bf16(double seconds);
double memory_bandwidth_gbs(int64_t bytes, int passes);
// Fixed-work probes for timing from Python: FMA chains of `iters` iterations on every pool
// thread (returns the flops done), and a parallel sum of n floats (a streaming read).
double fma_work(int64_t iters);
double stream_sum(const float* x, int64_t n);
}  // namespace ff
