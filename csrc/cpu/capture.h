// Launchers of the CPU capture kernels (csrc/cpu/capture.cpp): a sparse teacher from its logits,
// top-k or sampled; bound in csrc/bind/capture.cpp. CaptureProblem is in common/problems.h.
#pragma once

#include "common/problems.h"

namespace fastkd {

// Both run over all rows on p.num_threads OpenMP threads and return when done.
void capture_topk_cpu(const CaptureProblem& p);
void capture_sample_cpu(const CaptureProblem& p);

}  // namespace fastkd
