// Fused CPU knowledge-distillation loss: temperature softmaxes of student and teacher, KL(p‖q),
// KL(q‖p), JSD(β), total variation or skew KL(α), the label-smoothed hard cross-entropy, and the
// gradient w.r.t. both logits, in one sweep per row.
//
// Never materialised: p, q, log-probabilities, the softcapped logits, any float32 upcast of a
// bf16/fp16 row. The only N×V memory written is the gradient itself (input dtype).
//
// Passes over each row: pass 1 reads z and t once for the online statistics; the gradient pass
// follows. JSD, TVD and skew KL put a sums pass between them (their summands need the final
// normalisers: common/kd_math.h), so they take three passes, the KLs two. Exponentials,
// not memory, bind on CPU: a V = 32000 float32 row pair is 256 KB and the later passes hit L2. So
// pass 1 keeps its exponentials (a per-thread row cache, RowCache below) and the later passes turn
// them into p and q with one multiply each: one exp per element and distribution in all, where
// recomputing them would cost two. Forward KL + CE at τ ∈ {1, 2, 4} then reads z and t only once.
//
// Preconditions: unit column stride (row strides arbitrary), 64-bit offsets, the divisor is a host
// scalar. OpenMP threads take rows in small blocks on demand; each block runs in a function
// compiled for AVX2+FMA and for baseline x86-64, picked by CPU features, so one build runs anywhere.
#include "cpu/kd.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/kd_math.h"

// x86-64: every row function is compiled twice, for AVX2+FMA and for the baseline, and picked at
// run time from __builtin_cpu_supports("avx2"/"fma"). (target_clones("arch=haswell") resolved to the
// baseline SSE2 clone on an AMD EPYC VM that has both features: ~10× slower.)
#if defined(__GNUC__) && defined(__x86_64__)
#define FASTKD_X86_DISPATCH 1
#define FASTKD_AVX2 __attribute__((target("avx2,fma")))
#endif
#define FASTKD_INLINE inline __attribute__((always_inline))

namespace fastkd {
namespace {

FASTKD_INLINE double omp_seconds() {
#ifdef _OPENMP
  return omp_get_wtime();
#else
  return double(std::chrono::duration_cast<std::chrono::nanoseconds>(
                    std::chrono::steady_clock::now().time_since_epoch()).count()) * 1e-9;
#endif
}

constexpr int kChunk = 512;  // elements per chunk: 4 float buffers of 2 KB stay in L1

struct bf16_t {
  uint16_t bits;
};

// ----------------------------------------------------------------------------------------------
// dtype conversions (branch-free so the chunk loops vectorise)
// ----------------------------------------------------------------------------------------------
FASTKD_INLINE float to_acc(float x) { return x; }
FASTKD_INLINE double to_acc(double x) { return x; }
FASTKD_INLINE float to_acc(bf16_t x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
FASTKD_INLINE float to_acc(_Float16 x) { return static_cast<float>(x); }

FASTKD_INLINE void store(float* o, float g) { *o = g; }
FASTKD_INLINE void store(double* o, double g) { *o = g; }
FASTKD_INLINE void store(bf16_t* o, float g) {
  uint32_t u;
  std::memcpy(&u, &g, 4);
  // round to nearest even; a NaN stays a (quiet) NaN instead of rounding into inf
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  o->bits = (g != g) ? uint16_t(0x7fc0) : uint16_t(r);
}
FASTKD_INLINE void store(_Float16* o, float g) { *o = static_cast<_Float16>(g); }

// ----------------------------------------------------------------------------------------------
// Packs: the chunk loops are written once over a "pack" P — 8 floats as a GCC vector (one AVX2
// register in the haswell clone, two SSE registers in the default one), or a scalar double for
// float64 inputs. Explicit vectors because GCC's auto-vectoriser gave up on these loops (selects
// around exp/log), leaving scalar code ~8× slower.
// ----------------------------------------------------------------------------------------------
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

template <typename To, typename From>
FASTKD_INLINE To bitcast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bitcast size");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}
FASTKD_INLINE float i2f(int32_t x) { return float(x); }
FASTKD_INLINE v8f i2f(v8i x) { return __builtin_convertvector(x, v8f); }

// exp on (−inf, 0] (and NaN): the kernels only ever exponentiate x − max. Cody–Waite reduction and
// the Cephes degree-6 polynomial (~1 ulp); x < −87 flushes to 0 (no subnormal results).
template <typename F, typename I>
FASTKD_INLINE F exp_neg(F x) {
  const float kLog2e = 1.44269504088896341f, kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
  const float kShift = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer held in the mantissa
  F xc = x < -87.0f ? F{} - 87.0f : x;
  F tn = xc * kLog2e + kShift;
  F n = tn - kShift;
  I ni = bitcast<I>(tn) - 0x4B400000;
  F r = xc - n * kC1;
  r = r - n * kC2;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  F y = p * r * r + r + 1.0f;
  y = y * bitcast<F>((ni + 127) << 23);
  y = x < -87.0f ? F{} : y;
  return (x != x) ? x : y;
}

// natural log on [0, inf] (NaN passes through): Cephes logf, subnormals lifted by 2^23 first.
template <typename F, typename I>
FASTKD_INLINE F log_pos(F x) {
  const float kInf = std::numeric_limits<float>::infinity();
  auto sub = x < 1.17549435e-38f;
  F xs = sub ? x * 8388608.0f : x;
  I u = bitcast<I>(xs);
  I e = ((u >> 23) & 0xff) - 126;
  F m = bitcast<F>((u & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  F ef = i2f(e) - (sub ? F{} + 23.0f : F{});
  auto lo = m < 0.707106781186547524f;
  ef = lo ? ef - 1.0f : ef;
  m = lo ? m + m - 1.0f : m - 1.0f;
  F z = m * m;
  F y = F{} + 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  F r = m + y + ef * 0.693359375f;
  r = (x == 0.0f) ? F{} - kInf : r;
  r = (x == kInf) ? x : r;
  r = ((x < 0.0f) | (x != x)) ? F{} + std::numeric_limits<float>::quiet_NaN() : r;
  return r;
}

// tanh via exp(−2|x|) (argument <= 0, as exp_neg wants); odd polynomial near 0 where 1 − e cancels.
template <typename F, typename I>
FASTKD_INLINE F tanh_f(F x) {
  F ax = x < 0.0f ? -x : x;
  F e = exp_neg<F, I>(-2.0f * ax);
  F big = (1.0f - e) / (1.0f + e);
  F x2 = ax * ax;
  F small = ax * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.0539682540f)));
  F r = ax < 0.0625f ? small : big;
  r = x < 0.0f ? -r : r;
  return (x != x) ? x : r;
}

// 1 − tanh²(x) = 4e/(1 + e)² with e = exp(−2|x|): no cancellation where tanh saturates (1 − r²
// from a rounded r = tanh x would lose all accuracy there, and the softcap gradient is this factor).
template <typename F, typename I>
FASTKD_INLINE F tanh_deriv(F x) {
  F ax = x < 0.0f ? -x : x;
  F e = exp_neg<F, I>(-2.0f * ax);
  F d = 1.0f + e;
  return 4.0f * e / (d * d);
}

template <typename Acc>
struct Pack;
template <>
struct Pack<float> {
  using T = v8f;
  static constexpr int W = 8;
  static FASTKD_INLINE T load(const float* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
  }
  static FASTKD_INLINE void put(float* p, T v) { std::memcpy(p, &v, sizeof(T)); }
  static FASTKD_INLINE T set(float x) { return T{} + x; }
  static FASTKD_INLINE float sum(T v) {
    float s = 0;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
  }
  static FASTKD_INLINE float max(T v) {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
  static FASTKD_INLINE T exp(T x) { return exp_neg<v8f, v8i>(x); }
  static FASTKD_INLINE T log(T x) { return log_pos<v8f, v8i>(x); }
  static FASTKD_INLINE T tanh(T x) { return tanh_f<v8f, v8i>(x); }
  static FASTKD_INLINE T dtanh(T x) { return tanh_deriv<v8f, v8i>(x); }
};
template <>
struct Pack<double> {
  using T = double;
  static constexpr int W = 1;
  static FASTKD_INLINE T load(const double* p) { return *p; }
  static FASTKD_INLINE void put(double* p, T v) { *p = v; }
  static FASTKD_INLINE T set(double x) { return x; }
  static FASTKD_INLINE double sum(T v) { return v; }
  static FASTKD_INLINE double max(T v) { return v; }
  static FASTKD_INLINE T exp(T x) { return std::exp(x); }
  static FASTKD_INLINE T log(T x) { return std::log(x); }
  static FASTKD_INLINE T tanh(T x) { return std::tanh(x); }
  static FASTKD_INLINE T dtanh(T x) {
    const double e = std::exp(-2.0 * std::fabs(x));
    return 4.0 * e / ((1.0 + e) * (1.0 + e));
  }
};

// log m = log(β·p + (1−β)·q) in the log domain: max + log1p(exp(−|a − b|)), with log1p by
// Goldberg's trick. Summing p and q in linear space instead turns exp's 1-ulp relative error into an
// absolute error of log m, which the JSD gradient's (log p − log m − S) then exposes.
template <typename Acc, typename P = Pack<Acc>>
FASTKD_INLINE typename P::T log_mix(typename P::T lp, typename P::T lq, Acc log_b, Acc log_b1) {
  using T = typename P::T;
  T a = lp + log_b, b = lq + log_b1;
  T mx = a > b ? a : b, mn = a > b ? b : a;
  T e = P::exp(mn - mx);
  T u = 1.0f + e;
  T l1p = (u == 1.0f) ? e : P::log(u) * e / (u - 1.0f);
  T lm = mx + l1p;
  return (mx == neg_inf<Acc>()) ? mx : lm;
}

template <typename Acc>
struct Ctx {
  Acc inv_t;        // 1/τ
  Acc cap, inv_cap; // softcap (0: none)
  Acc soft;         // soft_scale / τ: the soft term's gradient factor
  Acc hard, eps, eps_over_v, beta;
  Acc inv_div;
  int div;
  // τ ∈ {2, 4} with a hard term: exp(z − m_1) = exp(s_z − m_z)^τ exactly (z/τ is exact for a power
  // of two and m_1 = τ·m_z), so the τ = 1 softmax costs two multiplies instead of an exp per pass.
  int tau_pow;
  bool tau_one, use_hard, need_m1, need_sum, teacher_grad;
};

// The exponentials of pass 1, kept for the passes after it (fused mode). Pass 1 computes
// e_z = exp(s_z − M_z) for every element, M_z the running maximum when its chunk was reduced; with the
// row's final maximum m_z and normaliser d_z, q = e_z · exp((M_z − m_z) − log d_z), one multiply by a
// per-chunk factor instead of a second exp. Likewise p from e_t. Kept per thread and per row in float32
// (float64 for float64 rows): 2·V·4 bytes, 256 KB at V = 32000, so the passes after pass 1 read it
// from L2, and forward KL with τ = 1, 2 or 4 then reads neither z nor t again. Chunks reduced while
// a side had no finite maximum yet hold only zeros; their M is −inf and their factor 0.
template <typename Acc>
struct RowCache {
  Acc* ez = nullptr;  // kChunk-strided chunks of exp(s_z − M_z), lanes past V zero
  Acc* et = nullptr;
  Acc* mz = nullptr;  // M_z, M_t per chunk
  Acc* mt = nullptr;
  Acc* fz = nullptr;  // the per-chunk factors, filled once the row's normalisers are known
  Acc* ft = nullptr;
  Acc* lm = nullptr;  // JSD, skew KL: log m per element, from the sums pass for the gradient pass
};

// A thread's cache storage, grown to the largest row it has seen and kept for later calls (OpenMP
// reuses its threads, so a training loop pays the allocation and first touch once).
template <typename Acc>
RowCache<Acc> thread_row_cache(int64_t v) {
  static thread_local std::vector<Acc> store;
  const int64_t nc = (v + kChunk - 1) / kChunk;  // chunks; the buffers below are kChunk-strided
  const size_t need = size_t(nc) * (3 * kChunk + 4) + 16;
  if (store.size() < need) store.assign(need, Acc(0));
  Acc* base = store.data();
  base += (64 - (reinterpret_cast<uintptr_t>(base) & 63)) % 64 / sizeof(Acc);  // 64-byte aligned
  RowCache<Acc> rc;
  rc.ez = base;
  rc.et = rc.ez + nc * kChunk;
  rc.mz = rc.et + nc * kChunk;
  rc.mt = rc.mz + nc;
  rc.fz = rc.mt + nc;
  rc.ft = rc.fz + nc;
  rc.lm = rc.ft + nc;
  return rc;
}

// The factors exp((M − m) − log d) per chunk; false (the cache is not used) unless both final
// maxima are finite, where the direct exp((s − m) − log d) is what the edge rules are written for.
template <typename Acc>
FASTKD_INLINE bool cache_factors(RowCache<Acc>& rc, int64_t v, const RowFinal<Acc>& f) {
  const Acc ninf = neg_inf<Acc>(), inf = -ninf;
  if (!(f.m_z > ninf && f.m_z < inf && f.m_t > ninf && f.m_t < inf)) return false;
  const int64_t nc = (v + kChunk - 1) / kChunk;
  for (int64_t k = 0; k < nc; ++k) {
    rc.fz[k] = rc.mz[k] > ninf ? std::exp((rc.mz[k] - f.m_z) - f.log_dz) : Acc(0);
    rc.ft[k] = rc.mt[k] > ninf ? std::exp((rc.mt[k] - f.m_t) - f.log_dt) : Acc(0);
  }
  return true;
}

// q and p at column j (chunk k): from the kept exponentials, or exp of the log-probabilities.
template <typename Acc, typename P = Pack<Acc>>
FASTKD_INLINE void probs(const RowCache<Acc>* rc, int64_t j, int64_t k, typename P::T lq, typename P::T lp,
                         typename P::T& q, typename P::T& p) {
  if (rc != nullptr) {
    q = P::load(rc->ez + j) * rc->fz[k];
    p = P::load(rc->et + j) * rc->ft[k];
  } else {
    q = P::exp(lq);
    p = P::exp(lp);
  }
}

// Load a chunk into `raw` (softcapped) and `scaled` (/τ); lanes past n up to the pack width are
// −inf, which every loop below treats as zero probability mass.
// With `deriv`, also the softcap's derivative 1 − tanh²(x/c) per element.
template <typename In, typename Acc>
FASTKD_INLINE int load_chunk(const In* src, int n, const Ctx<Acc>& c, Acc* raw, Acc* scaled,
                             Acc* deriv = nullptr) {
  using P = Pack<Acc>;
  for (int i = 0; i < n; ++i) raw[i] = to_acc(src[i]);
  const int np = (n + P::W - 1) / P::W * P::W;
  for (int i = n; i < np; ++i) raw[i] = Acc(0);
  if (c.cap > Acc(0)) {
    for (int i = 0; i < np; i += P::W) {
      typename P::T x = P::load(raw + i) * c.inv_cap;
      if (deriv != nullptr) P::put(deriv + i, P::dtanh(x));
      P::put(raw + i, c.cap * P::tanh(x));
    }
  }
  for (int i = n; i < np; ++i) raw[i] = neg_inf<Acc>();
  for (int i = 0; i < np; i += P::W) P::put(scaled + i, P::load(raw + i) * c.inv_t);
  return np;
}

// Online stats of one row slice (pass 1). Returns true if any input is NaN.
template <typename In, typename Acc>
FASTKD_INLINE bool row_stats(const In* z, const In* t, int64_t v, int64_t y_local, const Ctx<Acc>& c,
                             RowStats<Acc>& s, RowCache<Acc>* rc = nullptr) {
  using P = Pack<Acc>;
  using T = typename P::T;
  alignas(64) Acc zb[kChunk], tb[kChunk], sz[kChunk], st[kChunk];
  const Acc ninf = neg_inf<Acc>();
  s.m_z = s.m_t = s.m_1 = ninf;
  s.d_z = s.d_t = s.d_1 = s.a_t = s.a_z = s.sum_z = s.z_y = Acc(0);
  T nanv = P::set(0);
  Acc d1_pow = 0;  // Σ exp(s_z − m_z)^τ for the τ ∈ {2, 4} shortcut
  for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
    const int n = int(std::min<int64_t>(kChunk, v - j0));
    load_chunk<In, Acc>(z + j0, n, c, zb, sz);
    const int np = load_chunk<In, Acc>(t + j0, n, c, tb, st);
    T cmz = P::set(ninf), cmt = P::set(ninf), cm1 = P::set(ninf);
    for (int i = 0; i < np; i += P::W) {
      T a = P::load(sz + i), b = P::load(st + i), r = P::load(zb + i), q = P::load(tb + i);
      cmz = a > cmz ? a : cmz;
      cmt = b > cmt ? b : cmt;
      cm1 = r > cm1 ? r : cm1;
      nanv = ((r != r) | (q != q)) ? P::set(1) : nanv;
    }
    const Acc mz_c = P::max(cmz), mt_c = P::max(cmt), m1_c = P::max(cm1);
    const Acc mz_new = mz_c > s.m_z ? mz_c : s.m_z, mt_new = mt_c > s.m_t ? mt_c : s.m_t;
    if (mz_new != s.m_z || mt_new != s.m_t) {
      if (c.tau_pow && s.d_z > Acc(0)) {
        const Acc f = rescale(s.m_z, mz_new), f2 = f * f;
        d1_pow *= c.tau_pow == 2 ? f2 : f2 * f2;
      }
      shift_kl_sums(s.d_z, s.a_z, s.d_t, s.a_t, s.m_z, s.m_t, mz_new, mt_new);
      s.m_z = mz_new;
      s.m_t = mt_new;
    }
    // A side with no mass yet (max −inf) is shifted by 0: its terms are exp(−inf) = 0, and the
    // other side's log-ratio against it is +inf where that side has mass (the true KL).
    const Acc mz = s.m_z > ninf ? s.m_z : Acc(0), mt = s.m_t > ninf ? s.m_t : Acc(0);
    Acc* cz = nullptr;
    Acc* ct = nullptr;
    if (rc != nullptr) {
      const int64_t k = j0 / kChunk;
      rc->mz[k] = s.m_z;  // −inf while the side has no mass: its e are all 0
      rc->mt[k] = s.m_t;
      cz = rc->ez + j0;
      ct = rc->et + j0;
    }
    {
      T dz = P::set(0), az = P::set(0), dt = P::set(0), at = P::set(0), d1 = P::set(0);
      for (int i = 0; i < np; i += P::W) {
        T a = P::load(sz + i) - mz, b = P::load(st + i) - mt;  // max-shifted: both <= 0
        T ez = P::exp(a), et = P::exp(b);
        if (cz != nullptr) {  // loop-invariant: unswitched
          P::put(cz + i, ez);
          P::put(ct + i, et);
        }
        dz += ez;
        dt += et;
        // 0·log 0 = 0: skip entries with zero mass (and −inf − −inf)
        az += ez > Acc(0) ? ez * (a - b) : P::set(0);
        at += et > Acc(0) ? et * (b - a) : P::set(0);
        if (c.tau_pow) {
          T e2 = ez * ez;
          d1 += c.tau_pow == 2 ? e2 : e2 * e2;
        }
      }
      s.d_z += P::sum(dz);
      s.a_z += P::sum(az);
      s.d_t += P::sum(dt);
      s.a_t += P::sum(at);
      if (c.tau_pow) d1_pow += P::sum(d1);
    }
    if (c.need_m1 && !c.tau_pow) {
      if (m1_c > s.m_1) {
        s.d_1 *= rescale(s.m_1, m1_c);
        s.m_1 = m1_c;
      }
      const Acc m1 = s.m_1;
      if (m1 > ninf) {
        T d1 = P::set(0);
        for (int i = 0; i < np; i += P::W) d1 += P::exp(P::load(zb + i) - m1);
        s.d_1 += P::sum(d1);
      }
    }
    if (c.need_sum) {
      Acc sum = 0;
      for (int i = 0; i < n; ++i) sum += zb[i];
      s.sum_z += sum;
    }
    if (y_local >= j0 && y_local < j0 + n) s.z_y = zb[y_local - j0];
  }
  if (c.tau_pow) {
    s.m_1 = Acc(c.tau_pow) * s.m_z;
    s.d_1 = d1_pow;
  }
  return P::max(nanv) != Acc(0);
}

// Whether a divergence's sums and gradient use log m (JSD, skew KL; TVD needs only p and q).
FASTKD_INLINE bool uses_log_mix(int div) { return div == kJSD || div == kSkewForwardKL || div == kSkewReverseKL; }

// log m of the divergence at one element: log(w·own + (1−w)·other), own = p except for skew reverse KL.
template <typename Acc, typename P = Pack<Acc>>
FASTKD_INLINE typename P::T mix_log(int div, typename P::T lp, typename P::T lq, Acc lw, Acc lw1) {
  return mix_own_is_student(div) ? log_mix<Acc>(lq, lp, lw, lw1) : log_mix<Acc>(lp, lq, lw, lw1);
}

// The divergence's two sums over a slice (common/kd_math.h: sums_terms), given the row's final
// normalisers. With the row cache, p and q come from pass 1's exponentials, and the logits are read
// again only for the log-probabilities that log m needs (TVD reads nothing).
template <typename In, typename Acc>
FASTKD_INLINE void row_div_sums(const In* z, const In* t, int64_t v, const Ctx<Acc>& c,
                                const RowFinal<Acc>& f, Acc& out_s0, Acc& out_s1,
                                const RowCache<Acc>* rc = nullptr) {
  using P = Pack<Acc>;
  using T = typename P::T;
  alignas(64) Acc zb[kChunk], tb[kChunk], sz[kChunk], st[kChunk];
  const Acc lw = std::log(c.beta), lw1 = std::log1p(-c.beta);
  const bool logs = uses_log_mix(c.div);
  const bool read_rows = rc == nullptr || logs;
  const T zero = P::set(0);
  T s0 = zero, s1 = zero;
  for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
    const int n = int(std::min<int64_t>(kChunk, v - j0));
    const int np = (n + P::W - 1) / P::W * P::W;
    if (read_rows) {
      load_chunk<In, Acc>(z + j0, n, c, zb, sz);
      load_chunk<In, Acc>(t + j0, n, c, tb, st);
    }
    const int64_t k = j0 / kChunk;
    for (int i = 0; i < np; i += P::W) {
      T lq = zero, lp = zero, lm = zero, q, p;
      if (read_rows) {
        lq = (P::load(sz + i) - f.m_z) - f.log_dz;
        lp = (P::load(st + i) - f.m_t) - f.log_dt;
      }
      probs<Acc>(rc, j0 + i, k, lq, lp, q, p);
      if (logs) {
        lm = mix_log<Acc>(c.div, lp, lq, lw, lw1);
        if (rc != nullptr) P::put(rc->lm + j0 + i, lm);
      }
      sums_terms(c.div, q, p, lq, lp, lm, c.beta, zero, s0, s1);
    }
  }
  out_s0 = P::sum(s0);
  out_s1 = P::sum(s1);
}

// Gradient write of one row slice (the last pass); s0/s1 are the sums of a divergence with a sums pass.
template <typename In, typename Acc>
FASTKD_INLINE void row_grad(const In* z, const In* t, In* gz, In* gt, int64_t v, int64_t y_local,
                            const Ctx<Acc>& c, const RowFinal<Acc>& f, Acc s0, Acc s1,
                            const RowCache<Acc>* rc = nullptr) {
  using P = Pack<Acc>;
  using T = typename P::T;
  alignas(64) Acc zb[kChunk], tb[kChunk], sz[kChunk], st[kChunk], g[kChunk], h[kChunk];
  alignas(64) Acc dzc[kChunk], dtc[kChunk];  // softcap derivatives
  const Acc soft = c.soft, hard = c.use_hard ? c.hard : Acc(0), eps_v = c.eps_over_v;
  const Acc lw = std::log(c.beta), lw1 = std::log1p(-c.beta);
  const Acc inv_div = c.inv_div;
  const bool has_cap = c.cap > Acc(0);
  const bool want_t = gt != nullptr && c.teacher_grad;
  const Acc k_pow = c.tau_pow ? std::exp(Acc(c.tau_pow) * f.log_dz - f.log_d1) : Acc(0);
  const T zero = P::set(0);
  // With the cache, forward KL, TVD and skew forward KL need the logits again only for the teacher's
  // gradient (a log-probability), the softcap's derivative, or a τ whose hard-term softmax is not a
  // power of q; reverse KL, JSD and skew reverse KL need log q for the student's.
  const bool hard_exp = hard != Acc(0) && !c.tau_one && !c.tau_pow;
  const bool student_logs = c.div == kReverseKL || c.div == kJSD || c.div == kSkewReverseKL;
  const bool read_rows = rc == nullptr || student_logs || want_t || has_cap || hard_exp;
  const bool sums = has_sums_pass(c.div), logs = uses_log_mix(c.div);
  for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
    const int n = int(std::min<int64_t>(kChunk, v - j0));
    const int np = (n + P::W - 1) / P::W * P::W;
    if (read_rows) {
      load_chunk<In, Acc>(z + j0, n, c, zb, sz, has_cap ? dzc : nullptr);
      load_chunk<In, Acc>(t + j0, n, c, tb, st, has_cap ? dtc : nullptr);
    }
    const int64_t k = j0 / kChunk;
    for (int i = 0; i < np; i += P::W) {
      T lq = zero, lp = zero, q, p;
      if (read_rows) {
        lq = (P::load(sz + i) - f.m_z) - f.log_dz;
        lp = (P::load(st + i) - f.m_t) - f.log_dt;
      }
      probs<Acc>(rc, j0 + i, k, lq, lp, q, p);
      T gs, ht;
      // want_t is loop-invariant: GCC unswitches the loop, so without a teacher gradient the
      // teacher terms cost nothing
      if (c.div == kForwardKL) {
        gs = soft * (q - p);
        ht = want_t && p > Acc(0) ? soft * p * ((lp - lq) - f.kl_pq) : zero;
      } else if (c.div == kReverseKL) {
        gs = q > Acc(0) ? soft * q * ((lq - lp) - f.kl_qp) : zero;
        ht = want_t ? soft * (p - q) : zero;
      } else if (sums) {
        T lm = zero;
        if (logs) lm = rc != nullptr ? P::load(rc->lm + j0 + i) : mix_log<Acc>(c.div, lp, lq, lw, lw1);
        sums_grad(c.div, q, p, lq, lp, lm, c.beta, s0, s1, zero, want_t, gs, ht);
        gs *= soft;
        ht *= soft;
      } else {
        gs = ht = zero;
      }
      if (hard != Acc(0)) {
        T sm;
        if (c.tau_one) {
          sm = q;
        } else if (c.tau_pow) {  // softmax(z) = q^τ · d_z^τ / d_1
          T q2 = q * q;
          sm = (c.tau_pow == 2 ? q2 : q2 * q2) * k_pow;
        } else {
          sm = P::exp((P::load(zb + i) - f.m_1) - f.log_d1);
        }
        gs += hard * (sm - eps_v);
      }
      if (has_cap) {
        gs *= P::load(dzc + i);
        if (want_t) ht *= P::load(dtc + i);
      }
      P::put(g + i, gs * inv_div);
      if (want_t) P::put(h + i, ht * inv_div);
    }
    if (hard != Acc(0) && y_local >= j0 && y_local < j0 + n) {
      const int k = int(y_local - j0);
      const Acc capd = has_cap ? dzc[k] : Acc(1);
      g[k] -= hard * (Acc(1) - c.eps) * capd * inv_div;
    }
    for (int i = 0; i < n; ++i) store(gz + j0 + i, g[i]);
    if (want_t)
      for (int i = 0; i < n; ++i) store(gt + j0 + i, h[i]);
  }
}

template <typename In>
FASTKD_INLINE void zero_row(In* p, int64_t v) {
  if (p != nullptr) std::memset(static_cast<void*>(p), 0, sizeof(In) * size_t(v));
}

template <typename In>
FASTKD_INLINE void nan_row(In* p, int64_t v) {
  if (p == nullptr) return;
  for (int64_t j = 0; j < v; ++j) store(p + j, std::numeric_limits<float>::quiet_NaN());
}

template <typename In, typename Acc>
FASTKD_INLINE void run_rows(const KDProblem& P, int64_t r0, int64_t r1) {
  const KDArgs& a = P.args;
  Ctx<Acc> c;
  c.inv_t = Acc(1) / Acc(a.temperature);
  c.cap = Acc(a.softcap);
  c.inv_cap = a.softcap > 0 ? Acc(1) / Acc(a.softcap) : Acc(0);
  c.soft = Acc(a.soft_scale) / Acc(a.temperature);
  c.hard = Acc(a.hard_weight);
  c.eps = Acc(a.label_smoothing);
  c.eps_over_v = c.eps / Acc(P.vocab_total);
  c.beta = Acc(a.beta);
  c.inv_div = P.divisor ? Acc(1) / *static_cast<const Acc*>(P.divisor) : Acc(1);
  c.div = a.divergence;
  c.tau_one = a.temperature == 1.0f;
  c.use_hard = a.has_target && a.hard_weight != 0.0f;
  c.need_m1 = c.use_hard && !c.tau_one;
  c.tau_pow = (c.need_m1 && (a.temperature == 2.0 || a.temperature == 4.0)) ? int(a.temperature) : 0;
  c.need_sum = c.use_hard && a.label_smoothing > 0.0f;
  c.teacher_grad = P.grad_t != nullptr;
  const int64_t v = P.v;
  const Acc nan = std::numeric_limits<Acc>::quiet_NaN();
  RowCache<Acc> rc;
  if (P.mode == kFused) rc = thread_row_cache<Acc>(v);

  for (int64_t r = r0; r < r1; ++r) {
    const In* z = static_cast<const In*>(P.z) + r * P.stride_z;
    const In* t = static_cast<const In*>(P.t) + r * P.stride_t;
    In* gz = P.grad_z ? static_cast<In*>(P.grad_z) + r * P.stride_gz : nullptr;
    In* gt = P.grad_t ? static_cast<In*>(P.grad_t) + r * P.stride_gt : nullptr;
    Acc* loss = P.loss ? static_cast<Acc*>(P.loss) + r : nullptr;

    bool ignored = false, bad_target = false;
    int64_t y_local = -1;
    if (a.has_target) {
      const int64_t y = P.target[r];
      ignored = (y == a.ignore_index);
      bad_target = !ignored && (y < 0 || y >= P.vocab_total);
      if (!ignored && !bad_target) y_local = y - P.col_offset;  // outside [0, v): another slice
    }

    if (P.mode == kStats) {
      Acc* so = static_cast<Acc*>(P.stats_out) + r * kStatsWidth;
      RowStats<Acc> s;
      bool has_nan = row_stats<In, Acc>(z, t, v, y_local, c, s);
      std::memcpy(so, &s, sizeof(RowStats<Acc>));
      so[kStatsWidth - 1] = has_nan ? Acc(1) : Acc(0);
      continue;
    }
    if (ignored) {  // contributes nothing, not even NaN
      if (loss) *loss = Acc(0);
      if (P.mode == kDivSums) {
        Acc* jo = static_cast<Acc*>(P.sums_out) + 2 * r;
        jo[0] = jo[1] = Acc(0);
      } else {
        zero_row(gz, v);
        zero_row(gt, v);
      }
      continue;
    }

    RowStats<Acc> s;
    bool has_nan;
    // the cache pays off when a later pass re-reads the row: the gradient, or a divergence's sums
    const bool sums = has_sums_pass(c.div);
    RowCache<Acc>* rcp = nullptr;
    if (P.mode == kFused && !bad_target && (gz != nullptr || sums)) rcp = &rc;
    if (P.mode == kFused) {
      has_nan = row_stats<In, Acc>(z, t, v, y_local, c, s, rcp);
    } else {
      const Acc* si = static_cast<const Acc*>(P.stats_in) + r * kStatsWidth;
      std::memcpy(&s, si, sizeof(RowStats<Acc>));
      has_nan = si[kStatsWidth - 1] != Acc(0);
    }
    RowFinal<Acc> f = finalize(s, a, P.vocab_total, c.tau_one);
    if (rcp != nullptr && (has_nan || !cache_factors(rc, v, f))) rcp = nullptr;

    Acc s0 = 0, s1 = 0;
    if (sums) {
      if (P.mode == kFused || P.mode == kDivSums) row_div_sums<In, Acc>(z, t, v, c, f, s0, s1, rcp);
      if (P.mode == kDivSums) {
        Acc* so = static_cast<Acc*>(P.sums_out) + 2 * r;
        so[0] = s0;
        so[1] = s1;
        continue;
      }
      if (P.mode == kFinish) {
        const Acc* si = static_cast<const Acc*>(P.sums_in) + 2 * r;
        s0 = si[0];
        s1 = si[1];
      }
    }
    const Acc dsoft = c.div == kForwardKL ? f.kl_pq
                    : c.div == kReverseKL ? f.kl_qp
                                          : sums_divergence(c.div, c.beta, s0, s1);
    Acc row = Acc(a.soft_scale) * dsoft + (c.use_hard ? c.hard * f.ce : Acc(0));
    if (has_nan || bad_target) row = nan;
    if (loss) *loss = row * c.inv_div;
    if (bad_target) {
      nan_row(gz, v);
      nan_row(gt, v);
      continue;
    }
    if (gz != nullptr) row_grad<In, Acc>(z, t, gz, gt, v, y_local, c, f, s0, s1, rcp);
  }
}

// One entry per dtype and ISA: the whole per-row body is inlined into each and compiled for it.
using RowsFn = void (*)(const KDProblem&, int64_t, int64_t);
void rows_f32(const KDProblem& P, int64_t r0, int64_t r1) { run_rows<float, float>(P, r0, r1); }
void rows_bf16(const KDProblem& P, int64_t r0, int64_t r1) { run_rows<bf16_t, float>(P, r0, r1); }
void rows_f16(const KDProblem& P, int64_t r0, int64_t r1) { run_rows<_Float16, float>(P, r0, r1); }
void rows_f64(const KDProblem& P, int64_t r0, int64_t r1) { run_rows<double, double>(P, r0, r1); }
#ifdef FASTKD_X86_DISPATCH
FASTKD_AVX2 void rows_f32_avx2(const KDProblem& P, int64_t r0, int64_t r1) { run_rows<float, float>(P, r0, r1); }
FASTKD_AVX2 void rows_bf16_avx2(const KDProblem& P, int64_t r0, int64_t r1) { run_rows<bf16_t, float>(P, r0, r1); }
FASTKD_AVX2 void rows_f16_avx2(const KDProblem& P, int64_t r0, int64_t r1) { run_rows<_Float16, float>(P, r0, r1); }
FASTKD_AVX2 void rows_f64_avx2(const KDProblem& P, int64_t r0, int64_t r1) { run_rows<double, double>(P, r0, r1); }

bool have_avx2_fma() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#endif

RowsFn pick_rows(int dtype) {
#ifdef FASTKD_X86_DISPATCH
  if (have_avx2_fma()) {
    switch (dtype) {
      case kF32: return rows_f32_avx2;
      case kF64: return rows_f64_avx2;
      case kBF16: return rows_bf16_avx2;
      case kF16: return rows_f16_avx2;
      default: return nullptr;
    }
  }
#endif
  switch (dtype) {
    case kF32: return rows_f32;
    case kF64: return rows_f64;
    case kBF16: return rows_bf16;
    case kF16: return rows_f16;
    default: return nullptr;
  }
}

// Ask for transparent huge pages on a freshly allocated gradient buffer before its first touch:
// faulting in 262 MB (2048 × 32000 float32) as 4 KB pages costs more than writing it (77 ms vs
// 16 ms on 2 cores here); as 2 MB pages ~20 ms. A hint only: the contents are untouched.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (p == nullptr || bytes < 4 * kHuge) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// One thread's share of kd_exp_ns_cpu: sums exp over an L1-resident 8 KB buffer, kReps times, with
// eight independent accumulators (one would make the loop add-latency bound, not exp bound).
constexpr int kExpLen = 2048;
template <typename Acc>
FASTKD_INLINE float exp_loop(int reps) {
  using P = Pack<Acc>;
  using T = typename P::T;
  alignas(64) float buf[kExpLen];
  for (int i = 0; i < kExpLen; ++i) buf[i] = -float(i % 97) * 0.25f;
  T acc[8] = {};
  for (int r = 0; r < reps; ++r) {
    const T shift = P::set(float(r & 7));
    for (int i = 0; i < kExpLen; i += 8 * P::W)
      for (int u = 0; u < 8; ++u) acc[u] += P::exp(P::load(buf + i + u * P::W) - shift);
  }
  float sum = 0;
  for (int u = 0; u < 8; ++u) sum += P::sum(acc[u]);
  return sum;
}
float exp_loop_f32(int reps) { return exp_loop<float>(reps); }
#ifdef FASTKD_X86_DISPATCH
FASTKD_AVX2 float exp_loop_f32_avx2(int reps) { return exp_loop<float>(reps); }
#endif

size_t elem_size(int dtype) { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2; }

}  // namespace

double kd_exp_ns_cpu(int num_threads) {
  const int nt = num_threads > 0 ? num_threads : 1;
  float (*fn)(int) = exp_loop_f32;
#ifdef FASTKD_X86_DISPATCH
  if (have_avx2_fma()) fn = exp_loop_f32_avx2;
#endif
  constexpr int kReps = 4096;
  double best = 1e30;
  for (int trial = 0; trial < 3; ++trial) {
    const double t0 = omp_seconds();
    float sink = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) reduction(+ : sink)
#endif
    sink += fn(kReps);
    const double dt = omp_seconds() - t0;
    volatile float keep = sink;  // the sums are used: the loop is not optimised away
    (void)keep;
    const double ns = dt * 1e9 / (double(kExpLen) * kReps * nt);
    best = ns < best ? ns : best;
  }
  return best;
}

void kd_run_cpu(const KDProblem& P) {
  if (P.grad_z != nullptr && P.n > 0)
    advise_huge_pages(P.grad_z, size_t(P.n - 1) * size_t(P.stride_gz) * elem_size(P.dtype) +
                                    size_t(P.v) * elem_size(P.dtype));
  if (P.grad_t != nullptr && P.n > 0)
    advise_huge_pages(P.grad_t, size_t(P.n - 1) * size_t(P.stride_gt) * elem_size(P.dtype) +
                                    size_t(P.v) * elem_size(P.dtype));
  const RowsFn fn = pick_rows(P.dtype);
  if (fn == nullptr) return;
  const int64_t n = P.n;
  if (n <= 0) return;
  int nt = P.num_threads > 0 ? P.num_threads : 1;
  if (nt > n) nt = int(n);
#ifdef _OPENMP
  // Rows are handed out in small blocks on demand, so a thread slowed by another process on its
  // core holds up at most one block, not a fixed half of the call. Each row is computed by one
  // thread in a fixed order, so the results do not depend on the schedule.
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(16, n / (int64_t(nt) * 16)));
  const int64_t nblocks = (n + block - 1) / block;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t b = 0; b < nblocks; ++b) fn(P, b * block, std::min(n, (b + 1) * block));
#else
  fn(P, 0, n);
#endif
}

}  // namespace fastkd
