// Launcher of the fused CPU kd kernels (csrc/cpu/kd.cpp); bound in csrc/bind/kd.cpp. The problem
// description (KDProblem: four modes, pointers, strides, KDArgs) is in common/problems.h.
#pragma once

#include "common/problems.h"

namespace fastkd {

// Runs p.mode over all rows on p.num_threads OpenMP threads and returns when done. An unknown dtype
// code does nothing.
void kd_run_cpu(const KDProblem& p);

}  // namespace fastkd
