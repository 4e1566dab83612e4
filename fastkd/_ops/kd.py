"""``fastkd::kd``: the fused dense loss as a custom op (loss rows / divisor, and the gradients of
both logits computed in the same call), its fake implementation and autograd.

The kernels write the gradient during the forward pass, so backward only scales the stored gradient
by ``grad_output``. With the usual ``loss.backward()`` that factor is 1 (the reduction's divisor was
folded into the forward): on CPU the stored buffer is then handed on as is, and on a GPU an in-place
kernel skips the rows whose factor is 1 (no host sync decides it). In place only when this
backward runs once: under ``retain_graph``/``create_graph`` (and so under gradcheck) the product is
formed out of place, leaving the saved buffer intact for the next backward.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backends import registry
from .._settings import KDSettings, KernelParams, acc_dtype


@torch.library.custom_op("fastkd::kd", mutates_args=())
def kd_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    divisor: torch.Tensor,
    *,
    temperature: float,
    soft_scale: float,
    hard_weight: float,
    divergence: int,
    beta: float,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    student_grad: bool,
    teacher_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = registry.implementation("kd", backend)
    p = KernelParams(temperature, soft_scale, hard_weight, divergence, beta, ignore_index, label_smoothing, softcap)
    n = student.shape[0]
    loss = torch.empty(n, dtype=acc_dtype(student.dtype), device=student.device)
    none = student.new_empty((0,))
    if not student_grad and not teacher_grad and "loss_only" in impl.caps:
        # no gradient wanted (eval, torch.no_grad): the statistics pass alone, nothing N×V written
        impl.fn(student, teacher, target, divisor, loss, None, None, p)
        return loss, none, none.clone()
    grad_s = torch.empty_like(student, memory_format=torch.contiguous_format)
    grad_t = torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad else None
    impl.fn(student, teacher, target, divisor, loss, grad_s, grad_t, p)
    return loss, (grad_s if student_grad else none), (grad_t if teacher_grad else none.clone())


@kd_op.register_fake
def _(student, teacher, target, divisor, *, temperature, soft_scale, hard_weight, divergence, beta,
      ignore_index, label_smoothing, softcap, student_grad, teacher_grad, backend):
    torch._check(student.dim() == 2 and teacher.dim() == 2, lambda: "kd: logits must be 2-D (N, V)")
    torch._check(student.shape == teacher.shape, lambda: "kd: student and teacher logits differ in shape")
    torch._check(student.dtype == teacher.dtype, lambda: "kd: student and teacher logits differ in dtype")
    torch._check(divisor.dim() == 0, lambda: "kd: the divisor must be a 0-d tensor")
    if target is not None:
        torch._check(target.dim() == 1 and target.shape[0] == student.shape[0],
                     lambda: "kd: target must have shape (N,)")
        torch._check(target.dtype == torch.int64, lambda: "kd: target must be int64")
    loss = student.new_empty((student.shape[0],), dtype=acc_dtype(student.dtype))
    grad_s = (torch.empty_like(student, memory_format=torch.contiguous_format) if student_grad
              else student.new_empty((0,)))
    grad_t = (torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad
              else student.new_empty((0,)))
    return loss, grad_s, grad_t


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    _, grad_s, grad_t = output
    ctx.teacher_grad = keyword_only_inputs["teacher_grad"]
    ctx.student_grad = keyword_only_inputs["student_grad"]
    ctx.backend = keyword_only_inputs["backend"]
    ctx.save_for_backward(grad_s, grad_t)
    ctx.mark_non_differentiable(grad_s, grad_t)
    # Otherwise autograd fills the (never used) gradients of the grad_s/grad_t outputs with zeros:
    # an N×V buffer allocated and written for nothing on every backward.
    ctx.set_materialize_grads(False)


def _eager_tensor(g: torch.Tensor) -> bool:
    """A plain tensor outside compilation: its values may be used to pick a code path."""
    if type(g) is not torch.Tensor:
        return False
    try:
        return not torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover
        return True


def _runs_once() -> bool:
    """This backward will not run again on the same saved tensors (no retain_graph/create_graph)."""
    try:
        return not torch._C._autograd._get_current_graph_task_keep_graph()
    except (AttributeError, RuntimeError):  # not inside a graph task, or an older torch
        return False


# Devices where reading grad_output on the host is free: there a backward whose grad_output is all
# ones hands the stored buffer on as is. Elsewhere (a GPU) reading it would be a host sync, so the
# backend's in-place scale_rows kernel decides per row on the device.
_HOST_DEVICES = frozenset({"cpu"})


def _scale_in_place(grad: torch.Tensor, g: torch.Tensor, backend: str) -> Optional[torch.Tensor]:
    """``grad`` scaled in place by the backend's ``scale_rows`` kernel (rows whose factor is exactly 1
    skipped on the device), or None when the backend has none for this tensor."""
    impl = registry.find("scale_rows", backend, grad.device.type)
    if impl is None or grad.dim() != 2 or grad.stride(-1) != 1:
        return None
    return impl.fn(grad, g)


def scale_rows(grad: torch.Tensor, g: torch.Tensor, backend: str) -> torch.Tensor:
    """``grad · g`` per row for a gradient the forward stored; ``g`` is the (N,) grad_output.

    CPU: when ``g`` is all ones the buffer is handed on as is (no second N×V buffer: after this
    node runs autograd releases its saved reference, so the leaf's ``.grad`` can take the buffer
    over). GPU: scaled in place by the backend's ``scale_rows`` kernel (rows with factor 1 skipped
    on the device) when this backward runs once; otherwise out of place.
    """
    if _eager_tensor(g):
        if grad.device.type in _HOST_DEVICES:
            if bool(torch.all(g == 1)):
                return grad
        elif _runs_once():
            out = _scale_in_place(grad, g, backend)
            if out is not None:
                return out
    # g stays float32: computed per element in float32 and rounded once into the gradient's dtype,
    # without a float32 N×V temporary.
    g = g.unsqueeze(-1).to(acc_dtype(grad.dtype))
    return torch.mul(grad, g, out=torch.empty_like(grad))


def _backward(ctx, g_loss, _g_grad_s, _g_grad_t):
    grad_s, grad_t = ctx.saved_tensors
    if g_loss is None or not ctx.student_grad:
        return None, None, None, None
    d_student = scale_rows(grad_s, g_loss, ctx.backend)
    d_teacher = scale_rows(grad_t, g_loss, ctx.backend) if ctx.teacher_grad else None
    return d_student, d_teacher, None, None


torch.library.register_autograd("fastkd::kd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Entries used by the losses
# --------------------------------------------------------------------------------------------
def kd_rows(student, teacher, target, divisor, settings: KDSettings, *, backend: str) -> torch.Tensor:
    """Per-row loss divided by ``divisor`` (a 0-d tensor), differentiable w.r.t. both logits.

    ``student``/``teacher`` are 2-D (N, V) with a unit column stride; ``target`` (N,) int64 or None;
    ``backend`` already resolved.
    """
    impl = registry.implementation("kd", backend)
    p = settings.kernel_params()
    if "autograd" in impl.caps:
        return impl.fn(student, teacher, target, divisor, p)
    grad_on = torch.is_grad_enabled()
    teacher_grad = grad_on and teacher.requires_grad
    student_grad = grad_on and (student.requires_grad or teacher_grad)
    loss, _, _ = kd_op(student, teacher, target, divisor, **p._asdict(), student_grad=student_grad,
                       teacher_grad=teacher_grad, backend=backend)
    return loss


class _KDInplace(torch.autograd.Function):
    """``inplace_grad=True``: the gradient overwrites the student logits' storage (eager only).

    The logits' version counter is bumped, so any other autograd node that saved them fails loudly
    in backward instead of reading gradients as logits.
    """

    @staticmethod
    def forward(ctx, student, teacher, target, divisor, p, backend: str):
        loss = torch.empty(student.shape[0], dtype=acc_dtype(student.dtype), device=student.device)
        registry.implementation("kd", backend).fn(student, teacher, target, divisor, loss, student, None, p)
        torch.autograd.graph.increment_version(student)
        ctx.save_for_backward(student.detach())
        ctx.backend = backend
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        (grad,) = ctx.saved_tensors
        # The buffer already is the student's storage: scale it in place (a second backward through
        # a retained graph then fails on the version counter instead of double-scaling). On a GPU
        # the backend's kernel skips the rows whose factor is 1, without a host sync.
        if grad.device.type in _HOST_DEVICES and _eager_tensor(g_loss):
            if not bool(torch.all(g_loss == 1)):
                grad.mul_(g_loss.unsqueeze(-1).to(acc_dtype(grad.dtype)))
        elif not _eager_tensor(g_loss) or _scale_in_place(grad, g_loss, ctx.backend) is None:
            grad.mul_(g_loss.unsqueeze(-1).to(acc_dtype(grad.dtype)))
        return grad, None, None, None, None, None


def kd_rows_inplace(student, teacher, target, divisor, settings: KDSettings, *, backend: str) -> torch.Tensor:
    return _KDInplace.apply(student, teacher, target, divisor, settings.kernel_params(), backend)


def register_student_gradient_autograd(op: str, num_inputs: int = 5) -> None:
    """Autograd for an op that returns ``(loss (N,), grad (N, V))``, ``grad`` the gradient of the
    per-row loss with respect to its first input (the student) and no other input differentiable:
    backward scales ``grad`` by the incoming per-row gradient (:func:`scale_rows`)."""
    def setup_context(ctx, inputs, keyword_only_inputs, output):
        _, grad = output
        ctx.backend = keyword_only_inputs["backend"]
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)

    def backward(ctx, g_loss, _g_grad):
        (grad,) = ctx.saved_tensors
        rest = (None,) * (num_inputs - 1)
        if g_loss is None:
            return (None, *rest)
        return (scale_rows(grad, g_loss, ctx.backend), *rest)

    torch.library.register_autograd(op, backward, setup_context=setup_context)
