// Teacher-cache CUDA kernels: one-pass capture of a sparse teacher (top-k or sampled) and the fused
// sparse KD loss, with the contract of csrc/cpu/cache.cpp (cpu/cache.h). One thread block per row.
//
// capture, top-k: the block streams its teacher row once with 16-byte loads. Each thread keeps an
// online (max, Σ exp) of s = t/τ for the full-vocabulary log-sum-exp. Elements above a block-wide
// threshold go to a candidate buffer as 64-bit keys (order-preserving value bits, then the
// complemented id, so a larger key means a larger value or, on a tie, a smaller id). When the buffer
// could overflow, a radix select (8-bit digits over the keys, warp-aggregated shared histograms)
// cuts it to exactly its k largest keys and raises the threshold to the k-th value. After the
// first tile only the few elements that beat the current k-th value get in, so the row is read at
// the speed of its load. A bitonic sort orders the final k (value descending, ties: smaller id).
// capture, sample: the streaming pass reduces each warp's 32-slot segment to its max and the sum of
// exp(s − max) in 40-bit fixed point (exact, so any summation order agrees); a block scan of the
// segment masses (float64) gives the CDF at segment boundaries, in vocabulary order. The sorted
// uniforms are located by binary search, only the segments holding a draw are read again, and a
// warp scan there assigns each draw to the smallest id whose cumulative mass exceeds it (inverse
// CDF). Unique ids ascending with counts, then −1/0 padding.
// sparse loss: the stored ids of the row go to a shared bitmap; pass 1 reads the student once for
// the complement's log-sum-exp (bitmap members masked), the τ = 1 normaliser and Σ z of the hard
// term; pass 2 walks the row backwards (its tail, read last, is still in L2), writes the complement
// gradient everywhere, and after a barrier the stored ids' entries are overwritten with their own
// formula. 1 − Q_I is exp(lse_complement − lse), never 1 − Σ q_I.
//
// Never materialised: softmax(t/τ), softmax(z/τ), a sort or CDF of a full row, a float32 copy of a
// bf16/fp16 row. Memory traffic per row of V logits of b bytes: top-k capture reads V·b once and
// writes k·12 + 4 bytes, so its goal is the time of one read of the teacher; sampled capture adds
// the re-read of the segments holding a draw (32·16 bytes each, at most num_samples of them) and the
// uniforms; the sparse loss reads V·b twice and writes V·b once (plus k scattered corrections):
// 3 row transfers against the dense kd loss's 5.
//
// Preconditions: unit column stride; 16-byte loads only when every row start is 16-byte aligned
// (otherwise scalar loads of the same slots); 64-bit offsets; ids < 2^31; float32, bf16 or fp16
// inputs with float32 accumulation (the sampling CDF in fixed point and float64); the divisor a
// device float32.
// No float atomics and fixed reduction trees: results are bitwise reproducible. Per-row scratch
// lives in dynamic shared memory, or in a caller-allocated global workspace when it does not fit
// (huge k, num_samples or V; the grid then has one private scratch per resident block).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/kd.h"
#include "cuda/cache.h"
#include "cuda/common.cuh"

namespace fastkd {
namespace {

using cuda_common::from_f;
using cuda_common::kFull;
using cuda_common::to_f;
using cuda_common::VecOf;

typedef unsigned long long u64;

constexpr int kCapThreads = 256;     // capture: the candidate buffer grows with the tile (threads · slot)
constexpr int kSparseThreads = 512;  // as the dense kd kernel
constexpr int64_t kSmemCap = 96 * 1024;        // more dynamic shared memory per block costs occupancy
constexpr int64_t kStaticSmemReserve = 4096;   // the kernels' own __shared__ variables
constexpr int64_t kMaxGrid = int64_t(1) << 30;


__device__ __forceinline__ float ninf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float qnan() { return __int_as_float(0x7fc00000); }

// ------------------------------------------------------------------------------------------------
// Row slots: slot s holds elements [s·N, s·N + N) of a row, N = 16 bytes / element. Every kernel
// indexes rows this way, with one 16-byte load per slot when rows are aligned and N scalar loads
// otherwise; elements past the row read as −inf. Returns how many elements of the slot are in the row.
// ------------------------------------------------------------------------------------------------
template <typename T, bool kStreaming>
__device__ __forceinline__ int load_slot(const T* row, int64_t slot, int64_t v, bool vec_ok,
                                         float (&x)[VecOf<T>::N]) {
  constexpr int N = VecOf<T>::N;
  const int64_t j0 = slot * N, left = v - j0;
  const int nv = left >= N ? N : (left > 0 ? int(left) : 0);
  if (vec_ok && nv == N) {
    const uint4* src = reinterpret_cast<const uint4*>(row + j0);
    // read-once rows are marked evict-first; a row read again later is kept in L2
    const uint4 raw = kStreaming ? __ldcs(src) : __ldg(src);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = to_f(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = i < nv ? to_f(row[j0 + i]) : ninf();
  }
  return nv;
}

template <typename T>
__device__ __forceinline__ void store_slot(T* row, int64_t slot, int nv, bool vec_ok, const float (&g)[VecOf<T>::N]) {
  constexpr int N = VecOf<T>::N;
  const int64_t j0 = slot * N;
  if (vec_ok && nv == N) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = from_f<T>(g[i]);
    __stcs(reinterpret_cast<uint4*>(row + j0), raw);  // the gradient is not read again here
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < nv) row[j0 + i] = from_f<T>(g[i]);
  }
}

// ------------------------------------------------------------------------------------------------
// Online log-sum-exp. The max starts at −FLT_MAX, not −inf: exp(m_old − m_new) stays 1 while a row
// is still all −inf and an entry of −inf adds exp(−inf) = 0, so the hot loop has no special case.
// An all −inf row ends with d = 0 and value −inf, as on the CPU.
// ------------------------------------------------------------------------------------------------
struct Lse {
  float m, d;
};

__device__ __forceinline__ Lse lse_empty() { return Lse{-FLT_MAX, 0.f}; }

template <int N>
__device__ __forceinline__ void lse_add(Lse& s, const float (&x)[N]) {
  float mx = s.m;
#pragma unroll
  for (int i = 0; i < N; ++i) mx = fmaxf(mx, x[i]);  // drops NaN; the NaN still reaches d via exp
  s.d *= __expf(s.m - mx);
  s.m = mx;
#pragma unroll
  for (int i = 0; i < N; ++i) s.d += __expf(x[i] - mx);
}

__device__ __forceinline__ void lse_merge(Lse& a, const Lse& b) {
  const float m = fmaxf(a.m, b.m);
  a.d = a.d * __expf(a.m - m) + b.d * __expf(b.m - m);
  a.m = m;
}

__device__ __forceinline__ float lse_value(const Lse& s) { return s.m + __logf(s.d); }

// ------------------------------------------------------------------------------------------------
// Block reductions and scans: a fixed shuffle tree per warp, then warp 0 over the warps' results.
// The order never depends on timing. Every helper ends with a barrier, so its buffer is free again.
// ------------------------------------------------------------------------------------------------
struct MaxF {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MaxI {
  __device__ __forceinline__ int operator()(int a, int b) const { return a > b ? a : b; }
};
template <typename V>
struct Add {
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};

template <typename V, typename Op>
__device__ __forceinline__ V warp_allreduce(V v, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

// `buf`: 33 entries.
template <typename V, typename Op>
__device__ V block_allreduce(V v, V identity, V* buf, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_allreduce(v, op);
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V r = lane < nwarps ? buf[lane] : identity;
    r = warp_allreduce(r, op);
    if (lane == 0) buf[32] = r;
  }
  __syncthreads();
  const V out = buf[32];
  __syncthreads();
  return out;
}

__device__ __forceinline__ Lse warp_lse(Lse s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Lse o;
    o.m = __shfl_xor_sync(kFull, s.m, off);
    o.d = __shfl_xor_sync(kFull, s.d, off);
    lse_merge(s, o);
  }
  return s;
}

// `buf`: 33 entries.
__device__ Lse block_lse(Lse s, Lse* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  s = warp_lse(s);
  if (lane == 0) buf[warp] = s;
  __syncthreads();
  if (warp == 0) {
    Lse r = lane < nwarps ? buf[lane] : lse_empty();
    r = warp_lse(r);
    if (lane == 0) buf[32] = r;
  }
  __syncthreads();
  const Lse out = buf[32];
  __syncthreads();
  return out;
}

template <typename V>
__device__ __forceinline__ V warp_inclusive_scan(V v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const V o = __shfl_up_sync(kFull, v, off);
    if (lane >= off) v += o;
  }
  return v;
}

// Exclusive prefix of v over the block's threads in thread order, and the block total. `buf`: 66.
template <typename V>
__device__ V block_exclusive_scan(V v, V* buf, V& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const V incl = warp_inclusive_scan(v);
  V excl = __shfl_up_sync(kFull, incl, 1);
  if (lane == 0) excl = V(0);
  if (lane == 31) buf[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const V w = lane < nwarps ? buf[lane] : V(0);
    const V wi = warp_inclusive_scan(w);
    V we = __shfl_up_sync(kFull, wi, 1);
    if (lane == 0) we = V(0);
    buf[33 + lane] = we;
    if (lane == 31) buf[65] = wi;
  }
  __syncthreads();
  const V out = buf[33 + warp] + excl;
  total = buf[65];
  __syncthreads();
  return out;
}

// Bitonic sort of a[0, n), n a power of two, by the block: descending (top-k keys) or ascending.
template <typename V, bool kDescending>
__device__ void bitonic_sort(V* a, unsigned n) {
  for (unsigned size = 2; size <= n; size <<= 1) {
    for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
      for (unsigned i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const unsigned lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool first_half_desc = ((lo & size) == 0) == kDescending;
        const V x = a[lo], y = a[hi];
        if (first_half_desc ? x < y : y < x) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      __syncthreads();
    }
  }
}

// ================================================================================================
// capture, top-k
// ================================================================================================
// Order-preserving code of a float (larger code = larger value); −0 is folded onto +0 first, since
// the kernels' order compares values as floats (a tie goes to the smaller id, as on the CPU).
__device__ __forceinline__ unsigned enc_f(float v) {
  const unsigned u = __float_as_uint(__fadd_rn(v, 0.f));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float dec_f(unsigned o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
__device__ __forceinline__ u64 topk_key(float v, int64_t id) {
  return (u64(enc_f(v)) << 32) | u64(0xffffffffu - unsigned(id));
}

struct TopkShared {
  unsigned count;     // entries in the candidate buffer
  int admit_all;      // fewer than k entries known yet: every element is a candidate
  float thr;          // otherwise: elements above this value are
  unsigned bin, above, cnt;  // one radix-select step: the digit holding the k-th key
  unsigned holes, movers;    // compaction tickets
};

struct TopkLayout {
  unsigned char* ws;  // global scratch, ws_stride bytes per block; null: dynamic shared memory
  int64_t ws_stride;
  int64_t cap;        // candidate buffer entries: max(k + 2 tiles, p2)
  int64_t p2;         // the power of two >= k that the final sort runs on
  float inv_t;
  bool vec_ok;
};

// Cuts the n unique keys of buf to their k largest, moved into buf[0, k) (n > k). The radix select
// fixes one 8-bit digit per step among the keys that share the digits fixed so far, and stops as
// soon as the digit's bin completes the k: the cut is then that prefix (lower bits zero), and
// exactly k keys are >= it. Returns the cut.
__device__ u64 topk_compact(u64* buf, int* holes, unsigned* hist, TopkShared& st, unsigned n, unsigned k) {
  const unsigned tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5;
  u64 prefix = 0, mask = 0;
  unsigned need = k;
  for (int shift = 56;; shift -= 8) {
    for (unsigned i = tid; i < 256; i += nthreads) hist[i] = 0;
    __syncthreads();
    for (unsigned base = 0; base < n; base += nthreads) {  // same trip count in every lane
      const unsigned i = base + tid;
      unsigned digit = 0xffffffffu;
      if (i < n) {
        const u64 key = buf[i];
        if ((key & mask) == prefix) digit = unsigned(key >> shift) & 255u;
      }
      // logits crowd into few exponent bins: one atomic per group of equal digits, not per lane
      const unsigned peers = __match_any_sync(kFull, digit);
      if (digit != 0xffffffffu && lane == unsigned(__ffs(int(peers)) - 1))
        atomicAdd(&hist[digit], unsigned(__popc(peers)));
    }
    __syncthreads();
    if (warp == 0) {
      // lane l holds bins 255 − 8l ... 248 − 8l: a scan over lanes walks the bins from the top
      unsigned c[8], s = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[j] = hist[255 - 8 * lane - j];
        s += c[j];
      }
      const unsigned incl = warp_inclusive_scan(s);
      unsigned acc = incl - s;
      if (acc < need && need <= incl) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (acc + c[j] >= need) {
            st.bin = 255 - 8 * lane - j;
            st.above = acc;
            st.cnt = c[j];
            break;
          }
          acc += c[j];
        }
      }
    }
    __syncthreads();
    const unsigned bin = st.bin, above = st.above, cnt = st.cnt;
    prefix |= u64(bin) << shift;
    if (above + cnt == need || shift == 0) break;  // keys are unique: shift 0 always completes
    need -= above;
    mask |= u64(0xff) << shift;
  }
  const u64 cut = prefix;
  // Keys below the cut leave holes in [0, k); kept keys from [k, n) fill them (as many of each).
  if (tid == 0) {
    st.holes = 0;
    st.movers = 0;
  }
  __syncthreads();
  for (unsigned i = tid; i < k; i += nthreads)
    if (buf[i] < cut) holes[atomicAdd(&st.holes, 1u)] = int(i);
  __syncthreads();
  for (unsigned i = k + tid; i < n; i += nthreads) {
    const u64 key = buf[i];
    if (key >= cut) buf[holes[atomicAdd(&st.movers, 1u)]] = key;
  }
  __syncthreads();
  return cut;
}

// The filter value after a cut: its value bits (a lower bound of the k-th value when the cut
// stopped above bit 32). A later element equal to it has a larger id than every kept one, so it
// loses the tie: strict > is exact.
__device__ __forceinline__ float topk_threshold(u64 cut) {
  unsigned o = unsigned(cut >> 32);
  const unsigned lo = 0x007fffffu;  // enc_f(−inf): lower codes would decode to NaN
  return dec_f(o < lo ? lo : o);
}

template <typename T>
__global__ void __launch_bounds__(kCapThreads, 4) topk_kernel(CaptureProblem P, TopkLayout L) {
  constexpr int N = VecOf<T>::N;
  extern __shared__ __align__(16) unsigned char fkc_smem[];
  __shared__ TopkShared st;
  __shared__ unsigned hist[256];
  __shared__ Lse lbuf[33];

  unsigned char* scratch = L.ws != nullptr ? L.ws + int64_t(blockIdx.x) * L.ws_stride : fkc_smem;
  u64* buf = reinterpret_cast<u64*>(scratch);
  int* holes = reinterpret_cast<int*>(buf + L.cap);
  const unsigned tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31;
  const int64_t v = P.v, nslots = (v + N - 1) / N;
  const unsigned k = unsigned(P.k), tile = nthreads * N;
  float* values = static_cast<float*>(P.values);

  for (int64_t r = blockIdx.x; r < P.n; r += gridDim.x) {
    const T* row = static_cast<const T*>(P.t) + r * P.stride_t;
    if (tid == 0) {
      st.count = 0;
      st.admit_all = 1;
      st.thr = ninf();
    }
    __syncthreads();
    Lse ls = lse_empty();
    int nan = 0;
    for (int64_t base = 0; base < nslots; base += nthreads) {  // same trip count in every lane
      const int64_t slot = base + tid;
      float x[N];
      const int nv = load_slot<T, true>(row, slot, v, L.vec_ok, x);
      const bool admit_all = st.admit_all != 0;
      const float thr = st.thr;
      unsigned want = 0;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        x[i] = x[i] * L.inv_t;
        if (x[i] != x[i]) {  // flagged (the row's lse becomes NaN), then ranked as −inf
          nan = 1;
          x[i] = ninf();
        }
        if (i < nv && (admit_all || x[i] > thr)) want |= 1u << i;
      }
      lse_add(ls, x);
      const int c = __popc(want);
      if (__any_sync(kFull, c != 0)) {  // one atomic per warp for its candidates
        const int incl = warp_inclusive_scan(c);
        unsigned at = 0;
        if (lane == 31) at = atomicAdd(&st.count, unsigned(incl));
        at = __shfl_sync(kFull, at, 31) + unsigned(incl - c);
#pragma unroll
        for (int i = 0; i < N; ++i)
          if ((want >> i) & 1u) buf[at++] = topk_key(x[i], slot * N + i);
      }
      __syncthreads();
      const unsigned count = st.count;
      const bool cut_now = st.admit_all ? count > k : int64_t(count) > L.cap - int64_t(tile);
      __syncthreads();  // every thread has read count before the next tile changes it
      if (cut_now) {
        const u64 cut = topk_compact(buf, holes, hist, st, count, k);
        if (tid == 0) {
          st.count = k;
          st.admit_all = 0;
          st.thr = topk_threshold(cut);
        }
        __syncthreads();
      }
    }
    const unsigned count = st.count;  // >= k: V >= k and every element was a candidate until k
    if (count > k) topk_compact(buf, holes, hist, st, count, k);
    for (int64_t i = int64_t(k) + tid; i < L.p2; i += nthreads) buf[i] = 0;  // below every key
    __syncthreads();
    bitonic_sort<u64, true>(buf, unsigned(L.p2));
    const Lse total = block_lse(ls, lbuf);
    const int any_nan = __syncthreads_or(nan);
    const float row_lse = any_nan ? qnan() : lse_value(total);
    for (unsigned i = tid; i < k; i += nthreads) {
      const u64 key = buf[i];
      P.ids[r * P.k + i] = int64_t(0xffffffffu - unsigned(key & 0xffffffffu));
      values[r * P.k + i] = dec_f(unsigned(key >> 32)) - row_lse;
    }
    if (tid == 0) static_cast<float*>(P.lse)[r] = row_lse;
    __syncthreads();  // the buffer and the shared state are reused by the next row
  }
}

// ================================================================================================
// capture, sample
// ================================================================================================
struct SampleLayout {
  unsigned char* ws;  // global scratch, ws_stride bytes per block; null: dynamic shared memory
  int64_t ws_stride;
  int64_t nseg;       // warp segments per row: ceil(slots / 32)
  int64_t p2;         // the power of two >= num_samples that the uniforms' sort runs on
  int64_t off_sc, off_x, off_seg, off_did, off_work;  // byte offsets of the scratch arrays
  float inv_t;
  bool vec_ok;
};

// A segment's masses e_i = exp(s_i − max) (max over the warp's segment) in 40-bit fixed point,
// rounded up so that every element with mass keeps some. Integer sums do not depend on their order:
// the streaming pass (a reduction) and the re-scan of a segment (a scan) agree bitwise on every
// partial mass, so the bounds that located a draw are the ones it is walked through, and the
// intervals of neighbouring lanes meet exactly. 2^40 per unit of the segment max keeps 256·2^40
// below 2^53 (exact in double) and costs ~1e-12 relative to the segment's mass.
constexpr float kFixUnit = 1099511627776.0f;  // 2^40

template <int N>
__device__ __forceinline__ float segment_masses(const float (&s)[N], u64 (&e)[N], u64& lane_sum) {
  float mw = s[0];
#pragma unroll
  for (int i = 1; i < N; ++i) mw = fmaxf(mw, s[i]);
  mw = warp_allreduce(mw, MaxF());
  lane_sum = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    // accurate expf: the CDF decides which id a uniform lands on
    const float ef = mw == ninf() ? 0.f : expf(__fsub_rn(s[i], mw));
    e[i] = __float2ull_ru(ef * kFixUnit);
    lane_sum += e[i];
  }
  return mw;
}

// Fixed-point units of a segment with max mw -> units of e^m (m the row max).
__device__ __forceinline__ double segment_scale(float mw, float m) {
  return exp(double(mw) - double(m)) * (1.0 / 1099511627776.0);
}

__device__ __forceinline__ int lower_bound(const double* a, int lo, int hi, double x) {
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] < x)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kCapThreads, 2) sample_kernel(CaptureProblem P, SampleLayout L) {
  constexpr int N = VecOf<T>::N;
  extern __shared__ __align__(16) unsigned char fkc_smem[];
  __shared__ float fbuf[33];
  __shared__ int ibuf[66];
  __shared__ double dbuf[66];
  __shared__ unsigned nwork;

  unsigned char* scratch = L.ws != nullptr ? L.ws + int64_t(blockIdx.x) * L.ws_stride : fkc_smem;
  float* seg_max = reinterpret_cast<float*>(scratch);
  double* sc = reinterpret_cast<double*>(scratch + L.off_sc);  // masses, then the CDF at segment starts
  double* x = reinterpret_cast<double*>(scratch + L.off_x);    // sorted draws, u · total
  int* seg = reinterpret_cast<int*>(scratch + L.off_seg);      // segment of each draw; later run starts
  int* did = reinterpret_cast<int*>(scratch + L.off_did);      // id of each draw
  int* work = reinterpret_cast<int*>(scratch + L.off_work);    // first draw of each segment with draws

  const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  const int64_t v = P.v, nslots = (v + N - 1) / N;
  const int nseg = int(L.nseg), ns = int(P.num_samples), width = int(P.width);

  for (int64_t r = blockIdx.x; r < P.n; r += gridDim.x) {
    const T* row = static_cast<const T*>(P.t) + r * P.stride_t;
    int64_t* out_ids = P.ids + r * width;
    int32_t* out_counts = P.counts + r * width;

    // ---- pass 1: per-segment max and mass ----
    int nan = 0;
    for (int64_t base = 0; base < nslots; base += nthreads) {  // same trip count in every lane
      const int64_t slot = base + tid;
      float s[N];
      u64 e[N];
      load_slot<T, true>(row, slot, v, L.vec_ok, s);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        s[i] = __fmul_rn(s[i], L.inv_t);
        nan |= s[i] != s[i];
      }
      u64 lane_sum;
      const float mw = segment_masses(s, e, lane_sum);
      const u64 seg_sum = warp_allreduce(lane_sum, Add<u64>());
      const int64_t sg = slot >> 5;  // the same for the whole warp
      if (lane == 0 && sg < nseg) {
        seg_max[sg] = mw;
        sc[sg] = double(seg_sum);  // exact: < 2^53
      }
    }
    nan = __syncthreads_or(nan);
    float m = ninf();
    for (int s = tid; s < nseg; s += nthreads) m = fmaxf(m, seg_max[s]);
    m = block_allreduce(m, ninf(), fbuf, MaxF());
    if (nan || m == ninf()) {  // as the CPU: every draw on id V − 1
      for (int q = tid; q < width; q += nthreads) {
        out_ids[q] = q == 0 ? v - 1 : -1;
        out_counts[q] = q == 0 ? ns : 0;
      }
      if (tid == 0) static_cast<float*>(P.lse)[r] = nan ? qnan() : ninf();
      continue;
    }

    // ---- CDF at segment starts: masses in units of e^m, exclusive block scan in double ----
    const int per = (nseg + nthreads - 1) / nthreads, s0 = tid * per, s1 = min(nseg, s0 + per);
    double local = 0.0;
    int last = -1;
    for (int s = s0; s < s1; ++s) {
      const double mass = sc[s] * segment_scale(seg_max[s], m);
      sc[s] = mass;
      local += mass;
      if (mass > 0.0) last = s;
    }
    double total;
    double run = block_exclusive_scan(local, dbuf, total);
    for (int s = s0; s < s1; ++s) {
      const double mass = sc[s];
      sc[s] = run;
      run += mass;
    }
    const int s_last = block_allreduce(last, -1, ibuf, MaxI());  // draws past the end go here
    if (tid == 0) sc[nseg] = total;
    const float row_lse = float(double(m) + log(total));

    // ---- the draws: sort the uniforms, locate each one's segment ----
    const double* u = P.u + r * ns;
    for (int64_t j = tid; j < L.p2; j += nthreads) x[j] = j < ns ? u[j] : 2.0;
    __syncthreads();
    bitonic_sort<double, false>(x, unsigned(L.p2));
    for (int j = tid; j < ns; j += nthreads) {
      const double xj = x[j] * total;
      x[j] = xj;
      // the first segment whose end exceeds xj
      int lo = 0, hi = nseg;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (sc[mid + 1] > xj)
          hi = mid;
        else
          lo = mid + 1;
      }
      seg[j] = lo < s_last ? lo : s_last;
    }
    if (tid == 0) nwork = 0;
    __syncthreads();
    for (int j = tid; j < ns; j += nthreads)
      if (j == 0 || seg[j] != seg[j - 1]) work[atomicAdd(&nwork, 1u)] = j;
    __syncthreads();

    // ---- re-scan only the segments holding draws: one warp per segment ----
    const int nw = int(nwork);
    for (int w = warp; w < nw; w += nwarps) {  // the same for the whole warp
      const int j0 = work[w], sg = seg[j0];
      int j1 = j0 + 1;
      while (j1 < ns && seg[j1] == sg) ++j1;
      const int64_t slot = int64_t(sg) * 32 + lane;
      float s[N];
      u64 e[N], lane_sum;
      load_slot<T, false>(row, slot, v, L.vec_ok, s);
#pragma unroll
      for (int i = 0; i < N; ++i) s[i] = __fmul_rn(s[i], L.inv_t);
      const float mw = segment_masses(s, e, lane_sum);
      const u64 excl = warp_inclusive_scan(lane_sum) - lane_sum;
      const double scale = segment_scale(mw, m), c0 = sc[sg];
      // element i owns [c0 + scale·P_{i−1}, c0 + scale·P_i), P the exact fixed-point prefix: the
      // lanes' intervals tile the segment, and an element without mass owns none
      int p = lower_bound(x, j0, j1, c0 + scale * double(excl));
      u64 acc = excl;
      int last_id = -1;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        acc += e[i];
        if (e[i] == 0) continue;
        const double hi_bound = c0 + scale * double(acc);
        const int id = int(slot * N + i);
        while (p < j1 && x[p] < hi_bound) did[p++] = id;
        last_id = id;
      }
      // draws at or past the segment's last bound (rounding): the last id with mass, as the CPU
      const int p_end = __shfl_sync(kFull, p, 31);
      last_id = warp_allreduce(last_id, MaxI());
      for (int q = p_end + lane; q < j1; q += 32) did[q] = last_id;
    }
    __syncthreads();

    // ---- unique ids (runs of equal ids in the sorted draws) and their counts ----
    const int dper = (ns + nthreads - 1) / nthreads, d0 = min(ns, tid * dper), d1 = min(ns, d0 + dper);
    int starts = 0;
    for (int j = d0; j < d1; ++j) starts += (j == 0 || did[j] != did[j - 1]);
    int nunique;
    int at = block_exclusive_scan(starts, ibuf, nunique);
    for (int j = d0; j < d1; ++j)
      if (j == 0 || did[j] != did[j - 1]) seg[at++] = j;
    __syncthreads();
    for (int q = tid; q < width; q += nthreads) {
      int64_t id = -1;
      int c = 0;
      if (q < nunique) {
        const int j = seg[q], jn = q + 1 < nunique ? seg[q + 1] : ns;
        id = did[j];
        c = jn - j;
      }
      out_ids[q] = id;
      out_counts[q] = c;
    }
    if (tid == 0) static_cast<float*>(P.lse)[r] = row_lse;
    __syncthreads();  // the scratch is reused by the next row
  }
}

// ================================================================================================
// sparse KD loss
// ================================================================================================
struct SparseLayout {
  unsigned char* ws;  // global scratch, ws_stride bytes per block; null: dynamic shared memory
  int64_t ws_stride;
  int64_t nwords;     // bitmap words: ceil(v / 32)
  int64_t off_eid, off_ew, off_es;  // byte offsets of the per-entry arrays (k each)
  bool vec_ok;
};

struct SparseConsts {
  float inv_t, soft_scale, hard, eps, eps_v;
  bool tau_one, use_hard, need_m1, need_sum;
  int tail;
};

template <typename T>
__device__ void fill_row(T* row, int64_t nslots, int64_t v, bool vec_ok, float value) {
  constexpr int N = VecOf<T>::N;
  float g[N];
#pragma unroll
  for (int i = 0; i < N; ++i) g[i] = value;
  for (int64_t slot = threadIdx.x; slot < nslots; slot += blockDim.x) {
    const int64_t left = v - slot * N;
    store_slot<T>(row, slot, left >= N ? N : int(left), vec_ok, g);
  }
}

template <typename T>
__global__ void __launch_bounds__(kSparseThreads, 2) sparse_kernel(SparseKDProblem P, SparseLayout L, SparseConsts c) {
  constexpr int N = VecOf<T>::N;
  extern __shared__ __align__(16) unsigned char fkc_smem[];
  __shared__ Lse lbuf[33];
  __shared__ float fbuf[33];
  __shared__ double dbuf[33];
  __shared__ int ibuf[33];

  unsigned char* scratch = L.ws != nullptr ? L.ws + int64_t(blockIdx.x) * L.ws_stride : fkc_smem;
  unsigned* bits = reinterpret_cast<unsigned*>(scratch);  // stored ids of the current row
  int* eid = reinterpret_cast<int*>(scratch + L.off_eid);   // entry's id, −1: padding or rejected
  float* ew = reinterpret_cast<float*>(scratch + L.off_ew); // entry's teacher probability
  float* es = reinterpret_cast<float*>(scratch + L.off_es); // student's z/τ at the entry's id

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t v = P.v, K = P.k, nslots = (v + N - 1) / N;
  const float inv_t = c.inv_t;
  const float inv_div = 1.f / *static_cast<const float*>(P.divisor);
  for (int64_t w = tid; w < L.nwords; w += nthreads) bits[w] = 0u;
  __syncthreads();

  for (int64_t r = blockIdx.x; r < P.n; r += gridDim.x) {
    const T* z = static_cast<const T*>(P.z) + r * P.stride_z;
    T* g = static_cast<T*>(P.grad) + r * P.stride_g;
    float* loss = static_cast<float*>(P.loss) + r;
    int64_t y = -1;
    bool bad = false;
    if (P.target != nullptr) {
      y = P.target[r];
      if (y == P.ignore_index) {  // contributes nothing, not even NaN
        fill_row(g, nslots, v, L.vec_ok, 0.f);
        if (tid == 0) *loss = 0.f;
        continue;
      }
      bad = y < 0 || y >= v;
    }

    // ---- the stored entries: bitmap, teacher weights, student logits at the ids ----
    const int64_t* rid = P.ids + r * K;
    const float* rw = static_cast<const float*>(P.w) + r * K;
    int bad_l = 0, nan = 0, nvalid = 0;
    float m_in = ninf();
    double p_sum = 0.0;
    for (int64_t i = tid; i < K; i += nthreads) {
      const int64_t id = rid[i];
      int e = -1;
      if (id >= 0) {
        const float wv = rw[i];
        p_sum += double(wv);
        if (id >= v) {
          bad_l = 1;  // never read out of bounds: the row becomes NaN
        } else {
          const unsigned bit = 1u << unsigned(id & 31);
          if (atomicOr(&bits[id >> 5], bit) & bit) {
            bad_l = 1;  // a repeated id
          } else {
            const float sv = to_f(z[id]) * inv_t;
            e = int(id);
            ew[i] = wv;
            es[i] = sv;
            m_in = fmaxf(m_in, sv);
            nan |= sv != sv;
            ++nvalid;
          }
        }
      }
      eid[i] = e;
    }
    bad = __syncthreads_or(bad_l) || bad;  // also publishes the bitmap to pass 1
    m_in = block_allreduce(m_in, ninf(), fbuf, MaxF());
    p_sum = block_allreduce(p_sum, 0.0, dbuf, Add<double>());
    nvalid = block_allreduce(nvalid, 0, ibuf, Add<int>());
    if (bad) {
      if (tid == 0) *loss = qnan();
      fill_row(g, nslots, v, L.vec_ok, qnan());
      for (int64_t i = tid; i < K; i += nthreads)
        if (eid[i] >= 0) bits[eid[i] >> 5] = 0u;
      __syncthreads();
      continue;
    }

    // ---- pass 1: complement lse of z/τ (stored ids masked), τ = 1 lse, Σ z ----
    Lse comp = lse_empty(), one = lse_empty();
    float sum_z = 0.f;
    for (int64_t slot = tid; slot < nslots; slot += nthreads) {
      float zr[N], sr[N];
      const int nv = load_slot<T, false>(z, slot, v, L.vec_ok, zr);
      const int64_t j0 = slot * N;
      const unsigned in_set = bits[j0 >> 5] >> unsigned(j0 & 31);  // N divides 32: one word per slot
#pragma unroll
      for (int i = 0; i < N; ++i) {
        sr[i] = ((in_set >> i) & 1u) ? ninf() : zr[i] * inv_t;
        nan |= zr[i] != zr[i];
      }
      lse_add(comp, sr);
      if (c.need_m1) lse_add(one, zr);
      if (c.need_sum) {
#pragma unroll
        for (int i = 0; i < N; ++i)
          if (i < nv) sum_z += zr[i];
      }
    }
    comp = block_lse(comp, lbuf);
    if (c.need_m1) one = block_lse(one, lbuf);
    if (c.need_sum) sum_z = block_allreduce(sum_z, 0.f, fbuf, Add<float>());
    nan = __syncthreads_or(nan);

    float d_in = 0.f;
    if (m_in > ninf())
      for (int64_t i = tid; i < K; i += nthreads)
        if (eid[i] >= 0) d_in += expf(es[i] - m_in);
    d_in = block_allreduce(d_in, 0.f, fbuf, Add<float>());
    const float lse_in = m_in + logf(d_in);  // −inf when no stored id
    const float lse_c = lse_value(comp);
    const float hi = fmaxf(lse_in, lse_c), lo = fminf(lse_in, lse_c);
    const float lse_z = hi == ninf() ? hi : hi + log1pf(expf(lo - hi));
    const bool has_comp = int64_t(nvalid) < v;

    // ---- teacher weights, tail factor, loss ----
    const float wscale = c.tail == kTailRenorm ? 1.f / float(p_sum) : 1.f;
    float soft = 0.f;
    for (int64_t i = tid; i < K; i += nthreads) {
      if (eid[i] < 0) continue;
      const float wv = ew[i] * wscale;
      if (wv > 0.f) soft += wv * (logf(wv) - (es[i] - lse_z));
    }
    soft = block_allreduce(soft, 0.f, fbuf, Add<float>());
    float c_tail = 1.f;
    if (c.tail == kTailBucket && has_comp) {
      const float tail_p = float(fmax(0.0, 1.0 - p_sum));
      const float log_tail_q = lse_c - lse_z;
      if (tail_p > 0.f) {
        soft += tail_p * (logf(tail_p) - log_tail_q);
        c_tail = 1.f - expf(logf(tail_p) - log_tail_q);
      }
    }
    const float lse_1 = c.tau_one ? lse_z : lse_value(one);
    float ce = 0.f;
    if (c.use_hard) {
      ce = (1.f - c.eps) * (lse_1 - to_f(z[y]));
      if (c.eps > 0.f) ce += c.eps * (lse_1 - sum_z / float(v));
    }
    if (tid == 0) {
      float row = c.soft_scale * soft + (c.use_hard ? c.hard * ce : 0.f);
      if (nan) row = qnan();
      *loss = row * inv_div;
    }

    // ---- pass 2: the complement formula everywhere, walking the row backwards ----
    const float gs = c.soft_scale * inv_t * inv_div, gc = gs * c_tail;
    const float gh = c.use_hard ? c.hard * inv_div : 0.f;
    for (int64_t slot = nslots - 1 - tid; slot >= 0; slot -= nthreads) {
      float zr[N], gr[N];
      const int nv = load_slot<T, true>(z, slot, v, L.vec_ok, zr);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float q = __expf(zr[i] * inv_t - lse_z);
        float gi = gc * q;
        if (c.use_hard) {
          const float q1 = c.tau_one ? q : __expf(zr[i] - lse_1);
          gi += gh * (q1 - c.eps_v);
          if (slot * N + i == y) gi -= gh * (1.f - c.eps);
        }
        gr[i] = gi;
      }
      store_slot<T>(g, slot, nv, L.vec_ok, gr);
    }
    __syncthreads();  // the stored ids' entries below overwrite pass 2's

    // ---- the stored ids: (q − w)/τ instead of the complement formula; clear the bitmap ----
    for (int64_t i = tid; i < K; i += nthreads) {
      const int id = eid[i];
      if (id < 0) continue;
      const float q = __expf(es[i] - lse_z);
      float gi = gs * (q - ew[i] * wscale);
      if (c.use_hard) {
        const float q1 = c.tau_one ? q : __expf(to_f(z[id]) - lse_1);
        gi += gh * (q1 - c.eps_v);
        if (id == y) gi -= gh * (1.f - c.eps);
      }
      g[id] = from_f<T>(gi);
      bits[id >> 5] = 0u;
    }
    __syncthreads();
  }
}

// ================================================================================================
// Host side
// ================================================================================================
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastkd CUDA: ") + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the launch and restores the caller's device, also on a throw.
struct DeviceScope {
  int previous = -1, device;
  explicit DeviceScope(int d) : device(d) {
    check(cudaGetDevice(&previous), "cudaGetDevice");
    if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    if (previous != device) cudaSetDevice(previous);
  }
};

int64_t round16(int64_t b) { return (b + 15) / 16 * 16; }

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

int vec_of(int dtype) {
  switch (dtype) {
    case kF32: return 4;
    case kBF16:
    case kF16: return 8;
    default: throw std::invalid_argument("fastkd CUDA: dtype must be float32, bfloat16 or float16");
  }
}

int device_attr(cudaDeviceAttr attr, int device) {
  int value = 0;
  check(cudaDeviceGetAttribute(&value, attr, device), "cudaDeviceGetAttribute");
  return value;
}

// Launch shape and scratch placement; the workspace query and the launch compute the same plan.
struct Plan {
  int threads;
  int64_t bytes;  // scratch per block
  bool shared;    // in dynamic shared memory (else in the caller's workspace)
  unsigned grid;
};

Plan make_plan(int64_t n, int threads, int64_t bytes, int device) {
  Plan p;
  p.threads = threads;
  p.bytes = round16(bytes);
  const int64_t optin = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  p.shared = p.bytes <= std::min(optin - kStaticSmemReserve, kSmemCap);
  // a global scratch per block: only as many blocks as stay resident, each looping over rows
  const int64_t blocks = p.shared ? std::min(n, kMaxGrid)
                                  : std::min(n, 2 * int64_t(device_attr(cudaDevAttrMultiProcessorCount, device)));
  p.grid = unsigned(std::max<int64_t>(blocks, 1));
  return p;
}

int64_t workspace_of(const Plan& p) { return p.shared ? 0 : p.bytes * int64_t(p.grid); }

int capture_threads(int64_t v, int vec) {
  // ~8 slots per thread or more, so the per-row reductions stay a small part of a row's work
  const int64_t nslots = (v + vec - 1) / vec;
  int threads = 128;
  while (threads < kCapThreads && int64_t(threads) * 8 < nslots) threads *= 2;
  return threads;
}

int sparse_threads(int64_t v, int vec) {
  const int64_t nslots = (v + vec - 1) / vec;
  int threads = 128;
  while (threads < kSparseThreads && int64_t(threads) * 8 < nslots) threads *= 2;
  return threads;
}

bool aligned16(const void* p, int64_t n, int64_t stride, int esize) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0 && (n <= 1 || (stride * esize) % 16 == 0);
}

// ---- top-k ----
struct TopkSizes {
  int threads;
  int64_t cap, p2, bytes;
};

TopkSizes topk_sizes(int64_t v, int64_t k, int dtype) {
  const int vec = vec_of(dtype);
  TopkSizes s;
  s.threads = capture_threads(v, vec);
  s.p2 = next_pow2(k);
  s.cap = std::max(k + 2 * int64_t(s.threads) * vec, s.p2);
  s.bytes = s.cap * 8 + round16(k * 4);
  return s;
}

template <typename T>
void launch_topk(const CaptureProblem& P, const Plan& pl, const TopkSizes& s, void* ws, cudaStream_t stream) {
  TopkLayout L;
  L.ws = pl.shared ? nullptr : static_cast<unsigned char*>(ws);
  L.ws_stride = pl.bytes;
  L.cap = s.cap;
  L.p2 = s.p2;
  L.inv_t = float(1.0f / float(P.temperature));
  L.vec_ok = aligned16(P.t, P.n, P.stride_t, int(sizeof(T)));
  const size_t smem = pl.shared ? size_t(pl.bytes) : 0;
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(topk_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "cudaFuncSetAttribute");
  topk_kernel<T><<<pl.grid, pl.threads, smem, stream>>>(P, L);
}

// ---- sample ----
struct SampleSizes {
  int threads;
  int64_t nseg, p2, off_sc, off_x, off_seg, off_did, off_work, bytes;
};

SampleSizes sample_sizes(int64_t v, int64_t ns, int dtype) {
  const int vec = vec_of(dtype);
  SampleSizes s;
  s.threads = capture_threads(v, vec);
  s.nseg = ((v + vec - 1) / vec + 31) / 32;
  s.p2 = next_pow2(ns);
  s.off_sc = round16(s.nseg * 4);
  s.off_x = s.off_sc + round16((s.nseg + 1) * 8);
  s.off_seg = s.off_x + round16(s.p2 * 8);
  s.off_did = s.off_seg + round16(ns * 4);
  s.off_work = s.off_did + round16(ns * 4);
  s.bytes = s.off_work + round16(ns * 4);
  return s;
}

template <typename T>
void launch_sample(const CaptureProblem& P, const Plan& pl, const SampleSizes& s, void* ws, cudaStream_t stream) {
  SampleLayout L;
  L.ws = pl.shared ? nullptr : static_cast<unsigned char*>(ws);
  L.ws_stride = pl.bytes;
  L.nseg = s.nseg;
  L.p2 = s.p2;
  L.off_sc = s.off_sc;
  L.off_x = s.off_x;
  L.off_seg = s.off_seg;
  L.off_did = s.off_did;
  L.off_work = s.off_work;
  L.inv_t = float(1.0f / float(P.temperature));
  L.vec_ok = aligned16(P.t, P.n, P.stride_t, int(sizeof(T)));
  const size_t smem = pl.shared ? size_t(pl.bytes) : 0;
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(sample_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "cudaFuncSetAttribute");
  sample_kernel<T><<<pl.grid, pl.threads, smem, stream>>>(P, L);
}

// ---- sparse loss ----
struct SparseSizes {
  int threads;
  int64_t nwords, off_eid, off_ew, off_es, bytes;
};

SparseSizes sparse_sizes(int64_t v, int64_t k, int dtype) {
  const int vec = vec_of(dtype);
  SparseSizes s;
  s.threads = sparse_threads(v, vec);
  s.nwords = (v + 31) / 32;
  s.off_eid = round16(s.nwords * 4);
  s.off_ew = s.off_eid + round16(k * 4);
  s.off_es = s.off_ew + round16(k * 4);
  s.bytes = s.off_es + round16(k * 4);
  return s;
}

template <typename T>
void launch_sparse(const SparseKDProblem& P, const Plan& pl, const SparseSizes& s, void* ws, cudaStream_t stream) {
  SparseLayout L;
  L.ws = pl.shared ? nullptr : static_cast<unsigned char*>(ws);
  L.ws_stride = pl.bytes;
  L.nwords = s.nwords;
  L.off_eid = s.off_eid;
  L.off_ew = s.off_ew;
  L.off_es = s.off_es;
  const int es = int(sizeof(T));
  L.vec_ok = aligned16(P.z, P.n, P.stride_z, es) && aligned16(P.grad, P.n, P.stride_g, es);
  SparseConsts c;
  c.inv_t = 1.f / float(P.temperature);
  c.soft_scale = float(P.soft_scale);
  c.hard = float(P.hard_weight);
  c.eps = float(P.label_smoothing);
  c.eps_v = c.eps / float(P.v);
  c.tau_one = P.temperature == 1.0;
  c.use_hard = P.target != nullptr && P.hard_weight != 0.0;
  c.need_m1 = c.use_hard && !c.tau_one;
  c.need_sum = c.use_hard && c.eps > 0.f;
  c.tail = P.tail;
  const size_t smem = pl.shared ? size_t(pl.bytes) : 0;
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(sparse_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "cudaFuncSetAttribute");
  sparse_kernel<T><<<pl.grid, pl.threads, smem, stream>>>(P, L, c);
}

void need_workspace(const Plan& pl, void* ws) {
  if (!pl.shared && ws == nullptr)
    throw std::invalid_argument("fastkd CUDA: this size needs a workspace (see *_workspace_cuda)");
}

}  // namespace

int64_t capture_topk_workspace_cuda(int64_t n, int64_t v, int64_t k, int dtype, int device) {
  if (n <= 0 || v <= 0 || k <= 0) return 0;
  const TopkSizes s = topk_sizes(v, k, dtype);
  return workspace_of(make_plan(n, s.threads, s.bytes, device));
}

int64_t capture_sample_workspace_cuda(int64_t n, int64_t v, int64_t num_samples, int dtype, int device) {
  if (n <= 0 || v <= 0 || num_samples <= 0) return 0;
  const SampleSizes s = sample_sizes(v, num_samples, dtype);
  return workspace_of(make_plan(n, s.threads, s.bytes, device));
}

int64_t sparse_kd_workspace_cuda(int64_t n, int64_t v, int64_t k, int dtype, int device) {
  if (n <= 0 || v <= 0) return 0;
  const SparseSizes s = sparse_sizes(v, k, dtype);
  return workspace_of(make_plan(n, s.threads, s.bytes, device));
}

void capture_topk_cuda(const CaptureProblem& P, void* ws, int device, int64_t stream_handle) {
  if (P.n <= 0 || P.v <= 0 || P.k <= 0) return;
  if (P.k > P.v) throw std::invalid_argument("fastkd CUDA: capture k must lie in [1, V]");
  DeviceScope scope(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream_handle));
  const TopkSizes s = topk_sizes(P.v, P.k, P.dtype);
  const Plan pl = make_plan(P.n, s.threads, s.bytes, device);
  need_workspace(pl, ws);
  switch (P.dtype) {
    case kF32: launch_topk<float>(P, pl, s, ws, stream); break;
    case kBF16: launch_topk<__nv_bfloat16>(P, pl, s, ws, stream); break;
    case kF16: launch_topk<__half>(P, pl, s, ws, stream); break;
    default: throw std::invalid_argument("fastkd CUDA: dtype must be float32, bfloat16 or float16");
  }
  check(cudaGetLastError(), "capture_topk launch");
}

void capture_sample_cuda(const CaptureProblem& P, void* ws, int device, int64_t stream_handle) {
  if (P.n <= 0 || P.v <= 0 || P.num_samples <= 0) return;
  if (P.width != std::min(P.num_samples, P.v))
    throw std::invalid_argument("fastkd CUDA: capture_sample width must be min(num_samples, V)");
  DeviceScope scope(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream_handle));
  const SampleSizes s = sample_sizes(P.v, P.num_samples, P.dtype);
  const Plan pl = make_plan(P.n, s.threads, s.bytes, device);
  need_workspace(pl, ws);
  switch (P.dtype) {
    case kF32: launch_sample<float>(P, pl, s, ws, stream); break;
    case kBF16: launch_sample<__nv_bfloat16>(P, pl, s, ws, stream); break;
    case kF16: launch_sample<__half>(P, pl, s, ws, stream); break;
    default: throw std::invalid_argument("fastkd CUDA: dtype must be float32, bfloat16 or float16");
  }
  check(cudaGetLastError(), "capture_sample launch");
}

void sparse_kd_cuda(const SparseKDProblem& P, void* ws, int device, int64_t stream_handle) {
  if (P.n <= 0 || P.v <= 0) return;
  if (P.divisor == nullptr) throw std::invalid_argument("fastkd CUDA: sparse_kd needs a device divisor");
  DeviceScope scope(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream_handle));
  const SparseSizes s = sparse_sizes(P.v, P.k, P.dtype);
  const Plan pl = make_plan(P.n, s.threads, s.bytes, device);
  need_workspace(pl, ws);
  switch (P.dtype) {
    case kF32: launch_sparse<float>(P, pl, s, ws, stream); break;
    case kBF16: launch_sparse<__nv_bfloat16>(P, pl, s, ws, stream); break;
    case kF16: launch_sparse<__half>(P, pl, s, ws, stream); break;
    default: throw std::invalid_argument("fastkd CUDA: dtype must be float32, bfloat16 or float16");
  }
  check(cudaGetLastError(), "sparse_kd launch");
}

}  // namespace fastkd
