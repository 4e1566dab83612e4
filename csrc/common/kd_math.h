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
#else
#define FASTKD_HD inline
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

}  // namespace fastkd
