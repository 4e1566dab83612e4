// The fastkd._C module: built_with_cuda() and the entries of every op family (csrc/bind/bind.h).
#include <pybind11/pybind11.h>

#include "bind/bind.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastkd fused kernels (raw-pointer interface; see fastkd/_ops.py)";
  m.def(
      "built_with_cuda",
      []() {
#ifdef FASTKD_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA entries (*_cuda) were compiled in.");
  fastkd::bind::bind_kd(m);
  fastkd::bind::bind_capture(m);
  fastkd::bind::bind_sparse_kd(m);
  fastkd::bind::bind_uld(m);
}
