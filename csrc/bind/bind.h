// What the binding files of fastkd._C share: one binder per op family (csrc/bind/kd.cpp,
// capture.cpp, sparse_kd.cpp, uld.cpp), called by the module definition (csrc/bind/module.cpp), and the
// conversion of the integer pointers Python passes.
//
// Every entry takes keyword-only arguments: raw pointers as integers (tensor.data_ptr(), 0: null),
// sizes, strides, a dtype code and scalar settings; the CUDA entries also take the tensors' device
// index and the caller's stream (torch.cuda.current_stream().cuda_stream). No torch headers, so one
// build works with any torch version. Every entry that runs a kernel releases the GIL meanwhile.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace fastkd {
namespace bind {

template <typename T>
T* as_ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(p));
}

void bind_kd(pybind11::module_& m);
void bind_capture(pybind11::module_& m);
void bind_sparse_kd(pybind11::module_& m);
void bind_uld(pybind11::module_& m);

}  // namespace bind
}  // namespace fastkd
