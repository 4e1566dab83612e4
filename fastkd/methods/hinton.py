r"""Soft targets (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

The student matches the teacher's distribution softened by a temperature τ, mixed with the ordinary
hard-label loss; the soft term is scaled by τ² so its gradient magnitude does not shrink as τ grows::

    L = hard_weight · CE(z, y) + soft_weight · τ² · KL(softmax(t/τ) ‖ softmax(z/τ))

That is exactly :func:`fastkd.kd_loss`. This module adds the ensemble-teacher case of the paper
(§2: "an ensemble ... whose soft targets are the arithmetic mean of the members' softened
distributions"), done without materialising anything new inside the loss:

    p_ens = Σ_k w_k · softmax(t_k / τ),     Σ_k w_k = 1

Any logits ``u`` with ``softmax(u / τ) = p_ens`` can stand in for the teacher, and
``u = τ · log p_ens = τ · logsumexp_k(log_softmax(t_k / τ) + log w_k)`` is one. So the ensemble is
distilled by the same fused ``kd_loss`` call, at the same τ (the logits ``u`` are only meaningful
at the temperature they were built for).

Worked example (the numbers are in docs/methods.md and examples/hinton_worked_example.py)::

    T = 4.0
    with torch.no_grad():
        teacher_logits = teacher(x)
    student_logits = student(x)
    loss = fastkd.kd_loss(student_logits, teacher_logits, y, temperature=T,
                          soft_weight=0.9, hard_weight=0.1)
    # ensemble of teachers:
    loss = ensemble_kd_loss(student_logits, [t1(x), t2(x), t3(x)], y, temperature=T,
                            soft_weight=0.9, hard_weight=0.1)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..losses import kd_loss
from ._common import check_positive

__all__ = ["ensemble_logits", "ensemble_kd_loss"]

TeacherLogits = Union[torch.Tensor, Sequence[torch.Tensor]]


def _stack_teachers(teacher_logits: TeacherLogits) -> torch.Tensor:
    if isinstance(teacher_logits, torch.Tensor):
        if teacher_logits.dim() < 2:
            raise ValueError("teacher_logits as one tensor must have shape (K, ..., V) with K teachers, "
                             f"got shape {tuple(teacher_logits.shape)}")
        stacked = teacher_logits
    elif isinstance(teacher_logits, (list, tuple)):
        if len(teacher_logits) == 0:
            raise ValueError("teacher_logits must hold at least one teacher's logits, got an empty sequence")
        for i, t in enumerate(teacher_logits):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"teacher_logits[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != teacher_logits[0].shape:
                raise ValueError(f"teacher_logits[{i}] has shape {tuple(t.shape)}; every teacher must have "
                                 f"shape {tuple(teacher_logits[0].shape)}")
        stacked = torch.stack(list(teacher_logits))
    else:
        raise TypeError("teacher_logits must be a tensor (K, ..., V) or a sequence of K tensors (..., V), "
                        f"got {type(teacher_logits).__name__}")
    if not stacked.is_floating_point():
        raise TypeError(f"teacher_logits must be floating point, got {stacked.dtype}")
    return stacked


def ensemble_logits(teacher_logits: TeacherLogits, *, temperature: float = 1.0,
                    weights: Optional[Union[Sequence[float], torch.Tensor]] = None) -> torch.Tensor:
    r"""Logits whose softmax at ``temperature`` is the weighted mean of the teachers' softened softmaxes.

    Equals, for a stacked tensor ``t`` of shape ``(K, ..., V)`` and weights ``w`` summing to 1::

        T * torch.log((w.view(K, *[1] * (t.dim() - 1)) * torch.softmax(t / T, -1)).sum(0))

    computed stably as ``T * logsumexp_k(log_softmax(t_k / T) + log w_k)``, in float32 (float64 for
    float64 input) and returned in the input dtype. Pass the result as ``teacher_logits`` of
    :func:`fastkd.kd_loss` with the **same** temperature. It is differentiable; detach it (or build
    it under ``torch.no_grad()``) when the teachers are fixed.

    Args:
        teacher_logits: ``(K, ..., V)`` tensor or a sequence of K tensors of equal shape ``(..., V)``.
        temperature: τ > 0 of the softened distributions.
        weights: K non-negative weights (normalised here to sum to 1); default uniform.
    """
    check_positive("temperature", temperature)
    t = _stack_teachers(teacher_logits)
    k = t.shape[0]
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    log_p = torch.log_softmax(t.to(acc) / temperature, dim=-1)
    if weights is None:
        log_w = torch.full((k,), -math.log(k), dtype=acc, device=t.device)
    else:
        w = torch.as_tensor(weights, dtype=acc, device=t.device)
        if w.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) (one per teacher), got {tuple(w.shape)}")
        if not isinstance(weights, torch.Tensor) and (min(float(x) for x in weights) < 0
                                                      or sum(float(x) for x in weights) <= 0):
            raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
        log_w = torch.log(w) - torch.log(w.sum())
    log_w = log_w.view(k, *([1] * (t.dim() - 1)))
    return (temperature * torch.logsumexp(log_p + log_w, dim=0)).to(t.dtype)


def ensemble_kd_loss(student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                     target: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                     weights: Optional[Union[Sequence[float], torch.Tensor]] = None,
                     **kd_kwargs) -> torch.Tensor:
    r"""Hinton et al.'s distillation from an ensemble of teachers (the mean of their soft targets).

    Equals ``fastkd.kd_loss(student_logits, ensemble_logits(teacher_logits, temperature=T,
    weights=weights).detach(), target, temperature=T, **kd_kwargs)``; with ``divergence="forward_kl"``
    its soft term is ``T² · KL(Σ_k w_k softmax(t_k/T) ‖ softmax(z/T))`` per row. The teachers are
    detached: they are never trained by this loss.

    ``kd_kwargs`` are the keyword arguments of :func:`fastkd.kd_loss` (``soft_weight``,
    ``hard_weight``, ``reduction``, ...).
    """
    with torch.no_grad():
        ens = ensemble_logits(teacher_logits, temperature=temperature, weights=weights)
    if isinstance(student_logits, torch.Tensor) and ens.dtype != student_logits.dtype:
        ens = ens.to(student_logits.dtype)
    return kd_loss(student_logits, ens, target, temperature=temperature, **kd_kwargs)
