// pybind11 entry of the uld family: the Universal Logit Distillation loss from the student's logits
// and the teacher's sorted head and tail mass, uld_cpu (csrc/cpu/uld.cpp). No CUDA entry: on GPU
// the torch backend computes it (fastkd/_reference/uld.py).
#include <pybind11/pybind11.h>

#include "bind/bind.h"
#include "cpu/uld.h"

namespace py = pybind11;

namespace fastkd {
namespace bind {

void bind_uld(py::module_& m) {
  m.def(
      "uld_cpu",
      [](int64_t student, int64_t head, int64_t tail, int64_t cols, int64_t divisor, int64_t loss, int64_t grad,
         int64_t n, int64_t vocab, int64_t k, int64_t stride_student, int64_t stride_grad, int dtype,
         double temperature, double scale, int num_threads) {
        ULDProblem p{};
        p.dtype = dtype;
        p.z = as_ptr<const void>(student);
        p.head = as_ptr<const void>(head);
        p.tail = as_ptr<const void>(tail);
        p.cols = as_ptr<const uint8_t>(cols);
        p.divisor = as_ptr<const void>(divisor);
        p.loss = as_ptr<void>(loss);
        p.grad = as_ptr<void>(grad);
        p.n = n;
        p.v = vocab;
        p.k = k;
        p.stride_z = stride_student;
        p.stride_g = stride_grad;
        p.temperature = temperature;
        p.scale = scale;
        p.num_threads = num_threads;
        py::gil_scoped_release nogil;
        uld_cpu(p);
      },
      "ULD loss rows (divided by the divisor) and the student gradient: one pass for the top-k and the "
      "log-sum-exp, one for the gradient.",
      py::kw_only(), py::arg("student"), py::arg("head"), py::arg("tail"), py::arg("cols"), py::arg("divisor"),
      py::arg("loss"), py::arg("grad"), py::arg("n"), py::arg("vocab"), py::arg("k"), py::arg("stride_student"),
      py::arg("stride_grad"), py::arg("dtype"), py::arg("temperature"), py::arg("scale"), py::arg("num_threads"));
}

}  // namespace bind
}  // namespace fastkd
