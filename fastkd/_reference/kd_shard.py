"""The vocab-parallel phases of the dense loss in PyTorch: the shard contract's reference, and the
``kd_shard`` implementation of the torch backend (every device, every ``torch.distributed`` backend).

A rank reduces its vocabulary slice of each row to partial statistics (:func:`shard_stats`: the
``RowStats`` layout of ``csrc/common/kd_math.h`` plus a NaN flag), the gathered statistics of all
slices merge exactly (:func:`merge_stats`: maxima, then rescale and shift the max-relative sums), and
each rank finishes its own slice from the merged statistics (:func:`shard_finish`: the row loss and
the slice's gradients). JSD, TVD and skew KL need one more reduction between the two, their two
sums (:func:`shard_div_sums`, the table of ``csrc/common/kd_math.h``), because their summands depend
on the final normalisers.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._settings import acc_dtype
from .kd import log_mixture

M_Z, D_Z, M_T, D_T, A_T, A_Z, M_1, D_1, SUM_Z, Z_Y, NAN_FLAG = range(11)
STATS_WIDTH = 11
_PLAIN_SUMS = (SUM_Z, Z_Y, NAN_FLAG)
# The metadata row stores integers in base-2^12 digits so float32 keeps them exact.

def _capped(x: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return x if not softcap else softcap * torch.tanh(x / softcap)


def _local_target(target: Optional[torch.Tensor], vocab_start: int, width: int, ignore_index: int):
    """(column index inside this shard, row owns its target here, row is counted)."""
    if target is None:
        return None, None, None
    keep = target != ignore_index
    local = target - vocab_start
    here = keep & (local >= 0) & (local < width)
    return local.clamp(0, max(width - 1, 0)), here, keep


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def _max_and_exp(x: torch.Tensor):
    """Row maximum and exp(x − max), with an all −inf row giving max −inf and zero exponentials."""
    m = x.amax(dim=-1)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return m, torch.exp(x - m_safe.unsqueeze(-1))


def shard_stats(student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor], *,
                vocab_start: int, temperature: float = 1.0, softcap: Optional[float] = None,
                ignore_index: int = -100) -> torch.Tensor:
    """Partial statistics of each row over one vocabulary slice: ``(N, 11)``.

    ``student``/``teacher`` are ``(N, Vs)`` columns ``vocab_start .. vocab_start + Vs`` of the full
    logits; ``target`` holds global class ids. Columns follow ``fastkd::RowStats`` (m_z, d_z, m_t,
    d_t, a_t, a_z, m_1, d_1, sum_z, z_y) and a NaN flag; :func:`merge_stats` combines slices exactly.
    """
    acc = acc_dtype(student.dtype)
    z = _capped(student.to(acc), softcap)
    t = _capped(teacher.to(acc), softcap)
    sz, st = z / temperature, t / temperature
    out = torch.zeros(z.shape[0], STATS_WIDTH, dtype=acc, device=z.device)
    m_z, e_z = _max_and_exp(sz)
    m_t, e_t = _max_and_exp(st)
    m_1, e_1 = _max_and_exp(z)
    out[:, M_Z], out[:, D_Z] = m_z, e_z.sum(-1)
    out[:, M_T], out[:, D_T] = m_t, e_t.sum(-1)
    # The log-ratio sums use max-shifted logits, (s_t − m_t) − (s_z − m_z), as the kernels do:
    # small numbers even for very peaked rows. 0·log 0 = 0: entries with no mass are skipped.
    rz = sz - _finite_or_zero(m_z).unsqueeze(1)
    rt = st - _finite_or_zero(m_t).unsqueeze(1)
    out[:, A_T] = torch.where(e_t > 0, e_t * (rt - rz), torch.zeros_like(st)).sum(-1)
    out[:, A_Z] = torch.where(e_z > 0, e_z * (rz - rt), torch.zeros_like(sz)).sum(-1)
    out[:, M_1], out[:, D_1] = m_1, e_1.sum(-1)
    out[:, SUM_Z] = z.sum(-1)
    if target is not None and z.shape[1] > 0:
        local, here, _ = _local_target(target, vocab_start, z.shape[1], ignore_index)
        z_y = z.gather(1, local.unsqueeze(1)).squeeze(1)
        out[:, Z_Y] = torch.where(here, z_y, torch.zeros_like(z_y))
    out[:, NAN_FLAG] = (torch.isnan(student) | torch.isnan(teacher)).any(-1).to(acc)
    return out


def _rescale(m: torch.Tensor, m_max: torch.Tensor) -> torch.Tensor:
    """exp(m − m_max), with exp(−inf − −inf) := 1 (both sums still empty)."""
    return torch.where(m == m_max, torch.ones_like(m), torch.exp(m - m_max))


def merge_stats(gathered: torch.Tensor) -> torch.Tensor:
    """Merge ``(W, N, 11)`` per-shard statistics into ``(N, 11)`` full-row statistics.

    The rule of ``fastkd::merge_stats`` (``shift_kl_sums``): take the maxima; the sums d rescale by
    exp(m_shard − m_max); the log-ratio sums a are relative to the shard's maxima, so they rescale
    and shift by the change of maxima, a_t ← f_t·(a_t − d_t·(Δm_t − Δm_z)) (a_z symmetrically).
    A side with no mass (d = 0) stays empty. The plain sums add.
    """
    m_z, d_z, m_t, d_t = (gathered[..., c] for c in (M_Z, D_Z, M_T, D_T))
    a_t, a_z = gathered[..., A_T], gathered[..., A_Z]
    mz_max, mt_max = m_z.amax(0), m_t.amax(0)
    both = (d_z > 0) & (d_t > 0)
    zero = torch.zeros_like(m_z)
    dmz = torch.where(both, mz_max - m_z, zero)
    dmt = torch.where(both, mt_max - m_t, zero)
    fz = torch.where(d_z > 0, _rescale(m_z, mz_max), zero)
    ft = torch.where(d_t > 0, _rescale(m_t, mt_max), zero)
    out = torch.empty_like(gathered[0])
    out[:, M_Z], out[:, M_T] = mz_max, mt_max
    out[:, D_Z] = (d_z * fz).sum(0)
    out[:, D_T] = (d_t * ft).sum(0)
    out[:, A_T] = (ft * (a_t - d_t * (dmt - dmz))).sum(0)
    out[:, A_Z] = (fz * (a_z - d_z * (dmz - dmt))).sum(0)
    m_1 = gathered[..., M_1]
    m1_max = m_1.amax(0)
    out[:, M_1] = m1_max
    out[:, D_1] = (gathered[..., D_1] * _rescale(m_1, m1_max)).sum(0)
    for col in _PLAIN_SUMS:
        out[:, col] = gathered[..., col].sum(0)
    return out


def _normalisers(stats: torch.Tensor):
    """(m_z, log d_z, m_t, log d_t, m_1, log d_1) of merged stats. Log-probabilities are formed as
    (s − m) − log d, in that order, as the kernels do: subtracting a rounded lse from s would cost
    ulp(|s|) of absolute accuracy in every probability."""
    return (stats[:, M_Z], torch.log(stats[:, D_Z]), stats[:, M_T], torch.log(stats[:, D_T]),
            stats[:, M_1], torch.log(stats[:, D_1]))


def _log_probs(sz, st, stats):
    m_z, log_dz, m_t, log_dt, _, _ = _normalisers(stats)
    log_q = (sz - m_z.unsqueeze(1)) - log_dz.unsqueeze(1)
    log_p = (st - m_t.unsqueeze(1)) - log_dt.unsqueeze(1)
    return log_q, log_p


def _mixture(divergence, log_p, log_q, p, q, weight):
    """(log m, m, the side weight multiplies, its log, the other side) of a divergence with a sums pass."""
    if divergence == "skew_reverse_kl":
        a, la, b, lb = q, log_q, p, log_p
    else:
        a, la, b, lb = p, log_p, q, log_q
    log_m = log_mixture(la, lb, weight)
    return log_m, weight * a + (1.0 - weight) * b, a, la, b


def shard_div_sums(z, t, merged, *, temperature, softcap, divergence, weight) -> torch.Tensor:
    """This slice's share of the divergence's two sums ``[s0, s1]`` per row, given merged stats
    (JSD: [KL(q‖m), KL(p‖m)]; TVD: [Σ|p − q|, Σ q·sgn(p − q)]; skew KL: [KL(a‖m), Σ a·b/m])."""
    acc = acc_dtype(z.dtype)
    sz = _capped(z.to(acc), softcap) / temperature
    st = _capped(t.to(acc), softcap) / temperature
    log_q, log_p = _log_probs(sz, st, merged)
    q, p = log_q.exp(), log_p.exp()
    zeros = torch.zeros_like(q)
    if divergence == "tvd":
        s0 = (p - q).abs().sum(-1)
        s1 = (q * torch.sign(p - q)).sum(-1)
    elif divergence == "jsd":
        log_m = log_mixture(log_p, log_q, weight)
        s0 = torch.where(q > 0, q * (log_q - log_m), zeros).sum(-1)
        s1 = torch.where(p > 0, p * (log_p - log_m), zeros).sum(-1)
    else:
        log_m, m, a, la, b = _mixture(divergence, log_p, log_q, p, q, weight)
        s0 = torch.where(a > 0, a * (la - log_m), zeros).sum(-1)
        s1 = torch.where(m > 0, a * b / torch.where(m > 0, m, torch.ones_like(m)), zeros).sum(-1)
    return torch.stack([s0, s1], dim=-1)


def shard_finish(z, t, target, merged, div_sums, divisor, *, vocab_start, vocab_size, temperature,
                 soft_scale, hard_weight, divergence, weight, ignore_index, label_smoothing, softcap,
                 teacher_grad):
    """Row losses (N,) and this slice's gradients, divided by ``divisor`` (the kernels' formulas)."""
    acc = acc_dtype(z.dtype)
    zc = _capped(z.to(acc), softcap)
    tc = _capped(t.to(acc), softcap)
    tau = temperature
    _, log_dz, _, log_dt, m_1, log_d1 = _normalisers(merged)
    log_q, log_p = _log_probs(zc / tau, tc / tau, merged)
    q, p = log_q.exp(), log_p.exp()
    zeros = torch.zeros_like(q)
    rows = torch.zeros(z.shape[0], dtype=acc, device=z.device)
    grad_z = torch.zeros_like(zc)
    grad_t = torch.zeros_like(tc) if teacher_grad else None

    if soft_scale != 0.0:
        g = soft_scale / tau  # every divergence gradient carries 1/τ
        if divergence == "forward_kl":
            d = (merged[:, A_T] / merged[:, D_T] - log_dt + log_dz).clamp_min(0)
            grad_z += g * (q - p)
            if teacher_grad:
                grad_t += g * torch.where(p > 0, p * (log_p - log_q - d.unsqueeze(1)), zeros)
        elif divergence == "reverse_kl":
            d = (merged[:, A_Z] / merged[:, D_Z] - log_dz + log_dt).clamp_min(0)
            grad_z += g * torch.where(q > 0, q * (log_q - log_p - d.unsqueeze(1)), zeros)
            if teacher_grad:
                grad_t += g * (p - q)
        else:
            s0, s1 = div_sums[:, 0:1], div_sums[:, 1:2]
            w = weight
            if divergence == "jsd":
                d = (w * s1 + (1.0 - w) * s0).clamp_min(0)
                log_m = log_mixture(log_p, log_q, w)
                grad_z += (g * (1.0 - w)) * torch.where(q > 0, q * (log_q - log_m - s0), zeros)
                if teacher_grad:
                    grad_t += (g * w) * torch.where(p > 0, p * (log_p - log_m - s1), zeros)
            elif divergence == "tvd":
                d = (0.5 * s0).clamp_min(0)
                sg = torch.sign(p - q)
                grad_z += (-0.5 * g) * q * (sg - s1)
                if teacher_grad:
                    grad_t += (0.5 * g) * p * (sg - (s0 + s1))
            else:  # skew KL: a the side the weight multiplies in m, b the other one
                d = s0.clamp_min(0)
                log_m, m, a, la, b = _mixture(divergence, log_p, log_q, p, q, w)
                r = torch.where(m > 0, a / torch.where(m > 0, m, torch.ones_like(m)), zeros)
                ga = g * torch.where(a > 0, a * ((la - log_m) + (1.0 - (1.0 - w) * s1 - s0) - w * r), zeros)
                gb = (g * (1.0 - w)) * b * (s1 - r)
                own_q = divergence == "skew_reverse_kl"
                grad_z += ga if own_q else gb
                if teacher_grad:
                    grad_t += gb if own_q else ga
            d = d.squeeze(1)
        rows = rows + soft_scale * d

    keep = None
    if target is not None:
        local, here, keep = _local_target(target, vocab_start, z.shape[1], ignore_index)
        if hard_weight != 0.0:
            eps = label_smoothing
            ce = (1.0 - eps) * ((m_1 - merged[:, Z_Y]) + log_d1)
            if eps > 0.0:
                ce = ce + eps * ((m_1 - merged[:, SUM_Z] / vocab_size) + log_d1)
            rows = rows + hard_weight * ce
            hard = torch.exp((zc - m_1.unsqueeze(1)) - log_d1.unsqueeze(1)) - eps / vocab_size
            if z.shape[1] > 0:
                onehot = torch.zeros_like(hard).scatter_(1, local.unsqueeze(1), 1.0 - eps)
                hard = hard - onehot * here.unsqueeze(1).to(acc)
            grad_z += hard_weight * hard

    if softcap:
        grad_z *= 1.0 - (zc / softcap) ** 2
        if teacher_grad:
            grad_t *= 1.0 - (tc / softcap) ** 2
    rows = torch.where(merged[:, NAN_FLAG] > 0, torch.full_like(rows, float("nan")), rows)
    if keep is not None:
        # where(), not a product: an ignored row is exactly 0 even if its terms are inf or NaN
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        grad_z = torch.where(keep.unsqueeze(1), grad_z, torch.zeros_like(grad_z))
        if teacher_grad:
            grad_t = torch.where(keep.unsqueeze(1), grad_t, torch.zeros_like(grad_t))
    div = divisor.to(acc)
    rows = rows / div
    grad_z = (grad_z / div).to(z.dtype)
    if teacher_grad:
        grad_t = (grad_t / div).to(t.dtype)
    return rows, grad_z, grad_t


