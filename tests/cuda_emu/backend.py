"""The CUDA kernels of ``csrc/cuda/`` on a CPU, as the test-only backend ``"cuda_emu"``.

``csrc/cuda/kd.cu``, ``capture.cu`` and ``sparse_kd.cu`` are compiled by g++ against the host
emulation of CUDA in this directory (one std::thread per CUDA thread, barriers for __syncthreads and
the warp intrinsics; ``kernel<<<...>>>(...)`` launches rewritten to ``emu::launch``). A small C shim
(below) takes the kernels' arguments in the order of the ``fastkd._C`` keyword bindings, and the
Python side builds them with the same helpers the real ``cuda`` backend uses
(``fastkd/_backends/_kernel_args.py``), so the emulation exercises the argument marshalling, the
kernels' logic (row splits, block merges, the shard modes, workspace paths) and, through the
registry, the whole op layer on CPU tensors. It checks everything but the hardware: timing,
coalescing and the real SFU math are for the ``gpu`` tests.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

from fastkd import _ext
from fastkd._backends import _kernel_args as KA
from fastkd._backends import registry

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
NAME = "cuda_emu"
SMEM_DEFAULT = 99 * 1024

_SHIM = r'''
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <string>

#include "cuda/capture.h"
#include "cuda/kd.h"
#include "cuda/sparse_kd.h"

static int fail(const std::exception& e) { std::fprintf(stderr, "emu: %s\n", e.what()); return 1; }
extern "C" void emu_limits(int sms, int smem_optin) { emu::dev_sms = sms; emu::dev_smem_optin = smem_optin; }

extern "C" int emu_kd(int mode, int64_t student, int64_t teacher, int64_t target, int64_t divisor, int64_t loss,
                      int64_t grad_student, int64_t grad_teacher, int64_t stats_out, int64_t stats_in,
                      int64_t sums_out, int64_t sums_in, int64_t n, int64_t vocab, int64_t stride_student,
                      int64_t stride_teacher, int64_t stride_grad_student, int64_t stride_grad_teacher,
                      int64_t col_offset, int64_t vocab_total, int dtype, double temperature, double soft_scale,
                      double hard_weight, int divergence, double beta, int64_t ignore_index,
                      double label_smoothing, double softcap, int device) {
  fastkd::KDProblem p{};
  p.mode = mode; p.dtype = dtype;
  p.z = (const void*)student; p.t = (const void*)teacher; p.target = (const int64_t*)target;
  p.divisor = (const void*)divisor; p.loss = (void*)loss; p.grad_z = (void*)grad_student;
  p.grad_t = (void*)grad_teacher; p.stats_out = (void*)stats_out; p.stats_in = (const void*)stats_in;
  p.sums_out = (void*)sums_out; p.sums_in = (const void*)sums_in;
  p.n = n; p.v = vocab; p.stride_z = stride_student; p.stride_t = stride_teacher;
  p.stride_gz = stride_grad_student; p.stride_gt = stride_grad_teacher;
  p.col_offset = col_offset; p.vocab_total = vocab_total == -1 ? vocab : vocab_total;
  p.args.temperature = temperature; p.args.soft_scale = soft_scale; p.args.hard_weight = hard_weight;
  p.args.divergence = divergence; p.args.beta = beta; p.args.ignore_index = ignore_index;
  p.args.label_smoothing = label_smoothing; p.args.softcap = softcap; p.args.has_target = target != 0;
  try { fastkd::kd_run_cuda(p, device, 0); } catch (const std::exception& e) { return fail(e); }
  return 0;
}
extern "C" void emu_set_device(int device) { emu::current_device = device; }
extern "C" int emu_current_device() { return emu::current_device; }
extern "C" void emu_set_module_error(int err) { emu::module_error = err; }
static std::string probe_text;
extern "C" const char* emu_kernels_unusable(int device) {
  probe_text = fastkd::kernels_unusable_cuda(device);
  return probe_text.c_str();
}
extern "C" int emu_scale_rows(int64_t grad, int64_t n, int64_t vocab, int64_t stride, int dtype, int64_t factors,
                              int64_t factors_stride) {
  try { fastkd::scale_rows_cuda(grad, n, vocab, stride, dtype, factors, factors_stride, 0, 0); }
  catch (const std::exception& e) { return fail(e); }
  return 0;
}
extern "C" int64_t emu_topk_ws(int64_t n, int64_t vocab, int64_t k, int dtype) {
  return fastkd::capture_topk_workspace_cuda(n, vocab, k, dtype, 0);
}
extern "C" int64_t emu_sample_ws(int64_t n, int64_t vocab, int64_t num_samples, int dtype) {
  return fastkd::capture_sample_workspace_cuda(n, vocab, num_samples, dtype, 0);
}
extern "C" int64_t emu_sparse_ws(int64_t n, int64_t vocab, int64_t k, int dtype) {
  return fastkd::sparse_kd_workspace_cuda(n, vocab, k, dtype, 0);
}
extern "C" int emu_topk(int64_t teacher, int64_t ids, int64_t values, int64_t lse, int64_t n, int64_t vocab,
                        int64_t stride_teacher, int dtype, double temperature, int64_t k, int64_t workspace) {
  fastkd::CaptureProblem p{};
  p.dtype = dtype; p.t = (const void*)teacher; p.ids = (int64_t*)ids; p.values = (void*)values;
  p.lse = (void*)lse; p.n = n; p.v = vocab; p.stride_t = stride_teacher; p.temperature = temperature; p.k = k;
  try { fastkd::capture_topk_cuda(p, (void*)workspace, 0, 0); } catch (const std::exception& e) { return fail(e); }
  return 0;
}
extern "C" int emu_sample(int64_t teacher, int64_t uniforms, int64_t ids, int64_t counts, int64_t lse, int64_t n,
                          int64_t vocab, int64_t stride_teacher, int dtype, double temperature, int64_t num_samples,
                          int64_t width, int64_t workspace) {
  fastkd::CaptureProblem p{};
  p.dtype = dtype; p.t = (const void*)teacher; p.u = (const double*)uniforms; p.ids = (int64_t*)ids;
  p.counts = (int32_t*)counts; p.lse = (void*)lse; p.n = n; p.v = vocab; p.stride_t = stride_teacher;
  p.temperature = temperature; p.num_samples = num_samples; p.width = width;
  try { fastkd::capture_sample_cuda(p, (void*)workspace, 0, 0); } catch (const std::exception& e) { return fail(e); }
  return 0;
}
extern "C" int emu_sparse(int64_t student, int64_t ids, int64_t weights, int64_t target, int64_t divisor,
                          int64_t loss, int64_t grad, int64_t n, int64_t vocab, int64_t k, int64_t stride_student,
                          int64_t stride_grad, int dtype, int tail, double temperature, double soft_scale,
                          double hard_weight, int64_t ignore_index, double label_smoothing, int64_t workspace) {
  fastkd::SparseKDProblem p{};
  p.dtype = dtype; p.z = (const void*)student; p.ids = (const int64_t*)ids; p.w = (const void*)weights;
  p.target = (const int64_t*)target; p.divisor = (const void*)divisor; p.loss = (void*)loss; p.grad = (void*)grad;
  p.n = n; p.v = vocab; p.k = k; p.stride_z = stride_student; p.stride_g = stride_grad; p.tail = tail;
  p.temperature = temperature; p.soft_scale = soft_scale; p.hard_weight = hard_weight;
  p.ignore_index = ignore_index; p.label_smoothing = label_smoothing;
  try { fastkd::sparse_kd_cuda(p, (void*)workspace, 0, 0); } catch (const std::exception& e) { return fail(e); }
  return 0;
}
'''

# The shim's argument order: the keyword names of the bindings (csrc/bind/*.cpp) in the order the
# shim takes them. A name missing from the Python helper's arguments fails here, loudly.
_KD = ("mode", "student", "teacher", "target", "divisor", "loss", "grad_student", "grad_teacher", "stats_out",
       "stats_in", "sums_out", "sums_in", "n", "vocab", "stride_student", "stride_teacher", "stride_grad_student",
       "stride_grad_teacher", "col_offset", "vocab_total", "dtype", "temperature", "soft_scale", "hard_weight",
       "divergence", "beta", "ignore_index", "label_smoothing", "softcap")
_TOPK = ("teacher", "ids", "values", "lse", "n", "vocab", "stride_teacher", "dtype", "temperature", "k")
_SAMPLE = ("teacher", "uniforms", "ids", "counts", "lse", "n", "vocab", "stride_teacher", "dtype", "temperature",
           "num_samples", "width")
_SPARSE = ("student", "ids", "weights", "target", "divisor", "loss", "grad", "n", "vocab", "k", "stride_student",
           "stride_grad", "dtype", "tail", "temperature", "soft_scale", "hard_weight", "ignore_index",
           "label_smoothing")
_I32 = {"mode", "dtype", "divergence", "tail", "device"}
_F64 = {"temperature", "soft_scale", "hard_weight", "beta", "label_smoothing", "softcap"}


def _types(names, extra=()):
    return [ctypes.c_int if n in _I32 else ctypes.c_double if n in _F64 else ctypes.c_int64
            for n in tuple(names) + tuple(extra)]


def _rewrite_launches(src: str, name: str):
    """``kernel<<<grid, threads[, smem], stream>>>(args);`` → ``emu::launch(grid, threads[, smem], [&] {...});``."""
    src, n3 = re.subn(r"(\w+(?:<[^;<>]*>)?)<<<([^,]+), ([^,]+?), 0, stream>>>\((.*?)\);",
                      lambda m: f"emu::launch({m.group(2)}, {m.group(3)}, [&] {{ {m.group(1)}({m.group(4)}); }});",
                      src, flags=re.S)
    src, n4 = re.subn(r"(\w+(?:<[^;<>]*>)?)<<<([^,]+), ([^,]+?), ([^,]+?), stream>>>\((.*?)\);",
                      lambda m: (f"emu::launch({m.group(2)}, {m.group(3)}, {m.group(4)}, "
                                 f"[&] {{ {m.group(1)}({m.group(5)}); }});"), src, flags=re.S)
    assert "<<<" not in src, f"unexpected launch syntax in csrc/cuda/{name}.cu"
    decl = "extern __shared__ __align__(16) unsigned char fkc_smem[];"
    smem = src.count(decl)
    src = src.replace(decl, "unsigned char* fkc_smem = emu::dyn_smem;")
    return src, n3 + n4, smem


class Emulation:
    """The compiled emulation library and the test backend built on it."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    # ---- the op families, with the real backend's argument helpers ----------------------------
    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"cuda_emu: {what} failed (see stderr)")

    def kd(self, student, teacher, target, divisor, loss, grad_s, grad_t, p, *, device: int = 0, **modes) -> None:
        div = divisor if divisor.dtype == torch.float32 else divisor.float()
        tgt = None if target is None else target.contiguous()
        args = KA.kd_args(student, teacher, tgt, div, loss, grad_s, grad_t, p, **modes)
        self._check(self.lib.emu_kd(*[args[k] for k in _KD], device), "kd")

    def scale_rows(self, grad, g):
        n, v = grad.shape
        gf = (g if g.dtype == torch.float32 else g.float()).expand(n)
        self._check(self.lib.emu_scale_rows(grad.data_ptr(), n, v, grad.stride(0), _ext.dtype_code(grad.dtype),
                                            gf.data_ptr(), gf.stride(0)), "scale_rows")
        return grad

    @staticmethod
    def _ws(nbytes: int):
        return torch.empty(max(int(nbytes), 1), dtype=torch.uint8) if nbytes > 0 else None

    def capture_topk(self, teacher, k, temperature, ids, values, lse) -> None:
        args = KA.capture_topk_args(teacher, k, temperature, ids, values, lse)
        ws = self._ws(self.lib.emu_topk_ws(args["n"], args["vocab"], args["k"], args["dtype"]))
        self._check(self.lib.emu_topk(*[args[k_] for k_ in _TOPK], KA.ptr(ws)), "capture_topk")

    def capture_sample(self, teacher, uniforms, temperature, ids, counts, lse) -> None:
        u = uniforms.to(torch.float64).contiguous()
        args = KA.capture_sample_args(teacher, u, temperature, ids, counts, lse)
        ws = self._ws(self.lib.emu_sample_ws(args["n"], args["vocab"], args["num_samples"], args["dtype"]))
        self._check(self.lib.emu_sample(*[args[k_] for k_ in _SAMPLE], KA.ptr(ws)), "capture_sample")

    def sparse_kd(self, student, ids, weights, target, divisor, loss, grad, **settings) -> None:
        ids = ids.to(torch.int64).contiguous()
        weights = weights.to(torch.float32).contiguous()
        tgt = None if target is None else target.to(torch.int64).contiguous()
        args = KA.sparse_kd_args(student, ids, weights, tgt, divisor.to(torch.float32), loss, grad, **settings)
        ws = self._ws(self.lib.emu_sparse_ws(args["n"], args["vocab"], args["k"], args["dtype"]))
        self._check(self.lib.emu_sparse(*[args[k_] for k_ in _SPARSE], KA.ptr(ws)), "sparse_kd")

    @contextlib.contextmanager
    def shared_memory(self, nbytes: int):
        """Within the block the emulated device has ``nbytes`` of shared memory per block (small:
        the kernels take their global-workspace path)."""
        self.lib.emu_limits(2, int(nbytes))
        try:
            yield
        finally:
            self.lib.emu_limits(2, SMEM_DEFAULT)

    # ---- registration -------------------------------------------------------------------------
    def register(self) -> None:
        registry._BACKEND_INFO[NAME] = registry.BackendInfo(__name__, "the CUDA emulation of tests/cuda_emu")
        registry._LOADED[NAME] = True
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        cpu = ("cpu",)
        registry.register(NAME, "kd", self.kd, devices=cpu, dtypes=dtypes, caps=("loss_only",))
        registry.register(NAME, "kd_shard", _Shard(self), devices=cpu, dtypes=dtypes)
        registry.register(NAME, "scale_rows", self.scale_rows, devices=cpu, dtypes=dtypes)
        registry.register(NAME, "capture_topk", self.capture_topk, devices=cpu, dtypes=dtypes)
        registry.register(NAME, "capture_sample", self.capture_sample, devices=cpu, dtypes=dtypes)
        registry.register(NAME, "sparse_kd", self.sparse_kd, devices=cpu, dtypes=dtypes)

    def unregister(self) -> None:
        for key in [k for k in registry._IMPLS if k[1] == NAME]:
            del registry._IMPLS[key]
        registry._BACKEND_INFO.pop(NAME, None)
        registry._LOADED.pop(NAME, None)


class _Shard:
    """``kd_shard`` through the emulated kernel's modes 1-3 (float32 statistics, as on a GPU)."""

    def __init__(self, emu: Emulation):
        self.emu = emu

    def stats(self, student, teacher, target, p, *, col_offset, vocab_total, stats_dtype):
        out = torch.empty(student.shape[0], 11, dtype=torch.float32)
        self.emu.kd(student, teacher, target, torch.ones(()), None, None, None, p, mode=KA.STATS,
                    col_offset=col_offset, vocab_total=vocab_total, stats_out=out)
        return out

    def div_sums(self, student, teacher, target, merged, p, *, col_offset, vocab_total):
        out = torch.empty(student.shape[0], 2, dtype=merged.dtype)
        self.emu.kd(student, teacher, target, torch.ones(()), None, None, None, p, mode=KA.DIV_SUMS,
                    col_offset=col_offset, vocab_total=vocab_total, stats_in=merged.contiguous(), sums_out=out)
        return out

    def finish(self, student, teacher, target, merged, div_sums, divisor, p, *, col_offset, vocab_total,
               teacher_grad):
        loss = torch.empty(student.shape[0], dtype=merged.dtype)
        grad_s = torch.empty_like(student, memory_format=torch.contiguous_format)
        grad_t = torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad else None
        self.emu.kd(student, teacher, target, divisor.to(merged.dtype), loss, grad_s, grad_t, p, mode=KA.FINISH,
                    col_offset=col_offset, vocab_total=vocab_total, stats_in=merged.contiguous(),
                    sums_in=None if div_sums is None else div_sums.contiguous())
        return loss, grad_s, grad_t


def build(out_dir) -> Emulation:
    """Compile the three kernel files and the shim (in parallel, one translation unit each, as in the
    extension) into one library."""
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx is not None, "the CUDA emulation needs a C++20 compiler (g++)"
    out = Path(out_dir)
    sources, launches, smem = [], 0, 0
    for name in ("kd", "capture", "sparse_kd"):
        src, n_launch, n_smem = _rewrite_launches((ROOT / "csrc" / "cuda" / f"{name}.cu").read_text(), name)
        launches += n_launch
        smem += n_smem
        cpp = out / f"{name}_emu.cpp"
        cpp.write_text(src)
        sources.append(cpp)
    assert launches >= 8 and smem == 3, f"unexpected kernel launches ({launches}) or shared-memory declarations ({smem})"
    shim = out / "shim.cpp"
    shim.write_text(_SHIM)
    sources.append(shim)
    cc = [cxx, "-std=c++20", "-O1", "-fPIC", "-Wno-psabi", f"-I{HERE}", f"-I{ROOT / 'csrc'}"]
    objs = [s.with_suffix(".o") for s in sources]
    jobs = [subprocess.Popen(cc + ["-c", str(s), "-o", str(o)], stderr=subprocess.PIPE, text=True)
            for s, o in zip(sources, objs)]
    for job in jobs:
        err = job.communicate()[1]
        assert job.returncode == 0, err[-4000:]
    so = out / "libfastkd_cuda_emu.so"
    r = subprocess.run([cxx, "-shared", *map(str, objs), "-o", str(so), "-lpthread"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(so))
    lib.emu_limits.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.emu_kd.argtypes = _types(_KD, ("device",))
    lib.emu_set_device.argtypes = [ctypes.c_int]
    lib.emu_current_device.restype = ctypes.c_int
    lib.emu_set_module_error.argtypes = [ctypes.c_int]
    lib.emu_kernels_unusable.argtypes = [ctypes.c_int]
    lib.emu_kernels_unusable.restype = ctypes.c_char_p
    lib.emu_scale_rows.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_int] + [ctypes.c_int64] * 2
    for name in ("emu_topk_ws", "emu_sample_ws", "emu_sparse_ws"):
        getattr(lib, name).argtypes = [ctypes.c_int64] * 3 + [ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int64
    lib.emu_topk.argtypes = _types(_TOPK, ("workspace",))
    lib.emu_sample.argtypes = _types(_SAMPLE, ("workspace",))
    lib.emu_sparse.argtypes = _types(_SPARSE, ("workspace",))
    lib.emu_limits(2, SMEM_DEFAULT)
    return Emulation(lib)


if __name__ == "__main__":  # pragma: no cover - a manual build check
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        build(d)
        print("built", os.listdir(d))
