#include "csrc/dispatch.h"

#include <cstdlib>
#include <stdexcept>

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "csrc/threadpool.h"

namespace ff {
namespace {

Isa g_isa = Isa::generic;

bool cpu_has_avx2() {
#if defined(FF_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(FF_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// AVX512_BF16 (vdpbf16ps) on top of the avx512 variant's set: Zen 4, Cooper Lake, Sapphire
// Rapids and later; Ice Lake and Skylake-X lack it.
bool cpu_has_avx512_bf16() {
#if defined(FF_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// The OS lets this process use the AMX tile data registers. Linux enables them per process on
// request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18; kernels from 5.16 on); until
// then the first tile instruction faults. Asked once; the answer holds for every thread.
bool os_allows_amx() {
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
  static const bool allowed = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
  return allowed;
#else
  return false;
#endif
}

// AMX-BF16 tiles (tdpbf16ps) on top of avx512_bf16: Sapphire Rapids and later Xeons.
bool cpu_has_amx_bf16() {
#if defined(FF_HAVE_AVX512) && defined(FF_COMPILER_HAS_AMX)
  return cpu_has_avx512_bf16() && __builtin_cpu_supports("amx-tile") &&
         __builtin_cpu_supports("amx-bf16") && os_allows_amx();
#else
  return false;
#endif
}

// The best variant this CPU (and build) runs.
Isa best_isa() {
  return cpu_has_amx_bf16()      ? Isa::avx512_amx
         : cpu_has_avx512_bf16() ? Isa::avx512_bf16
         : cpu_has_avx512()    ? Isa::avx512
         : cpu_has_avx2()      ? Isa::avx2
                               : Isa::generic;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

}  // namespace

Isa active_isa() { return g_isa; }

bool bf16_dot() { return g_isa >= Isa::avx512_bf16; }

bool amx_tiles() { return g_isa == Isa::avx512_amx; }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512_amx: return "avx512_amx";
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names{"generic"};
#ifdef FF_HAVE_AVX2
  names.push_back("avx2");
#endif
#ifdef FF_HAVE_AVX512
  names.push_back("avx512");
  names.push_back("avx512_bf16");
#ifdef FF_COMPILER_HAS_AMX
  names.push_back("avx512_amx");
#endif
#endif
  return names;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names{"generic"};
  if (cpu_has_avx2()) names.push_back("avx2");
  if (cpu_has_avx512()) names.push_back("avx512");
  if (cpu_has_avx512_bf16()) names.push_back("avx512_bf16");
  if (cpu_has_amx_bf16()) names.push_back("avx512_amx");
  return names;
}

void select_isa() {
  const char* env = std::getenv("FUSEDFORMER_ISA");
  set_isa(env ? env : "auto");
}

namespace {

// `isa` when the CPU (and build) runs it; else the error naming what it lacks.
Isa require(Isa isa, bool runs, const char* needs) {
  if (!runs)
    throw std::invalid_argument(std::string("[fusedformer] FUSEDFORMER_ISA=") + isa_name(isa) +
                                ", but this CPU or build lacks " + needs + "; supported here: " +
                                join(supported_isas()));
  return isa;
}

}  // namespace

void set_isa(const std::string& want) {
  if (want == "auto" || want.empty()) {
    g_isa = best_isa();
  } else if (want == "generic") {
    g_isa = Isa::generic;
  } else if (want == "avx2") {
    g_isa = require(Isa::avx2, cpu_has_avx2(), "AVX2+FMA+F16C");
  } else if (want == "avx512") {
    g_isa = require(Isa::avx512, cpu_has_avx512(), "AVX-512 F/BW/VL/DQ+VNNI");
  } else if (want == "avx512_bf16") {
    g_isa = require(Isa::avx512_bf16, cpu_has_avx512_bf16(), "AVX-512 F/BW/VL/DQ+VNNI+BF16");
  } else if (want == "avx512_amx") {
    g_isa = require(Isa::avx512_amx, cpu_has_amx_bf16(),
                    "AVX-512 F/BW/VL/DQ+VNNI+BF16 with AMX-TILE+AMX-BF16 enabled by the OS");
  } else {
    throw std::invalid_argument("[fusedformer] FUSEDFORMER_ISA='" + want +
                                "' is not one of: auto, " + join(compiled_isas()));
  }
}

namespace {

// The integer value of environment variable `name` in [lo, hi]; false when it is unset or
// empty; throws with `what` (the accepted values) when it is not such an integer.
bool env_integer(const char* name, long lo, long hi, const char* what, long* value) {
  const char* env = std::getenv(name);
  if (!env || !*env) return false;
  char* end = nullptr;
  *value = std::strtol(env, &end, 10);
  if (*end != '\0' || *value < lo || *value > hi)
    throw std::invalid_argument(std::string("[fusedformer] ") + name + "='" + env + "' is not " + what);
  return true;
}

}  // namespace

void select_num_threads() {
  long n;
  if (env_integer("FUSEDFORMER_NUM_THREADS", 1, 4096, "a positive integer (1 to 4096)", &n))
    set_num_threads(static_cast<int>(n));
}

void select_pool() {
  const char* env = std::getenv("FUSEDFORMER_POOL");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") return set_pool_mode(PoolMode::automatic);
  if (want == "own") return set_pool_mode(PoolMode::own);
  if (want == "openmp") return set_pool_mode(PoolMode::openmp);
  throw std::invalid_argument("[fusedformer] FUSEDFORMER_POOL='" + want + "' is not one of: auto, own, openmp");
}

void select_spin() {
  long us;
  if (env_integer("FUSEDFORMER_SPIN_US", 0, 1000000, "an integer from 0 to 1000000 (microseconds)", &us))
    set_spin_us(us);
}

}  // namespace ff
