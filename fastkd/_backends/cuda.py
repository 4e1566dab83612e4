"""The ``cuda`` backend: the CUDA kernels of ``fastkd._C`` (``csrc/cuda/``), when it was built with nvcc.

Implements ``kd`` (also loss-only, without writing a gradient), ``kd_shard``, ``capture_topk``,
``capture_sample`` and ``sparse_kd`` for CUDA tensors of float32, bfloat16 and float16, plus
``scale_rows`` (the in-place backward). Every kernel is enqueued on the caller's current stream of the tensors' device
and never synchronises with the host. Importing this module needs no GPU.
"""
from __future__ import annotations

import torch

from .. import _ext
from . import registry
from ._kernel_args import FINISH, DIV_SUMS, STATS, capture_sample_args, capture_topk_args, kd_args, sparse_kd_args

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _device(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _launch(t: torch.Tensor) -> dict:
    return dict(device=_device(t), stream=torch.cuda.current_stream(t.device).cuda_stream)


def kd(student, teacher, target, divisor, loss, grad_s, grad_t, p) -> None:
    div = divisor if divisor.dtype == torch.float32 else divisor.float()
    tgt = None if target is None else target.contiguous()
    _ext.C.kd_cuda(**kd_args(student, teacher, tgt, div, loss, grad_s, grad_t, p), **_launch(student))


class _Shard:
    """The vocab-parallel phases (``kd_shard``) on the GPU; statistics are float32."""

    @staticmethod
    def _run(mode, student, teacher, target, p, *, col_offset, vocab_total, **bufs):
        tgt = None if target is None else target.contiguous()
        args = kd_args(student, teacher, tgt, bufs.pop("divisor", None), bufs.pop("loss", None),
                       bufs.pop("grad_s", None), bufs.pop("grad_t", None), p, mode=mode, col_offset=col_offset,
                       vocab_total=vocab_total, **bufs)
        _ext.C.kd_cuda(**args, **_launch(student))

    def stats(self, student, teacher, target, p, *, col_offset, vocab_total, stats_dtype):
        out = torch.empty(student.shape[0], _ext.C.KD_STATS_WIDTH, dtype=stats_dtype, device=student.device)
        self._run(STATS, student, teacher, target, p, col_offset=col_offset, vocab_total=vocab_total,
                  stats_out=out)
        return out

    def div_sums(self, student, teacher, target, merged, p, *, col_offset, vocab_total):
        out = torch.empty(student.shape[0], 2, dtype=merged.dtype, device=student.device)
        self._run(DIV_SUMS, student, teacher, target, p, col_offset=col_offset, vocab_total=vocab_total,
                  stats_in=merged, sums_out=out)
        return out

    def finish(self, student, teacher, target, merged, div_sums, divisor, p, *, col_offset, vocab_total,
               teacher_grad):
        loss = torch.empty(student.shape[0], dtype=merged.dtype, device=student.device)
        grad_s = torch.empty_like(student, memory_format=torch.contiguous_format)
        grad_t = torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad else None
        self._run(FINISH, student, teacher, target, p, col_offset=col_offset, vocab_total=vocab_total,
                  divisor=divisor.to(merged.dtype), loss=loss, grad_s=grad_s, grad_t=grad_t, stats_in=merged,
                  sums_in=div_sums)
        return loss, grad_s, grad_t


def scale_rows_(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``grad.mul_(g.unsqueeze(-1))`` for a (N, V) CUDA gradient and (N,) factors, in place.

    Rows whose factor is exactly 1 (``loss.backward()``) are skipped on the device, so the backward
    of the fused loss then reads one float per row instead of the whole N×V gradient. No host sync.
    """
    n, v = grad.shape
    gf = g if g.dtype == torch.float32 else g.float()
    gf = gf.expand(n)  # a 0-d/broadcast factor keeps stride 0
    _ext.C.scale_rows_cuda(grad=grad.data_ptr(), n=n, vocab=v, stride=grad.stride(0),
                           dtype=_ext.dtype_code(grad.dtype), factors=gf.data_ptr(), factors_stride=gf.stride(0),
                           **_launch(grad))
    return grad


def _workspace(nbytes: int, device: torch.device):
    """Global scratch for sizes whose per-row scratch does not fit shared memory (else None). Freed
    when the caller returns: the caching allocator hands it out again only to work that is ordered
    after the kernel on the same stream."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes > 0 else None


def _ws_ptr(ws) -> int:
    return 0 if ws is None else ws.data_ptr()


def capture_topk(teacher, k, temperature, ids, values, lse) -> None:
    args = capture_topk_args(teacher, k, temperature, ids, values, lse)
    launch = _launch(teacher)
    ws = _workspace(_ext.C.capture_topk_workspace_cuda(n=args["n"], vocab=args["vocab"], k=args["k"],
                                                       dtype=args["dtype"], device=launch["device"]), teacher.device)
    _ext.C.capture_topk_cuda(**args, workspace=_ws_ptr(ws), **launch)


def capture_sample(teacher, uniforms, temperature, ids, counts, lse) -> None:
    u = uniforms.to(device=teacher.device, dtype=torch.float64).contiguous()
    args = capture_sample_args(teacher, u, temperature, ids, counts, lse)
    launch = _launch(teacher)
    ws = _workspace(_ext.C.capture_sample_workspace_cuda(n=args["n"], vocab=args["vocab"],
                                                         num_samples=args["num_samples"], dtype=args["dtype"],
                                                         device=launch["device"]), teacher.device)
    _ext.C.capture_sample_cuda(**args, workspace=_ws_ptr(ws), **launch)


def sparse_kd(student, ids, weights, target, divisor, loss, grad, **settings) -> None:
    device = student.device
    ids = ids.to(device=device, dtype=torch.int64).contiguous()
    weights = weights.to(device=device, dtype=torch.float32).contiguous()
    tgt = None if target is None else target.to(device=device, dtype=torch.int64).contiguous()
    div = divisor.to(device=device, dtype=torch.float32)
    args = sparse_kd_args(student, ids, weights, tgt, div, loss, grad, **settings)
    launch = _launch(student)
    ws = _workspace(_ext.C.sparse_kd_workspace_cuda(n=args["n"], vocab=args["vocab"], k=args["k"],
                                                    dtype=args["dtype"], device=launch["device"]), device)
    _ext.C.sparse_kd_cuda(**args, workspace=_ws_ptr(ws), **launch)


def _probe(device: int) -> str:
    """'' when the kernels can run on ``device``, else the CUDA runtime's reason."""
    return _ext.C.kernels_unusable_cuda(device=device)


def register(probe=_probe) -> None:
    """Registers the CUDA kernels, unless they cannot run here: built without nvcc, or — asked of the
    CUDA runtime once, on the current device — a driver older than the runtime the kernels were
    linked with, or a GPU architecture the build has no code for. Then nothing is registered and
    ``backend="auto"`` takes the next backend (Triton), instead of every call raising."""
    if not _ext.has_cuda_kernels():
        registry.unavailable("cuda", "fastkd._C was built without the CUDA kernels (no nvcc at build time)"
                             if _ext.C is not None else f"extension failed to load: {_ext.LOAD_ERROR}")
        return
    if torch.cuda.is_available():
        why = probe(torch.cuda.current_device())
        if why:
            registry.unavailable("cuda", f"the CUDA kernels cannot run on this GPU: {why}")
            return
    gpu = ("cuda",)
    registry.register("cuda", "kd", kd, devices=gpu, dtypes=_DTYPES, caps=("loss_only",))
    registry.register("cuda", "kd_shard", _Shard(), devices=gpu, dtypes=_DTYPES)
    registry.register("cuda", "scale_rows", scale_rows_, devices=gpu, dtypes=_DTYPES)
    registry.register("cuda", "capture_topk", capture_topk, devices=gpu, dtypes=_DTYPES)
    registry.register("cuda", "capture_sample", capture_sample, devices=gpu, dtypes=_DTYPES)
    registry.register("cuda", "sparse_kd", sparse_kd, devices=gpu, dtypes=_DTYPES)


register()
