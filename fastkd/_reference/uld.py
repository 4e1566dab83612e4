"""Pure-PyTorch reference of the Universal Logit Distillation loss (Boizard et al. 2024): the test
oracle (float64 inputs) and the ``backend="torch"`` implementation (every device, including GPUs,
where no fused ULD kernel exists). It materialises the ``(N, V)`` probabilities, which the CPU
kernel (``csrc/cpu/uld.cpp``) never does.

Notation, per row: ``p = softmax(student / τ)`` over the whole row; ``A`` the student columns that
take part in the sorted comparison (all, or those with ``cols`` true); ``a`` the ``k`` largest ``p``
over ``A`` in decreasing order, zero-padded to ``k``; ``b`` the teacher's head (``k`` probabilities in
decreasing order, zero-padded); ``T_s = p[A].sum() − a.sum()`` (0 when A has at most k columns or fewer than
k finite logits) and ``T_t`` the teacher's mass beyond its head.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._settings import acc_dtype


def uld_rows(student: torch.Tensor, head: torch.Tensor, tail: torch.Tensor, cols: Optional[torch.Tensor], *,
             temperature: float, scale: float) -> torch.Tensor:
    """Per-row loss ``(N,)``, differentiable w.r.t. the student::

        scale * ((a - b).abs().sum(-1) + (T_s - T_t).abs())

    ``head`` ``(N, k)`` sorted decreasingly; ``tail`` ``(N,)``; ``cols`` ``(V,)`` bool or None (all).
    The last term stands for the ranks beyond k: their exact sum lies in ``[|T_s − T_t|, T_s + T_t]``.
    """
    cd = acc_dtype(student.dtype)
    z = student.to(cd)
    n, vocab = z.shape
    k = head.shape[1]
    p = torch.softmax(z / temperature, dim=-1)
    if cols is None:
        cols = torch.ones(vocab, dtype=torch.bool, device=z.device)
    cols = cols.to(torch.bool)
    pa = torch.where(cols, p, torch.full_like(p, -1.0))  # columns outside A sort after every p >= 0
    width = min(k, int(cols.sum()))
    a = torch.topk(pa, width, dim=-1).values if width else p.new_zeros(n, 0)
    a = a.clamp_min(0.0)  # a −1 stand-in never reaches the head when width <= |A|
    head_part = F.pad(a, (0, k - width))
    mass = torch.where(cols, p, torch.zeros_like(p)).sum(-1)
    # every column of A with mass is in the head: fewer finite logits in A than k, or |A| <= k
    full = ((cols & torch.isfinite(z)).sum(-1) < k) | (int(cols.sum()) <= k)
    s_tail = torch.where(full, torch.zeros_like(mass), (mass - a.sum(-1)).clamp_min(0.0))
    b = head.to(cd)
    return scale * ((head_part - b).abs().sum(-1) + (s_tail - tail.to(cd)).abs())


def uld_dense(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """The closed form on full distributions (a test helper), per row::

        s = student_probs.sort(-1, descending=True).values
        t = teacher_probs.sort(-1, descending=True).values
        w = max(s.shape[-1], t.shape[-1])
        (F.pad(s, (0, w - s.shape[-1])) - F.pad(t, (0, w - t.shape[-1]))).abs().sum(-1)
    """
    s = student_probs.sort(-1, descending=True).values
    t = teacher_probs.sort(-1, descending=True).values
    w = max(s.shape[-1], t.shape[-1])
    return (F.pad(s, (0, w - s.shape[-1])) - F.pad(t, (0, w - t.shape[-1]))).abs().sum(-1)
