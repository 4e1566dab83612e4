r"""Label smoothing, the regulariser KD is compared with (Szegedy et al. 2016; analysed by Müller,
Kornblith & Hinton 2019, "When does label smoothing help?").

The one-hot target is replaced by ``(1 − ε)·onehot(y) + ε/V``, so per row::

    L_LS = (1 − ε)·CE(z, y) + ε·CE(z, u),   u the uniform distribution over the V classes
         = (1 − ε)·CE(z, y) + ε·(KL(u ‖ softmax(z)) + log V)

i.e. label smoothing is distillation from a uniform "teacher" at τ = 1, plus a constant — the
comparison Müller et al. draw (and why a label-smoothed teacher distils worse: its logits carry less
information about class similarities). Both forms run through :func:`fastkd.kd_loss`.
"""
from __future__ import annotations

import math

import torch

from ..losses import kd_loss
from ._common import check_tensor, cross_entropy

__all__ = ["label_smoothing_loss", "uniform_teacher_loss"]


def _check_eps(smoothing):
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be a number in [0, 1], got {smoothing!r}")


def label_smoothing_loss(logits: torch.Tensor, target: torch.Tensor, *, smoothing: float = 0.1,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Equals ``F.cross_entropy(logits, target, label_smoothing=smoothing, ignore_index=ignore_index,
    reduction=reduction)`` for ``(N, V)`` logits (any leading shape is flattened), via ``kd_loss``."""
    check_tensor("logits", logits)
    _check_eps(smoothing)
    return cross_entropy(logits, target, label_smoothing=float(smoothing), ignore_index=ignore_index,
                         reduction=reduction)


def uniform_teacher_loss(logits: torch.Tensor, target: torch.Tensor, *, smoothing: float = 0.1,
                         ignore_index: int = -100) -> torch.Tensor:
    r"""Label smoothing written as KD from a uniform teacher; equals :func:`label_smoothing_loss`
    (mean reduction) up to the constant ``smoothing · log V``::

        fastkd.kd_loss(z, torch.zeros_like(z), y, temperature=1.0, soft_weight=ε, hard_weight=1 − ε)
        + ε * math.log(V)

    Included to make the Müller et al. comparison concrete; prefer :func:`label_smoothing_loss`.
    """
    check_tensor("logits", logits)
    _check_eps(smoothing)
    teacher = torch.zeros_like(logits).detach()
    return kd_loss(logits, teacher, target, temperature=1.0, soft_weight=float(smoothing),
                   hard_weight=1.0 - float(smoothing), ignore_index=ignore_index) \
        + float(smoothing) * math.log(logits.shape[-1])
