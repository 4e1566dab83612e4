// pybind11 entries of the kd family: the dense fused loss (mode 0) and the three shard phases of the
// vocab-parallel loss (modes 1-3), kd_cpu and kd_cuda, plus the CUDA backward helper
// scale_rows_cuda. kd_cpu and kd_cuda take the same keywords except for the device's own: CPU
// threads, or the device index and stream.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "bind/bind.h"
#include "common/kd_math.h"
#include "cpu/kd.h"
#ifdef FASTKD_WITH_CUDA
#include "cuda/kd.h"
#endif

namespace py = pybind11;

namespace fastkd {
namespace bind {
namespace {

// One kd call from the keywords kd_cpu and kd_cuda share (names as in Python: vocab = v,
// student = z, teacher = t, grad_student = grad_z, ...). vocab_total = -1 means vocab (one device,
// or a slice that is the whole row); the target is optional (0: soft loss only).
KDProblem kd_problem(int mode, int64_t student, int64_t teacher, int64_t target, int64_t divisor, int64_t loss,
                     int64_t grad_student, int64_t grad_teacher, int64_t stats_out, int64_t stats_in,
                     int64_t sums_out, int64_t sums_in, int64_t n, int64_t vocab, int64_t stride_student,
                     int64_t stride_teacher, int64_t stride_grad_student, int64_t stride_grad_teacher,
                     int64_t col_offset, int64_t vocab_total, int dtype, double temperature, double soft_scale,
                     double hard_weight, int divergence, double beta, int64_t ignore_index,
                     double label_smoothing, double softcap) {
  if (mode < kFused || mode > kFinish)
    throw std::invalid_argument("kd: mode must be 0 (fused), 1 (stats), 2 (divergence sums) or 3 (finish)");
  if (divergence < 0 || divergence >= kNumDivergences)
    throw std::invalid_argument("kd: divergence code must lie in [0, " + std::to_string(kNumDivergences) + ")");
  if (mode == kDivSums && !has_sums_pass(divergence))
    throw std::invalid_argument("kd: mode 2 (divergence sums) needs a divergence with a sums pass");
  KDProblem p{};
  p.mode = mode;
  p.dtype = dtype;
  p.z = as_ptr<const void>(student);
  p.t = as_ptr<const void>(teacher);
  p.target = as_ptr<const int64_t>(target);
  p.divisor = as_ptr<const void>(divisor);
  p.loss = as_ptr<void>(loss);
  p.grad_z = as_ptr<void>(grad_student);
  p.grad_t = as_ptr<void>(grad_teacher);
  p.stats_out = as_ptr<void>(stats_out);
  p.stats_in = as_ptr<const void>(stats_in);
  p.sums_out = as_ptr<void>(sums_out);
  p.sums_in = as_ptr<const void>(sums_in);
  p.n = n;
  p.v = vocab;
  p.stride_z = stride_student;
  p.stride_t = stride_teacher;
  p.stride_gz = stride_grad_student;
  p.stride_gt = stride_grad_teacher;
  p.col_offset = col_offset;
  p.vocab_total = vocab_total == -1 ? vocab : vocab_total;
  p.args.temperature = temperature;
  p.args.soft_scale = soft_scale;
  p.args.hard_weight = hard_weight;
  p.args.divergence = divergence;
  p.args.beta = beta;
  p.args.ignore_index = ignore_index;
  p.args.label_smoothing = label_smoothing;
  p.args.softcap = softcap;
  p.args.has_target = target != 0;
  return p;
}

// Defines a kd entry: the keywords of kd_problem, in its order, then the device's own (`device_args`).
// Stats and divergence-sum tensors are (n, KD_STATS_WIDTH) / (n, 2), float32 (float64 for float64 logits).
template <typename F, typename... DeviceArgs>
void def_kd(py::module_& m, const char* name, F&& f, const char* doc, DeviceArgs&&... device_args) {
  m.def(name, std::forward<F>(f), doc, py::kw_only(), py::arg("mode"), py::arg("student"), py::arg("teacher"),
        py::arg("target"), py::arg("divisor"), py::arg("loss"), py::arg("grad_student"), py::arg("grad_teacher"),
        py::arg("stats_out") = 0, py::arg("stats_in") = 0, py::arg("sums_out") = 0, py::arg("sums_in") = 0,
        py::arg("n"), py::arg("vocab"), py::arg("stride_student"), py::arg("stride_teacher"),
        py::arg("stride_grad_student"), py::arg("stride_grad_teacher"), py::arg("col_offset") = 0,
        py::arg("vocab_total") = -1, py::arg("dtype"), py::arg("temperature"), py::arg("soft_scale"),
        py::arg("hard_weight"), py::arg("divergence"), py::arg("beta"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("softcap"), std::forward<DeviceArgs>(device_args)...);
}

}  // namespace

void bind_kd(py::module_& m) {
  def_kd(
      m, "kd_cpu",
      [](int mode, int64_t student, int64_t teacher, int64_t target, int64_t divisor, int64_t loss,
         int64_t grad_student, int64_t grad_teacher, int64_t stats_out, int64_t stats_in, int64_t sums_out,
         int64_t sums_in, int64_t n, int64_t vocab, int64_t stride_student, int64_t stride_teacher,
         int64_t stride_grad_student, int64_t stride_grad_teacher, int64_t col_offset, int64_t vocab_total,
         int dtype, double temperature, double soft_scale, double hard_weight, int divergence, double beta,
         int64_t ignore_index, double label_smoothing, double softcap, int num_threads) {
        KDProblem p = kd_problem(mode, student, teacher, target, divisor, loss, grad_student, grad_teacher,
                                 stats_out, stats_in, sums_out, sums_in, n, vocab, stride_student, stride_teacher,
                                 stride_grad_student, stride_grad_teacher, col_offset, vocab_total, dtype,
                                 temperature, soft_scale, hard_weight, divergence, beta, ignore_index,
                                 label_smoothing, softcap);
        p.num_threads = num_threads;
        py::gil_scoped_release nogil;
        kd_run_cpu(p);
      },
      "kd loss rows and gradients on the CPU: mode 0 fused (stats and finish in one sweep per row), or one "
      "phase of the vocab-parallel loss over a slice at col_offset: 1 stats, 2 divergence sums, 3 finish.",
      py::arg("num_threads"));
  m.attr("KD_STATS_WIDTH") = kStatsWidth;
  m.def(
      "kd_exp_ns_cpu",
      [](int num_threads) {
        py::gil_scoped_release nogil;
        return kd_exp_ns_cpu(num_threads);
      },
      "nanoseconds per exponential (all threads together) of the exp the CPU kernels use: the exp-bound floor",
      py::kw_only(), py::arg("num_threads"));

#ifdef FASTKD_WITH_CUDA
  // The CUDA entries only enqueue work on `stream`; the divisor is read on the device.
  def_kd(
      m, "kd_cuda",
      [](int mode, int64_t student, int64_t teacher, int64_t target, int64_t divisor, int64_t loss,
         int64_t grad_student, int64_t grad_teacher, int64_t stats_out, int64_t stats_in, int64_t sums_out,
         int64_t sums_in, int64_t n, int64_t vocab, int64_t stride_student, int64_t stride_teacher,
         int64_t stride_grad_student, int64_t stride_grad_teacher, int64_t col_offset, int64_t vocab_total,
         int dtype, double temperature, double soft_scale, double hard_weight, int divergence, double beta,
         int64_t ignore_index, double label_smoothing, double softcap, int device, int64_t stream) {
        const KDProblem p = kd_problem(mode, student, teacher, target, divisor, loss, grad_student, grad_teacher,
                                       stats_out, stats_in, sums_out, sums_in, n, vocab, stride_student,
                                       stride_teacher, stride_grad_student, stride_grad_teacher, col_offset,
                                       vocab_total, dtype, temperature, soft_scale, hard_weight, divergence, beta,
                                       ignore_index, label_smoothing, softcap);
        py::gil_scoped_release nogil;
        kd_run_cuda(p, device, stream);
      },
      "kd loss rows and gradients on the GPU (one block per row, enqueued on `stream`): mode 0 fused, or one "
      "phase of the vocab-parallel loss: 1 stats, 2 divergence sums, 3 finish (float32 stats and sums).",
      py::arg("device"), py::arg("stream"));
  m.def(
      "scale_rows_cuda",
      [](int64_t grad, int64_t n, int64_t vocab, int64_t stride, int dtype, int64_t factors, int64_t factors_stride,
         int device, int64_t stream) {
        py::gil_scoped_release nogil;
        scale_rows_cuda(grad, n, vocab, stride, dtype, factors, factors_stride, device, stream);
      },
      "grad[r] *= factors[r * factors_stride] in place on the GPU; rows whose factor is 1 are skipped on the "
      "device.",
      py::kw_only(), py::arg("grad"), py::arg("n"), py::arg("vocab"), py::arg("stride"), py::arg("dtype"),
      py::arg("factors"), py::arg("factors_stride"), py::arg("device"), py::arg("stream"));
  m.def(
      "kernels_unusable_cuda",
      [](int device) {
        py::gil_scoped_release nogil;
        return kernels_unusable_cuda(device);
      },
      "'' when the CUDA kernels can run on `device`, else the runtime's reason (an old driver, no kernel image "
      "for this GPU's architecture, no device).",
      py::kw_only(), py::arg("device"));
#endif
}

}  // namespace bind
}  // namespace fastkd
