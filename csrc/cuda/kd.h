// Host launchers of the fused CUDA kd kernels (csrc/cuda/kd.cu); bound in csrc/bind/kd.cpp.
//
// Plain C++ types only, so a host .cpp can include this without the CUDA headers. The problem
// description is the CPU one (KDProblem in common/problems.h: the same four modes, pointers,
// strides and KDArgs); the pointers are device pointers, the divisor a device float (read by the
// kernel, never copied to the host), and `stream` the caller's cudaStream_t as an integer (0: the
// legacy default stream).
#pragma once

#include <cstdint>
#include <string>

#include "common/problems.h"

namespace fastkd {

// Enqueues the kernel on `stream` of device `device` and returns without synchronising.
// Throws std::runtime_error on a launch error, std::invalid_argument for a bad mode or an
// unsupported dtype (float64 is CPU-only).
void kd_run_cuda(const KDProblem& p, int device, int64_t stream);

// "" when the kernels can run on `device`, else why not (the runtime's error name and message: a
// driver older than the runtime these kernels were linked with, no kernel image for this GPU's
// architecture, no device). Never throws.
std::string kernels_unusable_cuda(int device);

// grad[r, :] *= factors[r * factors_stride] in place (factors: float32 device pointer), skipping
// rows whose factor is exactly 1 on the device: the backward of the fused loss without an N×V pass
// when grad_output is 1.
void scale_rows_cuda(int64_t grad, int64_t n, int64_t v, int64_t stride, int dtype, int64_t factors,
                     int64_t factors_stride, int device, int64_t stream);

}  // namespace fastkd
