#include "csrc/threadpool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cctype>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#ifdef __linux__
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sched.h>

#include <cstring>
#endif

#include "kernels/cpu/dispatch.h"

namespace ff {
namespace {

thread_local bool t_inside_pool_job = false;

// The first exception a job's ranges threw (std::bad_alloc from a scratch buffer, say), kept for
// the submitter to rethrow once every thread has left the job: a throw on a worker thread
// would terminate the process, and one from the submitter's own share would unwind the frame
// the workers still read. Later ranges are skipped (record() exhausts the counter) and their
// exceptions dropped.
class JobError {
 public:
  void record(int64_t n, std::atomic<int64_t>* next) noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
    next->store(n, std::memory_order_relaxed);  // no range is handed out after this
  }
  void rethrow() {  // (the job's threads are done: no lock needed)
    if (!error_) return;
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr error_;
};

// Runs fn on chunks of [0, n) taken from `next` until none is left, as a pool job's thread
// (nested parallel_for calls run inline); an exception stops the job and is recorded in `error`.
void take_chunks(RangeFn fn, void* ctx, int64_t n, int64_t grain, std::atomic<int64_t>* next, JobError* error) noexcept {
  const bool outer = t_inside_pool_job;
  t_inside_pool_job = true;
  try {
    for (;;) {
      const int64_t b = next->fetch_add(grain, std::memory_order_relaxed);
      if (b >= n) break;
      fn(ctx, b, std::min(b + grain, n));
    }
  } catch (...) {
    error->record(n, next);
  }
  t_inside_pool_job = outer;
}

// How long an idle worker (and a submitter waiting for the last worker) spins before it
// sleeps. Decode runs one short kernel after another (tens to hundreds of microseconds each,
// with a few small framework ops between them); waking a sleeping thread costs about as much
// as such a kernel on a busy VM.
// FUSEDFORMER_SPIN_US overrides it (0: sleep at once).
std::atomic<int64_t> g_spin_ns{100 * 1000};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Spins until done() or the spin budget is spent; returns done().
template <class Pred>
bool spin_until(const Pred& done) {
  const int64_t budget = g_spin_ns.load(std::memory_order_relaxed);
  if (budget <= 0) return done();
  const int64_t until = now_ns() + budget;
  for (int i = 1;; ++i) {
    if (done()) return true;
    cpu_relax();
    if (i % 64 == 0 && now_ns() > until) return done();
  }
}

// A job is a range [0, n) handed out in chunks of `grain` through an atomic counter, so uneven
// work balances itself; the submitting thread works too. Between jobs workers spin for a
// while (see g_spin_ns), then sleep on a condition variable. Jobs from several Python threads
// are serialised; a parallel_for issued from inside a job runs inline (no nested parallelism,
// no deadlock).
//
// The submitter waits only for workers that joined the job, not for every worker: once the
// counter is exhausted it closes the job, and a worker that had not joined by then (asleep,
// or its core taken by another process's spinning threads, as torch's OpenMP workers do
// between ops) stays out of it. Joining is `active_ += 1` followed by a check that the job is
// still open; closing is a store to state_ followed by reading active_. Both pairs are
// sequentially consistent, so either the submitter sees the worker in active_ and waits for
// it, or the worker sees the job closed and never touches its fields.
class ThreadPool {
 public:
  // Throws std::system_error (RuntimeError in Python) where the system refuses a thread, after
  // stopping the ones it started (a pids or address-space limit).
  explicit ThreadPool(int threads) {
    try {
      for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
    } catch (...) {
      stop_workers();
      throw;
    }
  }
  ~ThreadPool() { stop_workers(); }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

 private:
  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_.store(true);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

 public:

  void run(int64_t n, int64_t grain, RangeFn fn, void* ctx) {
    grain = std::max<int64_t>(grain, 1);
    if (n <= 0) return;
    if (workers_.empty() || n <= grain || t_inside_pool_job) {
      fn(ctx, 0, n);
      return;
    }
    std::lock_guard<std::mutex> submit(submit_mutex_);
    uint64_t job;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      grain_ = grain;
      next_.store(0, std::memory_order_relaxed);
      job = (state_.load(std::memory_order_relaxed) >> 1) + 1;
      state_.store(job << 1 | 1, std::memory_order_seq_cst);  // open; publishes the fields
      if (sleepers_ > 0) wake_.notify_all();
    }
    work();
    state_.store(job << 1, std::memory_order_seq_cst);  // closed to workers that have not joined
    auto finished = [this] { return active_.load(std::memory_order_seq_cst) == 0; };
    if (!spin_until(finished)) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, finished);
    }
    error_.rethrow();
  }

 private:
  void work() noexcept { take_chunks(fn_, ctx_, n_, grain_, &next_, &error_); }

  void worker_loop() {
    uint64_t seen = 0;  // the last job this worker looked at
    auto fresh = [&] {
      return stop_.load(std::memory_order_relaxed) || (state_.load(std::memory_order_acquire) >> 1) != seen;
    };
    for (;;) {
      if (!spin_until(fresh)) {
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleepers_;
        wake_.wait(lock, fresh);
        --sleepers_;
      }
      if (stop_.load()) return;
      seen = state_.load(std::memory_order_acquire) >> 1;
      active_.fetch_add(1, std::memory_order_seq_cst);
      if (state_.load(std::memory_order_seq_cst) == (seen << 1 | 1)) work();  // still open: join
      if (active_.fetch_sub(1, std::memory_order_seq_cst) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);  // the submitter may be about to sleep
        done_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex submit_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> state_{0};  // job number << 1 | (1 while the job is open)
  std::atomic<int> active_{0};      // workers inside the current job
  int sleepers_ = 0;                // guarded by mutex_
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<int64_t> next_{0};
  JobError error_;
};

// ---- running jobs on the process's OpenMP team (FUSEDFORMER_POOL) ------------------------
// torch's matmuls run on an OpenMP team whose threads spin for a while after each op (the
// default wait policy of GNU and LLVM OpenMP). On few cores our own workers then share cores
// with those spinning threads and lose their time slices in the middle of a unit of work,
// which the job waits for. So by default a job runs as a parallel region of that team (found
// in the OpenMP runtime the process has loaded: torch's bundled libgomp, or an LLVM/Intel
// runtime, which exports the same GOMP_parallel entry point), whose threads are the ones
// spinning. With OMP_WAIT_POLICY=passive the team's threads sleep between regions, out of our
// way and slow to wake, and jobs stay on our pool; likewise without such a runtime loaded.
// Measured on 2 cores (a Sapphire Rapids class VM), team / own pool time: 0.81-0.94 for
// decode attention, MiniLM's attention and a 4-bit GEMV called between torch matmuls, 0.94-0.99
// alone; with passive waiting 1.00-1.33.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

std::atomic<int> g_pool_mode{static_cast<int>(PoolMode::automatic)};

// GOMP_parallel of a loaded OpenMP runtime, or null; searched again only after the process
// loads more shared objects.
GompParallel openmp_parallel() {
#ifdef __linux__
  static std::atomic<GompParallel> found{nullptr};
  static std::atomic<unsigned long long> seen_loads{0};
  if (GompParallel f = found.load(std::memory_order_acquire)) return f;
  unsigned long long loads = 0;
  dl_iterate_phdr([](dl_phdr_info* info, size_t, void* out) -> int {
    *static_cast<unsigned long long*>(out) = info->dlpi_adds;
    return 1;  // the load counter is the same in every entry
  }, &loads);
  if (loads == seen_loads.load(std::memory_order_relaxed)) return nullptr;
  seen_loads.store(loads, std::memory_order_relaxed);
  std::string path;
  dl_iterate_phdr([](dl_phdr_info* info, size_t, void* out) -> int {
    const char* name = info->dlpi_name;
    if (name && (std::strstr(name, "libgomp") || std::strstr(name, "libiomp") || std::strstr(name, "libomp"))) {
      *static_cast<std::string*>(out) = name;
      return 1;
    }
    return 0;
  }, &path);
  if (path.empty()) return nullptr;
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (!lib) return nullptr;
  auto f = reinterpret_cast<GompParallel>(dlsym(lib, "GOMP_parallel"));
  found.store(f, std::memory_order_release);
  return f;
#else
  return nullptr;
#endif
}

struct OpenMPJob {
  RangeFn fn;
  void* ctx;
  int64_t n, grain;
  std::atomic<int64_t> next{0};
  JobError error;
};

// The body of the parallel region: every team thread takes chunks from the shared counter.
void openmp_body(void* data) {
  auto* job = static_cast<OpenMPJob*>(data);
  take_chunks(job->fn, job->ctx, job->n, job->grain, &job->next, &job->error);
}

std::mutex g_pool_mutex;
std::shared_ptr<ThreadPool> g_pool;
int g_child_pool_size = 0;  // in a forked child: the size of the parent's pool, for the child's own

std::shared_ptr<ThreadPool> pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (!g_pool) g_pool = std::make_shared<ThreadPool>(g_child_pool_size > 0 ? g_child_pool_size : available_cpus());
  return g_pool;
}

}  // namespace

int available_cpus() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

int num_threads() { return pool()->size(); }

void set_spin_us(int64_t us) { g_spin_ns.store(us * 1000, std::memory_order_relaxed); }

void set_num_threads(int n) {
  std::shared_ptr<ThreadPool> fresh;
  try {
    fresh = std::make_shared<ThreadPool>(std::max(1, n));
  } catch (const std::system_error& e) {  // (the pool in place stays)
    throw std::runtime_error("[set_num_threads] the system refused to start " + std::to_string(n) + " threads (" + e.what() +
                             "); the pool keeps its " + std::to_string(num_threads()));
  }
  std::shared_ptr<ThreadPool> old;
  {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    old = std::move(g_pool);
    g_pool = std::move(fresh);
  }
  // `old` joins its workers here, after any job still running on it has finished.
}

void set_pool_mode(PoolMode mode) { g_pool_mode.store(static_cast<int>(mode), std::memory_order_relaxed); }
PoolMode pool_mode() { return static_cast<PoolMode>(g_pool_mode.load(std::memory_order_relaxed)); }

namespace {

// Whether the loaded OpenMP runtime's threads spin between regions: OMP_WAIT_POLICY as the
// runtime read it when it started (read once, after the runtime is found, so already loaded).
bool openmp_team_spins() {
  static const bool spins = [] {
    const char* env = std::getenv("OMP_WAIT_POLICY");
    std::string policy = env ? env : "";
    for (char& c : policy) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return policy != "passive";
  }();
  return spins;
}

// Set in a child process forked from this one: GNU OpenMP's team does not survive a fork (a
// region in the child waits for the parent's threads forever: torch's own ops hang there), so
// the child's jobs run on our pool. Nor do our pool's workers: the child forgets the parent's
// pool without touching it (its workers are not in this process, and its locks may have been
// held by threads that are not either) and builds its own of the same size on first use, so
// num_threads() stays true and set_num_threads() works there.
std::atomic<bool> g_forked{false};
#ifdef __linux__
void forget_parents_pool() {  // (the child has one thread: nothing else reads these now)
  g_forked.store(true, std::memory_order_relaxed);
  if (g_pool) g_child_pool_size = g_pool->size();  // (else the size this process inherited stays)
  new (&g_pool_mutex) std::mutex();
  new (&g_pool) std::shared_ptr<ThreadPool>();  // the parent's pool is leaked, never joined
}
const int g_atfork = pthread_atfork(nullptr, nullptr, forget_parents_pool);
#endif

// GOMP_parallel where jobs run on the OpenMP team now, else null (our pool).
GompParallel team_for_jobs() {
  const auto mode = static_cast<PoolMode>(g_pool_mode.load(std::memory_order_relaxed));
  if (mode == PoolMode::own || g_forked.load(std::memory_order_relaxed)) return nullptr;
  GompParallel omp = openmp_parallel();
  if (omp && mode == PoolMode::automatic && !openmp_team_spins()) return nullptr;
  return omp;
}

}  // namespace

const char* pool_backend() { return team_for_jobs() ? "openmp" : "own"; }

void parallel_for_raw(int64_t n, int64_t grain, RangeFn fn, void* ctx) {
  std::shared_ptr<ThreadPool> p = pool();
  grain = std::max<int64_t>(grain, 1);
  if (p->size() > 1 && n > grain && !t_inside_pool_job) {
    if (GompParallel omp = team_for_jobs()) {
      OpenMPJob job{fn, ctx, n, grain};
      omp(openmp_body, &job, static_cast<unsigned>(p->size()), 0);
      job.error.rethrow();
      return;
    }
  }
  p->run(n, grain, fn, ctx);
}

}  // namespace ff
