"""Checks and layout of the tensors every entry point takes: logits, class ids, the "mean" divisor.

Nothing here synchronises with a GPU: a value-range check on device tensors is a device-side assert
(``torch._assert_async``), an ordinary ``ValueError`` only for CPU tensors outside compilation.
"""
from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def host_checkable(t: torch.Tensor) -> bool:
    """Whether a value check on ``t`` may read it on the host (CPU tensor, eager)."""
    return t.device.type == "cpu" and not is_compiling()


def check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (..., V) with at least one dimension, got a 0-d tensor")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocabulary dimension V >= 1, got shape {tuple(x.shape)}")


def narrow_vocab(name: str, x: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """The first ``vocab_size`` columns of logits ``(..., W)``, ``W >= vocab_size`` (a view; ``x``
    itself when ``vocab_size`` is None or W). The columns past it are a padded head's: they never
    get probability, and autograd gives them exactly zero gradient."""
    if vocab_size is None:
        return x
    if x.shape[-1] < vocab_size:
        raise ValueError(f"{name} has {x.shape[-1]} columns, fewer than vocab_size={vocab_size}")
    return x if x.shape[-1] == vocab_size else x[..., :vocab_size]


def width_mismatch(student_name: str, student_width: int, teacher_name: str, teacher_width: int) -> ValueError:
    """The error for two vocabulary widths that differ without ``vocab_size=``."""
    return ValueError(f"{student_name} has {student_width} vocabulary columns but {teacher_name} has "
                      f"{teacher_width}; if one head is padded past the real vocabulary, pass vocab_size=<the real "
                      f"vocabulary size> and only the first vocab_size columns of each side count")


def check_pair(student, teacher, *, student_name: str, teacher_name: str) -> None:
    """Two logits tensors of one shape, dtype and device."""
    check_logits(student_name, student)
    check_logits(teacher_name, teacher)
    if teacher.shape[:-1] == student.shape[:-1] and teacher.shape[-1] != student.shape[-1]:
        raise width_mismatch(student_name, student.shape[-1], teacher_name, teacher.shape[-1])
    if teacher.shape != student.shape:
        raise ValueError(f"{teacher_name} must have the student's shape {tuple(student.shape)}, "
                         f"got {tuple(teacher.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"{teacher_name} must have the student's dtype {student.dtype}, got {teacher.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"{teacher_name} must be on the student's device {student.device}, "
                         f"got {teacher.device}")


def check_target_layout(target, lead_shape, device, *, what: str = "class indices") -> None:
    """Type, dtype, shape and device of a target; no value is read."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of {what}, got {type(target).__name__}")
    if target.dtype not in INT_DTYPES:
        raise TypeError(f"target must be an integer tensor of {what}, got {target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"target must have shape {tuple(lead_shape)} (the logits' leading shape), "
                         f"got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target must be on {device} like the logits, got {target.device}")


def check_target(target, lead_shape, vocab: int, ignore_index: int, device) -> None:
    """Layout checks always; the value range [0, V) (or ignore_index) without a host sync.

    On CPU the range check is an ordinary ValueError. On other devices it is a device-side assert,
    which never stalls the stream; the kernels also never read out of bounds.
    """
    check_target_layout(target, lead_shape, device)
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if host_checkable(target):
        if bool(bad.any()):
            first = target[bad].flatten()[0]
            raise ValueError(f"target values must lie in [0, {vocab}) or equal ignore_index="
                             f"{ignore_index}; found {int(first)}")
    else:
        torch._assert_async(~bad.any(), "fastkd: target value out of range [0, V) and not ignore_index")


def rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` as 2-D rows ``(N, width)`` with a unit column stride (a view where possible)."""
    r = x.reshape(-1, width)
    return r if r.stride(-1) == 1 else r.contiguous()


def flat_target(target: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if target is None else target.reshape(-1).long()


def divisor(target: Optional[torch.Tensor], n_rows: int, reduction: str, num_items, ignore_index: int,
            device, dtype) -> torch.Tensor:
    """0-d tensor the loss rows are divided by: 1 for sum/none, the counted rows (or num_items) for mean.

    Computed on the logits' device and never read on the host, so "mean" costs no sync.
    """
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
    if target is None:
        return torch.tensor(float(max(n_rows, 1)), dtype=dtype, device=device)
    count = (target != ignore_index).sum()
    # A batch with no counted row gives loss 0: every row is 0, divided by 1.
    return count.clamp_min(1).to(dtype)


def reduce_rows(rows_: torch.Tensor, reduction: str, lead_shape) -> torch.Tensor:
    """Loss rows already divided by the divisor → the returned loss."""
    if reduction == "none":
        return rows_.reshape(lead_shape)
    return rows_.sum()


def check_sparse_ids(ids: torch.Tensor, vocab: int) -> None:
    """Stored ids must lie in [0, V) (−1: padding); a ValueError on CPU, a device assert elsewhere.
    The kernels also never read out of bounds (a bad row gives NaN)."""
    if ids.numel() == 0:
        return
    bad = (ids < -1) | (ids >= vocab)
    if host_checkable(ids):
        if bool(bad.any()):
            raise ValueError(f"sparse_teacher.ids must lie in [0, {vocab}) (or -1 for padding); found "
                             f"{int(ids[bad][0])}")
    else:
        torch._assert_async(~bad.any(), "fastkd: sparse_teacher id out of range [0, V)")
