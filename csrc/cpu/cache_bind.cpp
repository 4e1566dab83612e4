// pybind11 entries of the teacher-cache CPU kernels (csrc/cpu/cache.cpp): raw pointers, sizes,
// strides, a dtype code and scalar settings, as the kd entries in csrc/binding.cpp. GIL released.
#include <pybind11/pybind11.h>

#include "cache_bind.h"
#include "cpu/cache.h"

namespace py = pybind11;

namespace fastkd {

void bind_cache_cpu(py::module_& m) {
  m.def(
      "capture_topk_cpu",
      [](int64_t t, int64_t ids, int64_t values, int64_t lse, int64_t n, int64_t v, int64_t stride_t,
         int dtype, double temperature, int64_t k, int num_threads) {
        CaptureProblem p = bind::topk_problem(t, ids, values, lse, n, v, stride_t, dtype, temperature, k);
        p.num_threads = num_threads;
        py::gil_scoped_release nogil;
        capture_topk_cpu(p);
      },
      "Top-k capture: ids (n, k) int64, log-probabilities (n, k) and lse (n,) of t/τ in one sweep.");
  m.def(
      "capture_sample_cpu",
      [](int64_t t, int64_t u, int64_t ids, int64_t counts, int64_t lse, int64_t n, int64_t v,
         int64_t stride_t, int dtype, double temperature, int64_t num_samples, int64_t width,
         int num_threads) {
        CaptureProblem p = bind::sample_problem(t, u, ids, counts, lse, n, v, stride_t, dtype, temperature,
                                                num_samples, width);
        p.num_threads = num_threads;
        py::gil_scoped_release nogil;
        capture_sample_cpu(p);
      },
      "Sampled capture: inverse-CDF draws of the given uniforms -> unique ids, counts, lse.");
  m.def(
      "sparse_kd_cpu",
      [](int64_t z, int64_t ids, int64_t w, int64_t target, int64_t divisor, int64_t loss, int64_t grad,
         int64_t n, int64_t v, int64_t k, int64_t stride_z, int64_t stride_g, int dtype, int tail,
         double temperature, double soft_scale, double hard_weight, int64_t ignore_index,
         double label_smoothing, int num_threads) {
        SparseKDProblem p = bind::sparse_problem(z, ids, w, target, divisor, loss, grad, n, v, k, stride_z,
                                                 stride_g, dtype, tail, temperature, soft_scale, hard_weight,
                                                 ignore_index, label_smoothing);
        p.num_threads = num_threads;
        py::gil_scoped_release nogil;
        sparse_kd_cpu(p);
      },
      "Sparse KD loss rows (divided by the divisor) and the student gradient, two sweeps per row.");
}

}  // namespace fastkd
