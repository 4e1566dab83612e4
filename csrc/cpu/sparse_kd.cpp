// CPU sparse KD loss against a captured teacher (ids and probabilities of its stored entries, −1 =
// padding), with the label-smoothed hard cross-entropy and the student gradient.
//
// Per row, one sweep over the student gives the complement's log-sum-exp (stored ids masked to
// −inf), the stored ids' scaled logits, and the τ = 1 normaliser for the hard term; a second sweep
// writes the gradient. 1 − Q_I is exp(lse_complement − lse), never 1 − Σ q_I. The tail (mass
// outside the stored ids) is a bucket, renormalised away, or the sampled estimate (SparseTail).
//
// Never materialised: softmax(z/τ), any sort of a full row, any float32 upcast of a bf16/fp16 row.
// Preconditions: unit column stride, the divisor a host scalar, ids < v (a row with an id out of
// range or a repeated id gets a NaN loss and gradient, never an out-of-bounds read). Rows are split
// in static contiguous blocks over OpenMP threads; the float32, bf16 and fp16 row functions are cloned
// for x86-64-v3 and baseline x86-64 (cpu/cache_common.h).
#include "cpu/sparse_kd.h"

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

template <typename In, typename Acc>
FKC_INLINE void sparse_rows(const SparseKDProblem& P, int64_t r0, int64_t r1) {
  const int64_t v = P.v, K = P.k;
  const Acc inv_t = Acc(1) / Acc(P.temperature);
  const bool tau_one = P.temperature == 1.0f;
  const bool use_hard = P.target != nullptr && P.hard_weight != 0.0f;
  const bool need_m1 = use_hard && !tau_one;
  const Acc eps = Acc(P.label_smoothing);
  const bool need_sum = use_hard && eps > Acc(0);
  const Acc inv_div = P.divisor ? Acc(1) / *static_cast<const Acc*>(P.divisor) : Acc(1);
  const Acc nan = std::numeric_limits<Acc>::quiet_NaN();
  alignas(64) Acc zb[kBlock], sb[kBlock], g[kBlock];
  std::vector<std::pair<int64_t, Acc>> ent(static_cast<size_t>(K));
  std::vector<Acc> s_in(static_cast<size_t>(K));

  for (int64_t r = r0; r < r1; ++r) {
    const In* z = static_cast<const In*>(P.z) + r * P.stride_z;
    In* gr = static_cast<In*>(P.grad) + r * P.stride_g;
    Acc* loss = static_cast<Acc*>(P.loss) + r;
    int64_t y = -1;
    if (P.target != nullptr) {
      y = P.target[r];
      if (y == P.ignore_index) {  // contributes nothing, not even NaN
        *loss = Acc(0);
        std::memset(static_cast<void*>(gr), 0, sizeof(In) * size_t(v));
        continue;
      }
    }
    bool bad = P.target != nullptr && (y < 0 || y >= v);
    // Stored entries of this row, sorted by id so one forward walk meets them in vocabulary order.
    const int64_t* rid = P.ids + r * K;
    const Acc* rw = static_cast<const Acc*>(P.w) + r * K;
    int64_t m = 0;
    double p_sum = 0.0;
    for (int64_t i = 0; i < K; ++i) {
      if (rid[i] < 0) continue;
      if (rid[i] >= v) bad = true;
      ent[size_t(m++)] = {rid[i], rw[i]};
      p_sum += double(rw[i]);
    }
    std::sort(ent.begin(), ent.begin() + m,
              [](const std::pair<int64_t, Acc>& a, const std::pair<int64_t, Acc>& b) { return a.first < b.first; });
    for (int64_t i = 1; i < m; ++i)
      if (ent[size_t(i)].first == ent[size_t(i - 1)].first) bad = true;
    if (bad) {
      *loss = nan;
      for (int64_t j = 0; j < v; ++j) narrow(gr + j, nan);
      continue;
    }

    // Pass 1: complement lse of s = z/τ (stored ids masked), s at the stored ids, τ = 1 stats.
    OnlineLse<Acc> comp, one;
    Acc sum_z = 0;
    int nan_flag = 0;
    int64_t e_pos = 0;
    for (int64_t j0 = 0; j0 < v; j0 += kBlock) {
      const int n = int(std::min<int64_t>(kBlock, v - j0));
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        zb[i] = widen(z[j0 + i]);
        sb[i] = zb[i] * inv_t;
      }
      for (; e_pos < m && ent[size_t(e_pos)].first < j0 + n; ++e_pos) {
        const int i = int(ent[size_t(e_pos)].first - j0);
        s_in[size_t(e_pos)] = sb[i];
        if (sb[i] != sb[i]) nan_flag = 1;
        sb[i] = ninf<Acc>();
      }
      comp.absorb(sb, n, block_max(sb, n, nan_flag));
      if (need_m1) one.absorb(zb, n, block_max(zb, n, nan_flag));
      if (need_sum) {
        Acc s = 0;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < n; ++i) s += zb[i];
        sum_z += s;
      }
    }
    Acc m_in = ninf<Acc>();
    for (int64_t i = 0; i < m; ++i) m_in = std::max(m_in, s_in[size_t(i)]);
    Acc d_in = 0;
    if (m_in > ninf<Acc>())
      for (int64_t i = 0; i < m; ++i) d_in += std::exp(s_in[size_t(i)] - m_in);
    const Acc lse_in = m_in + std::log(d_in);
    const Acc lse_c = comp.value();
    const Acc hi = std::max(lse_in, lse_c), lo = std::min(lse_in, lse_c);
    const Acc lse_z = hi == ninf<Acc>() ? hi : hi + std::log1p(std::exp(lo - hi));
    const bool has_comp = m < v;

    // Teacher weights and the tail factor c_tail (gradient of complement entries is c_tail·q_j/τ).
    Acc wscale = Acc(1), c_tail = Acc(1), soft = Acc(0);
    if (P.tail == kTailRenorm) wscale = Acc(1) / Acc(p_sum);
    for (int64_t i = 0; i < m; ++i) {
      const Acc w = ent[size_t(i)].second * wscale;
      if (w > Acc(0)) soft += w * (std::log(w) - (s_in[size_t(i)] - lse_z));
    }
    if (P.tail == kTailBucket && has_comp) {
      const Acc tail_p = Acc(std::max(0.0, 1.0 - p_sum));
      const Acc log_tail_q = lse_c - lse_z;
      if (tail_p > Acc(0)) {
        soft += tail_p * (std::log(tail_p) - log_tail_q);
        c_tail = Acc(1) - std::exp(std::log(tail_p) - log_tail_q);
      }
    }
    Acc ce = 0, lse_1 = lse_z;
    if (use_hard) {
      lse_1 = tau_one ? lse_z : one.value();
      const Acc z_y = widen(z[y]);
      ce = (Acc(1) - eps) * (lse_1 - z_y);
      if (eps > Acc(0)) ce += eps * (lse_1 - sum_z / Acc(v));
    }
    Acc row = Acc(P.soft_scale) * soft + (use_hard ? Acc(P.hard_weight) * ce : Acc(0));
    if (nan_flag) row = nan;
    *loss = row * inv_div;

    // Pass 2: the gradient.
    const Acc gs = Acc(P.soft_scale) * inv_t * inv_div;
    const Acc gc = gs * c_tail;
    const Acc gh = use_hard ? Acc(P.hard_weight) * inv_div : Acc(0);
    const Acc eps_v = eps / Acc(v);
    e_pos = 0;
    for (int64_t j0 = 0; j0 < v; j0 += kBlock) {
      const int n = int(std::min<int64_t>(kBlock, v - j0));
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        zb[i] = widen(z[j0 + i]);
        sb[i] = zb[i] * inv_t;
      }
      exp_block(sb, n, lse_z, g);  // q_j
#pragma omp simd
      for (int i = 0; i < n; ++i) g[i] *= gc;
      if (use_hard) {
        exp_block(zb, n, lse_1, sb);  // softmax(z)_j (lse_1 = lse_z when τ = 1)
#pragma omp simd
        for (int i = 0; i < n; ++i) g[i] += gh * (sb[i] - eps_v);
        if (y >= j0 && y < j0 + n) g[y - j0] -= gh * (Acc(1) - eps);
      }
      for (; e_pos < m && ent[size_t(e_pos)].first < j0 + n; ++e_pos) {
        const int i = int(ent[size_t(e_pos)].first - j0);
        const Acc q = std::exp(s_in[size_t(e_pos)] - lse_z);
        // Replace the complement formula by (q − w)/τ for a stored id.
        g[i] += gs * (q - ent[size_t(e_pos)].second * wscale) - gc * q;
      }
#pragma omp simd
      for (int i = 0; i < n; ++i) narrow(gr + j0 + i, g[i]);
    }
  }
}

FKC_CLONES void sparse_f32(const SparseKDProblem& P, int64_t a, int64_t b) { sparse_rows<float, float>(P, a, b); }
FKC_CLONES void sparse_bf16(const SparseKDProblem& P, int64_t a, int64_t b) { sparse_rows<half_bf16, float>(P, a, b); }
FKC_CLONES void sparse_f16(const SparseKDProblem& P, int64_t a, int64_t b) { sparse_rows<_Float16, float>(P, a, b); }
void sparse_f64(const SparseKDProblem& P, int64_t a, int64_t b) { sparse_rows<double, double>(P, a, b); }

}  // namespace

void sparse_kd_cpu(const SparseKDProblem& P) {
  run_blocks<SparseKDProblem>(P, pick<SparseKDProblem>(P.dtype, sparse_f32, sparse_f64, sparse_bf16, sparse_f16));
}

}  // namespace fastkd
