"""Custom ops of the teacher cache: ``fastkd::capture_topk``, ``fastkd::capture_sample`` and
``fastkd::sparse_kd``, with fake impls and autograd, following the pattern of ``_ops.py``.

The backend is chosen by ``_ops.resolve_backend`` (the one dispatch rule); this module only maps the
resolved name to an implementation. A backend that has the dense kernels but no cache kernel yet
(e.g. "cuda" before its cache kernels exist) runs the torch reference when the caller asked for
"auto", and is an error when it was asked for by name.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from . import _cache_reference as _ref
from . import _ext
from . import _ops

_CAPTURE_TOPK_IMPLS: Dict[str, Callable[..., None]] = {}
_CAPTURE_SAMPLE_IMPLS: Dict[str, Callable[..., None]] = {}
_SPARSE_KD_IMPLS: Dict[str, Callable[..., None]] = {}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pick_backend(requested: str, device: torch.device, registry: Dict[str, Callable]) -> str:
    """Resolve with ``_ops.resolve_backend``, then fall back to "torch" only for "auto"."""
    resolved = _ops.resolve_backend(requested, device)
    if resolved == "triton" and resolved not in registry:
        _load_triton_impls()
    if resolved == "torch" or resolved in registry:
        return resolved
    if requested == "auto":
        return "torch"
    raise ValueError(f"backend={requested!r} has no teacher-cache kernel yet; use backend='auto' or 'torch'")


# --------------------------------------------------------------------------------------------
# fastkd::capture_topk  teacher (N, V) -> ids (N, k) int64, log-probs (N, k), lse (N,)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastkd::capture_topk", mutates_args=())
def capture_topk(teacher: torch.Tensor, k: int, temperature: float,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = teacher.shape[0]
    acc = _acc_dtype(teacher.dtype)
    ids = torch.empty((n, k), dtype=torch.int64, device=teacher.device)
    values = torch.empty((n, k), dtype=acc, device=teacher.device)
    lse = torch.empty((n,), dtype=acc, device=teacher.device)
    _CAPTURE_TOPK_IMPLS[backend](teacher, k, temperature, ids, values, lse)
    return ids, values, lse


@capture_topk.register_fake
def _(teacher, k, temperature, backend):
    n = teacher.shape[0]
    acc = _acc_dtype(teacher.dtype)
    return (teacher.new_empty((n, k), dtype=torch.int64), teacher.new_empty((n, k), dtype=acc),
            teacher.new_empty((n,), dtype=acc))


# --------------------------------------------------------------------------------------------
# fastkd::capture_sample  teacher (N, V), uniforms (N, S) float64 -> ids (N, W), counts (N, W), lse
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastkd::capture_sample", mutates_args=())
def capture_sample(teacher: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, v = teacher.shape
    width = min(uniforms.shape[1], v)
    ids = torch.empty((n, width), dtype=torch.int64, device=teacher.device)
    counts = torch.empty((n, width), dtype=torch.int32, device=teacher.device)
    lse = torch.empty((n,), dtype=_acc_dtype(teacher.dtype), device=teacher.device)
    _CAPTURE_SAMPLE_IMPLS[backend](teacher, uniforms, temperature, ids, counts, lse)
    return ids, counts, lse


@capture_sample.register_fake
def _(teacher, uniforms, temperature, backend):
    n, v = teacher.shape
    width = min(uniforms.shape[1], v)
    return (teacher.new_empty((n, width), dtype=torch.int64), teacher.new_empty((n, width), dtype=torch.int32),
            teacher.new_empty((n,), dtype=_acc_dtype(teacher.dtype)))


# --------------------------------------------------------------------------------------------
# fastkd::sparse_kd  student (N, V), ids/weights (N, K) -> (loss rows / divisor, grad_student)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastkd::sparse_kd", mutates_args=())
def sparse_kd(student: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, target: torch.Tensor,
              divisor: torch.Tensor, tail: int, temperature: float, soft_scale: float, hard_weight: float,
              ignore_index: int, label_smoothing: float, has_target: bool,
              backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    loss = torch.empty(student.shape[0], dtype=_acc_dtype(student.dtype), device=student.device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    _SPARSE_KD_IMPLS[backend](student, ids, weights, target if has_target else None, divisor, loss, grad,
                              tail, temperature, soft_scale, hard_weight, ignore_index, label_smoothing)
    return loss, grad


@sparse_kd.register_fake
def _(student, ids, weights, target, divisor, tail, temperature, soft_scale, hard_weight, ignore_index,
      label_smoothing, has_target, backend):
    loss = student.new_empty((student.shape[0],), dtype=_acc_dtype(student.dtype))
    return loss, torch.empty_like(student, memory_format=torch.contiguous_format)


def _sparse_setup_context(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)


def _sparse_backward(ctx, g_loss, _g_grad):
    (grad,) = ctx.saved_tensors
    # In place (the stored gradient is this op's private buffer). The float32 grad_output is not cast
    # to a bf16/fp16 gradient's dtype first: the product is formed in float32 and rounded once.
    grad = grad.mul_(g_loss.unsqueeze(-1))
    return (grad,) + (None,) * 12


torch.library.register_autograd("fastkd::sparse_kd", _sparse_backward, setup_context=_sparse_setup_context)


# --------------------------------------------------------------------------------------------
# CPU implementations (fastkd._C, csrc/cpu/cache.cpp)
# --------------------------------------------------------------------------------------------
def _cpu_capture_topk(teacher, k, temperature, ids, values, lse):
    _ext.C.capture_topk_cpu(teacher.data_ptr(), ids.data_ptr(), values.data_ptr(), lse.data_ptr(),
                            teacher.shape[0], teacher.shape[1], teacher.stride(0),
                            _ext.dtype_code(teacher.dtype), float(temperature), int(k),
                            torch.get_num_threads())


def _cpu_capture_sample(teacher, uniforms, temperature, ids, counts, lse):
    u = uniforms.contiguous()
    _ext.C.capture_sample_cpu(teacher.data_ptr(), u.data_ptr(), ids.data_ptr(), counts.data_ptr(),
                              lse.data_ptr(), teacher.shape[0], teacher.shape[1], teacher.stride(0),
                              _ext.dtype_code(teacher.dtype), float(temperature), u.shape[1],
                              ids.shape[1], torch.get_num_threads())


def _cpu_sparse_kd(student, ids, weights, target, divisor, loss, grad, tail, temperature, soft_scale,
                   hard_weight, ignore_index, label_smoothing):
    ids = ids.contiguous()
    weights = weights.contiguous()
    _ext.C.sparse_kd_cpu(student.data_ptr(), ids.data_ptr(), weights.data_ptr(),
                         0 if target is None else target.data_ptr(), divisor.data_ptr(),
                         loss.data_ptr(), grad.data_ptr(), student.shape[0], student.shape[1],
                         ids.shape[1], student.stride(0), grad.stride(0), _ext.dtype_code(student.dtype),
                         int(tail), float(temperature), float(soft_scale), float(hard_weight),
                         int(ignore_index), float(label_smoothing), torch.get_num_threads())


if _ext.C is not None and hasattr(_ext.C, "capture_topk_cpu"):
    _CAPTURE_TOPK_IMPLS["cpu"] = _cpu_capture_topk
    _CAPTURE_SAMPLE_IMPLS["cpu"] = _cpu_capture_sample
    _SPARSE_KD_IMPLS["cpu"] = _cpu_sparse_kd


# --------------------------------------------------------------------------------------------
# Entries used by cache.py
# --------------------------------------------------------------------------------------------
def run_capture_topk(teacher, k, temperature, backend):
    if backend == "torch":
        ids, values, lse = _ref.capture_topk(teacher, k, temperature)
        return ids, values, lse
    return capture_topk(teacher, int(k), float(temperature), backend)


def run_capture_sample(teacher, uniforms, temperature, backend):
    if backend == "torch":
        return _ref.capture_sample(teacher, uniforms, temperature)
    return capture_sample(teacher, uniforms, float(temperature), backend)


def sparse_kd_rows(student, ids, weights, target, divisor, *, tail, temperature, soft_scale, hard_weight,
                   ignore_index, label_smoothing, backend):
    """Per-row sparse loss divided by ``divisor``; differentiable w.r.t. the student."""
    if backend == "torch":
        rows = _ref.sparse_kd_rows(student, ids, weights, target, tail=tail, temperature=temperature,
                                   soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing)
        return rows / divisor.to(rows.dtype)
    has_target = target is not None
    tgt = target if has_target else student.new_empty((0,), dtype=torch.long)
    loss, _ = sparse_kd(student, ids, weights, tgt, divisor, int(tail), float(temperature), float(soft_scale),
                        float(hard_weight), int(ignore_index), float(label_smoothing), has_target, backend)
    return loss


def _load_triton_impls() -> None:
    """The Triton cache kernels register themselves on import. Imported on first use, once
    resolve_backend found the dense Triton backend usable (so triton was imported in the right mode)."""
    if "triton" in _ops._KD_IMPLS:
        try:
            from ._triton import cache as _triton_cache  # noqa: F401
        except ImportError:
            pass


def _load_cuda_impls() -> None:
    """The CUDA cache kernels (fastkd/_cuda_impls.py) register once the registries above exist: that
    module is first imported by _ops, possibly while this one is still initialising."""
    if _ext.has_cuda_kernels():
        try:
            from . import _cuda_impls

            _cuda_impls.register_cache_impls()
        except Exception as exc:  # a broken build must not break `import fastkd`; say so instead
            import warnings

            warnings.warn(f"fastkd: the CUDA teacher-cache kernels could not be registered ({exc!r}); "
                          "backend='auto' uses the torch reference for them on CUDA tensors", RuntimeWarning)


_load_cuda_impls()
