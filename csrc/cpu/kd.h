// Launcher of the fused CPU kd kernels (csrc/cpu/kd.cpp); bound in csrc/bind/kd.cpp. The problem
// description (KDProblem: four modes, pointers, strides, KDArgs) is in common/problems.h.
#pragma once

#include "common/problems.h"

namespace fastkd {

// Runs p.mode over all rows on p.num_threads OpenMP threads and returns when done. An unknown dtype
// code does nothing.
void kd_run_cpu(const KDProblem& p);

// Nanoseconds per exponential, all threads together, of the exp the kernels use (the AVX2 build where
// the CPU has it), over an L1-resident buffer: the exp-bound floor of the benchmarks.
double kd_exp_ns_cpu(int num_threads);

}  // namespace fastkd
