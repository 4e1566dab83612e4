// Row math shared by the CPU and CUDA kd kernels, as inline host/device functions.
//
// The kernel contract has two phases: `stats(slice)` reduces a vocabulary slice of one row to a
// RowStats, and `finish(slice, merged stats)` writes that slice's gradient and the row's loss.
// Partial stats of two slices merge exactly (max, then rescale the sums), so a single device runs
// both phases in one launch, and the vocab-parallel loss runs `stats` per shard, merges once, and
// runs `finish` locally.
//
// Conventions: s_z = z/τ, s_t = t/τ (after the optional softcap); every running sum is stored
// relative to its running maximum, so exp() only ever sees arguments <= 0. The KL accumulators hold
// log-ratios of the max-shifted logits, (s_t − m_t) − (s_z − m_z): the KL is then a difference of
// O(log V) terms instead of log-normalisers of size |logits|/τ, so its rounding does not grow with
// the logits' magnitude (peaked rows) and is exactly 0 for identical rows.
//
// The settings (KDArgs) and the problem description of a call are in common/problems.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/problems.h"

#if defined(__CUDACC__)
#define FASTKD_HD __host__ __device__ __forceinline__
#define FASTKD_HD_ELEM __host__ __device__ __forceinline__
#else
#define FASTKD_HD inline
// element formulas run on the CPU kernel's vector packs inside AVX2 clones: always inlined there
#define FASTKD_HD_ELEM inline __attribute__((always_inline))
#endif

namespace fastkd {

// Partial statistics of one row over a vocabulary slice. Laid out as the first kStatsWidth − 1
// values of a stats row, so a (N, kStatsWidth) tensor can be all-gathered and merged (merge_stats).
template <typename T>
struct RowStats {
  T m_z, d_z;  // max of s_z, Σ exp(s_z − m_z)
  T m_t, d_t;  // max of s_t, Σ exp(s_t − m_t)
  T a_t;       // Σ exp(s_t − m_t)·((s_t − m_t) − (s_z − m_z)), entries with p > 0   → KL(p‖q)
  T a_z;       // Σ exp(s_z − m_z)·((s_z − m_z) − (s_t − m_t)), entries with q > 0   → KL(q‖p)
  T m_1, d_1;  // max of z, Σ exp(z − m_1): the hard term's τ = 1 normaliser
  T sum_z;     // Σ z (label smoothing)
  T z_y;       // z at the target if the target lies in this slice, else 0
};
static_assert(sizeof(RowStats<float>) == sizeof(float) * (kStatsWidth - 1) &&
                  sizeof(RowStats<double>) == sizeof(double) * (kStatsWidth - 1),
              "a stats row is the RowStats fields followed by the NaN flag");

template <typename T>
FASTKD_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// exp(m_old − m_new) for m_new >= m_old, with exp(−inf − −inf) := 1 (both sums are still empty).
template <typename T>
FASTKD_HD T rescale(T m_old, T m_new) {
  return (m_old == m_new) ? T(1) : exp(m_old - m_new);
}

// Move the (d, a) sums of one side from maxima (mz0, mt0) to (mz, mt): the weights rescale by
// exp(m0 − m), and every log-ratio term shifts by −(mt − mt0) + (mz − mz0) (for a_t; the opposite
// for a_z). An empty side (d == 0, maxima −inf) stays empty.
template <typename T>
FASTKD_HD void shift_kl_sums(T& d_z, T& a_z, T& d_t, T& a_t, T mz0, T mt0, T mz, T mt) {
  const T dmz = (d_z > T(0) && d_t > T(0)) ? mz - mz0 : T(0);
  const T dmt = (d_z > T(0) && d_t > T(0)) ? mt - mt0 : T(0);
  const T fz = d_z > T(0) ? rescale(mz0, mz) : T(0);
  const T ft = d_t > T(0) ? rescale(mt0, mt) : T(0);
  a_t = ft * (a_t - d_t * (dmt - dmz));
  a_z = fz * (a_z - d_z * (dmz - dmt));
  d_t *= ft;
  d_z *= fz;
}

// Merge b into a: max, then rescale and shift the sums that are relative to the maxima.
template <typename T>
FASTKD_HD void merge_stats(RowStats<T>& a, const RowStats<T>& b) {
  const T mz = a.m_z > b.m_z ? a.m_z : b.m_z;
  const T mt = a.m_t > b.m_t ? a.m_t : b.m_t;
  RowStats<T> c = b;
  shift_kl_sums(a.d_z, a.a_z, a.d_t, a.a_t, a.m_z, a.m_t, mz, mt);
  shift_kl_sums(c.d_z, c.a_z, c.d_t, c.a_t, c.m_z, c.m_t, mz, mt);
  a.d_z += c.d_z;
  a.a_z += c.a_z;
  a.d_t += c.d_t;
  a.a_t += c.a_t;
  a.m_z = mz;
  a.m_t = mt;
  T m1 = a.m_1 > b.m_1 ? a.m_1 : b.m_1;
  a.d_1 = a.d_1 * rescale(a.m_1, m1) + b.d_1 * rescale(b.m_1, m1);
  a.m_1 = m1;
  a.sum_z += b.sum_z;
  a.z_y += b.z_y;
}

// Row-level results derived from merged stats.
// log q_j = (s_z,j − m_z) − log_dz, in that order: subtracting a rounded lse_z from s_z would
// cost ulp(|s_z|) of absolute accuracy in every probability.
template <typename T>
struct RowFinal {
  T lse_z, lse_t, lse_1;        // log-normalisers of s_z, s_t and (τ = 1) z
  T m_z, m_t, m_1;              // the maxima
  T log_dz, log_dt, log_d1;     // log of the max-relative sums
  T kl_pq, kl_qp;               // KL(p‖q), KL(q‖p)
  T ce;                         // label-smoothed cross-entropy (0 without target)
};

template <typename T>
FASTKD_HD RowFinal<T> finalize(const RowStats<T>& s, const KDArgs& a, int64_t vocab, bool tau_is_one) {
  RowFinal<T> f;
  f.m_z = s.m_z;
  f.m_t = s.m_t;
  f.m_1 = tau_is_one ? s.m_z : s.m_1;
  f.log_dz = log(s.d_z);
  f.log_dt = log(s.d_t);
  f.log_d1 = tau_is_one ? f.log_dz : log(s.d_1);
  f.lse_z = f.m_z + f.log_dz;
  f.lse_t = f.m_t + f.log_dt;
  f.lse_1 = f.m_1 + f.log_d1;
  f.kl_pq = s.a_t / s.d_t - f.log_dt + f.log_dz;
  f.kl_qp = s.a_z / s.d_z - f.log_dz + f.log_dt;
  // KL is >= 0; rounding can leave a tiny negative for (near-)identical rows.
  if (f.kl_pq < T(0)) f.kl_pq = T(0);
  if (f.kl_qp < T(0)) f.kl_qp = T(0);
  f.ce = T(0);
  if (a.has_target) {
    T eps = T(a.label_smoothing);
    f.ce = (T(1) - eps) * ((f.m_1 - s.z_y) + f.log_d1);
    if (eps > T(0)) f.ce += eps * ((f.m_1 - s.sum_z / T(vocab)) + f.log_d1);
  }
  return f;
}

// ------------------------------------------------------------------------------------------------
// Divergences with a sums pass (JSD, TVD, skew KL). Their summands depend on the row's final
// normalisers (log m needs log p and log q; the sign of p − q needs both probabilities), so no
// statistic of pass 1 gives them: each kernel runs one more pass over the row for the two sums
// below, then the gradient pass, which needs them too. The vocab-parallel loss sums them over the
// shards in one all-reduce of (n, 2). With p teacher, q student, w the mixture weight (JSD's β,
// skew KL's α) and m the mixture (w·p + (1−w)·q; w·q + (1−w)·p for skew reverse KL):
//
//   divergence   s0               s1               D
//   JSD          Σ q·log(q/m)     Σ p·log(p/m)     w·s1 + (1−w)·s0
//   TVD          Σ |p − q|        Σ q·sgn(p − q)   s0 / 2
//   skew fwd     Σ p·log(p/m)     Σ p·q/m          s0
//   skew rev     Σ q·log(q/m)     Σ q·p/m          s0
//
// Gradients w.r.t. the scaled logits s = x/τ (g student, h teacher), from ∂D/∂q and the softmax
// Jacobian, with r = (own side)/m:
//   JSD       g = (1−w)·q·(log(q/m) − s0)           h = w·p·(log(p/m) − s1)
//   TVD       g = −q·(sgn − s1)/2                    h = p·(sgn − (s0 + s1))/2     (Σ p·sgn = s0 + s1)
//   skew fwd  g = (1−w)·q·(s1 − r)                  h = p·(log(p/m) − s0 + 1 − w·r − (1−w)·s1)
//   skew rev  g = q·(log(q/m) − s0 + 1 − w·r − (1−w)·s1)   h = (1−w)·p·(s1 − r)
// (the skew rows use w·Σ own²/m = 1 − (1−w)·s1). TVD's subgradient at p_i = q_i takes sgn(0) = 0,
// so identical rows get a zero gradient.
// ------------------------------------------------------------------------------------------------
FASTKD_HD bool has_sums_pass(int div) {
  return div == kJSD || div == kTVD || div == kSkewForwardKL || div == kSkewReverseKL;
}

// The side the mixture weight w multiplies in m: the student's for skew reverse KL, else the teacher's.
FASTKD_HD bool mix_own_is_student(int div) { return div == kSkewReverseKL; }

// D of a divergence with a sums pass, from the row's sums (clamped at 0 against rounding).
template <typename T>
FASTKD_HD T sums_divergence(int div, T w, T s0, T s1) {
  T d = div == kJSD ? w * s1 + (T(1) - w) * s0 : div == kTVD ? T(0.5) * s0 : s0;
  return d > T(0) ? d : T(0);
}

// One element's share of (s0, s1). V: a float or a vector pack (then S is its scalar type); lm is
// log m (unused by TVD); zero is V's zero.
template <typename V, typename S>
FASTKD_HD_ELEM void sums_terms(int div, V q, V p, V lq, V lp, V lm, S w, V zero, V& s0, V& s1) {
  if (div == kTVD) {
    const V d = p - q, one = zero + S(1);
    const V sg = d > S(0) ? one : (d < S(0) ? zero - one : zero);
    s0 += d > S(0) ? d : zero - d;
    s1 += q * sg;
    return;
  }
  const bool own_q = mix_own_is_student(div);
  const V a = own_q ? q : p, b = own_q ? p : q, la = own_q ? lq : lp;
  if (div == kJSD) {
    s0 += q > S(0) ? q * (lq - lm) : zero;
    s1 += p > S(0) ? p * (lp - lm) : zero;
    return;
  }
  // m > 0 rather than a > 0: w·a can underflow to 0 for a tiny a > 0, and a·b/0 would be NaN
  const V m = w * a + (S(1) - w) * b;
  s0 += a > S(0) ? a * (la - lm) : zero;
  s1 += m > S(0) ? a * b / m : zero;
}

// One element's gradient w.r.t. s_z (g) and s_t (h) of a divergence with a sums pass, before the
// soft weight and 1/τ. want_t false: h is left as zero.
template <typename V, typename S>
FASTKD_HD_ELEM void sums_grad(int div, V q, V p, V lq, V lp, V lm, S w, S s0, S s1, V zero, bool want_t,
                              V& g, V& h) {
  h = zero;
  if (div == kTVD) {
    const V d = p - q, one = zero + S(1);
    const V sg = d > S(0) ? one : (d < S(0) ? zero - one : zero);
    g = S(-0.5) * q * (sg - s1);
    if (want_t) h = S(0.5) * p * (sg - (s0 + s1));
    return;
  }
  if (div == kJSD) {
    g = q > S(0) ? (S(1) - w) * q * ((lq - lm) - s0) : zero;
    if (want_t) h = p > S(0) ? w * p * ((lp - lm) - s1) : zero;
    return;
  }
  // skew KL: a the side w multiplies in m (the divergence's first argument), b the other one
  const bool own_q = mix_own_is_student(div);
  const V a = own_q ? q : p, b = own_q ? p : q;
  const V m = w * a + (S(1) - w) * b;
  const V r = m > S(0) ? a / m : zero;  // (a tiny a > 0 can give m = 0: see sums_terms)
  const S c = S(1) - (S(1) - w) * s1 - s0;  // the a side's row constant
  if (own_q) {
    g = a > S(0) ? a * ((lq - lm) + c - w * r) : zero;
    if (want_t) h = (S(1) - w) * b * (s1 - r);
  } else {
    g = (S(1) - w) * b * (s1 - r);
    if (want_t) h = a > S(0) ? a * ((lp - lm) + c - w * r) : zero;
  }
}

}  // namespace fastkd
