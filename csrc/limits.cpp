#include "csrc/limits.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "csrc/dispatch.h"
#include "csrc/threadpool.h"

namespace ff {
namespace {

// The probes measure the machine, so they use the best ISA the CPU has, whatever
// FUSEDFORMER_ISA forces for the kernels.
const ProbeKernels& best_probe() {
  const std::vector<std::string> isas = supported_isas();
#ifdef FF_HAVE_AVX512
  if (std::find(isas.begin(), isas.end(), "avx512") != isas.end()) return avx512::probe_kernels();
#endif
#ifdef FF_HAVE_AVX2
  if (isas.size() > 1) return avx2::probe_kernels();
#endif
  return generic::probe_kernels();
}

double now() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

std::atomic<float> g_sink{0};  // keeps the probe results alive

// Best GFLOP/s of `chains` (flops_per_iter flops an iteration) on every pool thread at once,
// over about `seconds`.
double chains_gflops(float (*chains)(int64_t), int64_t flops_per_iter, double seconds) {
  // Calibrate the iteration count on one thread, then run it on every pool thread at once.
  int64_t iters = 1 << 16;
  double t0 = now();
  g_sink = g_sink + chains(iters);
  double dt = std::max(now() - t0, 1e-6);
  iters = std::max<int64_t>(iters, static_cast<int64_t>(iters * (seconds / 3) / dt));
  const int threads = num_threads();
  struct Ctx {
    float (*chains)(int64_t);
    int64_t iters;
  } ctx{chains, iters};
  auto body = [](void* c, int64_t b, int64_t e) {
    const auto* p = static_cast<const Ctx*>(c);
    for (int64_t i = b; i < e; ++i) g_sink = g_sink + p->chains(p->iters);
  };
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    t0 = now();
    parallel_for_raw(threads, 1, body, &ctx);
    dt = now() - t0;
    best = std::max(best, static_cast<double>(threads) * iters * flops_per_iter / dt / 1e9);
  }
  return best;
}

}  // namespace

double peak_gflops(double seconds) {
  const ProbeKernels& k = best_probe();
  return chains_gflops(k.fma_chains, k.flops_per_iter(), seconds);
}

namespace {

// The peak of an avx512 probe (chains, flops per iteration) where the CPU runs variant `isa`.
double avx512_probe_peak(const char* isa, float (*ProbeKernels::*chains)(int64_t),
                         int64_t (*ProbeKernels::*flops)(), double seconds) {
#ifdef FF_HAVE_AVX512
  const std::vector<std::string> isas = supported_isas();
  if (std::find(isas.begin(), isas.end(), isa) != isas.end()) {
    const ProbeKernels& k = avx512::probe_kernels();
    return chains_gflops(k.*chains, (k.*flops)(), seconds);
  }
#endif
  (void)isa, (void)chains, (void)flops, (void)seconds;
  return 0.0;
}

}  // namespace

double peak_gflops_bf16_dot(double seconds) {
  return avx512_probe_peak("avx512_bf16", &ProbeKernels::bf16_dot_chains,
                           &ProbeKernels::bf16_dot_flops_per_iter, seconds);
}

double peak_gflops_amx_bf16(double seconds) {
  return avx512_probe_peak("avx512_amx", &ProbeKernels::amx_bf16_chains,
                           &ProbeKernels::amx_bf16_flops_per_iter, seconds);
}

double fma_work(int64_t iters) {
  const ProbeKernels& k = best_probe();
  struct Ctx {
    const ProbeKernels* k;
    int64_t iters;
  } ctx{&k, iters};
  const int threads = num_threads();
  parallel_for_raw(threads, 1, [](void* c, int64_t b, int64_t e) {
    const auto* p = static_cast<const Ctx*>(c);
    for (int64_t i = b; i < e; ++i) g_sink = g_sink + p->k->fma_chains(p->iters);
  }, &ctx);
  return static_cast<double>(threads) * iters * k.flops_per_iter();
}

double stream_sum(const float* x, int64_t n) {
  const ProbeKernels& k = best_probe();
  constexpr int64_t kChunk = 1 << 16;  // fixed chunks: the result does not depend on threads
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::unique_ptr<double[]> partial(new double[chunks > 0 ? chunks : 1]);
  struct Ctx {
    const ProbeKernels* k;
    const float* x;
    int64_t n;
    double* partial;
  } ctx{&k, x, n, partial.get()};
  parallel_for_raw(chunks, 16, [](void* c, int64_t b, int64_t e) {
    const auto* p = static_cast<const Ctx*>(c);
    for (int64_t i = b; i < e; ++i) {
      const int64_t lo = i * kChunk, hi = std::min(p->n, lo + kChunk);
      p->partial[i] = p->k->sum(p->x + lo, hi - lo);
    }
  }, &ctx);
  double s = 0;
  for (int64_t i = 0; i < chunks; ++i) s += partial[i];
  return s;
}

double memory_bandwidth_gbs(int64_t bytes, int passes) {
  const ProbeKernels& k = best_probe();
  const int64_t n = bytes / static_cast<int64_t>(sizeof(float));
  std::unique_ptr<float[]> buf(new float[n]);
  const int threads = num_threads();
  struct Ctx {
    const ProbeKernels* k;
    float* x;
    int64_t n;
    int threads;
    bool init;
  } ctx{&k, buf.get(), n, threads, true};
  auto body = [](void* c, int64_t b, int64_t e) {
    auto* p = static_cast<Ctx*>(c);
    for (int64_t t = b; t < e; ++t) {
      const int64_t lo = p->n * t / p->threads, hi = p->n * (t + 1) / p->threads;
      if (p->init) {
        for (int64_t i = lo; i < hi; ++i) p->x[i] = static_cast<float>(i & 7);
      } else {
        g_sink = g_sink + p->k->sum(p->x + lo, hi - lo);
      }
    }
  };
  parallel_for_raw(threads, 1, body, &ctx);  // first touch by the threads that read
  ctx.init = false;
  double best = 0;
  for (int rep = 0; rep < passes; ++rep) {
    const double t0 = now();
    parallel_for_raw(threads, 1, body, &ctx);
    best = std::max(best, static_cast<double>(n) * sizeof(float) / (now() - t0) / 1e9);
  }
  return best;
}

}  // namespace ff
