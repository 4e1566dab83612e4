// The Universal Logit Distillation loss on the CPU (csrc/cpu/uld.cpp), bound in csrc/bind/uld.cpp.
//
// Per row: the L1 distance between the student's probabilities sorted in decreasing order and the
// teacher's (already sorted, zero-padded), over the first k ranks, plus |T_s − T_t| for the mass
// beyond rank k, and the gradient with respect to the student logits.
#pragma once

#include <cstdint>

namespace fastkd {

struct ULDProblem {
  int dtype;               // DType code of the student logits (common/problems.h)
  const void* z;           // (n, v) student logits, row stride stride_z, unit column stride
  const void* head;        // (n, k) teacher probabilities sorted decreasingly, 0 = padding (float; double for f64)
  const void* tail;        // (n,) teacher mass beyond its head (float; double for f64)
  const uint8_t* cols;     // (v,) 1: the column takes part in the sorted comparison; null: every column
  const void* divisor;     // 0-d (float; double for f64): loss and gradient are divided by it
  void* loss;              // (n,) out (float; double for f64)
  void* grad;              // (n, v) out, input dtype, row stride stride_g
  int64_t n, v, k, stride_z, stride_g;
  double temperature;      // student probabilities are softmax(z / temperature)
  double scale;            // loss and gradient are multiplied by it
  int num_threads;         // OpenMP threads over rows
};

// Runs over all rows on p.num_threads OpenMP threads and returns when done.
void uld_cpu(const ULDProblem& p);

}  // namespace fastkd
