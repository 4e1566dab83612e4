r"""DistilBERT's cosine embedding loss on hidden states (Sanh et al. 2019, "DistilBERT, a distilled
version of BERT").

Besides the soft-target loss (:func:`fastkd.kd_loss`) and the language-modelling loss, DistilBERT
aligns the directions of the student's and the teacher's hidden states::

    L_cos = mean over kept positions of  1 − cos(h_s, h_t)

which is ``nn.CosineEmbeddingLoss`` with every target equal to +1. A learned linear map (e.g.
:class:`fastkd.methods.HintRegressor` with ``kind="linear"``) aligns different hidden sizes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_tensor

__all__ = ["cosine_embedding_loss"]


def cosine_embedding_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, *,
                          mask: Optional[torch.Tensor] = None, regressor: Optional[nn.Module] = None,
                          eps: float = 1e-8) -> torch.Tensor:
    r"""Mean of ``1 − cos`` between student and teacher hidden states over the kept positions.

    Equals, with ``h = regressor(student_hidden)`` (or ``student_hidden``) of shape ``(..., D)``::

        c = 1 - F.cosine_similarity(h, teacher_hidden.detach(), dim=-1, eps=eps)   # shape (...)
        c[mask].mean()           # mask: bool (...), True = keep (e.g. the attention mask); all if None

    and 0 when the mask keeps nothing. The teacher's states are detached.
    """
    check_tensor("student_hidden", student_hidden)
    check_tensor("teacher_hidden", teacher_hidden)
    h = regressor(student_hidden) if regressor is not None else student_hidden
    if h.shape != teacher_hidden.shape:
        raise ValueError(f"teacher_hidden has shape {tuple(teacher_hidden.shape)} but the "
                         f"{'regressed ' if regressor is not None else ''}student states have shape {tuple(h.shape)}")
    c = 1.0 - F.cosine_similarity(h, teacher_hidden.detach().to(h.dtype), dim=-1, eps=eps)
    if mask is None:
        return c.mean()
    if not isinstance(mask, torch.Tensor) or mask.shape != c.shape:
        raise ValueError(f"mask must be a tensor of shape {tuple(c.shape)} (the hidden states' leading shape), "
                         f"got {tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    keep = mask.to(dtype=c.dtype)
    # No boolean indexing and no count check on the host: a masked sum over a clamped count.
    return (c * keep).sum() / keep.sum().clamp_min(1.0)
