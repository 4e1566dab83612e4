// CPU capture of a sparse teacher from its logits, top-k or sampled, one row at a time.
//
// top-k: per row, the full-vocabulary log-sum-exp of t/τ (online max + rescaled sum) and the k
// largest entries (a size-k min-heap behind two filters: the 512-wide block max, then 32-wide group
// maxima) come out of ONE sweep over the teacher logits; the log-probabilities are the kept logits
// minus that lse.
// sample: the same sweep gives lse; a second walk over the row (still in L2 for the row sizes of
// interest) follows the cumulative distribution in vocabulary order and assigns N sorted uniforms
// to ids (inverse CDF), giving unique ids ascending with their counts.
//
// Never materialised: softmax(t/τ), any sort of a full row, any float32 upcast of a bf16/fp16 row.
// Preconditions: unit column stride; 1 <= k <= v; width = min(num_samples, v). Rows are split in
// static contiguous blocks over OpenMP threads; the float32, bf16 and fp16 row functions are cloned
// for x86-64-v3 and baseline x86-64 (cpu/cache_common.h).
#include "cpu/capture.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/cache_common.h"

namespace fastkd {
namespace {

using cpu_cache::block_max;
using cpu_cache::exp_block;
using cpu_cache::half_bf16;
using cpu_cache::kBlock;
using cpu_cache::lane_sum;
using cpu_cache::ninf;
using cpu_cache::OnlineLse;
using cpu_cache::pick;
using cpu_cache::run_blocks;
using cpu_cache::v8f;
using cpu_cache::v8i;
using cpu_cache::widen;

// Does any of the 32 values at x exceed thr? (A vector compare of four 8-lane groups.)
FKC_INLINE bool group_exceeds(const float* x, float thr) {
  v8f a, b, c, d;
  std::memcpy(&a, x, 32);
  std::memcpy(&b, x + 8, 32);
  std::memcpy(&c, x + 16, 32);
  std::memcpy(&d, x + 24, 32);
  const v8i hit = (a > thr) | (b > thr) | (c > thr) | (d > thr);
  int64_t w[4];
  std::memcpy(w, &hit, 32);
  return (w[0] | w[1] | w[2] | w[3]) != 0;
}
FKC_INLINE bool group_exceeds(const double* x, double thr) {
  for (int j = 0; j < 32; ++j)
    if (x[j] > thr) return true;
  return false;
}

// out[i] = src[i]/τ in the accumulator type.
template <typename In, typename Acc>
FKC_INLINE void load_scaled(const In* src, int n, Acc inv_t, Acc* out) {
#pragma omp simd
  for (int i = 0; i < n; ++i) out[i] = widen(src[i]) * inv_t;
}

// ----------------------------------------------------------------------------------------------
// Top-k heap. The root is the entry that would be evicted first: the smallest value, and among
// equal values the larger id, so ties resolve to the smaller id (the order the reference uses).
// ----------------------------------------------------------------------------------------------
template <typename Acc>
struct TopK {
  Acc* val;
  int64_t* id;
  int64_t size = 0, cap = 0;

  static FKC_INLINE bool evict_before(Acc va, int64_t ia, Acc vb, int64_t ib) {
    return va < vb || (va == vb && ia > ib);
  }
  FKC_INLINE void sift_down(int64_t i) {
    for (;;) {
      int64_t l = 2 * i + 1, r = l + 1, w = i;
      if (l < size && evict_before(val[l], id[l], val[w], id[w])) w = l;
      if (r < size && evict_before(val[r], id[r], val[w], id[w])) w = r;
      if (w == i) return;
      std::swap(val[i], val[w]);
      std::swap(id[i], id[w]);
      i = w;
    }
  }
  FKC_INLINE void push(Acc v, int64_t j) {
    int64_t i = size++;
    val[i] = v;
    id[i] = j;
    while (i > 0) {
      int64_t p = (i - 1) / 2;
      if (!evict_before(val[i], id[i], val[p], id[p])) break;
      std::swap(val[i], val[p]);
      std::swap(id[i], id[p]);
      i = p;
    }
  }
  // Later ids are larger, so an entry equal to the root loses the tie and is not taken.
  FKC_INLINE void offer(Acc v, int64_t j) {
    if (v > val[0]) {
      val[0] = v;
      id[0] = j;
      sift_down(0);
    }
  }
};

template <typename In, typename Acc>
FKC_INLINE void topk_rows(const CaptureProblem& P, int64_t r0, int64_t r1) {
  const int64_t v = P.v, k = P.k;
  const Acc inv_t = Acc(1) / Acc(P.temperature);
  alignas(64) Acc buf[kBlock];
  std::vector<Acc> hval(static_cast<size_t>(k));
  std::vector<int64_t> hid(static_cast<size_t>(k));
  std::vector<std::pair<Acc, int64_t>> sorted(static_cast<size_t>(k));
  for (int64_t r = r0; r < r1; ++r) {
    const In* t = static_cast<const In*>(P.t) + r * P.stride_t;
    TopK<Acc> heap{hval.data(), hid.data(), 0, k};
    OnlineLse<Acc> lse;
    int nan_flag = 0;
    for (int64_t j0 = 0; j0 < v; j0 += kBlock) {
      const int n = int(std::min<int64_t>(kBlock, v - j0));
      load_scaled<In, Acc>(t + j0, n, inv_t, buf);
      const Acc bm = block_max(buf, n, nan_flag);
      lse.absorb(buf, n, bm);
      int i = 0;
      while (heap.size < k && i < n) {
        heap.push(buf[i], j0 + i);
        ++i;
      }
      // Two-level filter: the block max skips whole blocks, then 32-wide group maxima skip groups,
      // so only the few groups holding a new top-k candidate are walked element by element.
      if (i < n && bm > heap.val[0]) {
        for (; i < n && (i & 31); ++i) heap.offer(buf[i], j0 + i);
        for (; i < n; i += 32) {
          const int e = std::min(n, i + 32);
          if (e - i == 32 && !group_exceeds(buf + i, heap.val[0])) continue;
          for (int j = i; j < e; ++j) heap.offer(buf[j], j0 + j);
        }
      }
    }
    const Acc row_lse = nan_flag ? std::numeric_limits<Acc>::quiet_NaN() : lse.value();
    for (int64_t i = 0; i < k; ++i) sorted[size_t(i)] = {hval[size_t(i)], hid[size_t(i)]};
    // A NaN row is NaN whatever the order (and NaN would break the sort's strict weak ordering).
    if (!nan_flag)
      std::sort(sorted.begin(), sorted.end(), [](const std::pair<Acc, int64_t>& a, const std::pair<Acc, int64_t>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
    int64_t* ids = P.ids + r * k;
    Acc* vals = static_cast<Acc*>(P.values) + r * k;
    for (int64_t i = 0; i < k; ++i) {
      ids[i] = sorted[size_t(i)].second;
      vals[i] = sorted[size_t(i)].first - row_lse;
    }
    static_cast<Acc*>(P.lse)[r] = row_lse;
  }
}

template <typename In, typename Acc>
FKC_INLINE void sample_rows(const CaptureProblem& P, int64_t r0, int64_t r1) {
  const int64_t v = P.v, ns = P.num_samples, width = P.width;
  const Acc inv_t = Acc(1) / Acc(P.temperature);
  alignas(64) Acc buf[kBlock], ebuf[kBlock];
  alignas(64) double e[kBlock];
  std::vector<double> u(static_cast<size_t>(ns));
  for (int64_t r = r0; r < r1; ++r) {
    const In* t = static_cast<const In*>(P.t) + r * P.stride_t;
    OnlineLse<Acc> lse;
    int nan_flag = 0;
    for (int64_t j0 = 0; j0 < v; j0 += kBlock) {
      const int n = int(std::min<int64_t>(kBlock, v - j0));
      load_scaled<In, Acc>(t + j0, n, inv_t, buf);
      lse.absorb(buf, n, block_max(buf, n, nan_flag));
    }
    const Acc row_lse = nan_flag ? std::numeric_limits<Acc>::quiet_NaN() : lse.value();
    static_cast<Acc*>(P.lse)[r] = row_lse;

    // Inverse CDF in units of e^(s − m): draw j goes to the smallest id whose running mass
    // exceeds u_j · total. Mass is accumulated in double, blocks without a draw are skipped whole.
    std::memcpy(u.data(), P.u + r * ns, sizeof(double) * size_t(ns));
    std::sort(u.begin(), u.end());
    const double total = double(lse.d);
    const Acc m = lse.m;
    int64_t* ids = P.ids + r * width;
    int32_t* counts = P.counts + r * width;
    int64_t out = 0, next = 0, last_pos = -1;
    double acc = 0.0;
    const bool degenerate = nan_flag || !(total > 0.0) || m == ninf<Acc>();
    auto emit = [&](int64_t id, int32_t c) {
      if (out > 0 && ids[out - 1] == id) {
        counts[out - 1] += c;
      } else {
        ids[out] = id;
        counts[out] = c;
        ++out;
      }
    };
    if (!degenerate) {
      for (int64_t j0 = 0; j0 < v && next < ns; j0 += kBlock) {
        const int n = int(std::min<int64_t>(kBlock, v - j0));
        load_scaled<In, Acc>(t + j0, n, inv_t, buf);
        exp_block(buf, n, m, ebuf);
        for (int i = 0; i < n; ++i) e[i] = double(ebuf[i]);
        const double bsum = lane_sum(e, n);
        if (acc + bsum <= u[size_t(next)] * total) {
          acc += bsum;
          for (int i = n - 1; i >= 0; --i)
            if (e[i] > 0.0) {
              last_pos = j0 + i;
              break;
            }
          continue;
        }
        for (int i = 0; i < n && next < ns; ++i) {
          if (e[i] <= 0.0) continue;
          acc += e[i];
          last_pos = j0 + i;
          int32_t c = 0;
          while (next < ns && u[size_t(next)] * total < acc) {
            ++c;
            ++next;
          }
          if (c) emit(j0 + i, c);
        }
      }
    }
    // Rounding can leave the top draws past the walked mass: they belong to the last id with mass.
    if (next < ns) emit(last_pos >= 0 ? last_pos : v - 1, int32_t(ns - next));
    for (int64_t i = out; i < width; ++i) {
      ids[i] = -1;
      counts[i] = 0;
    }
  }
}

FKC_CLONES void topk_f32(const CaptureProblem& P, int64_t a, int64_t b) { topk_rows<float, float>(P, a, b); }
FKC_CLONES void topk_bf16(const CaptureProblem& P, int64_t a, int64_t b) { topk_rows<half_bf16, float>(P, a, b); }
FKC_CLONES void topk_f16(const CaptureProblem& P, int64_t a, int64_t b) { topk_rows<_Float16, float>(P, a, b); }
void topk_f64(const CaptureProblem& P, int64_t a, int64_t b) { topk_rows<double, double>(P, a, b); }

FKC_CLONES void sample_f32(const CaptureProblem& P, int64_t a, int64_t b) { sample_rows<float, float>(P, a, b); }
FKC_CLONES void sample_bf16(const CaptureProblem& P, int64_t a, int64_t b) { sample_rows<half_bf16, float>(P, a, b); }
FKC_CLONES void sample_f16(const CaptureProblem& P, int64_t a, int64_t b) { sample_rows<_Float16, float>(P, a, b); }
void sample_f64(const CaptureProblem& P, int64_t a, int64_t b) { sample_rows<double, double>(P, a, b); }

}  // namespace

void capture_topk_cpu(const CaptureProblem& P) {
  run_blocks<CaptureProblem>(P, pick<CaptureProblem>(P.dtype, topk_f32, topk_f64, topk_bf16, topk_f16));
}

void capture_sample_cpu(const CaptureProblem& P) {
  run_blocks<CaptureProblem>(P, pick<CaptureProblem>(P.dtype, sample_f32, sample_f64, sample_bf16, sample_f16));
}

}  // namespace fastkd
