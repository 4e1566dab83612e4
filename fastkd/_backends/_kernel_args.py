"""The keyword arguments of the compiled kernels (``fastkd._C``), one helper per op family.

The pybind11 entries take keyword-only arguments (``csrc/bind/*.cpp``): a pointer is an int
(``tensor.data_ptr()``, 0 for none), sizes and strides are in elements, ``dtype`` is the code of
``fastkd._ext.dtype_code``. The CPU entries add ``num_threads``, the CUDA ones ``device`` and
``stream`` (and a ``workspace`` pointer for the teacher-cache kernels); the backend modules add
those.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .._settings import KernelParams

# Modes of the kd entries (csrc/common/problems.h: enum Mode).
FUSED, STATS, DIV_SUMS, FINISH = 0, 1, 2, 3


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def stride0(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.stride(0)


def kd_args(student, teacher, target, divisor, loss, grad_student, grad_teacher, p: KernelParams, *,
            mode: int = FUSED, col_offset: int = 0, vocab_total: Optional[int] = None, stats_out=None,
            stats_in=None, sums_out=None, sums_in=None) -> dict:
    """Arguments of ``kd_cpu`` / ``kd_cuda``: (N, V) logits with a unit column stride; ``target``
    (N,) int64 or None; ``divisor`` a 0-d tensor (loss and gradients are divided by it)."""
    return dict(
        mode=mode, student=ptr(student), teacher=ptr(teacher), target=ptr(target), divisor=ptr(divisor),
        loss=ptr(loss), grad_student=ptr(grad_student), grad_teacher=ptr(grad_teacher),
        stats_out=ptr(stats_out), stats_in=ptr(stats_in), sums_out=ptr(sums_out), sums_in=ptr(sums_in),
        n=student.shape[0], vocab=student.shape[1], stride_student=student.stride(0),
        stride_teacher=teacher.stride(0), stride_grad_student=stride0(grad_student),
        stride_grad_teacher=stride0(grad_teacher), col_offset=int(col_offset),
        vocab_total=-1 if vocab_total is None else int(vocab_total), dtype=_ext.dtype_code(student.dtype),
        temperature=p.temperature, soft_scale=p.soft_scale, hard_weight=p.hard_weight,
        divergence=p.divergence, beta=p.beta, ignore_index=p.ignore_index,
        label_smoothing=p.label_smoothing, softcap=p.softcap)


def capture_topk_args(teacher, k, temperature, ids, values, lse) -> dict:
    return dict(teacher=teacher.data_ptr(), ids=ids.data_ptr(), values=values.data_ptr(), lse=lse.data_ptr(),
                n=teacher.shape[0], vocab=teacher.shape[1], stride_teacher=teacher.stride(0),
                dtype=_ext.dtype_code(teacher.dtype), temperature=float(temperature), k=int(k))


def capture_sample_args(teacher, uniforms, temperature, ids, counts, lse) -> dict:
    """``uniforms``: (N, num_samples) contiguous float64 on the teacher's device."""
    return dict(teacher=teacher.data_ptr(), uniforms=uniforms.data_ptr(), ids=ids.data_ptr(),
                counts=counts.data_ptr(), lse=lse.data_ptr(), n=teacher.shape[0], vocab=teacher.shape[1],
                stride_teacher=teacher.stride(0), dtype=_ext.dtype_code(teacher.dtype),
                temperature=float(temperature), num_samples=uniforms.shape[1], width=ids.shape[1])


def sparse_kd_args(student, ids, weights, target, divisor, loss, grad, *, tail, temperature, soft_scale,
                   hard_weight, ignore_index, label_smoothing) -> dict:
    """``ids`` (N, K) int64 and ``weights`` (N, K) contiguous, in the student's accumulation dtype."""
    return dict(student=student.data_ptr(), ids=ids.data_ptr(), weights=weights.data_ptr(), target=ptr(target),
                divisor=divisor.data_ptr(), loss=loss.data_ptr(), grad=grad.data_ptr(), n=student.shape[0],
                vocab=student.shape[1], k=ids.shape[1], stride_student=student.stride(0), stride_grad=grad.stride(0),
                dtype=_ext.dtype_code(student.dtype), tail=int(tail), temperature=float(temperature),
                soft_scale=float(soft_scale), hard_weight=float(hard_weight), ignore_index=int(ignore_index),
                label_smoothing=float(label_smoothing))


def uld_args(student, head, tail, cols, divisor, loss, grad, *, temperature, scale) -> dict:
    """``head`` (N, k) and ``tail`` (N,) contiguous in the student's accumulation dtype; ``cols`` (V,)
    contiguous uint8 or None (every column)."""
    return dict(student=student.data_ptr(), head=head.data_ptr(), tail=tail.data_ptr(), cols=ptr(cols),
                divisor=divisor.data_ptr(), loss=loss.data_ptr(), grad=grad.data_ptr(), n=student.shape[0],
                vocab=student.shape[1], k=head.shape[1], stride_student=student.stride(0),
                stride_grad=grad.stride(0), dtype=_ext.dtype_code(student.dtype), temperature=float(temperature),
                scale=float(scale))
