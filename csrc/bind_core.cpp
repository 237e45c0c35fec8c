// Core bindings: ISA and thread-pool control, machine-limit probes.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "csrc/bindings.h"
#include "csrc/dispatch.h"
#include "csrc/limits.h"
#include "csrc/threadpool.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace py = pybind11;

namespace ff {
namespace {

// Asks the kernel to back the whole 2 MiB pages inside [ptr, ptr + nbytes) with transparent
// huge pages when they are first touched (MADV_HUGEPAGE, as numpy does for its large arrays);
// true where it took the hint. A fresh 32 MiB torch output costs 8192 page faults of 4 KiB
// (glibc maps allocations above 32 MiB anew each time): causal B1 H32 L2048 D128 fp32 SDPA took
// 0.93x the time writing into a reused output, 0.95x into a fresh one of huge pages (5
// alternating rounds, one process).
bool advise_hugepages(uintptr_t ptr, int64_t nbytes) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (nbytes <= 0) return false;
  const uintptr_t begin = (ptr + kHuge - 1) / kHuge * kHuge;
  const uintptr_t end = (ptr + static_cast<uintptr_t>(nbytes)) / kHuge * kHuge;
  return end > begin && madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)ptr;
  (void)nbytes;
  return false;
#endif
}

// A pool job of n indices (grain 1) whose ranges on `thrower` ("caller": the submitting thread,
// "worker": any other) throw std::bad_alloc (memory) or std::runtime_error, the others waiting
// ~50 us each so that both kinds of thread are inside the job; returns the indices that ran.
// The context lives on this frame, which an exception unwinds.
int64_t pool_job_that_throws(int64_t n, const std::string& thrower, bool memory) {
  struct Job {
    std::thread::id caller;
    bool on_caller, memory;
    std::atomic<int64_t> ran{0};
  } job{std::this_thread::get_id(), thrower == "caller", memory};
  parallel_for_raw(n, 1, [](void* ctx, int64_t b, int64_t e) {
    auto* j = static_cast<Job*>(ctx);
    if ((std::this_thread::get_id() == j->caller) == j->on_caller) {
      if (j->memory) throw std::bad_alloc();
      throw std::runtime_error("[_pool_job_that_throws] range " + std::to_string(b) + " failed");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    j->ran.fetch_add(e - b);
  }, &job);
  return job.ran.load();
}

}  // namespace

void init_core(py::module_& m) {
  m.def("isa", [] { return std::string(isa_name(active_isa())); },
        "ISA variant of the kernels in use (FUSEDFORMER_ISA or the best this CPU supports).");
  m.def(
      "_set_isa",
      [](const std::string& name) {
        try {
          set_isa(name);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      },
      py::arg("name"), "Test hook: switch the kernel ISA variant ('auto', 'generic', 'avx2').");
  m.def("compiled_isas", &compiled_isas, "ISA variants compiled into this build.");
  m.def("supported_isas", &supported_isas, "ISA variants this CPU can run.");
  m.def("num_threads", &num_threads, "Threads of the kernel pool (the caller included).");
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 1) throw py::value_error("[set_num_threads] n must be >= 1, got " + std::to_string(n));
        py::gil_scoped_release release;
        set_num_threads(n);
      },
      py::arg("n"), "Resizes the kernel thread pool.");
  m.def("available_cpus", &available_cpus, "CPUs this process may run on.");
  m.def(
      "_set_spin_us",
      [](int64_t us) {
        if (us < 0 || us > 1000000)
          throw py::value_error("[_set_spin_us] us must be in [0, 1000000], got " + std::to_string(us));
        set_spin_us(us);
      },
      py::arg("us"), "Test hook: how long idle pool threads spin before sleeping (FUSEDFORMER_SPIN_US).");
  m.def(
      "_set_pool",
      [](const std::string& name) {
        if (name == "auto") return set_pool_mode(PoolMode::automatic);
        if (name == "own") return set_pool_mode(PoolMode::own);
        if (name == "openmp") return set_pool_mode(PoolMode::openmp);
        throw py::value_error("[_set_pool] name must be 'auto', 'own' or 'openmp', got '" + name + "'");
      },
      py::arg("name"), "Test hook: where kernels' parallel work runs (FUSEDFORMER_POOL).");
  m.def(
      "_pool_mode",
      [] {
        switch (pool_mode()) {
          case PoolMode::own: return "own";
          case PoolMode::openmp: return "openmp";
          default: return "auto";
        }
      },
      "FUSEDFORMER_POOL's setting ('auto', 'own' or 'openmp'; pool_backend() says what it resolves to).");
  m.def(
      "_pool_job_that_throws",
      [](int64_t n, const std::string& thrower, bool memory) {
        if (thrower != "caller" && thrower != "worker")
          throw py::value_error("[_pool_job_that_throws] thrower must be 'caller' or 'worker', got '" + thrower + "'");
        py::gil_scoped_release release;
        return pool_job_that_throws(n, thrower, memory);
      },
      py::arg("n"), py::arg("thrower"), py::arg("memory"),
      "Test hook: a pool job whose ranges on the caller's or the workers' threads throw.");
  m.def("pool_backend", &pool_backend,
        "Where kernels' parallel work runs now: 'openmp' (the team of the OpenMP runtime the process "
        "has loaded, torch's: by default where its threads spin between regions, or always with "
        "FUSEDFORMER_POOL=openmp) or 'own' (fusedformer's thread pool).");
  // A throughput probe taking `seconds` (validated) and releasing the GIL while it runs.
  auto timed_probe = [](const char* name, double (*probe)(double)) {
    return [name, probe](double seconds) {
      if (!(seconds > 0 && seconds <= 60))
        throw py::value_error(std::string("[") + name + "] seconds must be in (0, 60]");
      py::gil_scoped_release release;
      return probe(seconds);
    };
  };
  m.def("peak_gflops", timed_probe("peak_gflops", peak_gflops), py::kw_only(),
        py::arg("seconds") = 0.3,
        "Measured fp32 FMA throughput of all pool threads, GFLOP/s (best ISA of this CPU).");
  m.def("peak_gflops_bf16_dot", timed_probe("peak_gflops_bf16_dot", peak_gflops_bf16_dot),
        py::kw_only(), py::arg("seconds") = 0.3,
        "Measured bf16-pair dot-product (AVX512_BF16 vdpbf16ps) throughput of all pool threads, "
        "GFLOP/s; 0 when the CPU lacks it.");
  m.def("peak_gflops_amx_bf16", timed_probe("peak_gflops_amx_bf16", peak_gflops_amx_bf16),
        py::kw_only(), py::arg("seconds") = 0.3,
        "Measured AMX-BF16 tile (tdpbf16ps) throughput of all pool threads, GFLOP/s; 0 when the "
        "CPU lacks it or the OS does not grant the tile registers.");
  m.def(
      "memory_bandwidth",
      [](int64_t mib, int passes) {
        if (mib < 1 || passes < 1)
          throw py::value_error("[memory_bandwidth] mib and passes must be >= 1");
        if (mib > (int64_t{1} << 30))  // (mib << 20 past int64 wrapped to an empty buffer: 0 GB/s)
          throw py::value_error("[memory_bandwidth] mib must be at most 2^30, got " + std::to_string(mib));
        py::gil_scoped_release release;
        return memory_bandwidth_gbs(mib << 20, passes);
      },
      py::kw_only(), py::arg("mib") = 512, py::arg("passes") = 5,
      "Measured streaming-read bandwidth of all pool threads over a buffer of `mib` MiB, GB/s.");
  m.def(
      "fma_work",
      [](int64_t iters) {
        if (iters < 1) throw py::value_error("[fma_work] iters must be >= 1");
        py::gil_scoped_release release;
        return fma_work(iters);
      },
      py::arg("iters"),
      "Runs `iters` iterations of independent FMA chains on every pool thread; returns the flops.");
  m.def("advise_hugepages", &advise_hugepages, py::arg("ptr"), py::arg("nbytes"),
        "Hint (Linux MADV_HUGEPAGE) that the whole 2 MiB pages in [ptr, ptr + nbytes), not yet "
        "touched, be transparent huge pages; true where the kernel took it.");
  m.def(
      "stream_sum",
      [](py::array_t<float, py::array::c_style> x) {
        const float* p = x.data();
        const int64_t n = x.size();
        py::gil_scoped_release release;
        return stream_sum(p, n);
      },
      py::arg("x"), "Sum of a float32 array, read by every pool thread (a streaming-read probe).");
  m.def(
      "_pool_trace",
      [](int64_t n, int64_t grain) {
        // Test hook: which thread ran each index of a parallel_for over [0, n).
        std::vector<int64_t> owner(static_cast<size_t>(n), -1);
        std::mutex mu;
        std::vector<std::thread::id> ids;
        struct Ctx {
          std::vector<int64_t>* owner;
          std::mutex* mu;
          std::vector<std::thread::id>* ids;
        } ctx{&owner, &mu, &ids};
        py::gil_scoped_release release;
        parallel_for_raw(n, grain, [](void* c, int64_t b, int64_t e) {
          auto* p = static_cast<Ctx*>(c);
          int64_t id;
          {
            std::lock_guard<std::mutex> lock(*p->mu);
            auto me = std::this_thread::get_id();
            id = 0;
            while (id < static_cast<int64_t>(p->ids->size()) && (*p->ids)[id] != me) ++id;
            if (id == static_cast<int64_t>(p->ids->size())) p->ids->push_back(me);
          }
          // busy work so that every thread gets a share
          volatile double x = 0;
          for (int i = 0; i < 20000; ++i) x = x + i;
          for (int64_t i = b; i < e; ++i) (*p->owner)[i] = ((*p->owner)[i] == -1) ? id : -2;
        }, &ctx);
        return owner;
      },
      py::arg("n"), py::arg("grain"));
}

}  // namespace ff
