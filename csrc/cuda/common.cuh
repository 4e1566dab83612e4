// Helpers shared by the CUDA kernel files (kd.cu, capture.cu, sparse_kd.cu): element types <->
// float, the 16-byte vector width of a row element, and the host-side check of a CUDA runtime call.
// Header-only; nvcc and the host emulation in tests/cuda_emu both compile it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastkd {
namespace cuda_common {

constexpr unsigned kFull = 0xffffffffu;  // all lanes of a warp

// Elements per 16-byte load.
template <typename T>
struct VecOf {
  static constexpr int N = 16 / int(sizeof(T));
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// Throws std::runtime_error naming `what` when a CUDA runtime call failed.
inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastkd CUDA: ") + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for a launch and restores the caller's device on every way out, a throw
// included (a launcher that throws must not leave the caller on another device).
struct DeviceScope {
  int previous = -1, device;
  explicit DeviceScope(int d) : device(d) {
    check(cudaGetDevice(&previous), "cudaGetDevice");
    if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    if (previous != device) cudaSetDevice(previous);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
};

}  // namespace cuda_common
}  // namespace fastkd
