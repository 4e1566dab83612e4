// Raw-pointer interface of the teacher-cache CPU kernels (csrc/cpu/cache.cpp), bound in
// csrc/cpu/cache_bind.cpp. dtype codes as in cpu/kd.h (0 f32, 1 f64, 2 bf16, 3 f16).
#pragma once

#include <cstdint>

namespace fastkd {

// Tail treatment of the sparse loss (same numbers as fastkd/_cache_reference.py).
enum SparseTail : int { kTailBucket = 0, kTailRenorm = 1, kTailSampled = 2 };

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
  int num_threads;
};

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
  int num_threads;
};

void capture_topk_cpu(const CaptureProblem& p);
void capture_sample_cpu(const CaptureProblem& p);
void sparse_kd_cpu(const SparseKDProblem& p);

}  // namespace fastkd
