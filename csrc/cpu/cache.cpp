// Teacher-cache CPU kernels: one-pass capture of a sparse teacher and the fused sparse KD loss.
//
// capture (top-k): per row, the full-vocabulary log-sum-exp of t/τ (online max + rescaled sum) and
// the k largest entries (a size-k min-heap behind two filters: the 512-wide block max, then 32-wide
// group maxima) come out of ONE sweep over the teacher logits; the log-probabilities are the kept
// logits minus that lse.
// capture (sample): the same sweep gives lse; a second walk over the row (still in L2 for the row
// sizes of interest) follows the cumulative distribution in vocabulary order and assigns N sorted
// uniforms to ids (inverse CDF), giving unique ids ascending with their counts.
// sparse loss: per row, one sweep over the student gives the complement's log-sum-exp (stored ids
// masked to −inf), the stored ids' scaled logits, and the τ = 1 normaliser for the hard term; a
// second sweep writes the gradient. 1 − Q_I is exp(lse_complement − lse), never 1 − Σ q_I.
//
// Never materialised: softmax(t/τ), softmax(z/τ), any sort of a full row, any float32 upcast of a
// bf16/fp16 row. Preconditions: unit column stride, the divisor a host scalar, ids < v (a row
// with an id out of range or a repeated id gets a NaN loss and gradient, never an out-of-bounds
// read). Rows are split in static contiguous blocks over OpenMP threads. The hot loops are cloned
// for x86-64-v3 (AVX2 + FMA) and baseline x86-64; "arch=haswell" is not used because it also
// requires RDRND, which some virtual CPUs hide, silently leaving them on the baseline clone.
#include "cpu/cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FKC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FKC_CLONES
#endif
#define FKC_INLINE inline __attribute__((always_inline))

namespace fastkd {
namespace {

constexpr int kBlock = 512;  // elements per block: a few float buffers of 2 KB, resident in L1

struct half_bf16 {
  uint16_t bits;
};

FKC_INLINE float widen(float x) { return x; }
FKC_INLINE double widen(double x) { return x; }
FKC_INLINE float widen(half_bf16 x) {
  const uint32_t b = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
FKC_INLINE float widen(_Float16 x) { return float(x); }

FKC_INLINE void narrow(float* o, float x) { *o = x; }
FKC_INLINE void narrow(double* o, double x) { *o = x; }
FKC_INLINE void narrow(half_bf16* o, float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;  // nearest, ties to even
  o->bits = (x != x) ? uint16_t(0x7fc0) : uint16_t(rounded);
}
FKC_INLINE void narrow(_Float16* o, float x) { *o = _Float16(x); }

// exp for arguments <= 0 (the only ones the kernels form: x − running max), vectorisable:
// x = n·ln2 + r with a two-constant reduction, e^r by a degree-6 Taylor-like minimax polynomial
// (Cephes coefficients), 2^n assembled in the exponent bits. Below −87 the result flushes to 0.
FKC_INLINE float vexp(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5·2^23: x·log2e + magic holds round(x·log2e) in its mantissa
  const float shifted = xc * 1.44269504088896341f + magic;
  const float n = shifted - magic;
  int32_t ni;
  std::memcpy(&ni, &shifted, 4);
  ni -= 0x4B400000;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  float y = poly * r * r + r + 1.0f;
  const int32_t ebits = (ni + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &ebits, 4);
  y *= two_n;
  y = x < -87.0f ? 0.0f : y;
  return (x != x) ? x : y;
}
FKC_INLINE double vexp(double x) { return std::exp(x); }

template <typename Acc>
constexpr Acc ninf() {
  return -std::numeric_limits<Acc>::infinity();
}

// e^(m_old − m_new) for m_new >= m_old; 1 when both are still −inf (the sum is empty anyway).
template <typename Acc>
FKC_INLINE Acc rescale_factor(Acc m_old, Acc m_new) {
  return m_old == m_new ? Acc(1) : std::exp(m_old - m_new);
}

// Σ e^(x_i − m): the exponentials in a plain simd loop, then 8 independent partial sums (GCC turns
// the fixed 8-lane body into one vector add; an `omp simd reduction` here stayed scalar).
// out[i] = e^(x[i] − shift). The float version runs 8 lanes at a time through GCC vector types:
// plain loops calling vexp stayed scalar inside the target clones.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

FKC_INLINE v8f vexp8(v8f x) {
  const v8f zero = {};
  const v8f lo = zero - 87.0f;
  const v8f xc = x < lo ? lo : x;
  const v8f magic = zero + 12582912.0f;
  const v8f shifted = xc * 1.44269504088896341f + magic;
  const v8f n = shifted - magic;
  v8i ni;
  std::memcpy(&ni, &shifted, sizeof(ni));
  ni -= 0x4B400000;
  v8f r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  v8f poly = zero + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  v8f y = poly * r * r + r + 1.0f;
  const v8i ebits = (ni + 127) << 23;
  v8f two_n;
  std::memcpy(&two_n, &ebits, sizeof(two_n));
  y = y * two_n;
  y = x < lo ? zero : y;
  return x != x ? x : y;
}

FKC_INLINE void exp_block(const float* x, int n, float shift, float* out) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f v;
    std::memcpy(&v, x + i, sizeof(v));
    v = vexp8(v - shift);
    std::memcpy(out + i, &v, sizeof(v));
  }
  for (; i < n; ++i) out[i] = vexp(x[i] - shift);
}
FKC_INLINE void exp_block(const double* x, int n, double shift, double* out) {
  for (int i = 0; i < n; ++i) out[i] = std::exp(x[i] - shift);
}

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

template <typename Acc>
FKC_INLINE Acc lane_sum(const Acc* e, int n) {
  Acc lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lane[l] += e[i + l];
  for (int l = 0; i + l < n; ++l) lane[l] += e[i + l];
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

template <typename Acc>
FKC_INLINE Acc sum_exp_shifted(const Acc* x, int n, Acc m) {
  alignas(64) Acc e[kBlock];
  exp_block(x, n, m, e);
  return lane_sum(e, n);
}

// Online (max, Σ e^(x − max)) over blocks; `absorb` folds one block of already scaled values.
template <typename Acc>
struct OnlineLse {
  Acc m = ninf<Acc>();
  Acc d = Acc(0);

  FKC_INLINE void absorb(const Acc* x, int n, Acc block_max) {
    if (block_max > m) {
      d *= rescale_factor(m, block_max);
      m = block_max;
    }
    if (m == ninf<Acc>()) return;  // everything so far is −inf: no mass
    d += sum_exp_shifted(x, n, m);
  }
  FKC_INLINE Acc value() const { return m + std::log(d); }
};

template <typename In, typename Acc>
FKC_INLINE void load_scaled(const In* src, int n, Acc inv_t, Acc* out) {
#pragma omp simd
  for (int i = 0; i < n; ++i) out[i] = widen(src[i]) * inv_t;
}

template <typename Acc>
FKC_INLINE Acc block_max(const Acc* x, int n, int& nan_flag) {
  Acc mx = ninf<Acc>();
  int nanf = 0;
#pragma omp simd reduction(max : mx) reduction(| : nanf)
  for (int i = 0; i < n; ++i) {
    mx = x[i] > mx ? x[i] : mx;
    nanf |= int(x[i] != x[i]);
  }
  nan_flag |= nanf;
  return mx;
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

// ----------------------------------------------------------------------------------------------
// Sparse KD loss
// ----------------------------------------------------------------------------------------------
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

FKC_CLONES void topk_f32(const CaptureProblem& P, int64_t a, int64_t b) { topk_rows<float, float>(P, a, b); }
FKC_CLONES void topk_bf16(const CaptureProblem& P, int64_t a, int64_t b) { topk_rows<half_bf16, float>(P, a, b); }
FKC_CLONES void topk_f16(const CaptureProblem& P, int64_t a, int64_t b) { topk_rows<_Float16, float>(P, a, b); }
void topk_f64(const CaptureProblem& P, int64_t a, int64_t b) { topk_rows<double, double>(P, a, b); }

FKC_CLONES void sample_f32(const CaptureProblem& P, int64_t a, int64_t b) { sample_rows<float, float>(P, a, b); }
FKC_CLONES void sample_bf16(const CaptureProblem& P, int64_t a, int64_t b) { sample_rows<half_bf16, float>(P, a, b); }
FKC_CLONES void sample_f16(const CaptureProblem& P, int64_t a, int64_t b) { sample_rows<_Float16, float>(P, a, b); }
void sample_f64(const CaptureProblem& P, int64_t a, int64_t b) { sample_rows<double, double>(P, a, b); }

FKC_CLONES void sparse_f32(const SparseKDProblem& P, int64_t a, int64_t b) { sparse_rows<float, float>(P, a, b); }
FKC_CLONES void sparse_bf16(const SparseKDProblem& P, int64_t a, int64_t b) { sparse_rows<half_bf16, float>(P, a, b); }
FKC_CLONES void sparse_f16(const SparseKDProblem& P, int64_t a, int64_t b) { sparse_rows<_Float16, float>(P, a, b); }
void sparse_f64(const SparseKDProblem& P, int64_t a, int64_t b) { sparse_rows<double, double>(P, a, b); }

template <typename Problem>
void run_blocks(const Problem& P, void (*fn)(const Problem&, int64_t, int64_t)) {
  const int64_t n = P.n;
  if (n <= 0 || fn == nullptr) return;
  int nt = P.num_threads > 0 ? P.num_threads : 1;
  if (nt > n) nt = int(n);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    fn(P, n * tid / nth, n * (tid + 1) / nth);
  }
#else
  fn(P, 0, n);
#endif
}

template <typename Problem>
using RowsFn = void (*)(const Problem&, int64_t, int64_t);

template <typename Problem>
RowsFn<Problem> pick(int dtype, RowsFn<Problem> f32, RowsFn<Problem> f64, RowsFn<Problem> bf16,
                     RowsFn<Problem> f16) {
  switch (dtype) {
    case 0: return f32;
    case 1: return f64;
    case 2: return bf16;
    case 3: return f16;
    default: return nullptr;
  }
}

}  // namespace

void capture_topk_cpu(const CaptureProblem& P) {
  run_blocks<CaptureProblem>(P, pick<CaptureProblem>(P.dtype, topk_f32, topk_f64, topk_bf16, topk_f16));
}

void capture_sample_cpu(const CaptureProblem& P) {
  run_blocks<CaptureProblem>(P, pick<CaptureProblem>(P.dtype, sample_f32, sample_f64, sample_bf16, sample_f16));
}

void sparse_kd_cpu(const SparseKDProblem& P) {
  run_blocks<SparseKDProblem>(P, pick<SparseKDProblem>(P.dtype, sparse_f32, sparse_f64, sparse_bf16, sparse_f16));
}

}  // namespace fastkd
