// Host emulation of the few CUDA features csrc/cuda/kd.cu uses, so that its kernels run (slowly)
// on a CPU in CI: one std::thread per CUDA thread, a std::barrier per block for __syncthreads and
// one per warp for the shuffles, `__shared__` as function statics (blocks run one at a time).
// Test-only (tests/test_cuda_emulated.py); never part of the package.
#pragma once
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

typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr int cudaSuccess = 0;
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace emu {
inline thread_local dim3 tid, bid;
inline dim3 bdim, gdim;
inline std::barrier<>* block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline std::vector<float> shfl_slots;

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
