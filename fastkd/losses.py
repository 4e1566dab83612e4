"""Public loss functions: argument checking, shapes, reductions and docs. Knows nothing of backends."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import _ops

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def _check_number(name: str, value, *, low=None, high=None, low_open=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (..., V) with at least one dimension, got a 0-d tensor")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocabulary dimension V >= 1, got shape {tuple(x.shape)}")


def check_target(target, lead_shape, vocab: int, ignore_index: int, device) -> None:
    """Shape/dtype/device checks always; value range checked without a host sync.

    On CPU the range check is an ordinary ValueError. On other devices it is a device-side assert
    (torch._assert_async), which never stalls the stream; the kernels also never read out of bounds.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"target must have shape {tuple(lead_shape)} (the logits' leading shape), "
                         f"got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target must be on {device} like the logits, got {target.device}")
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if target.device.type == "cpu" and not _is_compiling():
        if bool(bad.any()):
            first = target[bad].flatten()[0]
            raise ValueError(f"target values must lie in [0, {vocab}) or equal ignore_index="
                             f"{ignore_index}; found {int(first)}")
    else:
        torch._assert_async(~bad.any(), "fastkd: target value out of range [0, V) and not ignore_index")


def check_kd_inputs(student, teacher, target, *, temperature, soft_weight, hard_weight, divergence, beta,
                    ignore_index, label_smoothing, reduction, softcap, student_name="student_logits",
                    teacher_name="teacher_logits", target_what="class ids") -> None:
    """The checks every kd entry point shares (kd_loss, the vocab-parallel kd_loss): logits pair,
    scalar settings, and that a hard term has a target. Raises ValueError/TypeError naming the
    argument."""
    check_logits(student_name, student)
    check_logits(teacher_name, teacher)
    if teacher.shape != student.shape:
        raise ValueError(f"{teacher_name} must have the student's shape {tuple(student.shape)}, "
                         f"got {tuple(teacher.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"{teacher_name} must have the student's dtype {student.dtype}, got {teacher.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"{teacher_name} must be on the student's device {student.device}, "
                         f"got {teacher.device}")
    _check_number("temperature", temperature, low=0.0, low_open=True)
    if math.isinf(temperature):
        raise ValueError("temperature must be finite")
    _check_number("soft_weight", soft_weight)
    _check_number("hard_weight", hard_weight)
    _check_number("beta", beta, low=0.0, high=1.0)
    _check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    _check_number("softcap", softcap, low=0.0, low_open=True, allow_none=True)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hard_weight != 0.0 and target is None:
        raise ValueError(f"hard_weight != 0 needs target ({target_what} of shape {student_name}.shape[:-1])")


def _divisor(target2d: Optional[torch.Tensor], n_rows: int, reduction: str, num_items, ignore_index: int,
             device, dtype) -> torch.Tensor:
    """0-d tensor the loss rows are divided by: 1 for sum/none, the counted rows (or num_items) for mean."""
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be an int or a 1-element tensor, got shape "
                                 f"{tuple(num_items.shape)}")
            return num_items.detach().reshape(()).to(device=device, dtype=dtype)
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items <= 0:
            raise ValueError(f"num_items must be a positive int or a tensor, got {num_items!r}")
        return torch.tensor(float(num_items), dtype=dtype, device=device)
    if target2d is None:
        return torch.tensor(float(max(n_rows, 1)), dtype=dtype, device=device)
    count = (target2d != ignore_index).sum()
    # A batch with no counted row gives loss 0: every row is 0, divided by 1.
    return count.clamp_min(1).to(dtype)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    t2_scale: bool = True,
    softcap: Optional[float] = None,
    num_items: Union[int, torch.Tensor, None] = None,
    backend: str = "auto",
    inplace_grad: bool = False,
) -> torch.Tensor:
    r"""Fused knowledge-distillation loss: soft-target divergence plus hard-label cross-entropy.

    With ``divergence="forward_kl"``, ``softcap=None``, ``reduction="mean"`` and
    ``keep = target != ignore_index`` it equals, in exact arithmetic::

        T = temperature
        s, t, y = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2), target.flatten()
        kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                      reduction="none", log_target=True).sum(-1)
        ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="none",
                             label_smoothing=label_smoothing)
        loss = (soft_weight * T**2 * kl + hard_weight * ce)[keep].sum() / keep.sum().clamp_min(1)

    which, when no label is ignored, is the familiar idiom
    ``soft_weight * T**2 * F.kl_div(..., reduction="batchmean", log_target=True)
    + hard_weight * F.cross_entropy(s, y)``. The fused kernels compute it in one sweep per row without
    materialising any probability tensor, and write the gradient during the forward pass.

    Args:
        student_logits: ``(..., V)`` float32/bfloat16/float16 (float64 on CPU). Rows are flattened.
        teacher_logits: same shape, dtype and device. Gets a gradient only if it requires grad
            (mutual learning); otherwise it is treated as a constant.
        target: ``(...)`` integer class ids, or None (soft loss only). Rows equal to ``ignore_index``
            contribute nothing to either term and are not counted by "mean".
        temperature: τ > 0 applied to both softmaxes of the soft term (the hard term uses τ = 1).
        soft_weight, hard_weight: weights of the divergence and of the cross-entropy.
        divergence: ``"forward_kl"`` KL(p‖q), ``"reverse_kl"`` KL(q‖p), or ``"jsd"``
            β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q (β = 0 / 1 give forward / reverse KL exactly,
            as TRL's ``generalized_jsd_loss``). p is the teacher's, q the student's distribution.
        beta: β ∈ [0, 1] of the JSD.
        label_smoothing: ε ∈ [0, 1] of the hard term, as in ``F.cross_entropy``.
        reduction: ``"mean"`` over counted rows, ``"sum"``, or ``"none"`` (shape ``(...)``).
        t2_scale: multiply the soft term by τ² (Hinton et al.) so its gradient scale is τ-independent.
        softcap: if given, c·tanh(x/c) is applied to both logits first (Gemma-style).
        num_items: overrides the divisor of "mean" (int or 0-d tensor), e.g. the token count of a
            whole gradient-accumulation step.
        backend: ``"auto"``, ``"cpu"`` (fused C++), ``"cuda"``, ``"triton"``, or ``"torch"`` (pure
            PyTorch reference).
        inplace_grad: fused backends only, eager only: write the gradient into the student logits'
            storage instead of a new buffer (saves one N×V buffer; the logits are overwritten, and
            must be a non-leaf tensor that nothing else saved for backward).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or ``(...)`` for ``reduction="none"``.
    """
    check_kd_inputs(student_logits, teacher_logits, target, temperature=temperature,
                    soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence, beta=beta,
                    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
                    softcap=softcap)

    lead_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    device = student_logits.device
    if target is not None:
        check_target(target, lead_shape, vocab, ignore_index, device)

    resolved = _ops.resolve_backend(backend, device)
    if student_logits.dtype == torch.float64 and resolved in ("cuda", "triton"):
        raise TypeError(f"float64 logits are supported by the cpu and torch backends, not {resolved!r}")

    s2 = student_logits.reshape(-1, vocab)
    t2 = teacher_logits.reshape(-1, vocab)
    if s2.stride(-1) != 1:
        s2 = s2.contiguous()
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    y = None if target is None else target.reshape(-1).long()

    acc = torch.float64 if s2.dtype == torch.float64 else torch.float32
    divisor = _divisor(y, s2.shape[0], reduction, num_items, ignore_index, device, acc)
    kwargs = dict(temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
                  divergence=divergence, beta=beta, ignore_index=ignore_index,
                  label_smoothing=label_smoothing, t2_scale=t2_scale, softcap=softcap, backend=resolved)
    if inplace_grad:
        if resolved == "torch":
            raise ValueError("inplace_grad=True needs a fused backend (cpu, cuda, triton), not 'torch'")
        if student_logits.is_leaf and student_logits.requires_grad:
            raise ValueError("inplace_grad=True cannot overwrite a leaf tensor that requires grad; "
                             "pass the output of the student's head (a non-leaf tensor)")
        if teacher_logits.requires_grad:
            raise ValueError("inplace_grad=True does not support a teacher that requires grad")
        if s2.data_ptr() != student_logits.data_ptr() or not s2.is_contiguous():
            raise ValueError("inplace_grad=True needs contiguous student_logits")
        rows = _ops.kd_rows_inplace(s2, t2, y, divisor, **kwargs)
    else:
        rows = _ops.kd_rows(s2, t2, y, divisor, **kwargs)

    if reduction == "none":
        return rows.reshape(lead_shape)
    return rows.sum()


class KDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`kd_loss`; the constructor takes the same keyword arguments."""

    def __init__(self, **kwargs):
        super().__init__()
        allowed = {"temperature", "soft_weight", "hard_weight", "divergence", "beta", "ignore_index",
                   "label_smoothing", "reduction", "t2_scale", "softcap", "num_items", "backend",
                   "inplace_grad"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"KDLoss got unexpected keyword arguments {sorted(unknown)}")
        self.kwargs = kwargs

    def forward(self, student_logits, teacher_logits, target=None, **overrides):
        return kd_loss(student_logits, teacher_logits, target, **{**self.kwargs, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
