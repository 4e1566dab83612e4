// pybind11 entries of the capture family: a sparse teacher from its logits, top-k
// (capture_topk_cpu / _cuda) or sampled (capture_sample_cpu / _cuda), and the CUDA workspace
// queries. The CUDA entries take the CPU ones' keywords plus a workspace pointer (0: none; see
// *_workspace_cuda), the device index and the stream, in place of num_threads.
#include <pybind11/pybind11.h>

#include "bind/bind.h"
#include "cpu/capture.h"
#ifdef FASTKD_WITH_CUDA
#include "cuda/capture.h"
#endif

namespace py = pybind11;

namespace fastkd {
namespace bind {
namespace {

// One capture call from the keywords of the capture entries. Top-k calls pass 0 for the sampling
// fields (uniforms, counts, num_samples, width), sampled calls 0 for the top-k ones (values, k).
CaptureProblem capture_problem(int64_t teacher, int64_t uniforms, int64_t ids, int64_t values, int64_t counts,
                               int64_t lse, int64_t n, int64_t vocab, int64_t stride_teacher, int dtype,
                               double temperature, int64_t k, int64_t num_samples, int64_t width) {
  CaptureProblem p{};
  p.dtype = dtype;
  p.t = as_ptr<const void>(teacher);
  p.u = as_ptr<const double>(uniforms);
  p.ids = as_ptr<int64_t>(ids);
  p.values = as_ptr<void>(values);
  p.counts = as_ptr<int32_t>(counts);
  p.lse = as_ptr<void>(lse);
  p.n = n;
  p.v = vocab;
  p.stride_t = stride_teacher;
  p.temperature = temperature;
  p.k = k;
  p.num_samples = num_samples;
  p.width = width;
  return p;
}

}  // namespace

void bind_capture(py::module_& m) {
  m.def(
      "capture_topk_cpu",
      [](int64_t teacher, int64_t ids, int64_t values, int64_t lse, int64_t n, int64_t vocab, int64_t stride_teacher,
         int dtype, double temperature, int64_t k, int num_threads) {
        CaptureProblem p =
            capture_problem(teacher, 0, ids, values, 0, lse, n, vocab, stride_teacher, dtype, temperature, k, 0, 0);
        p.num_threads = num_threads;
        py::gil_scoped_release nogil;
        capture_topk_cpu(p);
      },
      "Top-k capture: ids (n, k) int64, log-probabilities (n, k) and lse (n,) of teacher/τ in one sweep.",
      py::kw_only(), py::arg("teacher"), py::arg("ids"), py::arg("values"), py::arg("lse"), py::arg("n"),
      py::arg("vocab"), py::arg("stride_teacher"), py::arg("dtype"), py::arg("temperature"), py::arg("k"),
      py::arg("num_threads"));
  m.def(
      "capture_sample_cpu",
      [](int64_t teacher, int64_t uniforms, int64_t ids, int64_t counts, int64_t lse, int64_t n, int64_t vocab,
         int64_t stride_teacher, int dtype, double temperature, int64_t num_samples, int64_t width,
         int num_threads) {
        CaptureProblem p = capture_problem(teacher, uniforms, ids, 0, counts, lse, n, vocab, stride_teacher, dtype,
                                           temperature, 0, num_samples, width);
        p.num_threads = num_threads;
        py::gil_scoped_release nogil;
        capture_sample_cpu(p);
      },
      "Sampled capture: inverse-CDF draws of the given uniforms -> unique ids, counts, lse.", py::kw_only(),
      py::arg("teacher"), py::arg("uniforms"), py::arg("ids"), py::arg("counts"), py::arg("lse"), py::arg("n"),
      py::arg("vocab"), py::arg("stride_teacher"), py::arg("dtype"), py::arg("temperature"),
      py::arg("num_samples"), py::arg("width"), py::arg("num_threads"));

#ifdef FASTKD_WITH_CUDA
  // The CUDA entries only enqueue work on `stream`.
  m.def("capture_topk_workspace_cuda", &capture_topk_workspace_cuda,
        "Bytes of global workspace capture_topk_cuda needs for (n, vocab, k, dtype, device); 0: none.",
        py::kw_only(), py::arg("n"), py::arg("vocab"), py::arg("k"), py::arg("dtype"), py::arg("device"));
  m.def("capture_sample_workspace_cuda", &capture_sample_workspace_cuda,
        "Bytes of global workspace capture_sample_cuda needs for (n, vocab, num_samples, dtype, device); 0: none.",
        py::kw_only(), py::arg("n"), py::arg("vocab"), py::arg("num_samples"), py::arg("dtype"), py::arg("device"));
  m.def(
      "capture_topk_cuda",
      [](int64_t teacher, int64_t ids, int64_t values, int64_t lse, int64_t workspace, int64_t n, int64_t vocab,
         int64_t stride_teacher, int dtype, double temperature, int64_t k, int device, int64_t stream) {
        const CaptureProblem p =
            capture_problem(teacher, 0, ids, values, 0, lse, n, vocab, stride_teacher, dtype, temperature, k, 0, 0);
        py::gil_scoped_release nogil;
        capture_topk_cuda(p, as_ptr<void>(workspace), device, stream);
      },
      "Top-k capture on the GPU: ids (n, k) int64, log-probabilities (n, k) float32, lse (n,) float32.",
      py::kw_only(), py::arg("teacher"), py::arg("ids"), py::arg("values"), py::arg("lse"), py::arg("workspace"),
      py::arg("n"), py::arg("vocab"), py::arg("stride_teacher"), py::arg("dtype"), py::arg("temperature"),
      py::arg("k"), py::arg("device"), py::arg("stream"));
  m.def(
      "capture_sample_cuda",
      [](int64_t teacher, int64_t uniforms, int64_t ids, int64_t counts, int64_t lse, int64_t workspace, int64_t n,
         int64_t vocab, int64_t stride_teacher, int dtype, double temperature, int64_t num_samples, int64_t width,
         int device, int64_t stream) {
        const CaptureProblem p = capture_problem(teacher, uniforms, ids, 0, counts, lse, n, vocab, stride_teacher,
                                                 dtype, temperature, 0, num_samples, width);
        py::gil_scoped_release nogil;
        capture_sample_cuda(p, as_ptr<void>(workspace), device, stream);
      },
      "Sampled capture on the GPU: inverse-CDF draws of the given float64 uniforms -> unique ids, int32 counts, "
      "lse.",
      py::kw_only(), py::arg("teacher"), py::arg("uniforms"), py::arg("ids"), py::arg("counts"), py::arg("lse"),
      py::arg("workspace"), py::arg("n"), py::arg("vocab"), py::arg("stride_teacher"), py::arg("dtype"),
      py::arg("temperature"), py::arg("num_samples"), py::arg("width"), py::arg("device"), py::arg("stream"));
#endif
}

}  // namespace bind
}  // namespace fastkd
