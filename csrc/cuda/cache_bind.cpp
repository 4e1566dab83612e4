// pybind11 entries of the teacher-cache CUDA kernels (csrc/cuda/cache.cu): device pointers, sizes,
// strides, a dtype code, scalar settings, a workspace pointer (0: none), then the device index and
// the caller's stream, as the kd CUDA entries in csrc/binding.cpp. They only enqueue work; the
// divisor is read on the device. Compiled into fastkd._C only when the CUDA kernels are built.
#include <pybind11/pybind11.h>

#include "cache_bind.h"
#include "cuda/cache.h"

namespace py = pybind11;

namespace fastkd {
using bind::as_ptr;

void bind_cache_cuda(py::module_& m) {
  m.def("capture_topk_workspace_cuda", &capture_topk_workspace_cuda,
        "Bytes of global workspace capture_topk_cuda needs for (n, v, k, dtype, device); 0: none.");
  m.def("capture_sample_workspace_cuda", &capture_sample_workspace_cuda,
        "Bytes of global workspace capture_sample_cuda needs for (n, v, num_samples, dtype, device).");
  m.def("sparse_kd_workspace_cuda", &sparse_kd_workspace_cuda,
        "Bytes of global workspace sparse_kd_cuda needs for (n, v, k, dtype, device).");
  m.def(
      "capture_topk_cuda",
      [](int64_t t, int64_t ids, int64_t values, int64_t lse, int64_t workspace, int64_t n, int64_t v,
         int64_t stride_t, int dtype, double temperature, int64_t k, int device, int64_t stream) {
        const CaptureProblem p = bind::topk_problem(t, ids, values, lse, n, v, stride_t, dtype, temperature, k);
        py::gil_scoped_release nogil;
        capture_topk_cuda(p, as_ptr<void>(workspace), device, stream);
      },
      "Top-k capture on the GPU: ids (n, k) int64, log-probabilities (n, k) float32, lse (n,) float32.");
  m.def(
      "capture_sample_cuda",
      [](int64_t t, int64_t u, int64_t ids, int64_t counts, int64_t lse, int64_t workspace, int64_t n,
         int64_t v, int64_t stride_t, int dtype, double temperature, int64_t num_samples, int64_t width,
         int device, int64_t stream) {
        const CaptureProblem p = bind::sample_problem(t, u, ids, counts, lse, n, v, stride_t, dtype, temperature,
                                                      num_samples, width);
        py::gil_scoped_release nogil;
        capture_sample_cuda(p, as_ptr<void>(workspace), device, stream);
      },
      "Sampled capture on the GPU: inverse-CDF draws of the given float64 uniforms -> unique ids, "
      "int32 counts, lse.");
  m.def(
      "sparse_kd_cuda",
      [](int64_t z, int64_t ids, int64_t w, int64_t target, int64_t divisor, int64_t loss, int64_t grad,
         int64_t workspace, int64_t n, int64_t v, int64_t k, int64_t stride_z, int64_t stride_g, int dtype,
         int tail, double temperature, double soft_scale, double hard_weight, int64_t ignore_index,
         double label_smoothing, int device, int64_t stream) {
        const SparseKDProblem p = bind::sparse_problem(z, ids, w, target, divisor, loss, grad, n, v, k, stride_z,
                                                       stride_g, dtype, tail, temperature, soft_scale,
                                                       hard_weight, ignore_index, label_smoothing);
        py::gil_scoped_release nogil;
        sparse_kd_cuda(p, as_ptr<void>(workspace), device, stream);
      },
      "Sparse KD loss rows (divided by the device divisor) and the student gradient on the GPU.");
}

}  // namespace fastkd
