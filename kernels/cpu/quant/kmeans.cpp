// Optimal 1-D k-means (the LUT of palettization): dynamic programming over sorted points.
//
// Points are the distinct values (exact) or, for tensors with more distinct values than the
// DP budget allows, the non-empty bins of a fine equal-width histogram, each carrying its
// count, sum and sum of squares, so cluster costs stay exact sums over the data. Clusters are
// runs of consecutive points; D[c][j] = min_i D[c-1][i] + cost(i, j) is solved layer by layer
// with the divide-and-conquer optimisation (the optimal split is monotone in j), O(k m log m).
// Histogram solutions are then polished by Lloyd iterations on the raw data, which never
// increase the error.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

#include "kernels/cpu/quant/api.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/simd/vec.h"

namespace ff {
namespace FF_ISA_NS {
namespace {

// Points with prefix sums of weight, weighted value and weighted square (values centred).
struct Points {
  int64_t m = 0;
  std::unique_ptr<double[]> w, s, ss;  // prefix sums, size m + 1
  double cost(int64_t i, int64_t j) const {  // within-cluster SSE of points [i, j)
    const double cw = w[j] - w[i];
    if (cw <= 0) return 0;
    const double cs = s[j] - s[i];
    return std::max(0.0, (ss[j] - ss[i]) - cs * cs / cw);
  }
  double mean(int64_t i, int64_t j) const {
    const double cw = w[j] - w[i];
    return cw > 0 ? (s[j] - s[i]) / cw : 0;
  }
};

void alloc_points(Points& p, int64_t m) {
  p.m = m;
  p.w.reset(new double[m + 1]);
  p.s.reset(new double[m + 1]);
  p.ss.reset(new double[m + 1]);
  p.w[0] = p.s[0] = p.ss[0] = 0;
}

// Distinct values of sorted v (centred on `centre`), each weighted by its multiplicity.
void points_exact(const float* sorted, int64_t n, double centre, Points& p) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) m += (i == 0 || sorted[i] != sorted[i - 1]);
  alloc_points(p, m);
  int64_t j = 0;
  for (int64_t i = 0; i < n;) {
    int64_t e = i;
    while (e < n && sorted[e] == sorted[i]) ++e;
    const double x = sorted[i] - centre, c = static_cast<double>(e - i);
    p.w[j + 1] = p.w[j] + c;
    p.s[j + 1] = p.s[j] + c * x;
    p.ss[j + 1] = p.ss[j] + c * x * x;
    ++j;
    i = e;
  }
}

// Non-empty bins of an equal-width histogram over [lo, hi].
void points_histogram(const float* v, int64_t n, double lo, double hi, int64_t bins, double centre,
                      Points& p) {
  std::unique_ptr<double[]> cw(new double[bins]()), cs(new double[bins]()), css(new double[bins]());
  const double inv = (hi > lo) ? static_cast<double>(bins) / (hi - lo) : 0;
  for (int64_t i = 0; i < n; ++i) {
    int64_t b = static_cast<int64_t>((v[i] - lo) * inv);
    b = std::min(std::max<int64_t>(b, 0), bins - 1);
    const double x = v[i] - centre;
    cw[b] += 1;
    cs[b] += x;
    css[b] += x * x;
  }
  int64_t m = 0;
  for (int64_t b = 0; b < bins; ++b) m += cw[b] > 0;
  alloc_points(p, m);
  int64_t j = 0;
  for (int64_t b = 0; b < bins; ++b) {
    if (cw[b] <= 0) continue;
    p.w[j + 1] = p.w[j] + cw[b];
    p.s[j + 1] = p.s[j] + cs[b];
    p.ss[j + 1] = p.ss[j] + css[b];
    ++j;
  }
}

struct Layer {
  const Points* p;
  const double* prev;  // D[c-1][*]
  double* cur;         // D[c][*]
  int32_t* arg;        // split of D[c][j]
};

// D[c][j] for j in [jlo, jhi] knowing the optimal split lies in [olo, ohi].
void solve(const Layer& L, int64_t jlo, int64_t jhi, int64_t olo, int64_t ohi) {
  if (jlo > jhi) return;
  const int64_t j = (jlo + jhi) / 2;
  double best = std::numeric_limits<double>::infinity();
  int64_t best_i = olo;
  for (int64_t i = olo; i <= std::min(ohi, j - 1); ++i) {
    const double c = L.prev[i] + L.p->cost(i, j);
    if (c < best) best = c, best_i = i;
  }
  L.cur[j] = best;
  L.arg[j] = static_cast<int32_t>(best_i);
  solve(L, jlo, j - 1, olo, best_i);
  solve(L, j + 1, jhi, best_i, ohi);
}

// Optimal clustering of the points into k' = min(k, m) runs; writes k' means (centred).
int64_t dp_kmeans(const Points& p, int k, double* means) {
  const int64_t m = p.m, kk = std::min<int64_t>(k, m);
  std::unique_ptr<double[]> prev(new double[m + 1]), cur(new double[m + 1]);
  std::unique_ptr<int32_t[]> arg(new int32_t[kk * (m + 1)]);
  for (int64_t j = 0; j <= m; ++j) prev[j] = p.cost(0, j), arg[j] = 0;
  for (int64_t c = 1; c < kk; ++c) {
    std::fill(cur.get(), cur.get() + m + 1, std::numeric_limits<double>::infinity());
    Layer L{&p, prev.get(), cur.get(), arg.get() + c * (m + 1)};
    solve(L, c + 1, m, c, m - 1);
    std::swap(prev, cur);
  }
  int64_t j = m;
  for (int64_t c = kk - 1; c >= 0; --c) {
    const int64_t i = c == 0 ? 0 : arg[c * (m + 1) + j];
    means[c] = p.mean(i, j);
    j = i;
  }
  return kk;
}

// Lloyd iterations on the raw data (centroids ascending, in absolute values). The data is cut
// into fixed chunks summed on the thread pool and reduced in chunk order, so the result does not
// depend on the thread count.
void lloyd(const float* v, int64_t n, double* c, int64_t k, int iters) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::unique_ptr<double[]> mid(new double[k]), part(new double[2 * k * chunks]);
  for (int it = 0; it < iters; ++it) {
    for (int64_t j = 0; j + 1 < k; ++j) mid[j] = 0.5 * (c[j] + c[j + 1]);
    const double* mids = mid.get();
    double* parts = part.get();
    parallel_for(chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t ch = b; ch < e; ++ch) {
        double* sum = parts + 2 * k * ch;
        double* cnt = sum + k;
        std::fill(sum, sum + 2 * k, 0.0);
        const int64_t hi = std::min(n, (ch + 1) * kChunk);
        for (int64_t i = ch * kChunk; i < hi; ++i) {
          const int64_t j = std::lower_bound(mids, mids + k - 1, static_cast<double>(v[i])) - mids;
          sum[j] += v[i];
          cnt[j] += 1;
        }
      }
    });
    bool moved = false;
    for (int64_t j = 0; j < k; ++j) {
      double sum = 0, cnt = 0;
      for (int64_t ch = 0; ch < chunks; ++ch) sum += parts[2 * k * ch + j], cnt += parts[2 * k * ch + k + j];
      if (cnt > 0) {
        const double nc = sum / cnt;
        moved |= nc != c[j];
        c[j] = nc;
      }
    }
    if (!moved) break;
  }
}

void kmeans1d(const float* v, int64_t n, int k, float* centroids) {
  double lo = v[0], hi = v[0], total = 0;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min<double>(lo, v[i]);
    hi = std::max<double>(hi, v[i]);
    total += v[i];
  }
  const double centre = total / static_cast<double>(n);
  // DP budget: k * m * log2(m) cost evaluations (m points: exact below it, histogram bins above;
  // Lloyd iterations on the raw values then refine the histogram solution).
  constexpr double kDpBudget = 3e7;
  int64_t max_points = int64_t{1} << 12;
  while (max_points < (int64_t{1} << 22) &&
         static_cast<double>(k) * (2 * max_points) * std::log2(2.0 * max_points) <= kDpBudget)
    max_points *= 2;

  Points p;
  bool exact = n <= max_points;
  if (exact) {
    std::unique_ptr<float[]> sorted(new float[n]);
    std::memcpy(sorted.get(), v, n * sizeof(float));
    std::sort(sorted.get(), sorted.get() + n);
    points_exact(sorted.get(), n, centre, p);
  } else {
    points_histogram(v, n, lo, hi, max_points, centre, p);
  }
  std::unique_ptr<double[]> means(new double[k]);
  const int64_t kk = dp_kmeans(p, k, means.get());
  for (int64_t c = 0; c < kk; ++c) means[c] += centre;
  if (!exact) lloyd(v, n, means.get(), kk, 3);
  for (int64_t c = 0; c < k; ++c) centroids[c] = static_cast<float>(means[std::min(c, kk - 1)]);
  std::sort(centroids, centroids + k);
}

}  // namespace

void quant_kmeans1d(const float* v, int64_t n, int k, float* centroids) { kmeans1d(v, n, k, centroids); }

}  // namespace FF_ISA_NS
}  // namespace ff
