// CPU Universal Logit Distillation loss (Boizard et al. 2024) from the student's top-k and the
// teacher's sorted head, with the gradient with respect to the student logits.
//
// Per row, with s = z/τ, p = softmax(s) over the whole row, A the columns that take part (all of
// them, or those with cols[j] = 1), a the k largest p_j over A in decreasing order (zero-padded
// when |A| < k) and b the teacher's head (k entries, decreasing, zero-padded):
//
//   T_s = Σ_{j∈A} p_j − Σ_r a_r  (exactly 0 when |A| <= k),   T_t = tail[row]
//   loss = scale · ( Σ_{r<k} |a_r − b_r| + |T_s − T_t| ) / divisor
//
// The |T_s − T_t| term stands for Σ_{r>=k} |a_r − b_r| over the ranks beyond k, which lies in
// [|T_s − T_t|, T_s + T_t]; it is exact when either tail is empty. With g_r = sign(a_r − b_r),
// g_T = sign(T_s − T_t) and S = Σ_r a_r g_r + g_T T_s, the gradient is
//   ∂loss/∂z_j = scale/(τ·divisor) · p_j · (c_j − S),  c_j = g_r (head column of rank r), g_T (other
//   columns of A), 0 (columns outside A).
//
// Pass 1 reads the row once: the online log-sum-exp of s (and of s over A when cols is given) and
// the top-k of s over A by a threshold filter (candidates above the current k-th value are kept; at
// 2k candidates nth_element keeps k and raises the threshold). Pass 2 writes the gradient. Ties at
// the k-th value keep the smaller column. Never materialised: softmax(s), a sort of the full row.
// A NaN logit gives a NaN loss and gradient for its row.
#include "cpu/uld.h"

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
using cpu_cache::narrow;
using cpu_cache::ninf;
using cpu_cache::OnlineLse;
using cpu_cache::pick;
using cpu_cache::run_blocks;
using cpu_cache::widen;

template <typename Acc>
struct Cand {
  Acc s;
  int64_t j;
};

template <typename Acc>
FKC_INLINE bool before(const Cand<Acc>& a, const Cand<Acc>& b) {  // larger first, then smaller column
  return a.s > b.s || (a.s == b.s && a.j < b.j);
}

template <typename In, typename Acc>
FKC_INLINE void uld_rows(const ULDProblem& P, int64_t r0, int64_t r1) {
  const int64_t v = P.v, K = P.k;
  const Acc inv_t = Acc(1) / Acc(P.temperature);
  const double inv_div = P.divisor ? 1.0 / double(*static_cast<const Acc*>(P.divisor)) : 1.0;
  const Acc nan = std::numeric_limits<Acc>::quiet_NaN();
  const uint8_t* cols = P.cols;
  alignas(64) Acc sb[kBlock], mb[kBlock], g[kBlock];
  std::vector<Cand<Acc>> cand;
  cand.reserve(size_t(2 * K + 1));
  std::vector<double> head_p(static_cast<size_t>(K));
  std::vector<double> head_g(static_cast<size_t>(K));

  for (int64_t r = r0; r < r1; ++r) {
    const In* z = static_cast<const In*>(P.z) + r * P.stride_z;
    In* gr = static_cast<In*>(P.grad) + r * P.stride_g;
    const Acc* hb = static_cast<const Acc*>(P.head) + r * K;
    const double t_tail = double(static_cast<const Acc*>(P.tail)[r]);

    // Pass 1: log-sum-exp of s (and over A), top-k of s over A.
    OnlineLse<Acc> all, allowed;
    int nan_flag = 0;
    int64_t n_allowed = 0;
    Acc thr = ninf<Acc>();
    cand.clear();
    for (int64_t j0 = 0; j0 < v; j0 += kBlock) {
      const int n = int(std::min<int64_t>(kBlock, v - j0));
#pragma omp simd
      for (int i = 0; i < n; ++i) sb[i] = widen(z[j0 + i]) * inv_t;
      all.absorb(sb, n, block_max(sb, n, nan_flag));
      const Acc* src = sb;
      if (cols != nullptr) {
        int cnt = 0;
        for (int i = 0; i < n; ++i) {
          const bool a = cols[j0 + i] != 0;
          mb[i] = a ? sb[i] : ninf<Acc>();
          cnt += int(a);
        }
        n_allowed += cnt;
        int dummy = 0;
        allowed.absorb(mb, n, block_max(mb, n, dummy));
        src = mb;
      } else {
        n_allowed += n;
      }
      if (K == 0) continue;
      for (int i = 0; i < n; ++i) {
        if (src[i] > thr) {
          cand.push_back({src[i], j0 + i});
          if (int64_t(cand.size()) >= 2 * K) {
            std::nth_element(cand.begin(), cand.begin() + (K - 1), cand.end(), before<Acc>);
            cand.resize(size_t(K));
            thr = cand[size_t(K - 1)].s;  // the k-th value: later ties lose to the smaller column kept
          }
        }
      }
    }
    // Columns of A whose s is −inf never enter the candidates; they have p = 0 and rank last.
    if (int64_t(cand.size()) > K) {
      std::nth_element(cand.begin(), cand.begin() + (K - 1), cand.end(), before<Acc>);
      cand.resize(size_t(K));
    }
    std::sort(cand.begin(), cand.end(), before<Acc>);
    if (nan_flag) {
      *(static_cast<Acc*>(P.loss) + r) = nan;
      for (int64_t j = 0; j < v; ++j) narrow(gr + j, nan);
      continue;
    }
    const Acc lse = all.value();
    const int64_t h = int64_t(cand.size());  // student head entries with p > 0 (<= min(K, |A|))
    double loss = 0.0, head_sum = 0.0, S = 0.0;
    for (int64_t i = 0; i < K; ++i) {
      const double b = double(hb[i]);
      const double a = i < h ? double(std::exp(cand[size_t(i)].s - lse)) : 0.0;
      const double d = a - b;
      const double sg = d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0);
      loss += std::fabs(d);
      if (i < h) {
        head_p[size_t(i)] = a;
        head_g[size_t(i)] = sg;
        head_sum += a;
        S += a * sg;
      }
    }
    double s_tail = 0.0;
    if (h == K && n_allowed > K) {  // otherwise every column of A with mass is in the head
      const double mass = cols != nullptr ? double(std::exp(allowed.value() - lse)) : 1.0;
      s_tail = std::max(0.0, mass - head_sum);
    }
    const double dt = s_tail - t_tail;
    const double g_tail = dt > 0 ? 1.0 : (dt < 0 ? -1.0 : 0.0);
    loss += std::fabs(dt);
    S += g_tail * s_tail;
    *(static_cast<Acc*>(P.loss) + r) = Acc(P.scale * loss * inv_div);

    // Pass 2: the gradient, coef · p_j · (c_j − S); head columns are rewritten afterwards.
    const Acc coef = Acc(P.scale * inv_div) * inv_t;
    const Acc c_in = coef * Acc(g_tail - S), c_out = coef * Acc(-S);
    for (int64_t j0 = 0; j0 < v; j0 += kBlock) {
      const int n = int(std::min<int64_t>(kBlock, v - j0));
#pragma omp simd
      for (int i = 0; i < n; ++i) sb[i] = widen(z[j0 + i]) * inv_t;
      exp_block(sb, n, lse, g);  // p_j
      if (cols == nullptr) {
#pragma omp simd
        for (int i = 0; i < n; ++i) g[i] *= c_in;
      } else {
        for (int i = 0; i < n; ++i) g[i] *= cols[j0 + i] ? c_in : c_out;
      }
#pragma omp simd
      for (int i = 0; i < n; ++i) narrow(gr + j0 + i, g[i]);
    }
    for (int64_t i = 0; i < h; ++i)
      narrow(gr + cand[size_t(i)].j, Acc(double(coef) * head_p[size_t(i)] * (head_g[size_t(i)] - S)));
  }
}

FKC_CLONES void uld_f32(const ULDProblem& P, int64_t a, int64_t b) { uld_rows<float, float>(P, a, b); }
FKC_CLONES void uld_bf16(const ULDProblem& P, int64_t a, int64_t b) { uld_rows<half_bf16, float>(P, a, b); }
FKC_CLONES void uld_f16(const ULDProblem& P, int64_t a, int64_t b) { uld_rows<_Float16, float>(P, a, b); }
void uld_f64(const ULDProblem& P, int64_t a, int64_t b) { uld_rows<double, double>(P, a, b); }

}  // namespace

void uld_cpu(const ULDProblem& P) {
  run_blocks<ULDProblem>(P, pick<ULDProblem>(P.dtype, uld_f32, uld_f64, uld_bf16, uld_f16));
}

}  // namespace fastkd
