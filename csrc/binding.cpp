// pybind11 entry points of fastkd._C. Kernels take raw pointers (tensor.data_ptr()), sizes, strides,
// a dtype code and, for CUDA, the caller's stream as an integer: no torch headers, so one build works
// with any torch version. Every entry releases the GIL while the kernel runs.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "cpu/kd.h"
#ifdef FASTKD_WITH_CUDA
#include "cuda/kd.h"
#endif

namespace py = pybind11;

namespace fastkd {
namespace {

template <typename T>
T* ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(p));
}

KDArgs make_args(double temperature, double soft_scale, double hard_weight, int divergence,
                 double beta, int64_t ignore_index, double label_smoothing, double softcap,
                 bool has_target) {
  KDArgs a;
  a.temperature = temperature;
  a.soft_scale = soft_scale;
  a.hard_weight = hard_weight;
  a.divergence = divergence;
  a.beta = beta;
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.softcap = softcap;
  a.has_target = has_target;
  return a;
}

// Shared argument order of the kd entries: pointers, sizes, strides, dtype, scalar settings.
KDProblem make_problem(int mode, int64_t z, int64_t t, int64_t target, int64_t divisor, int64_t loss,
                       int64_t grad_z, int64_t grad_t, int64_t n, int64_t v, int64_t stride_z,
                       int64_t stride_t, int64_t stride_gz, int64_t stride_gt, int dtype,
                       double temperature, double soft_scale, double hard_weight, int divergence,
                       double beta, int64_t ignore_index, double label_smoothing, double softcap,
                       int num_threads) {
  KDProblem p{};
  p.mode = mode;
  p.dtype = dtype;
  p.z = ptr<const void>(z);
  p.t = ptr<const void>(t);
  p.target = ptr<const int64_t>(target);
  p.divisor = ptr<const void>(divisor);
  p.loss = ptr<void>(loss);
  p.grad_z = ptr<void>(grad_z);
  p.grad_t = ptr<void>(grad_t);
  p.n = n;
  p.v = v;
  p.stride_z = stride_z;
  p.stride_t = stride_t;
  p.stride_gz = stride_gz;
  p.stride_gt = stride_gt;
  p.col_offset = 0;
  p.vocab_total = v;
  p.args = make_args(temperature, soft_scale, hard_weight, divergence, beta, ignore_index,
                     label_smoothing, softcap, target != 0);
  p.num_threads = num_threads;
  return p;
}

void bind_kd_cpu(py::module_& m) {
  m.def(
      "kd_forward_cpu",
      [](int64_t z, int64_t t, int64_t target, int64_t divisor, int64_t loss, int64_t grad_z,
         int64_t grad_t, int64_t n, int64_t v, int64_t stride_z, int64_t stride_t, int64_t stride_gz,
         int64_t stride_gt, int dtype, double temperature, double soft_scale, double hard_weight,
         int divergence, double beta, int64_t ignore_index, double label_smoothing, double softcap,
         int num_threads) {
        KDProblem p = make_problem(kFused, z, t, target, divisor, loss, grad_z, grad_t, n, v,
                                   stride_z, stride_t, stride_gz, stride_gt, dtype, temperature,
                                   soft_scale, hard_weight, divergence, beta, ignore_index,
                                   label_smoothing, softcap, num_threads);
        py::gil_scoped_release nogil;
        kd_run_cpu(p);
      },
      "Fused kd loss rows + gradients (stats and finish in one sweep per row).");
  // Two-phase entries for the vocab-parallel loss: the slice starts at global column col_offset of
  // a vocabulary of vocab_total; stats/jsd/finish tensors are (n, kStatsWidth) / (n, 2), float32
  // (float64 for float64 logits).
  m.def(
      "kd_shard_cpu",
      [](int mode, int64_t z, int64_t t, int64_t target, int64_t divisor, int64_t loss,
         int64_t grad_z, int64_t grad_t, int64_t stats_out, int64_t stats_in, int64_t jsd_out,
         int64_t jsd_in, int64_t n, int64_t v, int64_t stride_z, int64_t stride_t,
         int64_t stride_gz, int64_t stride_gt, int64_t col_offset, int64_t vocab_total, int dtype,
         double temperature, double soft_scale, double hard_weight, int divergence, double beta,
         int64_t ignore_index, double label_smoothing, double softcap, int num_threads) {
        if (mode < kStats || mode > kFinish) throw std::invalid_argument("kd_shard_cpu: bad mode");
        KDProblem p = make_problem(mode, z, t, target, divisor, loss, grad_z, grad_t, n, v,
                                   stride_z, stride_t, stride_gz, stride_gt, dtype, temperature,
                                   soft_scale, hard_weight, divergence, beta, ignore_index,
                                   label_smoothing, softcap, num_threads);
        p.stats_out = ptr<void>(stats_out);
        p.stats_in = ptr<const void>(stats_in);
        p.jsd_out = ptr<void>(jsd_out);
        p.jsd_in = ptr<const void>(jsd_in);
        p.col_offset = col_offset;
        p.vocab_total = vocab_total;
        py::gil_scoped_release nogil;
        kd_run_cpu(p);
      },
      "One phase of the vocab-parallel kd loss: mode 1 stats, 2 JSD sums, 3 finish.");
  m.attr("KD_STATS_WIDTH") = kStatsWidth;
}

#ifdef FASTKD_WITH_CUDA
// CUDA entries: same argument order as the CPU ones, with the tensors' device index and the
// caller's stream (torch.cuda.current_stream().cuda_stream) in place of num_threads. They only
// enqueue work; the divisor is read on the device.
void bind_kd_cuda(py::module_& m) {
  m.def(
      "kd_forward_cuda",
      [](int64_t z, int64_t t, int64_t target, int64_t divisor, int64_t loss, int64_t grad_z,
         int64_t grad_t, int64_t n, int64_t v, int64_t stride_z, int64_t stride_t, int64_t stride_gz,
         int64_t stride_gt, int dtype, double temperature, double soft_scale, double hard_weight,
         int divergence, double beta, int64_t ignore_index, double label_smoothing, double softcap,
         int device, int64_t stream) {
        KDProblem p = make_problem(kFused, z, t, target, divisor, loss, grad_z, grad_t, n, v,
                                   stride_z, stride_t, stride_gz, stride_gt, dtype, temperature,
                                   soft_scale, hard_weight, divergence, beta, ignore_index,
                                   label_smoothing, softcap, 0);
        py::gil_scoped_release nogil;
        kd_run_cuda(p, device, stream);
      },
      "Fused kd loss rows + gradients on the GPU (one block per row, enqueued on `stream`).");
  m.def(
      "kd_shard_cuda",
      [](int mode, int64_t z, int64_t t, int64_t target, int64_t divisor, int64_t loss,
         int64_t grad_z, int64_t grad_t, int64_t stats_out, int64_t stats_in, int64_t jsd_out,
         int64_t jsd_in, int64_t n, int64_t v, int64_t stride_z, int64_t stride_t,
         int64_t stride_gz, int64_t stride_gt, int64_t col_offset, int64_t vocab_total, int dtype,
         double temperature, double soft_scale, double hard_weight, int divergence, double beta,
         int64_t ignore_index, double label_smoothing, double softcap, int device, int64_t stream) {
        if (mode < kStats || mode > kFinish) throw std::invalid_argument("kd_shard_cuda: bad mode");
        KDProblem p = make_problem(mode, z, t, target, divisor, loss, grad_z, grad_t, n, v,
                                   stride_z, stride_t, stride_gz, stride_gt, dtype, temperature,
                                   soft_scale, hard_weight, divergence, beta, ignore_index,
                                   label_smoothing, softcap, 0);
        p.stats_out = ptr<void>(stats_out);
        p.stats_in = ptr<const void>(stats_in);
        p.jsd_out = ptr<void>(jsd_out);
        p.jsd_in = ptr<const void>(jsd_in);
        p.col_offset = col_offset;
        p.vocab_total = vocab_total;
        py::gil_scoped_release nogil;
        kd_run_cuda(p, device, stream);
      },
      "One phase of the vocab-parallel kd loss on the GPU: mode 1 stats, 2 JSD sums, 3 finish "
      "(float32 stats (n, KD_STATS_WIDTH) and JSD sums (n, 2)).");
  m.def(
      "scale_rows_cuda",
      [](int64_t grad, int64_t n, int64_t v, int64_t stride, int dtype, int64_t g, int64_t g_stride,
         int device, int64_t stream) {
        py::gil_scoped_release nogil;
        scale_rows_cuda(grad, n, v, stride, dtype, g, g_stride, device, stream);
      },
      "grad[r] *= g[r] in place on the GPU; rows with g == 1 are skipped on the device.");
}
#endif

}  // namespace
}  // namespace fastkd

namespace fastkd {
void bind_cache_cpu(py::module_& m);  // csrc/cpu/cache_bind.cpp (teacher cache)
#ifdef FASTKD_WITH_CUDA
void bind_cache_cuda(py::module_& m);  // csrc/cuda/cache_bind.cpp
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastkd fused kernels (raw-pointer interface; see fastkd/_ops.py)";
  m.def("built_with_cuda", []() {
#ifdef FASTKD_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  fastkd::bind_kd_cpu(m);
  fastkd::bind_cache_cpu(m);
#ifdef FASTKD_WITH_CUDA
  fastkd::bind_kd_cuda(m);
  fastkd::bind_cache_cuda(m);
#endif
}
