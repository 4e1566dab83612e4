"""Pure-PyTorch reference of teacher capture (top-k and sampled): the test oracle (float64 inputs)
and the ``backend="torch"`` implementation. It materialises the (N, V) probabilities and their
cumulative sums, which the fused kernels never do.

Notation: s = t/τ the teacher's scaled logits, p = softmax(s) over the FULL vocabulary.
"""
from __future__ import annotations

import torch

from .._settings import acc_dtype


def capture_topk(teacher: torch.Tensor, k: int, temperature: float):
    """(ids (N, k) int64, log-probabilities (N, k), lse (N,)) of a 2-D teacher (N, V).

    Rows are sorted by log-probability, descending, ties by the smaller id (the kernels' order). Which
    of several entries tied at the k-th value gets in is torch.topk's choice.
    """
    cd = acc_dtype(teacher.dtype)
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
    cd = acc_dtype(teacher.dtype)
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


def teacher_dense_probs(ids: torch.Tensor, weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N, V) float64 dense distribution with w at the stored ids (a test helper)."""
    valid = ids >= 0
    out = torch.zeros(ids.shape[0], vocab, dtype=torch.float64, device=ids.device)
    out.scatter_add_(1, torch.where(valid, ids, torch.zeros_like(ids)).long(),
                     torch.where(valid, weights.double(), torch.zeros_like(weights, dtype=torch.float64)))
    return out
