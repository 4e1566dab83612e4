"""Vocab-parallel knowledge distillation over ``torch.distributed`` (tensor-parallel LM heads).

Each rank of ``group`` holds a contiguous slice of the vocabulary columns of both the student and the
teacher logits (the layout of a column-parallel LM head). The loss equals the single-device
:func:`fastkd.kd_loss` on the concatenated rows, yet no rank ever sees a full row:

1. ``stats``: every rank reduces its slice of each row to the partial row statistics of DESIGN §3
   (the ``RowStats`` layout of ``csrc/common/kd_math.h``: 10 values and a NaN flag).
2. ONE collective: an all-gather of that small ``(N, 11)`` tensor (plus one metadata row that lets
   every rank check the shard layout). Each rank merges the gathered statistics locally with the
   exact max-then-rescale rule, so every rank holds the same full-row normalisers and divergences.
3. ``finish``: every rank writes the gradient of its own slice and, from the merged statistics, the
   complete loss of each row. The loss is therefore already identical on every rank: it needs no
   reduction of its own, exactly as Megatron's vocab-parallel cross-entropy.

Backward issues no communication: the gradient slice is computed in forward (as in
``fastkd._ops.kd_fused``) and backward only scales it by the incoming gradient.

JSD is the one exception, and needs a second, smaller collective. Its loss and the ``S = KL(q‖m)``
term of its gradient are sums over the vocabulary of ``q_i·log(q_i/m_i)`` with
``m_i = β p_i + (1−β) q_i``; that summand is a non-linear function of ``lse_t − lse_z``, a
row constant known only after the merge, so no finite set of per-shard statistics gathered *before*
the merge determines it. The loss value and the gradient's S term therefore travel together in one
all-reduce of a ``(N, 2)`` tensor ``[S_q, S_p]`` after the merge: two collectives in forward (an
all-gather of N×11 and an all-reduce of N×2 values), still none in backward.

The per-shard phases run in the fused kernels of ``fastkd._C`` (``kd_shard_cpu`` /
``kd_shard_cuda``) for the cpu and cuda backends, and otherwise as the vectorised PyTorch below
(float32 accumulation, float64 for float64 inputs), so every device and every
``torch.distributed`` backend (gloo, NCCL) works.

The same pattern gives :func:`sparse_kd_loss` (a sharded student against a replicated
``SparseTeacher``: one all-gather of per-row statistics relative to the stored ids) and
:func:`capture` (a sharded teacher: local top-k candidates or per-shard inverse-CDF draws, merged
so that the result equals the single-device ``fastkd.capture``).

Preconditions shared by every function here: the process group is initialised; every rank of
``group`` calls with the same number of rows and the same ``target``; the slices are contiguous,
in rank order, and tile the vocabulary (checked, except the row count: a mismatch there fails
inside the collective).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.distributed as dist

from . import _ops
from .losses import REDUCTIONS, _check_number, _divisor, check_kd_inputs, check_logits

__all__ = ["kd_loss", "sparse_kd_loss", "capture", "shard_stats", "merge_stats", "STATS_WIDTH"]

# Column layout of the per-row statistics, the order of fastkd::RowStats plus the NaN flag.
M_Z, D_Z, M_T, D_T, A_T, A_Z, M_1, D_1, SUM_Z, Z_Y, NAN_FLAG = range(11)
STATS_WIDTH = 11
_PLAIN_SUMS = (SUM_Z, Z_Y, NAN_FLAG)
# The metadata row stores integers in base-2^12 digits so float32 keeps them exact.
_DIGIT = 4096


# --------------------------------------------------------------------------------------------
# Per-shard phases (vectorised PyTorch)
# --------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    acc = _acc_dtype(student.dtype)
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


def _jsd_log_m(log_p, log_q, beta):
    return torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))


def _shard_jsd_sums(z, t, merged, *, temperature, softcap, beta) -> torch.Tensor:
    """This slice's share of ``[S_q, S_p] = [KL(q‖m), KL(p‖m)]`` per row, given merged stats."""
    acc = _acc_dtype(z.dtype)
    sz = _capped(z.to(acc), softcap) / temperature
    st = _capped(t.to(acc), softcap) / temperature
    log_q, log_p = _log_probs(sz, st, merged)
    log_m = _jsd_log_m(log_p, log_q, beta)
    q, p = log_q.exp(), log_p.exp()
    s_q = torch.where(q > 0, q * (log_q - log_m), torch.zeros_like(q)).sum(-1)
    s_p = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p)).sum(-1)
    return torch.stack([s_q, s_p], dim=-1)


def _shard_finish(z, t, target, merged, jsd_sums, divisor, *, vocab_start, vocab_size, temperature,
                  soft_weight, hard_weight, divergence, beta, ignore_index, label_smoothing, t2_scale,
                  softcap, teacher_grad):
    """Row losses (N,) and this slice's gradients, divided by ``divisor`` (DESIGN §3 formulas)."""
    acc = _acc_dtype(z.dtype)
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

    soft_scale = soft_weight * (tau * tau if t2_scale else 1.0)
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
            s_q, s_p = jsd_sums[:, 0], jsd_sums[:, 1]
            d = (beta * s_p + (1.0 - beta) * s_q).clamp_min(0)
            log_m = _jsd_log_m(log_p, log_q, beta)
            grad_z += (g * (1.0 - beta)) * torch.where(q > 0, q * (log_q - log_m - s_q.unsqueeze(1)), zeros)
            if teacher_grad:
                grad_t += (g * beta) * torch.where(p > 0, p * (log_p - log_m - s_p.unsqueeze(1)), zeros)
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


# --------------------------------------------------------------------------------------------
# Shard layout: checked from one metadata row that rides along with the statistics
# --------------------------------------------------------------------------------------------
def _meta_row(vocab_start: int, width: int, vocab_size: int, dtype, device,
              target: Optional[torch.Tensor] = None) -> torch.Tensor:
    row = torch.zeros(1, STATS_WIDTH, dtype=dtype, device=device)
    vals = [vocab_start // _DIGIT, vocab_start % _DIGIT, width // _DIGIT, width % _DIGIT,
            vocab_size // _DIGIT, vocab_size % _DIGIT]
    row[0, : len(vals)] = torch.tensor(vals, dtype=dtype)
    if target is not None and target.numel() > 0:
        # Two small checksums of the target, computed on the device (no sync): every rank of the
        # group must pass the same rows' targets, else each would finish a different loss.
        y = target.reshape(-1)
        weights = torch.arange(1, 2 * y.numel(), 2, device=y.device, dtype=torch.int64)
        row[0, 6] = torch.remainder((y * weights).sum(), 4093).to(dtype)
        row[0, 7] = torch.remainder(y.sum(), _DIGIT).to(dtype)
    return row


def _check_layout(meta: torch.Tensor, target: Optional[torch.Tensor], ignore_index: int) -> None:
    """meta: (W, 11) gathered metadata rows. Shards must tile [0, vocab_size) in rank order."""
    meta = meta.to(torch.float64)
    start = meta[:, 0] * _DIGIT + meta[:, 1]
    width = meta[:, 2] * _DIGIT + meta[:, 3]
    vocab = meta[:, 4] * _DIGIT + meta[:, 5]
    expected_start = torch.cumsum(width, 0) - width
    ok = (start == expected_start).all() & (vocab == width.sum()).all()
    same_target = (meta[:, 6:8] == meta[0:1, 6:8]).all()
    bad_target = None
    if target is not None and target.numel() > 0:
        bad_target = ((target < 0) | (target.to(torch.float64) >= vocab[0])) & (target != ignore_index)
    if meta.device.type == "cpu":
        if not bool(ok):
            raise ValueError(
                "the vocabulary shards must be contiguous slices in rank order covering [0, vocab_size): "
                f"got vocab_start per rank {start.long().tolist()}, widths {width.long().tolist()}, "
                f"vocab_size per rank {vocab.long().tolist()}; pass vocab_start= and vocab_size= "
                "when the shards are not all the same width")
        if not bool(same_target):
            raise ValueError("target must be the same on every rank of the group (the class ids of "
                             "the same rows); the ranks passed different targets")
        if bad_target is not None and bool(bad_target.any()):
            raise ValueError(f"target values must lie in [0, {int(vocab[0])}) (the full vocabulary) or "
                             f"equal ignore_index={ignore_index}; found {int(target[bad_target][0])}")
    else:
        torch._assert_async(ok, "fastkd.distributed: vocabulary shards do not tile [0, vocab_size)")
        torch._assert_async(same_target, "fastkd.distributed: ranks passed different targets")
        if bad_target is not None:
            torch._assert_async(~bad_target.any(), "fastkd.distributed: target out of range")


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastkd.distributed needs an initialised process group: call "
                           "torch.distributed.init_process_group(...) first")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _all_gather(local: torch.Tensor, world: int, group) -> torch.Tensor:
    out = local.new_empty((world * local.shape[0],) + tuple(local.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local.contiguous(), group=group)
    return out.view(world, *local.shape)


# --------------------------------------------------------------------------------------------
# Autograd: gradients in forward, no communication in backward
# --------------------------------------------------------------------------------------------
class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, target, divisor, cfg):
        rows, grad_s, grad_t = _vocab_parallel_forward(student, teacher, target, divisor, cfg)
        ctx.teacher_grad = grad_t is not None
        ctx.save_for_backward(grad_s, grad_t if grad_t is not None else grad_s.new_empty(0))
        return rows

    @staticmethod
    def backward(ctx, g_rows):
        # in place on this op's private buffers (as fastkd._ops): no second N×Vs allocation, and a
        # second backward through the same graph fails on the version counter instead of rescaling
        grad_s, grad_t = ctx.saved_tensors
        d_s = _ops._scale_rows(grad_s, g_rows)
        d_t = _ops._scale_rows(grad_t, g_rows) if ctx.teacher_grad else None
        return d_s, d_t, None, None, None


# --------------------------------------------------------------------------------------------
# Fused shard phases of the compiled extension (fastkd._C.kd_shard_cpu / kd_shard_cuda)
# --------------------------------------------------------------------------------------------
_STATS, _JSD_SUMS, _FINISH = 1, 2, 3


def _fused_shard_available(backend: str) -> bool:
    from . import _ext

    if backend == "cpu":
        return _ext.C is not None and hasattr(_ext.C, "kd_shard_cpu")
    if backend == "cuda":
        return _ext.has_cuda_kernels() and hasattr(_ext.C, "kd_shard_cuda")
    return False


def _kd_params(cfg) -> "_ops.KDParams":
    soft_scale = cfg["soft_weight"] * (cfg["temperature"] ** 2 if cfg["t2_scale"] else 1.0)
    return _ops.KDParams(cfg["temperature"], float(soft_scale), cfg["hard_weight"],
                         _ops.DIVERGENCE_CODES[cfg["divergence"]], cfg["beta"], cfg["ignore_index"],
                         cfg["label_smoothing"], float(cfg["softcap"] or 0.0), cfg["has_target"])


def _run_fused(mode, student, teacher, target, cfg, **bufs) -> None:
    from . import _ext

    p = _kd_params(cfg)
    if cfg["backend"] == "cuda":
        from ._cuda_impls import cuda_kd_shard

        cuda_kd_shard(mode, student, teacher, target, p, col_offset=cfg["vocab_start"],
                      vocab_total=cfg["vocab_size"], **bufs)
        return
    ptr = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
    g_s, g_t = bufs.get("grad_s"), bufs.get("grad_t")
    _ext.C.kd_shard_cpu(
        mode, ptr(student), ptr(teacher), ptr(target), ptr(bufs.get("divisor")), ptr(bufs.get("loss")),
        ptr(g_s), ptr(g_t), ptr(bufs.get("stats_out")), ptr(bufs.get("stats_in")),
        ptr(bufs.get("jsd_out")), ptr(bufs.get("jsd_in")), student.shape[0], student.shape[1],
        student.stride(0), teacher.stride(0), 0 if g_s is None else g_s.stride(0),
        0 if g_t is None else g_t.stride(0), cfg["vocab_start"], cfg["vocab_size"],
        _ext.dtype_code(student.dtype), p.temperature, p.soft_scale, p.hard_weight, p.divergence,
        p.beta, p.ignore_index, p.label_smoothing, p.softcap, torch.get_num_threads())


def _phase_stats(student, teacher, target, cfg, stats_dtype) -> torch.Tensor:
    if not cfg["fused"]:
        return shard_stats(student, teacher, target, vocab_start=cfg["vocab_start"],
                           temperature=cfg["temperature"], softcap=cfg["softcap"],
                           ignore_index=cfg["ignore_index"])
    out = torch.empty(student.shape[0], STATS_WIDTH, dtype=stats_dtype, device=student.device)
    _run_fused(_STATS, student, teacher, target, cfg, stats_out=out)
    return out


def _phase_jsd_sums(student, teacher, target, merged, cfg) -> torch.Tensor:
    if not cfg["fused"]:
        return _shard_jsd_sums(student, teacher, merged, temperature=cfg["temperature"],
                               softcap=cfg["softcap"], beta=cfg["beta"])
    out = torch.empty(student.shape[0], 2, dtype=merged.dtype, device=student.device)
    _run_fused(_JSD_SUMS, student, teacher, target, cfg, stats_in=merged, jsd_out=out)
    return out


def _phase_finish(student, teacher, target, merged, jsd_sums, divisor, cfg):
    if not cfg["fused"]:
        return _shard_finish(
            student, teacher, target, merged, jsd_sums, divisor, vocab_start=cfg["vocab_start"],
            vocab_size=cfg["vocab_size"], temperature=cfg["temperature"],
            soft_weight=cfg["soft_weight"], hard_weight=cfg["hard_weight"],
            divergence=cfg["divergence"], beta=cfg["beta"], ignore_index=cfg["ignore_index"],
            label_smoothing=cfg["label_smoothing"], t2_scale=cfg["t2_scale"],
            softcap=cfg["softcap"], teacher_grad=cfg["teacher_grad"])
    loss = torch.empty(student.shape[0], dtype=merged.dtype, device=student.device)
    grad_s = torch.empty_like(student, memory_format=torch.contiguous_format)
    grad_t = torch.empty_like(teacher, memory_format=torch.contiguous_format) if cfg["teacher_grad"] else None
    _run_fused(_FINISH, student, teacher, target, cfg, divisor=divisor.to(merged.dtype), loss=loss,
               grad_s=grad_s, grad_t=grad_t, stats_in=merged, jsd_in=jsd_sums)
    return loss, grad_s, grad_t


def _vocab_parallel_forward(student, teacher, target, divisor, cfg):
    group, world = cfg["group"], cfg["world"]
    # the fused CUDA kernels keep float32 statistics for every input dtype
    stats_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    stats = _phase_stats(student, teacher, target, cfg, stats_dtype)
    meta = _meta_row(cfg["vocab_start"], student.shape[1], cfg["vocab_size"], stats.dtype, stats.device,
                     target)
    n = stats.shape[0]
    # The one collective every divergence needs: partial stats of all shards, plus the layout row.
    gathered = _all_gather(torch.cat([stats, meta], 0), world, group)
    _check_layout(gathered[:, n], target, cfg["ignore_index"])
    merged = merge_stats(gathered[:, :n])

    jsd_sums = None
    if cfg["divergence"] == "jsd":
        jsd_sums = _phase_jsd_sums(student, teacher, target, merged, cfg)
        # JSD's second collective: the loss value and the gradient's S term, summed over shards.
        dist.all_reduce(jsd_sums, group=group)
    return _phase_finish(student, teacher, target, merged, jsd_sums, divisor, cfg)


def _check_target_shape(target, lead_shape, device) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of global class ids, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"target must be an integer tensor of class ids, got {target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"target must have shape {tuple(lead_shape)} (the logits' leading shape), "
                         f"got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target must be on {device} like the logits, got {target.device}")


def _check_int(name, value, low):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def kd_loss(
    student_shard: torch.Tensor,
    teacher_shard: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    t2_scale: bool = True,
    softcap: Optional[float] = None,
    num_items: Union[int, torch.Tensor, None] = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Vocab-parallel :func:`fastkd.kd_loss`: logits sharded along the vocabulary over ``group``.

    Every rank of ``group`` passes its columns ``vocab_start : vocab_start + Vs`` of the same rows.
    With ``student = torch.cat(all ranks' student_shard, -1)`` (teacher likewise) the result equals,
    on every rank::

        fastkd.kd_loss(student, teacher, target, **kd_kwargs)

    and ``student_shard.grad`` is this rank's slice of ``student.grad`` (same for a teacher that
    requires grad). No rank gathers a full row: forward runs one all-gather of an ``(N, 11)`` float
    tensor of row statistics (JSD adds one all-reduce of ``(N, 2)``); backward communicates nothing.
    The returned loss is already the full loss on every rank (no further reduction over ``group``).

    Args:
        student_shard, teacher_shard: ``(..., Vs)`` slices of the logits; same shape, dtype, device.
            Every rank must pass the same leading shape.
        target: ``(...)`` global class ids in ``[0, vocab_size)`` (the same on every rank), or None.
            The class may lie in any rank's slice.
        group: the tensor-parallel process group (default: the world group).
        vocab_start: first global column of this rank's slice. Default ``rank * Vs`` (equal slices).
        vocab_size: the full vocabulary size. Default ``world_size * Vs``. The layout (contiguous
            slices in rank order covering ``[0, vocab_size)``) is checked from data that rides along
            with the statistics: ``ValueError`` on CPU, a device-side assert on GPU.
        temperature, soft_weight, hard_weight, divergence, beta, ignore_index, label_smoothing,
        reduction, t2_scale, softcap, num_items: as in :func:`fastkd.kd_loss`.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``, resolved against
            the device as in :func:`fastkd.kd_loss`. ``"cpu"`` and ``"cuda"`` run the shard phases
            in the fused kernels of ``fastkd._C``; ``"triton"`` and ``"torch"`` run them as
            vectorised PyTorch on the logits' device.

    Returns:
        float32 loss (float64 for float64 inputs), identical on every rank of ``group``.
    """
    check_kd_inputs(student_shard, teacher_shard, target, temperature=temperature,
                    soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence, beta=beta,
                    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
                    softcap=softcap, student_name="student_shard", teacher_name="teacher_shard",
                    target_what="global class ids")
    _check_int("vocab_start", vocab_start, 0)
    _check_int("vocab_size", vocab_size, 1)

    lead_shape = student_shard.shape[:-1]
    width = student_shard.shape[-1]
    device = student_shard.device
    if target is not None:
        _check_target_shape(target, lead_shape, device)
    resolved = _ops.resolve_backend(backend, device)
    if student_shard.dtype == torch.float64 and resolved in ("cuda", "triton"):
        raise TypeError(f"float64 logits are supported by the cpu and torch backends, not {resolved!r}")

    rank, world = _group_info(group)
    if vocab_start is None:
        vocab_start = rank * width
    if vocab_size is None:
        vocab_size = world * width
    if vocab_start + width > vocab_size:
        raise ValueError(f"vocab_start + Vs must be <= vocab_size: got {vocab_start} + {width} > {vocab_size}")

    if divergence == "jsd" and beta in (0.0, 1.0):  # TRL's special cases, as the single-device loss
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if soft_weight == 0.0:  # no soft term: JSD's second collective would carry zeros
        divergence = "forward_kl"

    s2 = student_shard.reshape(-1, width)
    t2 = teacher_shard.reshape(-1, width)
    fused = _fused_shard_available(resolved)
    if fused:  # the kernels take row strides and a unit column stride
        s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
        t2 = t2 if t2.stride(-1) == 1 else t2.contiguous()
    y = None if target is None else target.reshape(-1).long().contiguous()
    acc = _acc_dtype(s2.dtype)
    divisor = _divisor(y, s2.shape[0], reduction, num_items, ignore_index, device, acc)
    cfg = dict(group=group, world=world, vocab_start=vocab_start, vocab_size=vocab_size,
               temperature=float(temperature), soft_weight=float(soft_weight),
               hard_weight=float(hard_weight), divergence=divergence, beta=float(beta),
               ignore_index=ignore_index, label_smoothing=float(label_smoothing),
               t2_scale=bool(t2_scale), softcap=None if softcap is None else float(softcap),
               teacher_grad=bool(teacher_shard.requires_grad), has_target=target is not None,
               backend=resolved, fused=fused)
    rows = _VocabParallelKD.apply(s2, t2, y, divisor, cfg)
    if reduction == "none":
        return rows.reshape(lead_shape)
    return rows.sum()


# --------------------------------------------------------------------------------------------
# Distributed capture: a tensor-parallel teacher's SparseTeacher, equal to the single-device one
# --------------------------------------------------------------------------------------------
def _pack_f64(*parts: torch.Tensor) -> torch.Tensor:
    # ids < 2^53 and float32/float64 values are exact in float64: one tensor, one collective
    return torch.cat([p.to(torch.float64).reshape(p.shape[0], -1) for p in parts], dim=1).contiguous()


def _merged_lse(lse_parts: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 0 of per-shard log-normalisers (W, N); all −inf stays −inf."""
    return torch.logsumexp(lse_parts, dim=0)


def _layout_digits(vocab_start: int, width: int, vocab_size: int, device) -> torch.Tensor:
    return _meta_row(vocab_start, width, vocab_size, torch.float64, device)[0, :6]


def _gather_with_layout(local: torch.Tensor, digits: torch.Tensor, world: int, group):
    """All-gather ``local`` (N, C) float64 with the 6 layout digits riding along as extra rows.

    Returns the gathered ``(W, N, C)`` rows and the ``(W, 6)`` digits of every rank.
    """
    n, c = local.shape
    extra = -(-6 // c)
    meta = local.new_zeros(extra * c)
    meta[:6] = digits
    gathered = _all_gather(torch.cat([local, meta.view(extra, c)], 0), world, group)
    return gathered[:, :n], gathered[:, n:].reshape(world, -1)[:, :6]


def _capture_topk(t2, k, temperature, vocab_start, vocab_size, world, group, backend):
    from . import _sparse_ops

    n, width = t2.shape
    k_local = min(k, width)
    resolved = _sparse_ops.pick_backend(backend, t2.device, _sparse_ops._CAPTURE_TOPK_IMPLS)
    ids, logp, lse = _sparse_ops.run_capture_topk(t2, k_local, temperature, resolved)
    acc = logp.dtype
    # s = t/τ of the candidates, recomputed exactly as the single-device capture does: equal
    # logits on different shards must stay equal for the tie rule (smaller id first)
    scaled = (t2.gather(1, ids).to(acc) / temperature).to(torch.float64)
    ids = ids + vocab_start
    if k_local < k:  # pad: never preferred over a real id, even a −inf one (pad id sorts last)
        pad = k - k_local
        scaled = torch.cat([scaled, scaled.new_full((n, pad), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((n, pad), vocab_size)], 1)
    # The one collective of top-k capture: each shard's candidates and normaliser.
    gathered, digits = _gather_with_layout(_pack_f64(lse, scaled, ids),
                                           _layout_digits(vocab_start, width, vocab_size, t2.device),
                                           world, group)                   # (W, N, 2k + 1)
    lse_all = _merged_lse(gathered[:, :, 0])                               # (N,)
    cand_val = gathered[:, :, 1:k + 1].permute(1, 0, 2).reshape(n, world * k)
    cand_ids = gathered[:, :, k + 1:].permute(1, 0, 2).reshape(n, world * k)
    # (value desc, id asc): order by id first, then a stable descending sort by value
    by_id = torch.argsort(cand_ids, dim=1, stable=True)
    cand_val, cand_ids = cand_val.gather(1, by_id), cand_ids.gather(1, by_id)
    order = torch.argsort(cand_val, dim=1, descending=True, stable=True)[:, :k]
    top_val, top_ids = cand_val.gather(1, order), cand_ids.gather(1, order)
    values = (top_val - lse_all.unsqueeze(1)).to(acc)
    return top_ids.long(), values, lse_all.to(acc), digits


def _capture_sample(t2, num_samples, temperature, generator, vocab_start, vocab_size, world, group):
    n, width = t2.shape
    acc = _acc_dtype(t2.dtype)
    s = (t2.to(acc) / temperature).to(torch.float64)
    lse_local = torch.logsumexp(s, dim=1)
    uniforms = torch.rand((n, num_samples), generator=generator, dtype=torch.float64, device=t2.device)
    # Round 1: every shard's log-mass, and a checksum of the uniforms so that ranks whose
    # generators are not in step are caught instead of silently drawing different samples.
    gathered, digits = _gather_with_layout(_pack_f64(lse_local, uniforms.sum(1)),
                                           _layout_digits(vocab_start, width, vocab_size, t2.device),
                                           world, group)                   # (W, N, 2)
    lse_all = _merged_lse(gathered[:, :, 0])
    mass = torch.exp(gathered[:, :, 0] - lse_all.unsqueeze(0))             # (W, N) shard masses
    upper = torch.cumsum(mass, dim=0)                                      # C_r
    rank = dist.get_rank(group)
    lower = upper[rank] - mass[rank]                                       # C_{r−1}
    x = uniforms * upper[-1].unsqueeze(1)
    # This shard owns the draws with C_{r−1} <= x < C_r (the last one also x >= C_last): the
    # number it owns is multinomial over the shard masses, and each owned draw is the inverse CDF
    # inside the shard, i.e. the smallest id whose global cumulative probability exceeds x.
    owned = (x >= lower.unsqueeze(1)) & ((x < upper[rank].unsqueeze(1)) | (rank == world - 1))
    cdf = lower.unsqueeze(1) + torch.cumsum(torch.exp(s - lse_all.unsqueeze(1)), dim=1)
    draws = torch.searchsorted(cdf, x.contiguous(), right=True).clamp_max(width - 1)
    counts = torch.zeros(n, width, dtype=torch.int32, device=t2.device)
    counts.scatter_add_(1, draws, owned.to(torch.int32))
    # compact to unique ids ascending, padded with −1 / 0, width num_samples (enough for any shard)
    keep = min(num_samples, width)
    key = torch.where(counts > 0, torch.arange(width, device=t2.device),
                      width + torch.arange(width, device=t2.device))
    order = torch.argsort(key, dim=1)[:, :keep]
    c_loc = counts.gather(1, order)
    i_loc = torch.where(c_loc > 0, order + vocab_start, torch.full_like(order, -1))
    if keep < num_samples:
        i_loc = torch.cat([i_loc, i_loc.new_full((n, num_samples - keep), -1)], 1)
        c_loc = torch.cat([c_loc, c_loc.new_zeros((n, num_samples - keep))], 1)
    # Round 2: the shards' (id, count) lists.
    lists = _all_gather(_pack_f64(i_loc, c_loc), world, group)            # (W, N, 2·num)
    all_ids = lists[:, :, :num_samples].permute(1, 0, 2).reshape(n, -1)
    all_cnt = lists[:, :, num_samples:].permute(1, 0, 2).reshape(n, -1)
    out_w = min(num_samples, vocab_size)
    pos = torch.arange(all_ids.shape[1], device=t2.device, dtype=torch.float64)
    key = torch.where(all_cnt > 0, all_ids, float(vocab_size) + pos)
    order = torch.argsort(key, dim=1)[:, :out_w]
    counts_out = all_cnt.gather(1, order).to(torch.int32)
    ids_out = torch.where(counts_out > 0, all_ids.gather(1, order).long(), torch.full_like(order, -1))
    return ids_out, counts_out, lse_all.to(acc), gathered[:, :, 1], digits


def _check_capture_layout(digits: torch.Tensor) -> None:
    """digits: (W, 6) of (vocab_start, width, vocab_size) per rank, as _meta_row writes them."""
    padded = torch.zeros(digits.shape[0], STATS_WIDTH, dtype=digits.dtype, device=digits.device)
    padded[:, :6] = digits
    _check_layout(padded, None, -100)


def capture(teacher_shard: torch.Tensor, *, group=None, vocab_start: Optional[int] = None,
            vocab_size: Optional[int] = None, k: int = 64, temperature: float = 1.0, mode: str = "topk",
            num_samples: int = 50, generator: Optional[torch.Generator] = None, backend: str = "auto"):
    r"""Vocab-parallel :func:`fastkd.capture`: the teacher's logits are sharded along the vocabulary.

    With ``teacher = torch.cat(all ranks' teacher_shard, -1)`` every rank returns the same
    :class:`fastkd.SparseTeacher` as ``fastkd.capture(teacher, k=k, temperature=temperature,
    mode=mode, num_samples=num_samples, generator=generator)`` (ids and counts exactly, values and
    lse up to float rounding; as there, kept ids are ordered by value, ties by the smaller id, and
    which of several logits tied at the k-th value is kept is the local top-k's choice), without
    gathering a row:

    * ``"topk"``: each shard's own top-k candidates (global ids) and log-normaliser are all-gathered
      once (``N·(2k + 1)`` float64 values per rank) and merged: the global top-k lies among them.
    * ``"sample"``: each shard's log-mass is all-gathered; the draws falling in a shard are those
      whose uniform lands in the shard's interval of the global CDF (so per-shard counts are
      multinomial over the shard masses), and each is the inverse CDF inside the shard. A second
      all-gather exchanges the shards' (id, count) lists (``2·num_samples`` values per row).
      ``generator`` must be in the same state on every rank (seed it identically); this is checked.

    Layout arguments (``group``, ``vocab_start``, ``vocab_size``) are those of :func:`kd_loss`.
    """
    from .cache import MODES, SparseTeacher

    check_logits("teacher_shard", teacher_shard)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_number("temperature", temperature, low=0.0, low_open=True)
    if math.isinf(temperature):
        raise ValueError("temperature must be finite")
    _check_int("vocab_start", vocab_start, 0)
    _check_int("vocab_size", vocab_size, 1)
    rank, world = _group_info(group)
    width = teacher_shard.shape[-1]
    vocab_start = rank * width if vocab_start is None else vocab_start
    vocab_size = world * width if vocab_size is None else vocab_size
    if vocab_start + width > vocab_size:
        raise ValueError(f"vocab_start + Vs must be <= vocab_size: got {vocab_start} + {width} > {vocab_size}")
    if mode == "topk":
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1 or k > vocab_size:
            raise ValueError(f"k must lie in [1, vocab_size={vocab_size}], got {k}")
    else:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    _ops.resolve_backend(backend, teacher_shard.device)  # validates the name against the device

    lead = teacher_shard.shape[:-1]
    t2 = teacher_shard.detach().reshape(-1, width)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    if mode == "topk":
        ids, values, lse, digits = _capture_topk(t2, k, float(temperature), vocab_start, vocab_size,
                                                 world, group, backend)
        _check_capture_layout(digits)
        return SparseTeacher("topk", ids.reshape(*lead, k), lse.reshape(lead), temperature=temperature,
                             vocab_size=vocab_size, values=values.reshape(*lead, k))
    ids, counts, lse, u_sums, digits = _capture_sample(t2, num_samples, float(temperature), generator,
                                                      vocab_start, vocab_size, world, group)
    _check_capture_layout(digits)
    in_step = (u_sums == u_sums[0:1]).all()
    if t2.device.type == "cpu":
        if not bool(in_step):
            raise ValueError("generator: the ranks drew different uniforms; seed the generator "
                             "identically on every rank of the group")
    else:
        torch._assert_async(in_step, "fastkd.distributed.capture: generators differ across ranks")
    width_out = ids.shape[-1]
    return SparseTeacher("sample", ids.reshape(*lead, width_out), lse.reshape(lead),
                         temperature=temperature, vocab_size=vocab_size,
                         counts=counts.reshape(*lead, width_out), num_samples=num_samples)


# --------------------------------------------------------------------------------------------
# Distributed sparse KD: a vocab-sharded student against a (replicated) SparseTeacher
# --------------------------------------------------------------------------------------------
# Per-row statistics of the student over a slice, relative to the stored ids I of the row:
SP_M_Z, SP_D_Z, SP_M_C, SP_D_C, SP_N_C, SP_A, SP_M_1, SP_D_1, SP_SUM_Z, SP_Z_Y, SP_NAN = range(11)
_SP_RESCALED = ((SP_M_Z, (SP_D_Z,)), (SP_M_C, (SP_D_C,)), (SP_M_1, (SP_D_1,)))
_SP_PLAIN = (SP_N_C, SP_A, SP_SUM_Z, SP_Z_Y, SP_NAN)


def _merge(gathered: torch.Tensor, rescaled, plain) -> torch.Tensor:
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


def _sparse_shard_stats(z, ids, w, target, *, vocab_start, temperature, ignore_index):
    acc = _acc_dtype(z.dtype)
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


def _sparse_shard_finish(z, ids, w, target, merged, divisor, *, vocab_start, vocab_size, tail,
                         temperature, soft_scale, hard_weight, ignore_index, label_smoothing):
    acc = _acc_dtype(z.dtype)
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


class _VocabParallelSparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, ids, w, target, divisor, cfg):
        stats = _sparse_shard_stats(student, ids, w, target, vocab_start=cfg["vocab_start"],
                                    temperature=cfg["temperature"], ignore_index=cfg["ignore_index"])
        meta = _meta_row(cfg["vocab_start"], student.shape[1], cfg["vocab_size"], stats.dtype,
                         stats.device, target)
        n = stats.shape[0]
        # the one collective: partial student statistics relative to the stored ids, + layout row
        gathered = _all_gather(torch.cat([stats, meta], 0), cfg["world"], cfg["group"])
        _check_layout(gathered[:, n], target, cfg["ignore_index"])
        merged = _merge(gathered[:, :n], _SP_RESCALED, _SP_PLAIN)
        rows, grad = _sparse_shard_finish(
            student, ids, w, target, merged, divisor, vocab_start=cfg["vocab_start"],
            vocab_size=cfg["vocab_size"], tail=cfg["tail"], temperature=cfg["temperature"],
            soft_scale=cfg["soft_scale"], hard_weight=cfg["hard_weight"],
            ignore_index=cfg["ignore_index"], label_smoothing=cfg["label_smoothing"])
        ctx.save_for_backward(grad)
        return rows

    @staticmethod
    def backward(ctx, g_rows):
        (grad,) = ctx.saved_tensors
        return _ops._scale_rows(grad, g_rows), None, None, None, None, None


def sparse_kd_loss(student_shard: torch.Tensor, sparse_teacher, target: Optional[torch.Tensor] = None, *,
                   group=None, vocab_start: Optional[int] = None, tail: str = "bucket",
                   temperature: Optional[float] = None, soft_weight: float = 1.0, hard_weight: float = 0.0,
                   divergence: str = "forward_kl", ignore_index: int = -100, label_smoothing: float = 0.0,
                   reduction: str = "mean", t2_scale: bool = True,
                   num_items: Union[int, torch.Tensor, None] = None, backend: str = "auto") -> torch.Tensor:
    r"""Vocab-parallel :func:`fastkd.sparse_kd_loss`: the student's logits are sharded along the vocabulary.

    ``sparse_teacher`` (global ids, e.g. from :func:`capture` or a ``TeacherCache``) is the same on
    every rank. With ``student = torch.cat(all ranks' student_shard, -1)`` the result equals, on every
    rank, ``fastkd.sparse_kd_loss(student, sparse_teacher, target, tail=tail, ...)`` and
    ``student_shard.grad`` is this rank's slice of the full gradient. Forward runs one all-gather of
    an ``(N, 11)`` tensor (the student's normaliser, the normaliser of the complement of the stored
    ids for the tail bucket, Σ w·z/τ over the stored ids, and the hard-term statistics); backward
    communicates nothing. The shard phases are vectorised PyTorch for every ``backend`` (which is
    still checked against the device).

    ``vocab_start`` defaults to ``rank * Vs``; the full vocabulary is ``sparse_teacher.vocab_size``.
    Other arguments as in :func:`fastkd.sparse_kd_loss`.
    """
    from .cache import TAILS, SparseTeacher

    check_logits("student_shard", student_shard)
    if not isinstance(sparse_teacher, SparseTeacher):
        raise TypeError(f"sparse_teacher must be a fastkd.SparseTeacher, got {type(sparse_teacher).__name__}")
    st = sparse_teacher
    width = student_shard.shape[-1]
    lead = student_shard.shape[:-1]
    n_rows = math.prod(lead)
    if math.prod(st.shape) != n_rows:
        raise ValueError(f"sparse_teacher must hold one row per student row: student leading shape "
                         f"{tuple(lead)} ({n_rows} rows), sparse_teacher shape {tuple(st.shape)}")
    device = student_shard.device
    if st.device != device:
        raise ValueError(f"sparse_teacher must be on the student's device {device}, got {st.device}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if st.mode == "topk" and tail == "sampled":
        raise ValueError("tail='sampled' needs a sampled teacher (capture(mode='sample'))")
    if divergence != "forward_kl":
        raise ValueError(f"sparse_kd_loss supports divergence='forward_kl' only, got {divergence!r}")
    if temperature is None:
        temperature = st.temperature
    _check_number("temperature", temperature, low=0.0, low_open=True)
    if not math.isclose(temperature, st.temperature, rel_tol=1e-6):
        raise ValueError(f"temperature={temperature} differs from the capture temperature {st.temperature}")
    _check_number("soft_weight", soft_weight)
    _check_number("hard_weight", hard_weight)
    _check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hard_weight != 0.0 and target is None:
        raise ValueError("hard_weight != 0 needs target (global class ids of shape student_shard.shape[:-1])")
    _check_int("vocab_start", vocab_start, 0)
    if target is not None:
        _check_target_shape(target, lead, device)
    _ops.resolve_backend(backend, device)
    rank, world = _group_info(group)
    vocab_start = rank * width if vocab_start is None else vocab_start
    vocab_size = st.vocab_size
    if vocab_start + width > vocab_size:
        raise ValueError(f"vocab_start + Vs must be <= sparse_teacher.vocab_size: got {vocab_start} + {width} "
                         f"> {vocab_size}")

    flat = st.flatten()
    ids = flat.ids.long()
    bad = (ids < -1) | (ids >= vocab_size)
    if device.type == "cpu":
        if ids.numel() and bool(bad.any()):
            raise ValueError(f"sparse_teacher.ids must lie in [0, {vocab_size}) (or -1 for padding)")
    elif ids.numel():
        torch._assert_async(~bad.any(), "fastkd: sparse_teacher id out of range [0, V)")
    acc = _acc_dtype(student_shard.dtype)
    w = torch.where(ids >= 0, flat.teacher_probs(acc), torch.zeros((), dtype=acc, device=device))
    s2 = student_shard.reshape(-1, width)
    y = None if target is None else target.reshape(-1).long()
    divisor = _divisor(y, s2.shape[0], reduction, num_items, ignore_index, device, acc)
    eff_tail = "sampled" if st.mode == "sample" else tail
    cfg = dict(group=group, world=world, vocab_start=vocab_start, vocab_size=vocab_size, tail=eff_tail,
               temperature=float(temperature),
               soft_scale=float(soft_weight * (temperature ** 2 if t2_scale else 1.0)),
               hard_weight=float(hard_weight), ignore_index=ignore_index,
               label_smoothing=float(label_smoothing))
    rows = _VocabParallelSparseKD.apply(s2, ids, w, y, divisor, cfg)
    if reduction == "none":
        return rows.reshape(lead)
    return rows.sum()
