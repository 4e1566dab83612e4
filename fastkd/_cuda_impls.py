"""The ``backend="cuda"`` implementation: the fused kernels of ``csrc/cuda/kd.cu``.

Registered only when ``fastkd._C`` was compiled with nvcc; importing this module needs no GPU. The
kernel is enqueued on the caller's current stream of the logits' device and never synchronises.
"""
from __future__ import annotations

import torch

from . import _ext
from ._ops import KDParams, register_kd_impl


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def cuda_kd_impl(student, teacher, target, divisor, loss, grad_s, grad_t, p: KDParams) -> None:
    """Fills ``loss`` (N,) float32 and the gradients; see ``fastkd._ops.register_kd_impl``."""
    if student.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"backend='cuda' takes float32, bfloat16 or float16 logits, got {student.dtype}")
    device = student.device
    tgt = target.contiguous() if p.has_target else None
    div = divisor if divisor.dtype == torch.float32 else divisor.float()
    _ext.C.kd_forward_cuda(
        _ptr(student), _ptr(teacher), _ptr(tgt), _ptr(div), _ptr(loss), _ptr(grad_s), _ptr(grad_t),
        student.shape[0], student.shape[1],
        student.stride(0), teacher.stride(0), grad_s.stride(0), 0 if grad_t is None else grad_t.stride(0),
        _ext.dtype_code(student.dtype), p.temperature, p.soft_scale, p.hard_weight, p.divergence,
        p.beta, p.ignore_index, p.label_smoothing, p.softcap,
        device.index if device.index is not None else torch.cuda.current_device(), _stream(device),
    )


def cuda_kd_shard(mode, student, teacher, target, p: KDParams, *, col_offset, vocab_total, divisor=None,
                  loss=None, grad_s=None, grad_t=None, stats_out=None, stats_in=None, jsd_out=None,
                  jsd_in=None) -> None:
    """One phase of the vocab-parallel loss on the GPU (mode 1 stats, 2 JSD sums, 3 finish).

    Same contract as ``fastkd._C.kd_shard_cpu``: stats tensors are (N, KD_STATS_WIDTH) float32,
    JSD sums (N, 2) float32, all contiguous and on the logits' device.
    """
    device = student.device
    tgt = target.contiguous() if target is not None else None
    _ext.C.kd_shard_cuda(
        int(mode), _ptr(student), _ptr(teacher), _ptr(tgt), _ptr(divisor), _ptr(loss), _ptr(grad_s),
        _ptr(grad_t), _ptr(stats_out), _ptr(stats_in), _ptr(jsd_out), _ptr(jsd_in),
        student.shape[0], student.shape[1], student.stride(0), teacher.stride(0),
        0 if grad_s is None else grad_s.stride(0), 0 if grad_t is None else grad_t.stride(0),
        int(col_offset), int(vocab_total), _ext.dtype_code(student.dtype), p.temperature,
        p.soft_scale, p.hard_weight, p.divergence, p.beta, p.ignore_index, p.label_smoothing,
        p.softcap, device.index if device.index is not None else torch.cuda.current_device(),
        _stream(device),
    )


def scale_rows_(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``grad.mul_(g.unsqueeze(-1))`` for a (N, V) CUDA gradient and (N,) factors, in place.

    Rows whose factor is exactly 1 (``loss.backward()``) are skipped on the device, so the backward
    of the fused loss then reads one float per row instead of the whole N×V gradient. No host sync.
    """
    n, v = grad.shape
    gf = g if g.dtype == torch.float32 else g.float()
    gf = gf.expand(n)  # a 0-d/broadcast factor keeps stride 0
    _ext.C.scale_rows_cuda(grad.data_ptr(), n, v, grad.stride(0), _ext.dtype_code(grad.dtype), gf.data_ptr(),
                           gf.stride(0), grad.device.index if grad.device.index is not None
                           else torch.cuda.current_device(), _stream(grad.device))
    return grad


if _ext.has_cuda_kernels() and hasattr(_ext.C, "kd_forward_cuda"):
    register_kd_impl("cuda", cuda_kd_impl)
