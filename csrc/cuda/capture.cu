// CUDA capture of a sparse teacher from its logits, top-k or sampled, with the contract of the CPU
// kernels (csrc/cpu/capture.cpp): the same ids, counts and tie order. One thread block per row.
//
// top-k: the block streams its teacher row once with 16-byte loads. Each thread keeps an online
// (max, Σ exp) of s = t/τ for the full-vocabulary log-sum-exp. Elements above a block-wide
// threshold go to a candidate buffer as 64-bit keys (order-preserving value bits, then the
// complemented id, so a larger key means a larger value or, on a tie, a smaller id). When the buffer
// could overflow, a radix select (8-bit digits over the keys, warp-aggregated shared histograms)
// cuts it to exactly its k largest keys and raises the threshold to the k-th value. After the
// first tile only the few elements that beat the current k-th value get in, so the row is read at
// the speed of its load. A bitonic sort orders the final k (value descending, ties: smaller id).
// sample: the streaming pass reduces each warp's 32-slot segment to its max and the sum of
// exp(s − max) in 40-bit fixed point (exact, so any summation order agrees); a block scan of the
// segment masses (float64) gives the CDF at segment boundaries, in vocabulary order. The sorted
// uniforms are located by binary search, only the segments holding a draw are read again, and a
// warp scan there assigns each draw to the smallest id whose cumulative mass exceeds it (inverse
// CDF). Unique ids ascending with counts, then −1/0 padding.
//
// Never materialised: softmax(t/τ), a sort or CDF of a full row, a float32 copy of a bf16/fp16 row.
// Memory traffic per row of V logits of b bytes: top-k capture reads V·b once and writes k·12 + 4
// bytes, so its goal is the time of one read of the teacher; sampled capture adds the re-read of the
// segments holding a draw (32·16 bytes each, at most num_samples of them) and the uniforms.
//
// Loads: rows are walked in 16-byte slots anchored at 16-byte boundaries (cuda/cache_common.cuh),
// so any row length and stride keeps vector loads (only the two slots at a row's ends load element
// by element), and each thread fetches its slots two iterations ahead of their use.
//
// Preconditions: unit column stride; 64-bit offsets; ids < 2^31; 1 <= k <= V; width =
// min(num_samples, V); float32, bf16 or fp16 inputs with float32 accumulation (the sampling CDF in
// fixed point and float64).
// No float atomics and fixed reduction trees: results are bitwise reproducible. Per-row scratch
// (candidate buffer, CDF segments) lives in dynamic shared memory, or in a caller-allocated global
// workspace when it does not fit (huge k, num_samples or V; the grid then has one private scratch
// per resident block).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "cuda/cache_common.cuh"
#include "cuda/capture.h"

namespace fastkd {
namespace {

using cuda_cache::Add;
using cuda_cache::bitonic_sort;
using cuda_cache::block_allreduce;
using cuda_cache::block_exclusive_scan;
using cuda_cache::block_lse;
using cuda_cache::check;
using cuda_cache::DeviceScope;
using cuda_cache::kFull;
using cuda_cache::decode_slot;
using cuda_cache::fetch_slot;
using cuda_cache::slot_mask;
using cuda_cache::load_slot;
using cuda_cache::Lse;
using cuda_cache::lse_add;
using cuda_cache::lse_empty;
using cuda_cache::lse_value;
using cuda_cache::make_plan;
using cuda_cache::max_slots;
using cuda_cache::MaxF;
using cuda_cache::MaxI;
using cuda_cache::need_workspace;
using cuda_cache::ninf;
using cuda_cache::Plan;
using cuda_cache::qnan;
using cuda_cache::round16;
using cuda_cache::row_slots;
using cuda_cache::RowSlots;
using cuda_cache::u64;
using cuda_cache::vec_of;
using cuda_cache::VecOf;
using cuda_cache::warp_allreduce;
using cuda_cache::warp_inclusive_scan;
using cuda_cache::workspace_of;

constexpr int kCapThreads = 256;     // capture: the candidate buffer grows with the tile (threads · slot)

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
  const int64_t v = P.v;
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
    const RowSlots rs = row_slots(row, v);
    // Each thread fetches its slots two tiles ahead of their use: its next two loads stay in
    // flight across this tile's candidate writes and barriers, which would otherwise leave the
    // memory system idle between one tile's load and the next.
    uint4 ahead0 = fetch_slot<T, true>(row, tid, v, rs);
    uint4 ahead1 = fetch_slot<T, true>(row, int64_t(tid) + nthreads, v, rs);
    for (int64_t base = 0; base < rs.count; base += nthreads) {  // same trip count in every lane
      const int64_t slot = base + tid;
      const uint4 raw = ahead0;
      ahead0 = ahead1;
      ahead1 = fetch_slot<T, true>(row, slot + 2 * int64_t(nthreads), v, rs);
      float x[N];
      const int64_t j0 = decode_slot<T>(raw, row, slot, v, rs, x);
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
        if (admit_all || x[i] > thr) want |= 1u << i;
      }
      want &= slot_mask<N>(j0, v);
      lse_add(ls, x);
      const int c = __popc(want);
      if (__any_sync(kFull, c != 0)) {  // one atomic per warp for its candidates
        const int incl = warp_inclusive_scan(c);
        unsigned at = 0;
        if (lane == 31) at = atomicAdd(&st.count, unsigned(incl));
        at = __shfl_sync(kFull, at, 31) + unsigned(incl - c);
#pragma unroll
        for (int i = 0; i < N; ++i)
          if ((want >> i) & 1u) buf[at++] = topk_key(x[i], j0 + i);
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
};

// A segment's masses e_i = exp(s_i − max) (max over the warp's segment) in 40-bit fixed point,
// rounded up so that every element with mass keeps some. Integer sums do not depend on their order:
// the streaming pass (a reduction) and the re-scan of a segment (a scan) agree bitwise on every
// partial mass, so the bounds that located a draw are the ones it is walked through, and the
// intervals of neighbouring lanes meet exactly. 2^40 per unit of the segment max keeps 256·2^40
// below 2^53 (exact in double) and costs ~1e-12 relative to the segment's mass.
constexpr float kFixUnit = 1099511627776.0f;  // 2^40

// The warp's max and sum run once per 512 bytes of row, so they are single warp reductions (REDUX)
// on sm_80 and later instead of five-step shuffle trees (two of them 64-bit): the max over the
// order-preserving code of the floats (exact; NaN rows are set aside by the caller), the sum of
// lane masses below 2^43 (N <= 8 masses of at most 2^40) as two exact 32-bit sums of its high and
// low bits.
__device__ __forceinline__ float warp_max_f(float x) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  return dec_f(__reduce_max_sync(kFull, enc_f(x)));
#else
  return warp_allreduce(x, MaxF());
#endif
}
__device__ __forceinline__ u64 warp_sum_masses(u64 x) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const unsigned hi = __reduce_add_sync(kFull, unsigned(x >> 21));  // < 2^22 per lane
  const unsigned lo = __reduce_add_sync(kFull, unsigned(x) & 0x1fffffu);
  return (u64(hi) << 21) + u64(lo);
#else
  return warp_allreduce(x, Add<u64>());
#endif
}

template <int N>
__device__ __forceinline__ float segment_masses(const float (&s)[N], u64 (&e)[N], u64& lane_sum) {
  float mw = s[0];
#pragma unroll
  for (int i = 1; i < N; ++i) mw = fmaxf(mw, s[i]);
  mw = warp_max_f(mw);
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
  const int64_t v = P.v;
  const int nseg = int(L.nseg), ns = int(P.num_samples), width = int(P.width);

  for (int64_t r = blockIdx.x; r < P.n; r += gridDim.x) {
    const T* row = static_cast<const T*>(P.t) + r * P.stride_t;
    int64_t* out_ids = P.ids + r * width;
    int32_t* out_counts = P.counts + r * width;

    // ---- pass 1: per-segment max and mass ----
    // Every segment of the layout is written (those past a row's end get mass 0); each slot is
    // fetched one iteration ahead of its use, so the load overlaps the previous slot's reductions.
    int nan = 0;
    const RowSlots rs = row_slots(row, v);
    uint4 ahead = fetch_slot<T, true>(row, tid, v, rs);
    for (int64_t base = 0; base < int64_t(nseg) * 32; base += nthreads) {  // same trip count in every lane
      const int64_t slot = base + tid;
      const uint4 raw = ahead;
      ahead = fetch_slot<T, true>(row, slot + nthreads, v, rs);
      float s[N];
      u64 e[N];
      decode_slot<T>(raw, row, slot, v, rs, s);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        s[i] = __fmul_rn(s[i], L.inv_t);
        nan |= s[i] != s[i];
      }
      u64 lane_sum;
      const float mw = segment_masses(s, e, lane_sum);
      const u64 seg_sum = warp_sum_masses(lane_sum);
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
      const int64_t first = load_slot<T, false>(row, slot, v, rs, s);
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
        const int id = int(first + i);
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
// Host side
// ================================================================================================
int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

int capture_threads(int64_t v, int vec) {
  // ~8 slots per thread or more, so the per-row reductions stay a small part of a row's work
  const int64_t nslots = (v + vec - 1) / vec;
  int threads = 128;
  while (threads < kCapThreads && int64_t(threads) * 8 < nslots) threads *= 2;
  return threads;
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
  s.nseg = (max_slots(v, vec) + 31) / 32;
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
  const size_t smem = pl.shared ? size_t(pl.bytes) : 0;
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(sample_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "cudaFuncSetAttribute");
  sample_kernel<T><<<pl.grid, pl.threads, smem, stream>>>(P, L);
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

}  // namespace fastkd
