// Host launcher of the CUDA sparse KD loss (csrc/cuda/sparse_kd.cu) against a captured teacher;
// bound in csrc/bind/sparse_kd.cpp.
//
// Plain C++ types only, so a host .cpp can include this without the CUDA headers. The problem
// description is the CPU one (SparseKDProblem in common/problems.h); here every pointer is a device
// pointer, the divisor a device float32 (read by the kernel, never copied to the host), and
// `stream` the caller's cudaStream_t as an integer (0: the legacy default stream). dtype: 0 f32,
// 2 bf16, 3 f16 (float64 is CPU-only).
//
// The kernel keeps a per-row scratch (the stored-id bitmap and the entries) in shared memory when
// it fits; otherwise in a global workspace that the caller allocates: sparse_kd_workspace_cuda says
// how many bytes (0: none needed) for the same sizes, and the launcher takes its device pointer
// (may be null when the size was 0).
#pragma once

#include <cstdint>

#include "common/problems.h"

namespace fastkd {

int64_t sparse_kd_workspace_cuda(int64_t n, int64_t v, int64_t k, int dtype, int device);

// Enqueues on `stream` of `device` and returns without synchronising. Throws std::invalid_argument
// for an unsupported dtype, a null divisor or a missing workspace; std::runtime_error on a launch
// error.
void sparse_kd_cuda(const SparseKDProblem& p, void* workspace, int device, int64_t stream);

}  // namespace fastkd
