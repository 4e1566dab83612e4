// Device and host helpers shared by the CUDA capture and sparse-loss kernels (csrc/cuda/capture.cu,
// csrc/cuda/sparse_kd.cu); the element conversions they share with kd.cu are in cuda/common.cuh.
//
// Device side: the row slots every kernel indexes rows by (one 16-byte load per slot when rows are
// aligned, scalar loads otherwise), the online log-sum-exp, and fixed-order block reductions, scans
// and a bitonic sort (results never depend on timing). Host side: the launch plan that decides
// whether a kernel's per-row scratch fits in dynamic shared memory or lives in the caller's global
// workspace (the *_workspace_cuda queries and the launchers compute the same plan), and the
// device scope of a launch. Header-only; nvcc and the host emulation in tests/cuda_emu both
// compile it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <stdexcept>

#include "common/problems.h"
#include "cuda/common.cuh"

namespace fastkd {
namespace cuda_cache {

using cuda_common::check;
using cuda_common::from_f;
using cuda_common::kFull;
using cuda_common::to_f;
using cuda_common::VecOf;

typedef unsigned long long u64;

// Scratch placement (make_plan).
constexpr int64_t kSmemCap = 96 * 1024;        // more dynamic shared memory per block costs occupancy
constexpr int64_t kStaticSmemReserve = 4096;   // the kernels' own __shared__ variables
constexpr int64_t kMaxGrid = int64_t(1) << 30;

// −inf and the canonical quiet NaN as bit patterns (no dependence on fast-math flags).
__device__ __forceinline__ float ninf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float qnan() { return __int_as_float(0x7fc00000); }

// ------------------------------------------------------------------------------------------------
// Row slots. Every kernel walks a row in slots of N = 16 bytes / element consecutive elements,
// anchored at 16-byte boundaries: slot s holds row elements [s·N − shift, s·N − shift + N), where
// shift (0 <= shift < N) is how many elements the row start lies past the boundary below it. Every
// slot that lies wholly inside the row is then one aligned 16-byte load, whatever the row's length
// and stride: rows of an odd byte length (V = 50257 in bf16: every row starts at a different offset)
// keep vector loads, and only the first and last slots, which reach past the row's ends, load their
// elements one at a time (never a byte outside the row). When two tensors walked together disagree
// on a row's offset the row takes the element path in every slot (still coalesced).
// Elements outside the row read as −inf.
// ------------------------------------------------------------------------------------------------
struct RowSlots {
  int64_t shift;  // row elements before the first 16-byte boundary, as above
  int64_t count;  // slots covering the row: ceil((v + shift) / N)
  bool vec;       // inner slots are 16-byte loads (false: element by element)
  // the row index of slot s's first element (negative in the first slot when shift > 0)
  __device__ __forceinline__ int64_t first(int64_t s, int n) const { return s * n - shift; }
};

// The slots of a row of v elements at `row`; `other`, when given, is a second row walked with the
// same slots (a gradient written where the logits are read) and must share the offset for vectors.
template <typename T>
__device__ __forceinline__ RowSlots row_slots(const T* row, int64_t v, const void* other = nullptr) {
  constexpr int N = VecOf<T>::N;
  const uintptr_t mis = reinterpret_cast<uintptr_t>(row) & 15;
  const bool ok = mis % sizeof(T) == 0 && (other == nullptr || (reinterpret_cast<uintptr_t>(other) & 15) == mis);
  RowSlots rs;
  rs.shift = ok ? int64_t(mis / sizeof(T)) : 0;
  rs.count = (v + rs.shift + N - 1) / N;
  rs.vec = ok;
  return rs;
}

// Slots past the longest row's end in a kernel's sizing: a row may start up to N − 1 elements past
// a boundary, so ceil((v + N − 1) / N) slots cover any row of v elements.
inline int64_t max_slots(int64_t v, int n) { return (v + 2 * int64_t(n) - 2) / n; }

template <typename T>
__device__ __forceinline__ bool inner_slot(const RowSlots& rs, int64_t slot, int64_t v) {
  constexpr int N = VecOf<T>::N;
  const int64_t j0 = rs.first(slot, N);
  return rs.vec && j0 >= 0 && j0 + N <= v;
}

// The raw 16 bytes of an inner slot, issued on its own so that a loop can have several in flight
// before it converts any (zeros for the slots at the row's ends, which decode_slot loads itself).
// Read-once rows are marked evict-first; a row read again later is kept in L2.
template <typename T, bool kStreaming>
__device__ __forceinline__ uint4 fetch_slot(const T* row, int64_t slot, int64_t v, const RowSlots& rs) {
  constexpr int N = VecOf<T>::N;
  if (!inner_slot<T>(rs, slot, v)) return make_uint4(0u, 0u, 0u, 0u);
  const uint4* src = reinterpret_cast<const uint4*>(row + rs.first(slot, N));
  return kStreaming ? __ldcs(src) : __ldg(src);
}

// The slot's elements as float: from `raw` (fetch_slot) for an inner slot, else one by one, −inf
// outside the row. Returns the row index of the slot's first element.
template <typename T>
__device__ __forceinline__ int64_t decode_slot(const uint4& raw, const T* row, int64_t slot, int64_t v,
                                               const RowSlots& rs, float (&x)[VecOf<T>::N]) {
  constexpr int N = VecOf<T>::N;
  const int64_t j0 = rs.first(slot, N);
  if (inner_slot<T>(rs, slot, v)) {
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = to_f(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int64_t j = j0 + i;
      x[i] = j >= 0 && j < v ? to_f(row[j]) : ninf();
    }
  }
  return j0;
}

template <typename T, bool kStreaming>
__device__ __forceinline__ int64_t load_slot(const T* row, int64_t slot, int64_t v, const RowSlots& rs,
                                             float (&x)[VecOf<T>::N]) {
  return decode_slot<T>(fetch_slot<T, kStreaming>(row, slot, v, rs), row, slot, v, rs, x);
}

// Element i of the slot starting at row index j0 lies in the row.
__device__ __forceinline__ bool in_row(int64_t j0, int i, int64_t v) { return j0 + i >= 0 && j0 + i < v; }

// Bit i set: element i of the slot starting at row index j0 lies in the row (all N bits for an
// inner slot), so that a loop tests membership once per slot instead of once per element.
template <int N>
__device__ __forceinline__ unsigned slot_mask(int64_t j0, int64_t v) {
  const int64_t lo = j0 < 0 ? -j0 : 0, left = v - j0;
  const int64_t hi = left < N ? (left > 0 ? left : 0) : N;
  return ((1u << unsigned(hi)) - 1u) & ~((1u << unsigned(lo < N ? lo : N)) - 1u);
}

template <typename T>
__device__ __forceinline__ void store_slot(T* row, int64_t slot, int64_t v, const RowSlots& rs,
                                           const float (&g)[VecOf<T>::N]) {
  constexpr int N = VecOf<T>::N;
  const int64_t j0 = rs.first(slot, N);
  if (inner_slot<T>(rs, slot, v)) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = from_f<T>(g[i]);
    __stcs(reinterpret_cast<uint4*>(row + j0), raw);  // the gradient is not read again here
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (in_row(j0, i, v)) row[j0 + i] = from_f<T>(g[i]);
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
inline __device__ Lse block_lse(Lse s, Lse* buf) {
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
// Host side
// ================================================================================================
using cuda_common::DeviceScope;

inline int64_t round16(int64_t b) { return (b + 15) / 16 * 16; }

// Elements per 16-byte slot of a dtype code (float64 has no CUDA kernels).
inline int vec_of(int dtype) {
  switch (dtype) {
    case kF32: return 4;
    case kBF16:
    case kF16: return 8;
    default: throw std::invalid_argument("fastkd CUDA: dtype must be float32, bfloat16 or float16");
  }
}

inline int device_attr(cudaDeviceAttr attr, int device) {
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

inline Plan make_plan(int64_t n, int threads, int64_t bytes, int device) {
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

// Bytes of global workspace a plan needs: 0 when the scratch is in shared memory.
inline int64_t workspace_of(const Plan& p) { return p.shared ? 0 : p.bytes * int64_t(p.grid); }

inline void need_workspace(const Plan& pl, void* ws) {
  if (!pl.shared && ws == nullptr)
    throw std::invalid_argument("fastkd CUDA: this size needs a workspace (see *_workspace_cuda)");
}

}  // namespace cuda_cache
}  // namespace fastkd
