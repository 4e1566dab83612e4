// Host launchers of the teacher-cache CUDA kernels (csrc/cuda/cache.cu); bound in
// csrc/cuda/cache_bind.cpp.
//
// Plain C++ types only, so a host .cpp can include this without the CUDA headers. The problem
// descriptions are the CPU ones (cpu/cache.h); here every pointer is a device pointer, the divisor
// of the sparse loss a device float32 (read by the kernel, never copied to the host), and `stream`
// the caller's cudaStream_t as an integer (0: the legacy default stream). dtype: 0 f32, 2 bf16,
// 3 f16 (float64 is CPU-only).
//
// Each kernel keeps a per-row scratch (candidate buffer, CDF segments, or the stored-id bitmap) in
// shared memory when it fits; otherwise in a global workspace that the caller allocates:
// *_workspace_cuda says how many bytes (0: none needed) for the same sizes, and the launcher
// takes its device pointer (may be null when the size was 0).
#pragma once

#include <cstdint>

#include "cpu/cache.h"

namespace fastkd {

int64_t capture_topk_workspace_cuda(int64_t n, int64_t v, int64_t k, int dtype, int device);
int64_t capture_sample_workspace_cuda(int64_t n, int64_t v, int64_t num_samples, int dtype, int device);
int64_t sparse_kd_workspace_cuda(int64_t n, int64_t v, int64_t k, int dtype, int device);

// Enqueue on `stream` of `device` and return without synchronising. Throw std::invalid_argument
// for an unsupported dtype or a missing workspace, std::runtime_error on a launch error.
void capture_topk_cuda(const CaptureProblem& p, void* workspace, int device, int64_t stream);
void capture_sample_cuda(const CaptureProblem& p, void* workspace, int device, int64_t stream);
void sparse_kd_cuda(const SparseKDProblem& p, void* workspace, int device, int64_t stream);

}  // namespace fastkd
