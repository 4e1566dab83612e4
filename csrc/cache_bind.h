// The teacher-cache problem descriptions built from the raw integers the Python wrappers pass (device
// or host pointers, sizes, strides, dtype code, settings). Shared by the CPU and CUDA bindings
// (csrc/cpu/cache_bind.cpp, csrc/cuda/cache_bind.cpp), which differ only in what they launch.
#pragma once

#include <cstdint>

#include "cpu/cache.h"

namespace fastkd {
namespace bind {

template <typename T>
T* as_ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(p));
}

inline CaptureProblem topk_problem(int64_t t, int64_t ids, int64_t values, int64_t lse, int64_t n, int64_t v,
                                   int64_t stride_t, int dtype, double temperature, int64_t k) {
  CaptureProblem p{};
  p.dtype = dtype;
  p.t = as_ptr<const void>(t);
  p.ids = as_ptr<int64_t>(ids);
  p.values = as_ptr<void>(values);
  p.lse = as_ptr<void>(lse);
  p.n = n;
  p.v = v;
  p.stride_t = stride_t;
  p.temperature = temperature;
  p.k = k;
  return p;
}

inline CaptureProblem sample_problem(int64_t t, int64_t u, int64_t ids, int64_t counts, int64_t lse, int64_t n,
                                     int64_t v, int64_t stride_t, int dtype, double temperature,
                                     int64_t num_samples, int64_t width) {
  CaptureProblem p{};
  p.dtype = dtype;
  p.t = as_ptr<const void>(t);
  p.u = as_ptr<const double>(u);
  p.ids = as_ptr<int64_t>(ids);
  p.counts = as_ptr<int32_t>(counts);
  p.lse = as_ptr<void>(lse);
  p.n = n;
  p.v = v;
  p.stride_t = stride_t;
  p.temperature = temperature;
  p.num_samples = num_samples;
  p.width = width;
  return p;
}

inline SparseKDProblem sparse_problem(int64_t z, int64_t ids, int64_t w, int64_t target, int64_t divisor,
                                      int64_t loss, int64_t grad, int64_t n, int64_t v, int64_t k,
                                      int64_t stride_z, int64_t stride_g, int dtype, int tail, double temperature,
                                      double soft_scale, double hard_weight, int64_t ignore_index,
                                      double label_smoothing) {
  SparseKDProblem p{};
  p.dtype = dtype;
  p.z = as_ptr<const void>(z);
  p.ids = as_ptr<const int64_t>(ids);
  p.w = as_ptr<const void>(w);
  p.target = as_ptr<const int64_t>(target);
  p.divisor = as_ptr<const void>(divisor);
  p.loss = as_ptr<void>(loss);
  p.grad = as_ptr<void>(grad);
  p.n = n;
  p.v = v;
  p.k = k;
  p.stride_z = stride_z;
  p.stride_g = stride_g;
  p.tail = tail;
  p.temperature = temperature;
  p.soft_scale = soft_scale;
  p.hard_weight = hard_weight;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  return p;
}

}  // namespace bind
}  // namespace fastkd
