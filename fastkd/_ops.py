"""The op layer: torch.library custom ops, their fake (meta) implementations, autograd, and the ONE
place that chooses a backend.

Kernels (C++ via ``fastkd._C``, CUDA, Triton) know nothing of autograd: each backend is a function
that fills preallocated outputs (``register_kd_impl``). The fused kernels compute the gradient during
the forward pass, so backward only rescales the stored gradient by ``grad_output``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from . import _ext
from . import _reference

DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


@dataclass(frozen=True)
class KDParams:
    """Scalar settings every fused kd kernel takes. ``soft_scale`` already includes τ² if asked for."""

    temperature: float
    soft_scale: float
    hard_weight: float
    divergence: int
    beta: float
    ignore_index: int
    label_smoothing: float
    softcap: float  # 0.0: no softcap
    has_target: bool


# A kd impl fills loss_out (N,), grad_s_out (N, V) and, if given, grad_t_out (N, V).
# ``divisor`` is a 0-d float tensor on the logits' device: the loss rows and both gradients are
# divided by it, so a "mean" needs no second pass (and no host sync to learn the count).
KDImpl = Callable[..., None]
_KD_IMPLS: Dict[str, KDImpl] = {}


def register_kd_impl(backend: str, fn: KDImpl) -> None:
    """Register the fused-kd implementation of a backend ("cpu", "cuda", "triton")."""
    _KD_IMPLS[backend] = fn


def _triton_available() -> bool:
    try:
        from ._triton import kd as _tkd  # noqa: F401
    except Exception:  # triton missing or too old
        return False
    return True


def backend_available(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu" and "cpu" in _KD_IMPLS
    if backend == "cuda":
        return device.type == "cuda" and "cuda" in _KD_IMPLS
    if backend == "triton":
        import os

        interp = os.environ.get("TRITON_INTERPRET") == "1"
        return (device.type == "cuda" or (interp and device.type == "cpu")) and _triton_available() \
            and "triton" in _KD_IMPLS
    return False


def resolve_backend(backend: str, device: torch.device) -> str:
    """The one dispatch rule: cuda kernels, else triton, on GPU; the C++ kernel on CPU; else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        for cand in order:
            if backend_available(cand, device):
                return cand
        return "torch"
    if not backend_available(backend, device):
        why = {
            "cpu": "needs CPU tensors and the compiled extension fastkd._C",
            "cuda": "needs CUDA tensors and fastkd._C built with nvcc",
            "triton": "needs CUDA tensors (or TRITON_INTERPRET=1) and an importable triton",
        }[backend]
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: it {why}"
                         + (f" (extension failed to load: {_ext.LOAD_ERROR})" if _ext.LOAD_ERROR else ""))
    return backend


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# fastkd::kd_fused  (student, teacher) -> (loss_rows / divisor, grad_student, grad_teacher)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastkd::kd_fused", mutates_args=())
def kd_fused(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    divisor: torch.Tensor,
    temperature: float,
    soft_scale: float,
    hard_weight: float,
    divergence: int,
    beta: float,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    has_target: bool,
    teacher_grad: bool,
    backend: str,
    student_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, v = student.shape
    loss = torch.empty(n, dtype=_acc_dtype(student.dtype), device=student.device)
    params = KDParams(temperature, soft_scale, hard_weight, divergence, beta, ignore_index,
                      label_smoothing, softcap, has_target)
    if not student_grad and not teacher_grad and backend in _NO_GRAD_OK:
        # no gradient wanted (eval, torch.no_grad): the stats pass alone, nothing N×V written
        _KD_IMPLS[backend](student, teacher, target, divisor, loss, None, None, params)
        return loss, student.new_empty((0,)), student.new_empty((0,))
    grad_s = torch.empty_like(student, memory_format=torch.contiguous_format)
    grad_t = (torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad
              else student.new_empty((0,)))
    _KD_IMPLS[backend](student, teacher, target, divisor, loss, grad_s,
                       grad_t if teacher_grad else None, params)
    if not student_grad:
        grad_s = student.new_empty((0,))
    return loss, grad_s, grad_t


@kd_fused.register_fake
def _(student, teacher, target, divisor, temperature, soft_scale, hard_weight, divergence, beta,
      ignore_index, label_smoothing, softcap, has_target, teacher_grad, backend, student_grad=True):
    n = student.shape[0]
    loss = student.new_empty((n,), dtype=_acc_dtype(student.dtype))
    grad_s = (torch.empty_like(student, memory_format=torch.contiguous_format) if student_grad
              else student.new_empty((0,)))
    grad_t = (torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad
              else student.new_empty((0,)))
    return loss, grad_s, grad_t


def _kd_setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.teacher_grad = inputs[13]
    ctx.student_grad = inputs[15] if len(inputs) > 15 else True
    ctx.save_for_backward(grad_s, grad_t)
    ctx.mark_non_differentiable(grad_s, grad_t)
    # Otherwise autograd fills the (never used) gradients of the grad_s/grad_t outputs with zeros:
    # an N×V buffer allocated and written for nothing on every backward.
    ctx.set_materialize_grads(False)


def _is_unit(g: torch.Tensor) -> bool:
    """True when grad_output is all ones and that can be known without a device sync (a plain CPU
    tensor, not a fake/functional one being traced)."""
    if g.device.type != "cpu" or type(g) is not torch.Tensor:
        return False
    try:
        if torch.compiler.is_compiling():
            return False
    except AttributeError:  # pragma: no cover
        pass
    return bool(torch.all(g == 1))


def _scale_rows(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad · g per row. The usual loss.backward() has g ≡ 1 (the reduction's divisor was folded
    into the forward), and then the stored buffer is handed on as is: no second N×V buffer. After this
    node runs, autograd releases its saved reference, so the leaf's .grad can take the buffer over.
    """
    if _is_unit(g):
        return grad
    # g stays float32: computed per element in float32 and rounded once into the input dtype,
    # without a float32 N×V temporary.
    g = g.unsqueeze(-1).to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    return torch.mul(grad, g, out=torch.empty_like(grad))


def _kd_backward(ctx, g_loss, _g_grad_s, _g_grad_t):
    grad_s, grad_t = ctx.saved_tensors
    if g_loss is None or not ctx.student_grad:
        return (None,) * 16
    d_student = _scale_rows(grad_s, g_loss)
    d_teacher = _scale_rows(grad_t, g_loss) if ctx.teacher_grad else None
    return (d_student, d_teacher) + (None,) * 14


torch.library.register_autograd("fastkd::kd_fused", _kd_backward, setup_context=_kd_setup_context)


# --------------------------------------------------------------------------------------------
# Backend implementations living in the compiled extension
# --------------------------------------------------------------------------------------------
def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


# Backends whose impl accepts grad_s=None (loss only, no gradient pass).
_NO_GRAD_OK = {"cpu"}


def _cpu_kd_impl(student, teacher, target, divisor, loss, grad_s, grad_t, p: KDParams) -> None:
    C = _ext.C
    C.kd_forward_cpu(
        # pointers
        _ptr(student), _ptr(teacher), _ptr(target) if p.has_target else 0, _ptr(divisor),
        _ptr(loss), _ptr(grad_s), _ptr(grad_t),
        # sizes
        student.shape[0], student.shape[1],
        # row strides (elements; the vocabulary dimension is contiguous)
        student.stride(0), teacher.stride(0), 0 if grad_s is None else grad_s.stride(0),
        0 if grad_t is None else grad_t.stride(0),
        # dtype and scalar settings
        _ext.dtype_code(student.dtype), p.temperature, p.soft_scale, p.hard_weight, p.divergence,
        p.beta, p.ignore_index, p.label_smoothing, p.softcap, torch.get_num_threads(),
    )


if _ext.has_cpu_kernels():
    register_kd_impl("cpu", _cpu_kd_impl)


def _load_gpu_impls() -> None:
    """Triton and CUDA backends register themselves on import; neither import needs a GPU.

    Triton is imported only where it can run (a CUDA device, or TRITON_INTERPRET=1): importing it
    costs ~0.3 s, and it fixes compile-vs-interpret mode at its first import.
    """
    import os

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from ._triton import kd as _tkd  # noqa: F401
        except Exception:
            pass
    try:
        from . import _cuda_impls  # noqa: F401
    except Exception:
        pass


_load_gpu_impls()


# --------------------------------------------------------------------------------------------
# Entry used by losses.py
# --------------------------------------------------------------------------------------------
def _trl_divergence(divergence: str, beta: float) -> str:
    """TRL's special cases: JSD with β = 0 / 1 is exactly forward / reverse KL."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return divergence


def _kd_params(student, target, *, temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
               label_smoothing, t2_scale, softcap):
    """The kernels' scalar settings and a target tensor (empty when there is none)."""
    params = KDParams(float(temperature), float(soft_weight * (temperature * temperature if t2_scale else 1.0)),
                      float(hard_weight), DIVERGENCE_CODES[_trl_divergence(divergence, beta)], float(beta),
                      int(ignore_index), float(label_smoothing), float(softcap or 0.0), target is not None)
    tgt = target if target is not None else student.new_empty((0,), dtype=torch.long)
    return params, tgt


def kd_rows(student, teacher, target, divisor, *, backend, **settings):
    """Per-row loss divided by ``divisor`` (a 0-d tensor), differentiable w.r.t. both logits.

    ``student``/``teacher`` are 2-D (N, V) with a contiguous vocabulary dimension; ``target`` is
    (N,) int64 or None. ``backend`` must already be resolved; ``settings`` are kd_loss's temperature,
    soft_weight, hard_weight, divergence, beta, ignore_index, label_smoothing, t2_scale, softcap.
    """
    if backend == "torch":
        settings = dict(settings, divergence=_trl_divergence(settings["divergence"], settings["beta"]))
        rows = _reference.kd_loss_rows(student, teacher, target, **settings)
        return rows / divisor.to(rows.dtype)
    p, tgt = _kd_params(student, target, **settings)
    grad_on = torch.is_grad_enabled()
    teacher_grad = grad_on and teacher.requires_grad
    student_grad = grad_on and (student.requires_grad or teacher_grad)
    loss, _, _ = kd_fused(
        student, teacher, tgt, divisor, p.temperature, p.soft_scale, p.hard_weight, p.divergence, p.beta,
        p.ignore_index, p.label_smoothing, p.softcap, p.has_target, teacher_grad, backend, student_grad)
    return loss


class _KDInplace(torch.autograd.Function):
    """``inplace_grad=True``: the gradient overwrites the student logits' storage (eager only).

    The logits' version counter is bumped, so any other autograd node that saved them fails loudly
    in backward instead of reading gradients as logits.
    """

    @staticmethod
    def forward(ctx, student, teacher, target, divisor, params: KDParams, backend: str):
        loss = torch.empty(student.shape[0], dtype=_acc_dtype(student.dtype), device=student.device)
        _KD_IMPLS[backend](student, teacher, target, divisor, loss, student, None, params)
        torch.autograd.graph.increment_version(student)
        ctx.save_for_backward(student.detach())
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        (grad,) = ctx.saved_tensors
        # The buffer already is the student's storage: scale it in place (a second backward through
        # a retained graph then fails on the version counter instead of double-scaling).
        if not _is_unit(g_loss):
            grad.mul_(g_loss.unsqueeze(-1).to(torch.float64 if grad.dtype == torch.float64 else torch.float32))
        return grad, None, None, None, None, None


def kd_rows_inplace(student, teacher, target, divisor, *, backend, **settings):
    params, tgt = _kd_params(student, target, **settings)
    return _KDInplace.apply(student, teacher, tgt, divisor, params, backend)
