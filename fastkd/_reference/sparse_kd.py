"""Pure-PyTorch reference of the loss against a sparse (captured) teacher: the test oracle (float64
inputs) and the ``backend="torch"`` implementation. It materialises (N, V) probability and mask
tensors, which the fused kernels never do.

Notation: I the stored ids of a row, w_i the stored teacher probability of id i (top-k:
exp(log-probability over the full vocabulary); sampled: count_i / N), P_I = Σ_I w_i;
q = softmax(z/τ) the student over the full vocabulary, Q_I = Σ_I q_i.
"""
from __future__ import annotations

import torch

from .._settings import acc_dtype
from .kd import hard_ce_rows


def sparse_kd_rows(
    student: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    target: torch.Tensor | None,
    *,
    tail: str,
    temperature: float,
    soft_scale: float,
    hard_weight: float,
    ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    """Per-row sparse KD loss (N,) for a 2-D student (N, V); differentiable w.r.t. the student.

    ``ids`` (N, K): stored ids, −1 for padding; ``weights`` (N, K): w_i (0 for padding).
    ``tail``: "bucket" (KL over the K+1 buckets I ∪ {tail}), "renorm" (teacher w/P_I) or "sampled"
    (w used as is: count/N). Rows whose target is ignored are exactly 0.
    """
    cd = acc_dtype(student.dtype)
    z = student.to(cd)
    n, vocab = z.shape
    valid = ids >= 0
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids)).long()
    w = torch.where(valid, weights.to(cd), torch.zeros((), dtype=cd, device=z.device))

    s = z / temperature
    log_q = torch.log_softmax(s, dim=-1)
    log_q_i = log_q.gather(1, safe_ids)
    p_total = w.sum(-1)
    if tail == "renorm":
        w = w / p_total.unsqueeze(-1)

    def xlogx_minus(a, log_b):  # a·(log a − log b), with 0·log 0 = 0
        return torch.where(a > 0, a * (torch.log(torch.where(a > 0, a, torch.ones_like(a))) - log_b),
                           torch.zeros_like(a))

    soft = xlogx_minus(w, torch.where(valid, log_q_i, torch.zeros_like(log_q_i))).sum(-1)
    if tail == "bucket":
        # counts, not a boolean scatter: padding maps to column 0 and must not overwrite a stored id 0
        in_set = torch.zeros(n, vocab, dtype=torch.long, device=z.device).scatter_add_(1, safe_ids, valid.long()) > 0
        has_tail = (~in_set).any(-1, keepdim=True)
        # log(1 − Q_I) from the complement's own log-sum-exp (never 1 − Q_I by subtraction). Rows with
        # no complement use a harmless finite stand-in so that autograd never sees −inf − −inf.
        s_tail = torch.where(has_tail, s.masked_fill(in_set, float("-inf")), torch.zeros_like(s))
        log_tail_q = torch.logsumexp(s_tail, dim=-1) - torch.logsumexp(s, dim=-1)
        tail_p = (1.0 - p_total).clamp_min(0.0)
        tail_term = xlogx_minus(tail_p, log_tail_q)
        soft = soft + torch.where(has_tail.squeeze(-1), tail_term, torch.zeros_like(tail_term))

    loss = soft_scale * soft
    if target is not None:
        keep = target != ignore_index
        if hard_weight != 0.0:
            safe_t = torch.where(keep, target, torch.zeros_like(target))
            loss = loss + hard_weight * hard_ce_rows(z, safe_t, label_smoothing)
        loss = torch.where(keep, loss, torch.zeros_like(loss))
    return loss


def teacher_dense_probs(ids: torch.Tensor, weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N, V) float64 dense distribution with w at the stored ids (a test helper)."""
    valid = ids >= 0
    out = torch.zeros(ids.shape[0], vocab, dtype=torch.float64, device=ids.device)
    out.scatter_add_(1, torch.where(valid, ids, torch.zeros_like(ids)).long(),
                     torch.where(valid, weights.double(), torch.zeros_like(weights, dtype=torch.float64)))
    return out
