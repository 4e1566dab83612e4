// pybind11 entries of the teacher-cache CUDA kernels (csrc/cuda/cache.cu): device pointers, sizes,
// strides, a dtype code, scalar settings, a workspace pointer (0: none), then the device index and
// the caller's stream, as the kd CUDA entries in csrc/binding.cpp. They only enqueue work; the
// divisor is read on the device. Compiled into fastkd._C only when the CUDA kernels are built.
#include <pybind11/pybind11.h>

#include "cuda/cache.h"

namespace py = pybind11;

namespace fastkd {
namespace {
template <typename T>
T* as_ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(p));
}
}  // namespace

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
        py::gil_scoped_release nogil;
        capture_topk_cuda(p, as_ptr<void>(workspace), device, stream);
      },
      "Top-k capture on the GPU: ids (n, k) int64, log-probabilities (n, k) float32, lse (n,) float32.");
  m.def(
      "capture_sample_cuda",
      [](int64_t t, int64_t u, int64_t ids, int64_t counts, int64_t lse, int64_t workspace, int64_t n,
         int64_t v, int64_t stride_t, int dtype, double temperature, int64_t num_samples, int64_t width,
         int device, int64_t stream) {
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
        py::gil_scoped_release nogil;
        sparse_kd_cuda(p, as_ptr<void>(workspace), device, stream);
      },
      "Sparse KD loss rows (divided by the device divisor) and the student gradient on the GPU.");
}

}  // namespace fastkd
