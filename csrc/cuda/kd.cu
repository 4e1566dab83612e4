// Fused CUDA knowledge-distillation loss: temperature softmaxes of student and teacher, KL(p‖q),
// KL(q‖p), JSD(β), total variation or skew KL(α), the label-smoothed hard cross-entropy, and the
// gradient w.r.t. both logits.
//
// Never materialised: p, q, m, any log-probability, the softcapped logits, any float32 copy of a
// bf16/fp16 row. The only N×V memory written is the gradient itself, in the input dtype, rounded
// once from float32.
//
// Structure: one thread block per row. Pass 1 reads the row once with 16-byte loads and
// reduces it to a RowStats (online max + rescaled sums, per thread, then a fixed shuffle/shared
// tree: bitwise deterministic, no atomics). JSD, TVD and skew KL add a pass for their two sums
// (common/kd_math.h: they need the final normalisers), so they read the row three times, the KLs
// twice. The last pass re-reads the
// row and writes the gradient; it walks the row backwards, so the tail that pass 1 read last is
// still in L2 when it is needed again. The same block body runs the four modes of KDProblem
// (common/problems.h), so the vocab-parallel loss reuses it shard by shard (stats, [divergence
// sums], finish).
//
// Preconditions: unit column stride; any row stride (16-byte loads are used when every row pointer
// shares the same misalignment, scalar loads otherwise); 64-bit offsets everywhere; float32, bf16
// or fp16 inputs, float32 accumulation; the divisor is a device float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <stdexcept>

#include "common/kd_math.h"
#include "cuda/common.cuh"
#include "cuda/kd.h"

namespace fastkd {
namespace {

using cuda_common::check;
using cuda_common::DeviceScope;
using cuda_common::from_f;
using cuda_common::kFull;
using cuda_common::to_f;
using cuda_common::VecOf;

constexpr int kAllStats = kNumDivergences;  // "DIV" of the stats mode: accumulate a_z and a_t both
constexpr int kMaxThreads = 512;  // two blocks per SM overlap one row's reductions with another's loads

// exp/log via the SFU (ex2/lg2.approx: ~2 ulp near the arguments that matter), flushing subnormals
// to zero: every exp argument is x − max <= 0, and a result below FLT_MIN only feeds sums it cannot
// change (the CPU kernel flushes below e^−87 too). The .ftz forms save the three subnormal fix-up
// instructions __expf/__logf carry around each SFU op when the file is not compiled with -ftz —
// about a quarter of the statistics loop. (The host emulation of the tests has no PTX.)
__device__ __forceinline__ float fexp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
#else
  return __expf(x);
#endif
}
__device__ __forceinline__ float flog(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y * 0.6931471805599453f;
#else
  return __logf(x);
#endif
}


// Per-call constants derived once on the host (inv_div comes from the device divisor).
struct Consts {
  float inv_t;              // 1/τ
  float cap, inv_cap, inv_cap2;
  float soft;               // soft_scale / τ: the soft term's gradient factor
  float soft_scale;         // soft_weight · (τ² if t2_scale)
  float hard, eps, eps_over_v;
  float beta, beta1, log_beta, log_beta1;
  bool has_cap, tau_one, use_hard, need_m1, need_sum, teacher_grad;
};

// log q_j = (s_z,j − m_z) − log_dz, in that order: subtracting a rounded lse_z from s_z would cost
// ulp(|s_z|) of absolute accuracy in every probability (kd_math.h, RowFinal).
struct Final {
  float m_z, m_t, m_1;
  float log_dz, log_dt, log_d1;
  float d;       // KL(p‖q) (forward) or KL(q‖p) (reverse): the constant of the gradient formulas
  float s0, s1;  // the sums of a divergence with a sums pass (kd_math.h)
};

__device__ __forceinline__ float softcap(float x, const Consts& c) {
  return c.has_cap ? c.cap * tanhf(x * c.inv_cap) : x;
}

__device__ __forceinline__ RowStats<float> empty_stats() {
  RowStats<float> s;
  // A finite "−inf": exp(m_old − m_new) stays exp(0) = 1 while a row is still all −inf, and an
  // entry of −inf gives exp(−inf) = 0, so the hot loop needs no special case for masked columns.
  s.m_z = s.m_t = s.m_1 = -FLT_MAX;
  s.d_z = s.d_t = s.d_1 = s.a_z = s.a_t = s.sum_z = s.z_y = 0.f;
  return s;
}

// One 16-byte load. Pass 1 keeps the lines in L2 for the last pass; the last pass marks them
// evict-first. The loops start every load of an iteration (two vectors of z and t: 64 bytes per
// thread) before converting any of them, so that the loads are in flight together.
template <bool kStreaming>
__device__ __forceinline__ uint4 load16(const void* p) {
  const uint4* src = reinterpret_cast<const uint4*>(p);
  return kStreaming ? __ldcs(src) : __ldg(src);
}

// The K = VecOf<T>::N elements of a 16-byte load, to float and softcapped.
template <typename T, int K>
__device__ __forceinline__ void convert(const uint4& raw, float (&out)[K], const Consts& c) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < K; ++i) out[i] = softcap(to_f(e[i]), c);
}

// Load K consecutive elements (16 bytes when K = VecOf<T>::N) and softcap them.
template <typename T, int K, bool kStreaming>
__device__ __forceinline__ void load(const T* p, float (&out)[K], const Consts& c) {
  if constexpr (K == VecOf<T>::N) {
    convert<T, K>(load16<kStreaming>(p), out, c);
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i) out[i] = softcap(to_f(p[i]), c);
  }
}

template <typename T, int K>
__device__ __forceinline__ void store(T* p, const float (&v)[K]) {
  if constexpr (K == VecOf<T>::N) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < K; ++i) e[i] = from_f<T>(v[i]);
    __stcs(reinterpret_cast<uint4*>(p), raw);  // the gradient is not read again in this kernel
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i) p[i] = from_f<T>(v[i]);
  }
}

// Pass 1 on K elements: one max per chunk, one rescale per chunk, K exps per distribution.
// The KL sums hold max-shifted log-ratios (kd_math.h): a_t = Σ e_t·((s_t − m_t) − (s_z − m_z)), so
// a new maximum rescales them and shifts each term by the change of the two maxima
// (shift_kl_sums). The finite initial maxima keep every shift finite; a side without mass has
// d = 0, so its shift multiplies 0.
template <int DIV, int K>
__device__ __forceinline__ void stats_chunk(RowStats<float>& s, const float (&zr)[K], const float (&tr)[K],
                                            const Consts& c) {
  constexpr bool kAZ = DIV == kReverseKL || DIV == kAllStats;
  constexpr bool kAT = DIV == kForwardKL || DIV == kAllStats;
  float sz[K], st[K];
  float mz = s.m_z, mt = s.m_t;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    sz[i] = zr[i] * c.inv_t;
    st[i] = tr[i] * c.inv_t;
    mz = fmaxf(mz, sz[i]);  // fmaxf drops NaN here; the NaN still reaches d_z through exp below
    mt = fmaxf(mt, st[i]);
  }
  const float fz = fexp(s.m_z - mz), ft = fexp(s.m_t - mt);
  const float shift = (mt - s.m_t) - (mz - s.m_z);  // change of (s_t − m_t) − (s_z − m_z)
  if (kAZ) s.a_z = fz * (s.a_z + s.d_z * shift);
  if (kAT) s.a_t = ft * (s.a_t - s.d_t * shift);
  s.d_z *= fz;
  s.d_t *= ft;
  s.m_z = mz;
  s.m_t = mt;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const float uz = sz[i] - mz, ut = st[i] - mt;  // both <= 0
    const float ez = fexp(uz), et = fexp(ut);
    s.d_z += ez;
    s.d_t += et;
    // 0·log 0 = 0: entries without mass are skipped (−inf − −inf would be NaN)
    if (kAZ) s.a_z += ez > 0.f ? ez * (uz - ut) : 0.f;
    if (kAT) s.a_t += et > 0.f ? et * (ut - uz) : 0.f;
  }
  if (c.need_m1) {
    float m1 = s.m_1;
#pragma unroll
    for (int i = 0; i < K; ++i) m1 = fmaxf(m1, zr[i]);
    s.d_1 *= fexp(s.m_1 - m1);
    s.m_1 = m1;
#pragma unroll
    for (int i = 0; i < K; ++i) s.d_1 += fexp(zr[i] - m1);
  }
  if (c.need_sum) {
#pragma unroll
    for (int i = 0; i < K; ++i) s.sum_z += zr[i];
  }
}

// log m = log(w·own + (1−w)·other) (own: p, or q for skew reverse KL), bounded below by either
// term's own log so that an underflowed m never turns q·(log q − log m) into q·inf.
template <int DIV>
__device__ __forceinline__ float mix_log(float lq, float lp, float q, float p, const Consts& c) {
  if (mix_own_is_student(DIV))
    return fmaxf(flog(c.beta * q + c.beta1 * p), fmaxf(lp + c.log_beta1, lq + c.log_beta));
  return fmaxf(flog(c.beta * p + c.beta1 * q), fmaxf(lq + c.log_beta1, lp + c.log_beta));
}

// The sums pass on K elements (kd_math.h: sums_terms).
template <int DIV, int K>
__device__ __forceinline__ void sums_chunk(float& s0, float& s1, const float (&zr)[K], const float (&tr)[K],
                                           const Consts& c, const Final& f) {
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const float lq = (zr[i] * c.inv_t - f.m_z) - f.log_dz, lp = (tr[i] * c.inv_t - f.m_t) - f.log_dt;
    const float q = fexp(lq), p = fexp(lp);
    const float lm = DIV == kTVD ? 0.f : mix_log<DIV>(lq, lp, q, p, c);
    sums_terms(DIV, q, p, lq, lp, lm, c.beta, 0.f, s0, s1);
  }
}

// Last pass on K elements starting at column j0: gradients of loss_row / divisor.
template <int DIV, int K>
__device__ __forceinline__ void grad_chunk(float (&g)[K], float (&h)[K], const float (&zr)[K],
                                           const float (&tr)[K], int64_t j0, int64_t y_local,
                                           const Consts& c, const Final& f, float inv_div) {
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const float lq = (zr[i] * c.inv_t - f.m_z) - f.log_dz, lp = (tr[i] * c.inv_t - f.m_t) - f.log_dt;
    const float q = fexp(lq), p = fexp(lp);
    float gi, hi;
    if (DIV == kForwardKL) {
      gi = c.soft * (q - p);
      hi = p > 0.f ? c.soft * p * ((lp - lq) - f.d) : 0.f;
    } else if (DIV == kReverseKL) {
      gi = q > 0.f ? c.soft * q * ((lq - lp) - f.d) : 0.f;
      hi = c.soft * (p - q);
    } else {
      const float lm = DIV == kTVD ? 0.f : mix_log<DIV>(lq, lp, q, p, c);
      sums_grad(DIV, q, p, lq, lp, lm, c.beta, f.s0, f.s1, 0.f, c.teacher_grad, gi, hi);
      gi *= c.soft;
      hi *= c.soft;
    }
    if (c.use_hard) {
      const float q1 = c.tau_one ? q : fexp((zr[i] - f.m_1) - f.log_d1);
      gi += c.hard * (q1 - c.eps_over_v);
      if (j0 + i == y_local) gi -= c.hard * (1.f - c.eps);
    }
    if (c.has_cap) {  // d(c·tanh(x/c))/dx = 1 − tanh², with tanh = capped/c
      gi *= 1.f - zr[i] * zr[i] * c.inv_cap2;
      hi *= 1.f - tr[i] * tr[i] * c.inv_cap2;
    }
    g[i] = gi * inv_div;
    h[i] = hi * inv_div;
  }
}

// ------------------------------------------------------------------------------------------------
// Block reductions: a fixed xor-shuffle tree per warp, then warp 0 over the warps' results. The
// order never depends on timing, so results are bitwise reproducible.
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ void warp_merge(RowStats<float>& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    RowStats<float> o;
    o.m_z = __shfl_xor_sync(kFull, s.m_z, off);
    o.d_z = __shfl_xor_sync(kFull, s.d_z, off);
    o.m_t = __shfl_xor_sync(kFull, s.m_t, off);
    o.d_t = __shfl_xor_sync(kFull, s.d_t, off);
    o.a_t = __shfl_xor_sync(kFull, s.a_t, off);
    o.a_z = __shfl_xor_sync(kFull, s.a_z, off);
    o.m_1 = __shfl_xor_sync(kFull, s.m_1, off);
    o.d_1 = __shfl_xor_sync(kFull, s.d_1, off);
    o.sum_z = __shfl_xor_sync(kFull, s.sum_z, off);
    o.z_y = __shfl_xor_sync(kFull, s.z_y, off);
    merge_stats(s, o);
  }
}

// Every thread gets the merged stats of the block. `buf` holds 33 entries.
__device__ RowStats<float> block_merge(RowStats<float> s, RowStats<float>* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  warp_merge(s);
  if (lane == 0) buf[warp] = s;
  __syncthreads();
  if (warp == 0) {
    RowStats<float> r = lane < nwarps ? buf[lane] : empty_stats();
    warp_merge(r);
    if (lane == 0) buf[32] = r;
  }
  __syncthreads();
  RowStats<float> out = buf[32];
  __syncthreads();  // buf is reused by the next row
  return out;
}

__device__ float2 block_sum2(float2 v, float2* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v.x += __shfl_xor_sync(kFull, v.x, off);
    v.y += __shfl_xor_sync(kFull, v.y, off);
  }
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float2 r = lane < nwarps ? buf[lane] : make_float2(0.f, 0.f);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      r.x += __shfl_xor_sync(kFull, r.x, off);
      r.y += __shfl_xor_sync(kFull, r.y, off);
    }
    if (lane == 0) buf[32] = r;
  }
  __syncthreads();
  float2 out = buf[32];
  __syncthreads();
  return out;
}

// How one row splits into an unaligned head, 16-byte vectors and a tail. When the pointers of a
// row disagree on their misalignment the whole row takes the scalar path (still coalesced).
struct RowSplit {
  int64_t head, nvec, tail_start, nscalar;
  __device__ __forceinline__ int64_t scalar_col(int64_t i) const { return i < head ? i : tail_start + (i - head); }
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(int64_t v, const void* a, const void* b, const void* c1,
                                              const void* c2) {
  constexpr int kVec = VecOf<T>::N;
  const uintptr_t mis = reinterpret_cast<uintptr_t>(a) & 15;
  bool ok = (reinterpret_cast<uintptr_t>(b) & 15) == mis && mis % sizeof(T) == 0;
  if (c1 != nullptr) ok = ok && (reinterpret_cast<uintptr_t>(c1) & 15) == mis;
  if (c2 != nullptr) ok = ok && (reinterpret_cast<uintptr_t>(c2) & 15) == mis;
  RowSplit r;
  if (ok) {
    int64_t head = int64_t((16 - mis) & 15) / int64_t(sizeof(T));
    r.head = head < v ? head : v;
    r.nvec = (v - r.head) / kVec;
  } else {
    r.head = v;
    r.nvec = 0;
  }
  r.tail_start = r.head + r.nvec * kVec;
  r.nscalar = r.head + (v - r.tail_start);
  return r;
}

template <typename T>
__device__ void fill_row(T* p, int64_t v, float value) {
  if (p == nullptr) return;
  const T x = from_f<T>(value);
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) p[j] = x;
}

template <typename T, int DIV>
__global__ void __launch_bounds__(kMaxThreads, 2) kd_rows_kernel(KDProblem P, Consts c) {
  constexpr int kVec = VecOf<T>::N;
  __shared__ RowStats<float> sbuf[33];
  __shared__ float2 fbuf[33];

  const KDArgs& a = P.args;
  const float inv_div = P.divisor != nullptr ? 1.f / *static_cast<const float*>(P.divisor) : 1.f;
  const float qnan = __int_as_float(0x7fc00000);
  const int64_t v = P.v;

  for (int64_t r = blockIdx.x; r < P.n; r += gridDim.x) {
    const T* z = static_cast<const T*>(P.z) + r * P.stride_z;
    const T* t = static_cast<const T*>(P.t) + r * P.stride_t;
    T* gz = P.grad_z != nullptr ? static_cast<T*>(P.grad_z) + r * P.stride_gz : nullptr;
    T* gt = P.grad_t != nullptr ? static_cast<T*>(P.grad_t) + r * P.stride_gt : nullptr;
    float* loss = P.loss != nullptr ? static_cast<float*>(P.loss) + r : nullptr;

    bool ignored = false, bad_target = false;
    int64_t y_local = -1;
    if (a.has_target) {
      const int64_t y = P.target[r];
      ignored = y == a.ignore_index;
      bad_target = !ignored && (y < 0 || y >= P.vocab_total);
      if (!ignored && !bad_target) y_local = y - P.col_offset;  // outside [0, v): another shard
    }
    const bool have_y = y_local >= 0 && y_local < v;

    if (P.mode != kStats && ignored) {  // contributes nothing, not even NaN
      if (threadIdx.x == 0) {
        if (loss) *loss = 0.f;
        if (P.mode == kDivSums) reinterpret_cast<float2*>(P.sums_out)[r] = make_float2(0.f, 0.f);
      }
      if (P.mode != kDivSums) {
        fill_row(gz, v, 0.f);
        fill_row(gt, v, 0.f);
      }
      continue;
    }

    const bool write_grad = P.mode == kFused || P.mode == kFinish;
    const RowSplit sp = split_row<T>(v, z, t, write_grad ? gz : nullptr,
                                     write_grad && c.teacher_grad ? gt : nullptr);

    // ---- pass 1: stats (or the merged stats of all shards) ----
    RowStats<float> s;
    bool has_nan;
    if (P.mode == kFused || P.mode == kStats) {
      s = empty_stats();
      // two vectors per iteration (the same per-thread order as one at a time: bitwise the same sums)
      int64_t k = threadIdx.x;
      for (; k + blockDim.x < sp.nvec; k += 2 * int64_t(blockDim.x)) {
        const int64_t j0 = sp.head + k * kVec, j1 = j0 + int64_t(blockDim.x) * kVec;
        const uint4 z0 = load16<false>(z + j0), t0 = load16<false>(t + j0);
        const uint4 z1 = load16<false>(z + j1), t1 = load16<false>(t + j1);
        float zr[kVec], tr[kVec];
        convert<T, kVec>(z0, zr, c);
        convert<T, kVec>(t0, tr, c);
        stats_chunk<DIV, kVec>(s, zr, tr, c);
        convert<T, kVec>(z1, zr, c);
        convert<T, kVec>(t1, tr, c);
        stats_chunk<DIV, kVec>(s, zr, tr, c);
      }
      if (k < sp.nvec) {
        float zr[kVec], tr[kVec];
        const int64_t j = sp.head + k * kVec;
        load<T, kVec, false>(z + j, zr, c);
        load<T, kVec, false>(t + j, tr, c);
        stats_chunk<DIV, kVec>(s, zr, tr, c);
      }
      for (int64_t i = threadIdx.x; i < sp.nscalar; i += blockDim.x) {
        float zr[1], tr[1];
        const int64_t j = sp.scalar_col(i);
        load<T, 1, false>(z + j, zr, c);
        load<T, 1, false>(t + j, tr, c);
        stats_chunk<DIV, 1>(s, zr, tr, c);
      }
      // z at the target is read BEFORE the block merge, by one thread (the merge adds z_y up): the
      // merge's barriers then order the read before every gradient store, which matters when the
      // gradient overwrites z in place (inplace_grad, the fused linear loss). Read after the merge,
      // a warp already in the gradient pass could overwrite z[y] before a slower warp read it.
      if (have_y && threadIdx.x == 0) s.z_y = softcap(to_f(z[y_local]), c);
      s = block_merge(s, sbuf);
      // a NaN input reaches d_z or d_t through exp(NaN) (fmaxf alone would have dropped it)
      has_nan = isnan(s.d_z) || isnan(s.d_t);
      if (P.mode == kStats) {
        if (threadIdx.x == 0) {
          float* so = static_cast<float*>(P.stats_out) + r * kStatsWidth;
          // back to the CPU convention: an empty (all −inf) slice has max −inf
          if (s.d_z == 0.f) s.m_z = __int_as_float(0xff800000);  // -inf
          if (s.d_t == 0.f) s.m_t = __int_as_float(0xff800000);  // -inf
          if (s.d_1 == 0.f) s.m_1 = __int_as_float(0xff800000);  // -inf
          so[0] = s.m_z; so[1] = s.d_z; so[2] = s.m_t; so[3] = s.d_t; so[4] = s.a_t; so[5] = s.a_z;
          so[6] = s.m_1; so[7] = s.d_1; so[8] = s.sum_z; so[9] = s.z_y;
          so[kStatsWidth - 1] = has_nan ? 1.f : 0.f;
        }
        continue;
      }
    } else {
      const float* si = static_cast<const float*>(P.stats_in) + r * kStatsWidth;
      s.m_z = si[0]; s.d_z = si[1]; s.m_t = si[2]; s.d_t = si[3]; s.a_t = si[4]; s.a_z = si[5];
      s.m_1 = si[6]; s.d_1 = si[7]; s.sum_z = si[8]; s.z_y = si[9];
      has_nan = si[kStatsWidth - 1] != 0.f;
    }
    const RowFinal<float> rf = finalize(s, a, P.vocab_total, c.tau_one);
    Final f;
    f.m_z = rf.m_z;
    f.m_t = rf.m_t;
    f.m_1 = rf.m_1;
    f.log_dz = rf.log_dz;
    f.log_dt = rf.log_dt;
    f.log_d1 = rf.log_d1;
    f.d = DIV == kReverseKL ? rf.kl_qp : rf.kl_pq;
    f.s0 = f.s1 = 0.f;

    // ---- JSD, TVD, skew KL: their sums need the final normalisers ----
    if (has_sums_pass(DIV)) {
      if (P.mode == kFinish) {
        const float2 js = reinterpret_cast<const float2*>(P.sums_in)[r];
        f.s0 = js.x;
        f.s1 = js.y;
      } else {
        float2 acc = make_float2(0.f, 0.f);
        int64_t k = threadIdx.x;
        for (; k + blockDim.x < sp.nvec; k += 2 * int64_t(blockDim.x)) {
          const int64_t j0 = sp.head + k * kVec, j1 = j0 + int64_t(blockDim.x) * kVec;
          const uint4 z0 = load16<false>(z + j0), t0 = load16<false>(t + j0);
          const uint4 z1 = load16<false>(z + j1), t1 = load16<false>(t + j1);
          float zr[kVec], tr[kVec];
          convert<T, kVec>(z0, zr, c);
          convert<T, kVec>(t0, tr, c);
          sums_chunk<DIV, kVec>(acc.x, acc.y, zr, tr, c, f);
          convert<T, kVec>(z1, zr, c);
          convert<T, kVec>(t1, tr, c);
          sums_chunk<DIV, kVec>(acc.x, acc.y, zr, tr, c, f);
        }
        if (k < sp.nvec) {
          float zr[kVec], tr[kVec];
          const int64_t j = sp.head + k * kVec;
          load<T, kVec, false>(z + j, zr, c);
          load<T, kVec, false>(t + j, tr, c);
          sums_chunk<DIV, kVec>(acc.x, acc.y, zr, tr, c, f);
        }
        for (int64_t i = threadIdx.x; i < sp.nscalar; i += blockDim.x) {
          float zr[1], tr[1];
          const int64_t j = sp.scalar_col(i);
          load<T, 1, false>(z + j, zr, c);
          load<T, 1, false>(t + j, tr, c);
          sums_chunk<DIV, 1>(acc.x, acc.y, zr, tr, c, f);
        }
        acc = block_sum2(acc, fbuf);
        f.s0 = acc.x;
        f.s1 = acc.y;
        if (P.mode == kDivSums) {
          if (threadIdx.x == 0) reinterpret_cast<float2*>(P.sums_out)[r] = acc;
          continue;
        }
      }
    }

    // ---- the row's loss ----
    if (threadIdx.x == 0 && loss != nullptr) {
      const float dsoft = DIV == kForwardKL ? rf.kl_pq : DIV == kReverseKL ? rf.kl_qp
                                                                            : sums_divergence(DIV, c.beta, f.s0, f.s1);
      float row = c.soft_scale * dsoft + (c.use_hard ? c.hard * rf.ce : 0.f);
      if (has_nan || bad_target) row = qnan;
      *loss = row * inv_div;
    }
    if (bad_target) {
      fill_row(gz, v, qnan);
      fill_row(gt, v, qnan);
      continue;
    }
    if (gz == nullptr) continue;

    // ---- last pass: the gradient, walking the row backwards (its tail is the warmest in L2) ----
    T* gt_w = c.teacher_grad ? gt : nullptr;
    int64_t k = sp.nvec - 1 - threadIdx.x;
    for (; k - int64_t(blockDim.x) >= 0; k -= 2 * int64_t(blockDim.x)) {
      // both vectors are loaded before either is written: with the gradient over the logits
      // (inplace_grad) the second vector is read before the first one's store, never after
      const int64_t j0 = sp.head + k * kVec, j1 = j0 - int64_t(blockDim.x) * kVec;
      const uint4 z0 = load16<true>(z + j0), t0 = load16<true>(t + j0);
      const uint4 z1 = load16<true>(z + j1), t1 = load16<true>(t + j1);
      float zr[kVec], tr[kVec], g[kVec], h[kVec];
      convert<T, kVec>(z0, zr, c);
      convert<T, kVec>(t0, tr, c);
      grad_chunk<DIV, kVec>(g, h, zr, tr, j0, y_local, c, f, inv_div);
      store<T, kVec>(gz + j0, g);
      if (gt_w != nullptr) store<T, kVec>(gt_w + j0, h);
      convert<T, kVec>(z1, zr, c);
      convert<T, kVec>(t1, tr, c);
      grad_chunk<DIV, kVec>(g, h, zr, tr, j1, y_local, c, f, inv_div);
      store<T, kVec>(gz + j1, g);
      if (gt_w != nullptr) store<T, kVec>(gt_w + j1, h);
    }
    if (k >= 0) {
      float zr[kVec], tr[kVec], g[kVec], h[kVec];
      const int64_t j = sp.head + k * kVec;
      load<T, kVec, true>(z + j, zr, c);
      load<T, kVec, true>(t + j, tr, c);
      grad_chunk<DIV, kVec>(g, h, zr, tr, j, y_local, c, f, inv_div);
      store<T, kVec>(gz + j, g);
      if (gt_w != nullptr) store<T, kVec>(gt_w + j, h);
    }
    for (int64_t i = threadIdx.x; i < sp.nscalar; i += blockDim.x) {
      float zr[1], tr[1], g[1], h[1];
      const int64_t j = sp.scalar_col(i);
      load<T, 1, true>(z + j, zr, c);
      load<T, 1, true>(t + j, tr, c);
      grad_chunk<DIV, 1>(g, h, zr, tr, j, y_local, c, f, inv_div);
      store<T, 1>(gz + j, g);
      if (gt_w != nullptr) store<T, 1>(gt_w + j, h);
    }
  }
}

// Backward of the fused loss: grad[r, :] *= g[r], skipped on the device for rows with g == 1 (the
// usual loss.backward()), so that case costs one float read per row instead of an N×V pass.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads) scale_rows_kernel(T* grad, int64_t n, int64_t v, int64_t stride,
                                                                 const float* g, int64_t g_stride) {
  constexpr int kVec = VecOf<T>::N;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const float s = g[r * g_stride];
    if (s == 1.f) continue;
    T* row = grad + r * stride;
    const RowSplit sp = split_row<T>(v, row, row, nullptr, nullptr);
    for (int64_t k = threadIdx.x; k < sp.nvec; k += blockDim.x) {
      const int64_t j = sp.head + k * kVec;
      uint4 raw = *reinterpret_cast<const uint4*>(row + j);
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kVec; ++i) e[i] = from_f<T>(to_f(e[i]) * s);
      *reinterpret_cast<uint4*>(row + j) = raw;
    }
    for (int64_t i = threadIdx.x; i < sp.nscalar; i += blockDim.x) {
      const int64_t j = sp.scalar_col(i);
      row[j] = from_f<T>(to_f(row[j]) * s);
    }
  }
}

Consts make_consts(const KDProblem& P) {
  const KDArgs& a = P.args;
  Consts c{};
  c.inv_t = 1.f / a.temperature;
  c.has_cap = a.softcap > 0.f;
  c.cap = a.softcap;
  c.inv_cap = c.has_cap ? 1.f / a.softcap : 0.f;
  c.inv_cap2 = c.inv_cap * c.inv_cap;
  c.soft_scale = a.soft_scale;
  c.soft = a.soft_scale / a.temperature;
  c.hard = a.hard_weight;
  c.eps = a.label_smoothing;
  c.eps_over_v = a.label_smoothing / float(P.vocab_total);
  c.beta = a.beta;
  c.beta1 = 1.f - a.beta;
  c.log_beta = std::log(a.beta);    // −inf at w = 0: the bound in mix_log then drops out
  c.log_beta1 = std::log(1.f - a.beta);
  c.tau_one = a.temperature == 1.f;
  c.use_hard = a.has_target && a.hard_weight != 0.f;
  c.need_m1 = c.use_hard && !c.tau_one;
  c.need_sum = c.use_hard && a.label_smoothing > 0.f;
  // (the stats mode always reports the τ = 1 sums, which the shard merge may need)
  if (P.mode == kStats) {
    c.need_m1 = !c.tau_one;
    c.need_sum = true;
  }
  c.teacher_grad = P.grad_t != nullptr;
  return c;
}

template <typename T>
int pick_threads(int64_t v) {
  // ~8 vectors per thread or more, so the block reductions stay a small part of a row's work
  const int64_t nvec = v / VecOf<T>::N;
  int threads = 128;
  while (threads < kMaxThreads && int64_t(threads) * 8 < nvec) threads *= 2;
  return threads;
}

template <typename T>
void launch_dtype(const KDProblem& P, cudaStream_t stream) {
  const Consts c = make_consts(P);
  const int threads = pick_threads<T>(P.v);
  const int64_t max_grid = 1 << 30;
  const unsigned grid = unsigned(P.n < max_grid ? P.n : max_grid);
  const int div = P.mode == kStats ? kAllStats : P.args.divergence;
  if (P.mode == kDivSums && !has_sums_pass(div))
    throw std::invalid_argument("fastkd CUDA: the divergence-sums mode needs JSD, TVD or skew KL");
  switch (div) {
    case kForwardKL: kd_rows_kernel<T, kForwardKL><<<grid, threads, 0, stream>>>(P, c); break;
    case kReverseKL: kd_rows_kernel<T, kReverseKL><<<grid, threads, 0, stream>>>(P, c); break;
    case kJSD: kd_rows_kernel<T, kJSD><<<grid, threads, 0, stream>>>(P, c); break;
    case kTVD: kd_rows_kernel<T, kTVD><<<grid, threads, 0, stream>>>(P, c); break;
    case kSkewForwardKL: kd_rows_kernel<T, kSkewForwardKL><<<grid, threads, 0, stream>>>(P, c); break;
    case kSkewReverseKL: kd_rows_kernel<T, kSkewReverseKL><<<grid, threads, 0, stream>>>(P, c); break;
    case kAllStats: kd_rows_kernel<T, kAllStats><<<grid, threads, 0, stream>>>(P, c); break;
    default: throw std::invalid_argument("fastkd CUDA: divergence code must lie in [0, 6)");
  }
}

}  // namespace

void scale_rows_cuda(int64_t grad, int64_t n, int64_t v, int64_t stride, int dtype, int64_t factors,
                     int64_t factors_stride, int device, int64_t stream_handle) {
  if (n <= 0 || v <= 0) return;
  DeviceScope scope(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream_handle));
  const unsigned grid = unsigned(n < (int64_t(1) << 30) ? n : (int64_t(1) << 30));
  const float* gp = reinterpret_cast<const float*>(static_cast<intptr_t>(factors));
  switch (dtype) {
    case kF32:
      scale_rows_kernel<float><<<grid, pick_threads<float>(v), 0, stream>>>(
          reinterpret_cast<float*>(static_cast<intptr_t>(grad)), n, v, stride, gp, factors_stride);
      break;
    case kBF16:
      scale_rows_kernel<__nv_bfloat16><<<grid, pick_threads<__nv_bfloat16>(v), 0, stream>>>(
          reinterpret_cast<__nv_bfloat16*>(static_cast<intptr_t>(grad)), n, v, stride, gp, factors_stride);
      break;
    case kF16:
      scale_rows_kernel<__half><<<grid, pick_threads<__half>(v), 0, stream>>>(
          reinterpret_cast<__half*>(static_cast<intptr_t>(grad)), n, v, stride, gp, factors_stride);
      break;
    default:
      throw std::invalid_argument("fastkd CUDA: dtype must be float32, bfloat16 or float16");
  }
  check(cudaGetLastError(), "scale_rows launch");
}

void kd_run_cuda(const KDProblem& P, int device, int64_t stream_handle) {
  if (P.n <= 0 || P.v <= 0) return;
  if (P.mode < kFused || P.mode > kFinish) throw std::invalid_argument("fastkd CUDA: bad mode");
  // every way out (a bad dtype or divergence code throws in launch_dtype) restores the caller's device
  DeviceScope scope(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream_handle));
  switch (P.dtype) {
    case kF32: launch_dtype<float>(P, stream); break;
    case kBF16: launch_dtype<__nv_bfloat16>(P, stream); break;
    case kF16: launch_dtype<__half>(P, stream); break;
    default:
      throw std::invalid_argument("fastkd CUDA: dtype must be float32, bfloat16 or float16");
  }
  check(cudaGetLastError(), "kernel launch");
}

std::string kernels_unusable_cuda(int device) {
  // The kernels are linked with the static CUDA runtime: an older driver than that runtime needs,
  // or a GPU architecture the build has no code for, makes every launch fail. Asking for a kernel's
  // attributes loads its module for the device and reports exactly those errors, without a launch.
  try {
    DeviceScope scope(device);
    cudaFuncAttributes attr;
    const cudaError_t err = cudaFuncGetAttributes(&attr, kd_rows_kernel<float, kForwardKL>);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the error state, so that later runtime calls start clean
      return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    }
  } catch (const std::exception& e) {
    return e.what();
  }
  return std::string();
}

}  // namespace fastkd
