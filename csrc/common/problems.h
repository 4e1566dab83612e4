// The problem descriptions every kernel family takes, shared by the CPU kernels (csrc/cpu), the CUDA
// kernels (csrc/cuda) and the bindings (csrc/bind): what one call computes, as raw pointers, sizes,
// strides, a dtype code and scalar settings. Plain C++ only (no CUDA or torch headers), so host code
// and nvcc include it alike.
//
// Pointers are host pointers for the CPU kernels and device pointers for the CUDA ones; every row
// has unit column stride and an arbitrary row stride; sizes and offsets are 64-bit.
#pragma once

#include <cstdint>

namespace fastkd {

// dtype codes shared with fastkd/_ext.py. The accumulator (and the dtype of every loss, stats and
// value output) is float32, or float64 for kF64 inputs (CPU only).
enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

// ------------------------------------------------------------------------------------------------
// kd: the dense fused loss and its shard phases (cpu/kd.h, cuda/kd.h)
// ------------------------------------------------------------------------------------------------
// p teacher, q student: KL(p‖q), KL(q‖p), JSD_β, ½Σ|p − q|, KL(p‖αp + (1−α)q), KL(q‖αq + (1−α)p).
// The last four need the row's final normalisers before their sums can start (has_sums_pass).
enum Divergence : int {
  kForwardKL = 0, kReverseKL = 1, kJSD = 2, kTVD = 3, kSkewForwardKL = 4, kSkewReverseKL = 5
};
constexpr int kNumDivergences = 6;

// Scalar settings of one call. soft_scale = soft_weight · (τ² if t2_scale); softcap 0 means none;
// beta is the divergence's mixture weight (JSD's β, skew KL's α).
// Held in double so float64 inputs see the exact Python values; float kernels round them once.
struct KDArgs {
  double temperature;
  double soft_scale;
  double hard_weight;
  int divergence;
  double beta;
  int64_t ignore_index;
  double label_smoothing;
  double softcap;
  bool has_target;
};

// Width of one row of a stats tensor: the 10 fields of RowStats (common/kd_math.h) in declaration
// order, then a NaN flag (any NaN in the slice's inputs).
constexpr int kStatsWidth = 11;

// What one call computes. Pointers may be null where the mode does not use them.
//   kFused : stats + finish per row (the single-device loss): loss, grad_z, grad_t (optional)
//   kStats : partial RowStats of a vocabulary slice per row -> stats_out (n, kStatsWidth)
//   kDivSums: given merged stats, the slice's part of the divergence's two sums -> sums_out (n, 2)
//            (divergences with has_sums_pass; the sums are listed in common/kd_math.h, DivSums)
//   kFinish: given merged stats (+ the summed divergence sums), the slice's gradient and the row loss
enum Mode : int { kFused = 0, kStats = 1, kDivSums = 2, kFinish = 3 };

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
  const void* stats_in;    // kDivSums / kFinish: merged stats (n, kStatsWidth)
  void* sums_out;          // kDivSums
  const void* sums_in;     // kFinish of a divergence with has_sums_pass: the summed sums (n, 2)
  int64_t n, v;
  int64_t stride_z, stride_t, stride_gz, stride_gt;
  int64_t col_offset;      // first global column of this slice
  int64_t vocab_total;     // full vocabulary size (label smoothing's 1/V, target range)
  KDArgs args;
  int num_threads;         // CPU only: OpenMP threads over rows
};

// ------------------------------------------------------------------------------------------------
// capture: a sparse teacher from its logits, top-k or sampled (cpu/capture.h, cuda/capture.h)
// ------------------------------------------------------------------------------------------------
struct CaptureProblem {
  int dtype;
  const void* t;        // (n, v) teacher logits, row stride stride_t, unit column stride
  const double* u;      // sample mode: (n, num_samples) uniforms in [0, 1), row-major
  int64_t* ids;         // (n, width) out
  void* values;         // top-k: (n, k) log-probabilities out (float; double for f64)
  int32_t* counts;      // sample: (n, width) out
  void* lse;            // (n,) out (float; double for f64)
  int64_t n, v, stride_t;
  double temperature;
  int64_t k;            // top-k: ids per row
  int64_t num_samples;  // sample: draws per row
  int64_t width;        // sample: output columns = min(num_samples, v)
  int num_threads;      // CPU only: OpenMP threads over rows
};

// ------------------------------------------------------------------------------------------------
// sparse_kd: the KD loss against a captured teacher (cpu/sparse_kd.h, cuda/sparse_kd.h)
// ------------------------------------------------------------------------------------------------
// Tail treatment of the sparse loss (same numbers as fastkd/_cache_reference.py).
enum SparseTail : int { kTailBucket = 0, kTailRenorm = 1, kTailSampled = 2 };

struct SparseKDProblem {
  int dtype;
  const void* z;          // (n, v) student logits, row stride stride_z
  const int64_t* ids;     // (n, k) stored ids, −1 = padding
  const void* w;          // (n, k) stored teacher probabilities (float; double for f64)
  const int64_t* target;  // (n,) or null
  const void* divisor;    // 0-d (float; double for f64)
  void* loss;             // (n,) out
  void* grad;             // (n, v) out, input dtype, row stride stride_g
  int64_t n, v, k, stride_z, stride_g;
  int tail;
  double temperature, soft_scale, hard_weight, label_smoothing;  // double: float64 rows keep full precision
  int64_t ignore_index;
  int num_threads;        // CPU only: OpenMP threads over rows
};

}  // namespace fastkd
