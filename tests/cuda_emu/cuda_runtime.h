// Host emulation of the few CUDA features csrc/cuda/kd.cu uses, so that its kernels run (slowly)
// on a CPU in CI: one std::thread per CUDA thread, a std::barrier per block for __syncthreads and
// one per warp for the shuffles, `__shared__` as function statics (blocks run one at a time).
// Test-only (tests/test_cuda_emulated.py); never part of the package.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float a, float b) { return {a, b}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr int cudaSuccess = 0;
constexpr int cudaErrorInsufficientDriver = 35;
constexpr int cudaErrorNoKernelImageForDevice = 209;
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInsufficientDriver
      ? "CUDA driver version is insufficient for CUDA runtime version"
      : e == cudaErrorNoKernelImageForDevice ? "no kernel image is available for execution on the device"
                                             : "emulated error";
}
inline const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaSuccess ? "cudaSuccess" : e == cudaErrorInsufficientDriver ? "cudaErrorInsufficientDriver"
      : e == cudaErrorNoKernelImageForDevice ? "cudaErrorNoKernelImageForDevice" : "cudaErrorUnknown";
}
namespace emu {
inline int current_device = 0;      // what cudaGetDevice reports and cudaSetDevice changes
inline cudaError_t module_error = 0;  // what cudaFuncGetAttributes reports (a kernel that cannot load)
}  // namespace emu
inline cudaError_t cudaGetDevice(int* d) {
  *d = emu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  emu::current_device = d;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
struct cudaFuncAttributes {
  int numRegs = 0, maxThreadsPerBlock = 1024;
  size_t sharedSizeBytes = 0, localSizeBytes = 0;
};
template <typename F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F) {
  *attr = cudaFuncAttributes{};
  return emu::module_error;
}

namespace emu {
inline thread_local dim3 tid, bid;
inline dim3 bdim, gdim;
inline std::barrier<>* block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline std::vector<float> shfl_slots;
inline std::vector<uint64_t> raw_slots;  // warp exchanges of any type up to 8 bytes
inline std::vector<int> block_slots;     // __syncthreads_or / __syncthreads_count

// kernel<<<grid, threads>>>(...) becomes launch(grid, threads, [&] { kernel(...); })
inline void launch(unsigned grid, unsigned threads, const std::function<void()>& body) {
  gdim.x = grid;
  bdim.x = threads;
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bar(threads);
    block_bar = &bar;
    warp_bars.clear();
    for (unsigned w = 0; w < threads / 32; ++w) warp_bars.emplace_back(new std::barrier<>(32));
    shfl_slots.assign(threads, 0.f);
    raw_slots.assign(threads, 0);
    block_slots.assign(threads, 0);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) pool.emplace_back([&, t, b] {
        tid.x = t;
        bid.x = b;
        body();
      });
    for (auto& th : pool) th.join();
  }
}
}  // namespace emu

#define threadIdx (emu::tid)
#define blockIdx (emu::bid)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = emu::tid.x, w = t / 32;
  emu::shfl_slots[t] = v;
  emu::warp_bars[w]->arrive_and_wait();
  const float r = emu::shfl_slots[w * 32 + ((t % 32) ^ unsigned(lane_mask))];
  emu::warp_bars[w]->arrive_and_wait();
  return r;
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __int_as_float(unsigned i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
using std::isnan;

// ---- Additions for csrc/cuda/capture.cu, sparse_kd.cu (tests/test_cuda_emulated_cache.py) ---------
// Dynamic shared memory (`extern __shared__` is rewritten by the test to read emu::dyn_smem), warp
// votes/exchanges of any type, block votes, shared-memory atomics, device attributes.
namespace emu {
inline unsigned char* dyn_smem = nullptr;
inline int dev_sms = 2;
inline int dev_smem_optin = 99 * 1024;

// kernel<<<grid, threads, smem, stream>>>(...) becomes launch(grid, threads, smem, [&] { ... }).
// The buffer starts as garbage, as real shared memory does.
inline void launch(unsigned grid, unsigned threads, size_t smem, const std::function<void()>& body) {
  std::vector<uint64_t> mem(smem / 8 + 2, 0xA5A5A5A5A5A5A5A5ull);
  dyn_smem = reinterpret_cast<unsigned char*>(mem.data());
  launch(grid, threads, body);
  dyn_smem = nullptr;
}

inline unsigned lane() { return tid.x % 32; }

template <typename V>
inline V exchange(V v, unsigned src_lane) {
  static_assert(sizeof(V) <= 8, "warp exchange of at most 8 bytes");
  const unsigned t = tid.x, w = t / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  raw_slots[t] = bits;
  warp_bars[w]->arrive_and_wait();
  const uint64_t got = raw_slots[w * 32 + (src_lane & 31)];
  warp_bars[w]->arrive_and_wait();
  V r;
  std::memcpy(&r, &got, sizeof(V));
  return r;
}

// Every lane's value of v, in lane order (a warp barrier pair).
inline void gather(uint64_t v, uint64_t (&out)[32]) {
  const unsigned t = tid.x, w = t / 32;
  raw_slots[t] = v;
  warp_bars[w]->arrive_and_wait();
  for (unsigned l = 0; l < 32; ++l) out[l] = raw_slots[w * 32 + l];
  warp_bars[w]->arrive_and_wait();
}
}  // namespace emu

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int lane_mask) {
  return emu::exchange(v, emu::lane() ^ unsigned(lane_mask));
}
template <typename V>
inline V __shfl_sync(unsigned, V v, int src_lane) {
  return emu::exchange(v, unsigned(src_lane));
}
template <typename V>
inline V __shfl_up_sync(unsigned, V v, unsigned delta) {
  const unsigned l = emu::lane();
  return emu::exchange(v, l >= delta ? l - delta : l);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  uint64_t all[32];
  emu::gather(pred ? 1 : 0, all);
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m |= unsigned(all[l]) << l;
  return m;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline unsigned __match_any_sync(unsigned, unsigned v) {
  uint64_t all[32];
  emu::gather(v, all);
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m |= unsigned(all[l] == v) << l;
  return m;
}
// sm_80 warp reductions (REDUX): every lane gets the result over the warp
inline unsigned __reduce_max_sync(unsigned, unsigned v) {
  uint64_t all[32];
  emu::gather(v, all);
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m = std::max(m, unsigned(all[l]));
  return m;
}
inline unsigned __reduce_add_sync(unsigned, unsigned v) {
  uint64_t all[32];
  emu::gather(v, all);
  unsigned s = 0;
  for (unsigned l = 0; l < 32; ++l) s += unsigned(all[l]);
  return s;
}
// the low 32 bits of (hi:lo) >> (shift & 31)
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return unsigned(((uint64_t(hi) << 32) | lo) >> (shift & 31));
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

inline int emu_block_vote(int pred, bool count) {
  emu::block_slots[emu::tid.x] = pred;
  emu::block_bar->arrive_and_wait();
  int r = 0;
  for (unsigned t = 0; t < emu::bdim.x; ++t) r += emu::block_slots[t] != 0;
  emu::block_bar->arrive_and_wait();
  return count ? r : int(r != 0);
}
inline int __syncthreads_or(int pred) { return emu_block_vote(pred, false); }
inline int __syncthreads_count(int pred) { return emu_block_vote(pred, true); }

template <typename V>
inline V atomicAdd(V* p, V v) {
  return std::atomic_ref<V>(*p).fetch_add(v);
}
template <typename V>
inline V atomicOr(V* p, V v) {
  return std::atomic_ref<V>(*p).fetch_or(v);
}

// The _rn intrinsics exist to forbid contraction into FMAs; g++ without -mfma never contracts.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned long long __float2ull_ru(float f) {
  if (!(f >= 0.f)) return f != f ? 0x8000000000000000ull : 0ull;  // NaN: the device's pattern
  return (unsigned long long)std::ceil(double(f));
}
using std::min;
using std::max;

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? emu::dev_sms : emu::dev_smem_optin;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
