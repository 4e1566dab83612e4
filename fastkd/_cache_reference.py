"""Pure-PyTorch reference of the teacher-cache math: ``capture`` and ``sparse_kd_loss``.

Two roles, as ``_reference.py`` for the dense loss: the test oracle (float64 inputs) and the
``backend="torch"`` fallback. It materialises (N, V) probability and mask tensors, which the fused
kernels never do.

Notation (DESIGN §3, "Sparse teacher"): s = t/τ the teacher's scaled logits, p = softmax(s) over the
FULL vocabulary; I the stored ids of a row, w_i the stored teacher probability of id i (top-k:
exp(log-probability); sampled: count_i / N), P_I = Σ_I w_i; q = softmax(z/τ) the student over the full
vocabulary, Q_I = Σ_I q_i.
"""
from __future__ import annotations

import torch

# Kernel-side tail codes (csrc/cpu/cache.cpp uses the same numbers).
TAIL_BUCKET, TAIL_RENORM, TAIL_SAMPLED = 0, 1, 2


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def capture_topk(teacher: torch.Tensor, k: int, temperature: float):
    """(ids (N, k) int64, log-probabilities (N, k), lse (N,)) of a 2-D teacher (N, V).

    Rows are sorted by log-probability, descending, ties by the smaller id (the kernels' order). Which
    of several entries tied at the k-th value gets in is torch.topk's choice.
    """
    cd = _compute_dtype(teacher.dtype)
    s = teacher.to(cd) / temperature
    lse = torch.logsumexp(s, dim=-1)
    vals, ids = torch.topk(s, k, dim=-1)
    # Re-order the k kept entries by (value desc, id asc): sort by id, then stable sort by value.
    ids, order = torch.sort(ids, dim=-1)
    vals = vals.gather(-1, order)
    vals, order = torch.sort(vals, dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    return ids, vals - lse.unsqueeze(-1), lse


def capture_sample(teacher: torch.Tensor, uniforms: torch.Tensor, temperature: float):
    """Inverse-CDF sampling of N = uniforms.shape[1] draws per row from p = softmax(teacher/τ).

    Returns (ids (N_rows, W), counts (N_rows, W) int32, lse (N_rows,)) with W = min(N, V): the unique
    drawn ids in ascending order, their counts, then padding (id −1, count 0). Draw j of a row is the
    smallest id i with cdf_i > u_j · cdf_V (cdf accumulated in vocabulary order, float64).
    """
    n_rows, vocab = teacher.shape
    num = uniforms.shape[1]
    width = min(num, vocab)
    cd = _compute_dtype(teacher.dtype)
    s = teacher.to(cd) / temperature
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s.double() - lse.double().unsqueeze(-1))
    cdf = torch.cumsum(p, dim=-1)
    x = uniforms.double() * cdf[:, -1:]
    draws = torch.searchsorted(cdf, x, right=True).clamp_max(vocab - 1)
    onehot = torch.zeros(n_rows, vocab, dtype=torch.int32, device=teacher.device)
    onehot.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
    # Unique ids in ascending order: sort the "drawn" flags so drawn ids come first, in id order.
    drawn = onehot > 0
    key = torch.where(drawn, torch.arange(vocab, device=teacher.device), vocab + torch.arange(
        vocab, device=teacher.device))
    order = torch.argsort(key, dim=-1)[:, :width]
    counts = onehot.gather(1, order)
    ids = torch.where(counts > 0, order, torch.full_like(order, -1))
    return ids, counts, lse


def sparse_kd_rows(
    student: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    target: torch.Tensor | None,
    *,
    tail: int,
    temperature: float,
    soft_scale: float,
    hard_weight: float,
    ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    """Per-row sparse KD loss (N,) for a 2-D student (N, V); differentiable w.r.t. the student.

    ``ids`` (N, K): stored ids, −1 for padding; ``weights`` (N, K): w_i (0 for padding).
    ``tail``: TAIL_BUCKET (KL over the K+1 buckets I ∪ {tail}), TAIL_RENORM (teacher w/P_I) or
    TAIL_SAMPLED (w used as is: count/N). Rows whose target is ignored are exactly 0.
    """
    from ._reference import hard_ce_rows

    cd = _compute_dtype(student.dtype)
    z = student.to(cd)
    n, vocab = z.shape
    valid = ids >= 0
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids)).long()
    w = torch.where(valid, weights.to(cd), torch.zeros((), dtype=cd, device=z.device))

    s = z / temperature
    log_q = torch.log_softmax(s, dim=-1)
    log_q_i = log_q.gather(1, safe_ids)
    p_total = w.sum(-1)
    if tail == TAIL_RENORM:
        w = w / p_total.unsqueeze(-1)

    def xlogx_minus(a, log_b):  # a·(log a − log b), with 0·log 0 = 0
        return torch.where(a > 0, a * (torch.log(torch.where(a > 0, a, torch.ones_like(a))) - log_b),
                           torch.zeros_like(a))

    soft = xlogx_minus(w, torch.where(valid, log_q_i, torch.zeros_like(log_q_i))).sum(-1)
    if tail == TAIL_BUCKET:
        in_set = torch.zeros(n, vocab, dtype=torch.bool, device=z.device)
        in_set.scatter_(1, safe_ids, valid)
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
