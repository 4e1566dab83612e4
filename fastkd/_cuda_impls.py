"""The ``backend="cuda"`` implementation: the fused kernels of ``csrc/cuda/kd.cu`` and the
teacher-cache kernels of ``csrc/cuda/cache.cu``.

Registered only when ``fastkd._C`` was compiled with nvcc; importing this module needs no GPU. The
kernels are enqueued on the caller's current stream of the logits' device and never synchronise.
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


# --------------------------------------------------------------------------------------------
# Teacher cache (csrc/cuda/cache.cu): registered into fastkd._sparse_ops by register_cache_impls,
# which _sparse_ops calls once its registries exist (this module is first imported by _ops, possibly
# while _sparse_ops is still initialising).
# --------------------------------------------------------------------------------------------
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _workspace(nbytes: int, device: torch.device):
    """Global scratch for sizes whose per-row scratch does not fit shared memory (else None). Freed
    when the caller returns: the caching allocator hands it out again only to work that is ordered
    after the kernel on the same stream."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes > 0 else None


def _check_cache_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _CACHE_DTYPES:
        raise TypeError(f"backend='cuda' takes float32, bfloat16 or float16 {name}, got {t.dtype}")


def cuda_capture_topk(teacher, k, temperature, ids, values, lse) -> None:
    """ids (N, k) int64, values (N, k) float32, lse (N,) float32 of a (N, V) teacher (unit column stride)."""
    _check_cache_dtype(teacher, "teacher logits")
    n, v = teacher.shape
    dev, code = _device_index(teacher.device), _ext.dtype_code(teacher.dtype)
    ws = _workspace(_ext.C.capture_topk_workspace_cuda(n, v, int(k), code, dev), teacher.device)
    _ext.C.capture_topk_cuda(teacher.data_ptr(), ids.data_ptr(), values.data_ptr(), lse.data_ptr(), _ptr(ws),
                             n, v, teacher.stride(0), code, float(temperature), int(k), dev,
                             _stream(teacher.device))


def cuda_capture_sample(teacher, uniforms, temperature, ids, counts, lse) -> None:
    """Unique ids (N, W) int64 ascending + counts (N, W) int32 (padding −1/0), lse (N,) float32."""
    _check_cache_dtype(teacher, "teacher logits")
    n, v = teacher.shape
    u = uniforms.to(device=teacher.device, dtype=torch.float64).contiguous()
    dev, code = _device_index(teacher.device), _ext.dtype_code(teacher.dtype)
    ws = _workspace(_ext.C.capture_sample_workspace_cuda(n, v, u.shape[1], code, dev), teacher.device)
    _ext.C.capture_sample_cuda(teacher.data_ptr(), u.data_ptr(), ids.data_ptr(), counts.data_ptr(), lse.data_ptr(),
                               _ptr(ws), n, v, teacher.stride(0), code, float(temperature), u.shape[1],
                               ids.shape[1], dev, _stream(teacher.device))


def cuda_sparse_kd(student, ids, weights, target, divisor, loss, grad, tail, temperature, soft_scale, hard_weight,
                   ignore_index, label_smoothing) -> None:
    """Loss rows / divisor (N,) float32 and the student gradient (N, V) in the student's dtype."""
    _check_cache_dtype(student, "student logits")
    n, v = student.shape
    device = student.device
    ids = ids.to(device=device, dtype=torch.int64).contiguous()
    weights = weights.to(device=device, dtype=torch.float32).contiguous()
    tgt = None if target is None else target.to(device=device, dtype=torch.int64).contiguous()
    div = divisor.to(device=device, dtype=torch.float32)
    dev, code = _device_index(device), _ext.dtype_code(student.dtype)
    ws = _workspace(_ext.C.sparse_kd_workspace_cuda(n, v, ids.shape[1], code, dev), device)
    _ext.C.sparse_kd_cuda(student.data_ptr(), ids.data_ptr(), weights.data_ptr(), _ptr(tgt), div.data_ptr(),
                          loss.data_ptr(), grad.data_ptr(), _ptr(ws), n, v, ids.shape[1], student.stride(0),
                          grad.stride(0), code, int(tail), float(temperature), float(soft_scale),
                          float(hard_weight), int(ignore_index), float(label_smoothing), dev, _stream(device))


def register_cache_impls() -> None:
    """Adds "cuda" to the teacher-cache registries of fastkd._sparse_ops (idempotent)."""
    if not (_ext.has_cuda_kernels() and hasattr(_ext.C, "capture_topk_cuda")):
        return
    from . import _sparse_ops

    _sparse_ops._CAPTURE_TOPK_IMPLS["cuda"] = cuda_capture_topk
    _sparse_ops._CAPTURE_SAMPLE_IMPLS["cuda"] = cuda_capture_sample
    _sparse_ops._SPARSE_KD_IMPLS["cuda"] = cuda_sparse_kd
