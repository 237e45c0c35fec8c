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
#include <vector>

#include "kernels/cpu/quant/api.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/simd/vec.h"

namespace ff {
namespace FF_ISA_NS {
namespace {

// Points with prefix sums of weight, weighted value and weighted square (values centred on the
// median). The sums are anchored at the median point: P[t] sums the points from the pivot up to
// t, and for t below the pivot it is minus the sum from t up to it, so that P[j] - P[i] is the
// sum over [i, j) either way. A cluster's sums then never take the difference of two totals that
// carry an outlier far from it (prefix sums from the first point lost a cluster's whole error to
// rounding once one point 1e10 times the rest came before it).
struct Points {
  int64_t m = 0;
  std::unique_ptr<double[]> w, s, ss;  // anchored prefix sums, size m + 1
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

// The points in ascending order of value, each as its weight and the sums of its (centred)
// values and of their squares, before the prefix sums.
struct PointList {
  std::vector<double> w, s, ss;
  void add(double cw, double cs, double css) {
    w.push_back(cw);
    s.push_back(cs);
    ss.push_back(css);
  }
  // Each distinct value of sorted[0, n) with its multiplicity.
  void add_distinct(const float* sorted, int64_t n, double centre) {
    for (int64_t i = 0; i < n;) {
      int64_t e = i;
      while (e < n && sorted[e] == sorted[i]) ++e;
      const double x = sorted[i] - centre, c = static_cast<double>(e - i);
      add(c, c * x, c * x * x);
      i = e;
    }
  }
};

// The anchored prefix sums of the list (pivot: the first point where the weight reaches half).
void anchor_points(const PointList& list, Points& p) {
  const int64_t m = static_cast<int64_t>(list.w.size());
  p.m = m;
  p.w.reset(new double[m + 1]);
  p.s.reset(new double[m + 1]);
  p.ss.reset(new double[m + 1]);
  double total = 0, below = 0;
  for (double x : list.w) total += x;
  int64_t pivot = 0;
  while (pivot < m && below + list.w[pivot] < 0.5 * total) below += list.w[pivot++];
  p.w[pivot] = p.s[pivot] = p.ss[pivot] = 0;
  for (int64_t t = pivot; t < m; ++t) {
    p.w[t + 1] = p.w[t] + list.w[t];
    p.s[t + 1] = p.s[t] + list.s[t];
    p.ss[t + 1] = p.ss[t] + list.ss[t];
  }
  for (int64_t t = pivot - 1; t >= 0; --t) {
    p.w[t] = p.w[t + 1] - list.w[t];
    p.s[t] = p.s[t + 1] - list.s[t];
    p.ss[t] = p.ss[t + 1] - list.ss[t];
  }
}

// A strided sample of v, sorted: where the histogram's bins go and the values' centre.
struct Sample {
  std::vector<float> x;
  Sample(const float* v, int64_t n) {
    constexpr int64_t kSize = int64_t{1} << 16;
    const int64_t stride = std::max<int64_t>(1, n / kSize);
    for (int64_t i = 0; i < n; i += stride) x.push_back(v[i]);
    std::sort(x.begin(), x.end());
  }
  double median() const { return x[x.size() / 2]; }
  // The range the histogram's bins cover: the sample's span less its extreme 1/4096 on each
  // side, widened by `widen` times that span each way, within [lo, hi]. Values outside it become
  // exact points: bins of equal width over all of [lo, hi] left the bulk of the data in a
  // handful of bins beside an outlier 1e4 times the rest (an 8-bit palette of 1M values kept 8
  // distinct entries).
  void range(double widen, double lo, double hi, double* a, double* b) const {
    const size_t cut = x.size() / 4096;
    const double qa = x[cut], qb = x[x.size() - 1 - cut], span = qb - qa;
    *a = std::max(lo, qa - widen * span);
    *b = std::min(hi, qb + widen * span);
  }
};

// Non-empty bins of an equal-width histogram over [a, b], with the values outside it as exact
// points below and above them. False (list untouched) where more than max_tail values lie
// outside.
bool points_histogram(const float* v, int64_t n, double a, double b, int64_t bins, double centre,
                      int64_t max_tail, PointList& list) {
  std::vector<double> cw(bins), cs(bins), css(bins);
  std::vector<float> below, above;
  const double inv = (b > a) ? static_cast<double>(bins) / (b - a) : 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = v[i];
    if (x < a || x > b) {
      (x < a ? below : above).push_back(v[i]);
      if (static_cast<int64_t>(below.size() + above.size()) > max_tail) return false;
      continue;
    }
    const int64_t bin = std::min(static_cast<int64_t>((x - a) * inv), bins - 1);
    const double c = x - centre;
    cw[bin] += 1;
    cs[bin] += c;
    css[bin] += c * c;
  }
  std::sort(below.begin(), below.end());
  std::sort(above.begin(), above.end());
  list.add_distinct(below.data(), static_cast<int64_t>(below.size()), centre);
  for (int64_t bin = 0; bin < bins; ++bin)
    if (cw[bin] > 0) list.add(cw[bin], cs[bin], css[bin]);
  list.add_distinct(above.data(), static_cast<int64_t>(above.size()), centre);
  return true;
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

// The histogram's points (centred on the sample's median, returned): bins over the sample's
// range, widened until at most max_points / 4 values lie outside it, else over all of [lo, hi].
double histogram_points(const float* v, int64_t n, double lo, double hi, int64_t max_points, PointList& list) {
  const Sample sample(v, n);
  const double centre = sample.median();
  for (double widen : {0.125, 1.0, 8.0, 64.0}) {
    double a, b;
    sample.range(widen, lo, hi, &a, &b);
    if (points_histogram(v, n, a, b, max_points, centre, max_points / 4, list)) return centre;
  }
  points_histogram(v, n, lo, hi, max_points, centre, n, list);
  return centre;
}

void kmeans1d(const float* v, int64_t n, int k, float* centroids) {
  double lo = v[0], hi = v[0];
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min<double>(lo, v[i]);
    hi = std::max<double>(hi, v[i]);
  }
  // DP budget: k * m * log2(m) cost evaluations (m points: exact below it, histogram bins above;
  // Lloyd iterations on the raw values then refine the histogram solution).
  constexpr double kDpBudget = 3e7;
  int64_t max_points = int64_t{1} << 12;
  while (max_points < (int64_t{1} << 22) &&
         static_cast<double>(k) * (2 * max_points) * std::log2(2.0 * max_points) <= kDpBudget)
    max_points *= 2;

  PointList list;
  const bool exact = n <= max_points;
  double centre;
  if (exact) {
    std::unique_ptr<float[]> sorted(new float[n]);
    std::memcpy(sorted.get(), v, n * sizeof(float));
    std::sort(sorted.get(), sorted.get() + n);
    centre = sorted[n / 2];
    list.add_distinct(sorted.get(), n, centre);
  } else {
    centre = histogram_points(v, n, lo, hi, max_points, list);
  }
  Points p;
  anchor_points(list, p);
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
