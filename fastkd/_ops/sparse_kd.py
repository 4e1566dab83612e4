"""``fastkd::sparse_kd``: the loss against a sparse (captured) teacher as a custom op (loss rows /
divisor and the student's gradient in one call), its fake implementation and autograd."""
from __future__ import annotations

from typing import Optional

import torch

from .._backends import registry
from .._settings import acc_dtype
from .kd import register_student_gradient_autograd


@torch.library.custom_op("fastkd::sparse_kd", mutates_args=())
def sparse_kd_op(student: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, target: Optional[torch.Tensor],
                 divisor: torch.Tensor, *, tail: int, temperature: float, soft_scale: float, hard_weight: float,
                 ignore_index: int, label_smoothing: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    loss = torch.empty(student.shape[0], dtype=acc_dtype(student.dtype), device=student.device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    registry.implementation("sparse_kd", backend).fn(
        student, ids, weights, target, divisor, loss, grad, tail=tail, temperature=temperature,
        soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return loss, grad


@sparse_kd_op.register_fake
def _(student, ids, weights, target, divisor, *, tail, temperature, soft_scale, hard_weight, ignore_index,
      label_smoothing, backend):
    torch._check(student.dim() == 2, lambda: "sparse_kd: student logits must be 2-D (N, V)")
    torch._check(ids.dim() == 2 and ids.shape[0] == student.shape[0], lambda: "sparse_kd: ids must be (N, K)")
    torch._check(weights.shape == ids.shape, lambda: "sparse_kd: weights must have the shape of ids")
    torch._check(ids.dtype == torch.int64, lambda: "sparse_kd: ids must be int64")
    loss = student.new_empty((student.shape[0],), dtype=acc_dtype(student.dtype))
    return loss, torch.empty_like(student, memory_format=torch.contiguous_format)


register_student_gradient_autograd("fastkd::sparse_kd")


def sparse_kd_rows(student, ids, weights, target, divisor, *, tail: int, temperature: float, soft_scale: float,
                   hard_weight: float, ignore_index: int, label_smoothing: float, backend: str) -> torch.Tensor:
    """Per-row sparse loss divided by ``divisor``; differentiable w.r.t. the student."""
    impl = registry.implementation("sparse_kd", backend)
    kw = dict(tail=tail, temperature=float(temperature), soft_scale=float(soft_scale),
              hard_weight=float(hard_weight), ignore_index=int(ignore_index),
              label_smoothing=float(label_smoothing))
    if "autograd" in impl.caps:
        return impl.fn(student, ids, weights, target, divisor, **kw)
    loss, _ = sparse_kd_op(student, ids, weights, target, divisor, **kw, backend=backend)
    return loss
