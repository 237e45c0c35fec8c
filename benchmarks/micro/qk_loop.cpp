// S = Q K^T's inner loop of GQA decode (qk_dot: 4 query rows x 2 keys, D 128, bf16 K) alone, K
// and q in L1, one thread: FMAs per cycle of the loop's forms beside bare FMA chains, to tell
// what bounds it (issue 3's bf16 decode). Standalone, not part of the build:
//
//   g++ -O3 -mavx2 -mfma -o /tmp/qk_loop benchmarks/micro/qk_loop.cpp && /tmp/qk_loop [GHz]
//
// (GHz: the clock FMAs per cycle are counted at; 3.19 here, from the FMA probe: 102 GFLOP/s on
// one thread = 2 FMA x 8 lanes x 2 flop x 3.19 GHz.) Forms: bf16 widened by a shift and a mask
// of each 32-bit word (the split order, simd::load_bf16_split), the same with the load kept in
// one register (GCC otherwise folds it into the vpand too: a second load of the same bytes), and
// by unpacking with zeros (lane order); blocks of 4 rows x 2 keys and 2 rows x 4 keys.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
// conversion variants for 16 bf16 values at p: 0 shift+and (split order), 1 unpack lo/hi (lane order), 2 shift+and with one load (asm barrier)
template <int CV> static inline void cvt(const uint16_t* p, __m256& a, __m256& b) {
  __m256i w = _mm256_loadu_si256((const __m256i*)p);
  if (CV == 2) asm volatile("" : "+x"(w));
  if (CV == 1) {
    const __m256i z = _mm256_setzero_si256();
    a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, w));
    b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, w));
  } else {
    a = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(0xffff0000)));
  }
}
template <int CV, int R, int KB>
__attribute__((noipa)) float run(const float* q, const uint16_t* k, int nk) {
  const int D = 128;
  __m256 keep = _mm256_setzero_ps();
  for (int j = 0; j + KB <= nk; j += KB) {
    __m256 acc[R][KB];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
      for (int b = 0; b < KB; ++b) acc[r][b] = _mm256_setzero_ps();
    for (int x = 0; x < D; x += 16) {
      __m256 ka[KB], kb[KB];
#pragma GCC unroll 8
      for (int b = 0; b < KB; ++b) cvt<CV>(k + (j + b) * D + x, ka[b], kb[b]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 qa = _mm256_loadu_ps(q + r * D + x), qb = _mm256_loadu_ps(q + r * D + x + 8);
#pragma GCC unroll 8
        for (int b = 0; b < KB; ++b) {
          acc[r][b] = _mm256_fmadd_ps(qa, ka[b], acc[r][b]);
          acc[r][b] = _mm256_fmadd_ps(qb, kb[b], acc[r][b]);
        }
      }
    }
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
      for (int b = 0; b < KB; ++b) keep = _mm256_add_ps(keep, acc[r][b]);
  }
  float out[8]; _mm256_storeu_ps(out, keep); return out[0];
}
static double ghz = 3.19;

// N independent chains a = a * m + c (operand from L1 with L), the FMA unit's own rate.
template <int N, int L> __attribute__((noipa)) float chains(const float* buf, long iters) {
  __m256 a[N];
  for (int i = 0; i < N; ++i) a[i] = _mm256_set1_ps(1.0f + i * 1e-3f);
  const __m256 c = _mm256_set1_ps(1e-7f), m = _mm256_set1_ps(0.9999f);
  for (long i = 0; i < iters; ++i) {
    const float* p = buf + (i & 63) * 64;
#pragma GCC unroll 16
    for (int k = 0; k < N; ++k) a[k] = _mm256_fmadd_ps(a[k], L ? _mm256_loadu_ps(p + 8 * (k % 8)) : m, c);
  }
  __m256 s = a[0];
  for (int i = 1; i < N; ++i) s = _mm256_add_ps(s, a[i]);
  float o[8];
  _mm256_storeu_ps(o, s);
  return o[0];
}
template <int N, int L> void bench_chains(const float* buf) {
  const long iters = 50000000 / N * 8;
  auto t0 = std::chrono::steady_clock::now();
  const float r = chains<N, L>(buf, iters);
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  printf("%-28s %d chains: %.2f FMA/cycle %g\n", L ? "bare FMAs, load operand" : "bare FMAs", N, iters * N / ns / ghz, r);
}

template <int CV, int R, int KB> void bench(const char* name, const float* q, const uint16_t* k) {
  const int NK = 48; const int iters = 300000; float sink = 0;
  for (int w = 0; w < 2; ++w) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) sink += run<CV, R, KB>(q, k, NK);
    double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    double fmas = double(iters) * (NK / KB * KB) * R * 16;
    if (w) printf("%-28s %d x %d: %.2f FMA/cycle %g\n", name, R, KB, fmas / ns / ghz, sink);
  }
}
int main(int argc, char** argv) {
  if (argc > 1) ghz = atof(argv[1]);
  alignas(64) static float buf[4096];
  for (float& b : buf) b = 0.9999f;
  const int D = 128, NK = 48;
  alignas(64) static float q[4 * D];
  alignas(64) static uint16_t kb[NK * D];
  for (int i = 0; i < 4 * D; ++i) q[i] = (i % 7) * 0.1f;
  for (int i = 0; i < NK * D; ++i) { float f = (i % 5) * 0.2f; uint32_t b; memcpy(&b, &f, 4); kb[i] = b >> 16; }
  for (int rep = 0; rep < 2; ++rep) {
    bench_chains<8, 0>(buf); bench_chains<8, 1>(buf);
    bench<0, 4, 2>("shift+and", q, kb); bench<2, 4, 2>("shift+and, one load", q, kb); bench<1, 4, 2>("unpack", q, kb);
    bench<0, 2, 4>("shift+and", q, kb); bench<2, 2, 4>("shift+and, one load", q, kb); bench<1, 2, 4>("unpack", q, kb);
  }
}
