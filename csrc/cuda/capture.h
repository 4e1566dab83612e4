// Host launchers of the CUDA capture kernels (csrc/cuda/capture.cu): a sparse teacher from its
// logits, top-k or sampled; bound in csrc/bind/capture.cpp.
//
// Plain C++ types only, so a host .cpp can include this without the CUDA headers. The problem
// description is the CPU one (CaptureProblem in common/problems.h); here every pointer is a device
// pointer and `stream` the caller's cudaStream_t as an integer (0: the legacy default stream).
// dtype: 0 f32, 2 bf16, 3 f16 (float64 is CPU-only); values and lse are float32.
//
// Each kernel keeps a per-row scratch (candidate buffer or CDF segments) in shared memory when it
// fits; otherwise in a global workspace that the caller allocates: *_workspace_cuda says how many
// bytes (0: none needed) for the same sizes, and the launcher takes its device pointer (may be null
// when the size was 0).
#pragma once

#include <cstdint>

#include "common/problems.h"

namespace fastkd {

int64_t capture_topk_workspace_cuda(int64_t n, int64_t v, int64_t k, int dtype, int device);
int64_t capture_sample_workspace_cuda(int64_t n, int64_t v, int64_t num_samples, int dtype, int device);

// Enqueue on `stream` of `device` and return without synchronising. Throw std::invalid_argument
// for an unsupported dtype, k > V, a width other than min(num_samples, V) or a missing workspace;
// std::runtime_error on a launch error. Empty problems (n, V, k or num_samples <= 0) enqueue nothing.
void capture_topk_cuda(const CaptureProblem& p, void* workspace, int device, int64_t stream);
void capture_sample_cuda(const CaptureProblem& p, void* workspace, int device, int64_t stream);

}  // namespace fastkd
