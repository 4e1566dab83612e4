// pybind11 entries of the sparse_kd family: the KD loss against a captured teacher (stored ids and
// probabilities), sparse_kd_cpu and sparse_kd_cuda, and the CUDA workspace query. sparse_kd_cuda
// takes the CPU entry's keywords plus a workspace pointer (0: none; see sparse_kd_workspace_cuda),
// the device index and the stream, in place of num_threads.
#include <pybind11/pybind11.h>

#include "bind/bind.h"
#include "cpu/sparse_kd.h"
#ifdef FASTKD_WITH_CUDA
#include "cuda/sparse_kd.h"
#endif

namespace py = pybind11;

namespace fastkd {
namespace bind {
namespace {

// One sparse KD call from the keywords sparse_kd_cpu and sparse_kd_cuda share (vocab = v,
// student = z, weights = w, stride_grad = stride_g). tail: a SparseTail code; target 0: none.
SparseKDProblem sparse_kd_problem(int64_t student, int64_t ids, int64_t weights, int64_t target, int64_t divisor,
                                  int64_t loss, int64_t grad, int64_t n, int64_t vocab, int64_t k,
                                  int64_t stride_student, int64_t stride_grad, int dtype, int tail,
                                  double temperature, double soft_scale, double hard_weight, int64_t ignore_index,
                                  double label_smoothing) {
  SparseKDProblem p{};
  p.dtype = dtype;
  p.z = as_ptr<const void>(student);
  p.ids = as_ptr<const int64_t>(ids);
  p.w = as_ptr<const void>(weights);
  p.target = as_ptr<const int64_t>(target);
  p.divisor = as_ptr<const void>(divisor);
  p.loss = as_ptr<void>(loss);
  p.grad = as_ptr<void>(grad);
  p.n = n;
  p.v = vocab;
  p.k = k;
  p.stride_z = stride_student;
  p.stride_g = stride_grad;
  p.tail = tail;
  p.temperature = temperature;
  p.soft_scale = soft_scale;
  p.hard_weight = hard_weight;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  return p;
}

}  // namespace

void bind_sparse_kd(py::module_& m) {
  m.def(
      "sparse_kd_cpu",
      [](int64_t student, int64_t ids, int64_t weights, int64_t target, int64_t divisor, int64_t loss, int64_t grad,
         int64_t n, int64_t vocab, int64_t k, int64_t stride_student, int64_t stride_grad, int dtype, int tail,
         double temperature, double soft_scale, double hard_weight, int64_t ignore_index, double label_smoothing,
         int num_threads) {
        SparseKDProblem p = sparse_kd_problem(student, ids, weights, target, divisor, loss, grad, n, vocab, k,
                                              stride_student, stride_grad, dtype, tail, temperature, soft_scale,
                                              hard_weight, ignore_index, label_smoothing);
        p.num_threads = num_threads;
        py::gil_scoped_release nogil;
        sparse_kd_cpu(p);
      },
      "Sparse KD loss rows (divided by the divisor) and the student gradient, two sweeps per row.",
      py::kw_only(), py::arg("student"), py::arg("ids"), py::arg("weights"), py::arg("target"), py::arg("divisor"),
      py::arg("loss"), py::arg("grad"), py::arg("n"), py::arg("vocab"), py::arg("k"), py::arg("stride_student"),
      py::arg("stride_grad"), py::arg("dtype"), py::arg("tail"), py::arg("temperature"), py::arg("soft_scale"),
      py::arg("hard_weight"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("num_threads"));

#ifdef FASTKD_WITH_CUDA
  // The CUDA entries only enqueue work on `stream`; the divisor is read on the device.
  m.def("sparse_kd_workspace_cuda", &sparse_kd_workspace_cuda,
        "Bytes of global workspace sparse_kd_cuda needs for (n, vocab, k, dtype, device); 0: none.", py::kw_only(),
        py::arg("n"), py::arg("vocab"), py::arg("k"), py::arg("dtype"), py::arg("device"));
  m.def(
      "sparse_kd_cuda",
      [](int64_t student, int64_t ids, int64_t weights, int64_t target, int64_t divisor, int64_t loss, int64_t grad,
         int64_t workspace, int64_t n, int64_t vocab, int64_t k, int64_t stride_student, int64_t stride_grad,
         int dtype, int tail, double temperature, double soft_scale, double hard_weight, int64_t ignore_index,
         double label_smoothing, int device, int64_t stream) {
        const SparseKDProblem p = sparse_kd_problem(student, ids, weights, target, divisor, loss, grad, n, vocab, k,
                                                    stride_student, stride_grad, dtype, tail, temperature,
                                                    soft_scale, hard_weight, ignore_index, label_smoothing);
        py::gil_scoped_release nogil;
        sparse_kd_cuda(p, as_ptr<void>(workspace), device, stream);
      },
      "Sparse KD loss rows (divided by the device divisor) and the student gradient on the GPU.", py::kw_only(),
      py::arg("student"), py::arg("ids"), py::arg("weights"), py::arg("target"), py::arg("divisor"),
      py::arg("loss"), py::arg("grad"), py::arg("workspace"), py::arg("n"), py::arg("vocab"), py::arg("k"),
      py::arg("stride_student"), py::arg("stride_grad"), py::arg("dtype"), py::arg("tail"),
      py::arg("temperature"), py::arg("soft_scale"), py::arg("hard_weight"), py::arg("ignore_index"),
      py::arg("label_smoothing"), py::arg("device"), py::arg("stream"));
#endif
}

}  // namespace bind
}  // namespace fastkd
