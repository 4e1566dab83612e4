// Launcher of the CPU sparse KD loss (csrc/cpu/sparse_kd.cpp) against a captured teacher; bound in
// csrc/bind/sparse_kd.cpp. SparseKDProblem is in common/problems.h.
#pragma once

#include "common/problems.h"

namespace fastkd {

// Runs over all rows on p.num_threads OpenMP threads and returns when done.
void sparse_kd_cpu(const SparseKDProblem& p);

}  // namespace fastkd
