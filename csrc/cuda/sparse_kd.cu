// CUDA sparse KD loss against a captured teacher (ids and probabilities of its stored entries, −1 =
// padding), with the label-smoothed hard cross-entropy and the student gradient; the contract of
// the CPU kernel (csrc/cpu/sparse_kd.cpp). One thread block per row.
//
// The stored ids of the row go to a shared bitmap; pass 1 reads the student once for the
// complement's log-sum-exp (bitmap members masked), the τ = 1 normaliser and Σ z of the hard term;
// pass 2 walks the row backwards (its tail, read last, is still in L2), writes the complement
// gradient everywhere, and after a barrier the stored ids' entries are overwritten with their own
// formula. 1 − Q_I is exp(lse_complement − lse), never 1 − Σ q_I.
//
// Never materialised: softmax(z/τ), a sort of a full row, a float32 copy of a bf16/fp16 row. Memory
// traffic per row of V logits of b bytes: the student is read twice and the gradient written once
// (plus k scattered corrections): 3 row transfers against the dense kd loss's 5.
//
// Loads: rows are walked in 16-byte slots anchored at 16-byte boundaries (cuda/cache_common.cuh):
// vector loads and stores for any row length and stride, as long as a student row and its gradient
// row start at the same offset from a boundary (otherwise that row goes element by element).
//
// Preconditions: unit column stride; 64-bit offsets;
// ids < 2^31 (a row with an id >= V or a repeated id gets a NaN loss and gradient, never an
// out-of-bounds read); float32, bf16 or fp16 inputs with float32 accumulation; the divisor a device
// float32.
// No float atomics and fixed reduction trees: results are bitwise reproducible. The per-row scratch
// (the stored-id bitmap and the entries) lives in dynamic shared memory, or in a caller-allocated
// global workspace when it does not fit (huge k or V; the grid then has one private scratch per
// resident block).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

#include "cuda/cache_common.cuh"
#include "cuda/sparse_kd.h"

namespace fastkd {
namespace {

using cuda_cache::Add;
using cuda_cache::block_allreduce;
using cuda_cache::block_lse;
using cuda_cache::check;
using cuda_cache::DeviceScope;
using cuda_cache::from_f;
using cuda_cache::slot_mask;
using cuda_cache::load_slot;
using cuda_cache::Lse;
using cuda_cache::lse_add;
using cuda_cache::lse_empty;
using cuda_cache::lse_value;
using cuda_cache::make_plan;
using cuda_cache::MaxF;
using cuda_cache::need_workspace;
using cuda_cache::ninf;
using cuda_cache::Plan;
using cuda_cache::qnan;
using cuda_cache::round16;
using cuda_cache::row_slots;
using cuda_cache::RowSlots;
using cuda_cache::store_slot;
using cuda_cache::to_f;
using cuda_cache::vec_of;
using cuda_cache::VecOf;
using cuda_cache::workspace_of;

constexpr int kSparseThreads = 512;  // as the dense kd kernel

// ================================================================================================
// Device side
// ================================================================================================
struct SparseLayout {
  unsigned char* ws;  // global scratch, ws_stride bytes per block; null: dynamic shared memory
  int64_t ws_stride;
  int64_t nwords;     // bitmap words: ceil(v / 32)
  int64_t off_eid, off_ew, off_es;  // byte offsets of the per-entry arrays (k each)
};

struct SparseConsts {
  float inv_t, soft_scale, hard, eps, eps_v;
  bool tau_one, use_hard, need_m1, need_sum;
  int tail;
};

template <typename T>
__device__ void fill_row(T* row, int64_t v, float value) {
  constexpr int N = VecOf<T>::N;
  float g[N];
#pragma unroll
  for (int i = 0; i < N; ++i) g[i] = value;
  const RowSlots rs = row_slots(row, v);
  for (int64_t slot = threadIdx.x; slot < rs.count; slot += blockDim.x) store_slot<T>(row, slot, v, rs, g);
}

// Bits j0 .. j0 + N − 1 of the stored-id bitmap (bit i: id j0 + i), N <= 32. A slot starts at a
// multiple of N only in a 16-byte aligned row; otherwise it may straddle two words, or start before
// the row (j0 < 0, the ids below 0 read as not stored).
__device__ __forceinline__ unsigned slot_bits(const unsigned* bits, int64_t j0, int n, int64_t nwords) {
  if (j0 < 0) return bits[0] << unsigned(-j0);
  const int64_t w = j0 >> 5;
  const unsigned b = unsigned(j0 & 31);
  const unsigned lo = bits[w], hi = b + unsigned(n) > 32u && w + 1 < nwords ? bits[w + 1] : 0u;
  return __funnelshift_r(lo, hi, b);
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
  const int64_t v = P.v, K = P.k;
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
        fill_row(g, v, 0.f);
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
      fill_row(g, v, qnan());
      for (int64_t i = tid; i < K; i += nthreads)
        if (eid[i] >= 0) bits[eid[i] >> 5] = 0u;
      __syncthreads();
      continue;
    }

    // ---- pass 1: complement lse of z/τ (stored ids masked), τ = 1 lse, Σ z ----
    // (the same slots as the gradient pass below: vectors when z and the gradient share the row's offset)
    const RowSlots rs = row_slots(z, v, g);
    Lse comp = lse_empty(), one = lse_empty();
    float sum_z = 0.f;
    for (int64_t slot = tid; slot < rs.count; slot += nthreads) {
      float zr[N], sr[N];
      const int64_t j0 = load_slot<T, false>(z, slot, v, rs, zr);
      const unsigned in_set = slot_bits(bits, j0, N, L.nwords);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        sr[i] = ((in_set >> i) & 1u) ? ninf() : zr[i] * inv_t;
        nan |= zr[i] != zr[i];
      }
      lse_add(comp, sr);
      if (c.need_m1) lse_add(one, zr);
      if (c.need_sum) {
        const unsigned inside = slot_mask<N>(j0, v);
#pragma unroll
        for (int i = 0; i < N; ++i)
          if ((inside >> i) & 1u) sum_z += zr[i];
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
    for (int64_t slot = rs.count - 1 - tid; slot >= 0; slot -= nthreads) {
      float zr[N], gr[N];
      const int64_t j0 = load_slot<T, true>(z, slot, v, rs, zr);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float q = __expf(zr[i] * inv_t - lse_z);
        float gi = gc * q;
        if (c.use_hard) {
          const float q1 = c.tau_one ? q : __expf(zr[i] - lse_1);
          gi += gh * (q1 - c.eps_v);
          if (j0 + i == y) gi -= gh * (1.f - c.eps);
        }
        gr[i] = gi;
      }
      store_slot<T>(g, slot, v, rs, gr);
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
int sparse_threads(int64_t v, int vec) {
  const int64_t nslots = (v + vec - 1) / vec;
  int threads = 128;
  while (threads < kSparseThreads && int64_t(threads) * 8 < nslots) threads *= 2;
  return threads;
}

// Threads per block and the scratch layout of one row.
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

}  // namespace

int64_t sparse_kd_workspace_cuda(int64_t n, int64_t v, int64_t k, int dtype, int device) {
  if (n <= 0 || v <= 0) return 0;
  const SparseSizes s = sparse_sizes(v, k, dtype);
  return workspace_of(make_plan(n, s.threads, s.bytes, device));
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
