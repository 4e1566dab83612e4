// Raw-pointer interface of the fused CPU kd kernels (csrc/cpu/kd.cpp); bound in csrc/binding.cpp.
#pragma once

#include <cstdint>

#include "common/kd_math.h"

namespace fastkd {

// dtype codes shared with fastkd/_ext.py
enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

// What one call computes. Pointers may be null where the mode does not use them.
//   kFused : stats + finish per row (the single-device loss): loss, grad_z, grad_t (optional)
//   kStats : partial RowStats of a vocabulary slice per row -> stats_out (n, kStatsWidth)
//   kJSDSums: given merged stats, partial [S_q, S_p] of the slice -> jsd_out (n, 2)
//   kFinish: given merged stats (+ summed JSD sums), the slice's gradient and the row loss
enum Mode : int { kFused = 0, kStats = 1, kJSDSums = 2, kFinish = 3 };

struct KDProblem {
  int mode;
  int dtype;
  const void* z;           // (n, v) student logits, row stride stride_z, unit column stride
  const void* t;           // (n, v) teacher logits
  const int64_t* target;   // (n,) global class ids, or null
  const void* divisor;     // 0-d, float (double for kF64): loss and gradients are divided by it
  void* loss;              // (n,) float (double for kF64)
  void* grad_z;            // (n, v) input dtype, row stride stride_gz
  void* grad_t;            // (n, v) or null
  void* stats_out;         // kStats
  const void* stats_in;    // kJSDSums / kFinish: merged stats (n, kStatsWidth)
  void* jsd_out;           // kJSDSums
  const void* jsd_in;      // kFinish with JSD: summed [S_q, S_p] (n, 2)
  int64_t n, v;
  int64_t stride_z, stride_t, stride_gz, stride_gt;
  int64_t col_offset;      // first global column of this slice
  int64_t vocab_total;     // full vocabulary size (label smoothing's 1/V, target range)
  KDArgs args;
  int num_threads;
};

void kd_run_cpu(const KDProblem& p);

}  // namespace fastkd
