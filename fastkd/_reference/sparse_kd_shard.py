"""The vocab-parallel phases of the sparse loss in PyTorch (a vocab-sharded student against a
replicated SparseTeacher): the ``sparse_kd_shard`` implementation of the torch backend.

Per row and slice: the student's normaliser, the normaliser of the complement of the stored ids (the
tail bucket), Σ w·z/τ over the stored ids in the slice and the hard-term statistics
(:func:`sparse_shard_stats`, ``(N, 11)``); after one all-gather, :func:`sparse_merge` combines them
exactly and :func:`sparse_shard_finish` gives the row loss and the slice's gradient.
"""
from __future__ import annotations

import torch

from .._settings import acc_dtype
from .kd_shard import STATS_WIDTH, _local_target, _max_and_exp

# --------------------------------------------------------------------------------------------
# Per-row statistics of the student over a slice, relative to the stored ids I of the row:
SP_M_Z, SP_D_Z, SP_M_C, SP_D_C, SP_N_C, SP_A, SP_M_1, SP_D_1, SP_SUM_Z, SP_Z_Y, SP_NAN = range(11)
SP_RESCALED = ((SP_M_Z, (SP_D_Z,)), (SP_M_C, (SP_D_C,)), (SP_M_1, (SP_D_1,)))
SP_PLAIN = (SP_N_C, SP_A, SP_SUM_Z, SP_Z_Y, SP_NAN)


def sparse_merge_rows(gathered: torch.Tensor, rescaled, plain) -> torch.Tensor:
    out = torch.empty_like(gathered[0])
    for m_col, sum_cols in rescaled:
        m = gathered[..., m_col]
        m_max = m.amax(0)
        factor = torch.where(m == m_max, torch.ones_like(m), torch.exp(m - m_max))
        out[:, m_col] = m_max
        for col in sum_cols:
            out[:, col] = (gathered[..., col] * factor).sum(0)
    for col in plain:
        out[:, col] = gathered[..., col].sum(0)
    return out


def _sparse_local(ids, vocab_start, width):
    """(local column of each stored id, whether it lies in this slice, (N, Vs) membership of I)."""
    local = ids - vocab_start
    inside = (ids >= 0) & (local >= 0) & (local < width)
    safe = torch.where(inside, local, torch.zeros_like(local))
    # scatter_add, not scatter: ids of other slices all land on column 0 with a 0 and must not
    # overwrite a stored id that really is column 0
    hits = torch.zeros(ids.shape[0], width, dtype=torch.int32, device=ids.device)
    hits.scatter_add_(1, safe, inside.to(torch.int32))
    return safe, inside, hits > 0


def sparse_shard_stats(z, ids, w, target, *, vocab_start, temperature, ignore_index):
    acc = acc_dtype(z.dtype)
    zc = z.to(acc)
    s = zc / temperature
    safe, inside, in_set = _sparse_local(ids, vocab_start, z.shape[1])
    out = torch.zeros(z.shape[0], STATS_WIDTH, dtype=acc, device=z.device)
    m_z, e_z = _max_and_exp(s)
    m_c, e_c = _max_and_exp(s.masked_fill(in_set, float("-inf")))
    m_1, e_1 = _max_and_exp(zc)
    out[:, SP_M_Z], out[:, SP_D_Z] = m_z, e_z.sum(-1)
    out[:, SP_M_C], out[:, SP_D_C] = m_c, e_c.sum(-1)
    out[:, SP_N_C] = (~in_set).sum(-1).to(acc)
    s_i = s.gather(1, safe)
    out[:, SP_A] = torch.where(inside, w * s_i, torch.zeros_like(s_i)).sum(-1)   # Σ_{I ∩ slice} w·s
    out[:, SP_M_1], out[:, SP_D_1] = m_1, e_1.sum(-1)
    out[:, SP_SUM_Z] = zc.sum(-1)
    if target is not None:
        local, here, _ = _local_target(target, vocab_start, z.shape[1], ignore_index)
        z_y = zc.gather(1, local.unsqueeze(1)).squeeze(1)
        out[:, SP_Z_Y] = torch.where(here, z_y, torch.zeros_like(z_y))
    out[:, SP_NAN] = torch.isnan(z).any(-1).to(acc)
    return out


def sparse_shard_finish(z, ids, w, target, merged, divisor, *, vocab_start, vocab_size, tail,
                         temperature, soft_scale, hard_weight, ignore_index, label_smoothing):
    acc = acc_dtype(z.dtype)
    zc = z.to(acc)
    tau = temperature
    s = zc / tau
    safe, inside, in_set = _sparse_local(ids, vocab_start, z.shape[1])
    lse_z = merged[:, SP_M_Z] + torch.log(merged[:, SP_D_Z])
    lse_1 = merged[:, SP_M_1] + torch.log(merged[:, SP_D_1])
    p_stored = w.sum(-1)
    a_sum = merged[:, SP_A]
    if tail == "renorm":  # the teacher renormalised over I
        w = w / p_stored.unsqueeze(1)
        a_sum = a_sum / p_stored
    w_total = w.sum(-1)
    w_log_w = torch.where(w > 0, w * torch.log(torch.where(w > 0, w, torch.ones_like(w))),
                          torch.zeros_like(w)).sum(-1)
    d = w_log_w - (a_sum - w_total * lse_z)      # Σ_I w (log w − log q_i)
    q = torch.exp(s - lse_z.unsqueeze(1))
    grad = q.clone()
    grad.scatter_add_(1, safe, -torch.where(inside, w, torch.zeros_like(w)))
    if tail == "bucket":
        tail_p = (1.0 - p_stored).clamp_min(0.0)
        log_tail_q = merged[:, SP_M_C] + torch.log(merged[:, SP_D_C]) - lse_z   # log(1 − Q_I)
        has_tail = merged[:, SP_N_C] > 0
        tail_term = torch.where(tail_p > 0, tail_p * (torch.log(torch.where(tail_p > 0, tail_p,
                                torch.ones_like(tail_p))) - log_tail_q), torch.zeros_like(tail_p))
        d = d + torch.where(has_tail, tail_term, torch.zeros_like(tail_term))
        # outside I: q_j·(1 − (1 − P_I)/(1 − Q_I))
        ratio = torch.where(tail_p > 0, tail_p * torch.exp(-log_tail_q), torch.zeros_like(tail_p))
        grad = torch.where(in_set, grad, q * (1.0 - ratio).unsqueeze(1))
    rows = soft_scale * d
    grad = grad * (soft_scale / tau)
    keep = None
    if target is not None:
        local, here, keep = _local_target(target, vocab_start, z.shape[1], ignore_index)
        if hard_weight != 0.0:
            eps = label_smoothing
            ce = (1.0 - eps) * (lse_1 - merged[:, SP_Z_Y])
            if eps > 0.0:
                ce = ce + eps * (lse_1 - merged[:, SP_SUM_Z] / vocab_size)
            rows = rows + hard_weight * ce
            hard = torch.exp(zc - lse_1.unsqueeze(1)) - eps / vocab_size
            onehot = torch.zeros_like(hard).scatter_(1, local.unsqueeze(1), 1.0 - eps)
            grad = grad + hard_weight * (hard - onehot * here.unsqueeze(1).to(acc))
    rows = torch.where(merged[:, SP_NAN] > 0, torch.full_like(rows, float("nan")), rows)
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        grad = torch.where(keep.unsqueeze(1), grad, torch.zeros_like(grad))
    div = divisor.to(acc)
    return rows / div, (grad / div).to(z.dtype)




def sparse_merge(gathered: torch.Tensor) -> torch.Tensor:
    """Merge ``(W, N, 11)`` per-slice sparse statistics into ``(N, 11)`` full-row statistics."""
    return sparse_merge_rows(gathered, SP_RESCALED, SP_PLAIN)
