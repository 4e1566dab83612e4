"""``fastkd::uld``: the Universal Logit Distillation loss as a custom op (loss rows / divisor and the
student's gradient in one call), its fake implementation and autograd."""
from __future__ import annotations

from typing import Optional

import torch

from .._backends import registry
from .._settings import acc_dtype
from .kd import register_student_gradient_autograd


@torch.library.custom_op("fastkd::uld", mutates_args=())
def uld_op(student: torch.Tensor, head: torch.Tensor, tail: torch.Tensor, cols: Optional[torch.Tensor],
           divisor: torch.Tensor, *, temperature: float, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    loss = torch.empty(student.shape[0], dtype=acc_dtype(student.dtype), device=student.device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    registry.implementation("uld", backend).fn(student, head, tail, cols, divisor, loss, grad,
                                               temperature=temperature, scale=scale)
    return loss, grad


@uld_op.register_fake
def _(student, head, tail, cols, divisor, *, temperature, scale, backend):
    torch._check(student.dim() == 2, lambda: "uld: student logits must be 2-D (N, V)")
    torch._check(head.dim() == 2 and head.shape[0] == student.shape[0], lambda: "uld: head must be (N, k)")
    torch._check(tail.shape == (student.shape[0],), lambda: "uld: tail must be (N,)")
    torch._check(head.dtype == acc_dtype(student.dtype) and tail.dtype == head.dtype,
                 lambda: "uld: head and tail must be in the student's accumulation dtype")
    torch._check(cols is None or (cols.dim() == 1 and cols.shape[0] == student.shape[1]),
                 lambda: "uld: cols must be (V,)")
    loss = student.new_empty((student.shape[0],), dtype=acc_dtype(student.dtype))
    return loss, torch.empty_like(student, memory_format=torch.contiguous_format)


register_student_gradient_autograd("fastkd::uld")


def uld_rows(student, head, tail, cols, divisor, *, temperature: float, scale: float, backend: str) -> torch.Tensor:
    """Per-row ULD loss divided by ``divisor``; differentiable w.r.t. the student (the teacher's
    head and tail get no gradient)."""
    impl = registry.implementation("uld", backend)
    if "autograd" in impl.caps:
        return impl.fn(student, head, tail, cols, divisor, temperature=float(temperature), scale=float(scale))
    loss, _ = uld_op(student, head, tail, cols, divisor, temperature=float(temperature), scale=float(scale),
                     backend=backend)
    return loss
