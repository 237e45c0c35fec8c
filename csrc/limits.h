// Measured machine limits: fp32 FMA throughput and streaming-read bandwidth (all pool threads).
#pragma once

#include <cstdint>

namespace ff {
double peak_gflops(double seconds);
double memory_bandwidth_gbs(int64_t bytes, int passes);
}  // namespace ff
