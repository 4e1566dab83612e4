"""Vocab-parallel knowledge distillation over ``torch.distributed`` (tensor-parallel LM heads).

Each rank of ``group`` holds a contiguous slice of the vocabulary columns of both the student and the
teacher logits (the layout of a column-parallel LM head). The loss equals the single-device
:func:`fastkd.kd_loss` on the concatenated rows, yet no rank ever sees a full row:

1. ``stats``: every rank reduces its slice of each row to partial row statistics (the ``RowStats``
   layout of ``csrc/common/kd_math.h``: 10 values and a NaN flag).
2. ONE collective: an all-gather of that small ``(N, 11)`` tensor (plus one metadata row that lets
   every rank check the shard layout). Each rank merges the gathered statistics locally with the
   exact max-then-rescale rule, so every rank holds the same full-row normalisers and divergences.
3. ``finish``: every rank writes the gradient of its own slice and, from the merged statistics, the
   complete loss of each row. The loss is therefore already identical on every rank: it needs no
   reduction of its own, exactly as Megatron's vocab-parallel cross-entropy.

Backward issues no communication: the gradient slice is computed in forward (as by the op
``fastkd::kd``) and backward only scales it by the incoming gradient.

Forward KL and reverse KL need that one collective. JSD, total variation and skew KL need a
second, smaller one. Their loss and the row constants of their gradients are sums over the
vocabulary of terms such as ``q_i·log(q_i/m_i)`` with ``m_i = β p_i + (1−β) q_i`` (JSD, skew KL) or
``|p_i − q_i|`` (TVD); each summand is a non-linear function of ``lse_t − lse_z``, a row constant
known only after the merge, so no finite set of per-shard statistics gathered *before* the merge
determines it. The loss value and the gradient's constants therefore travel together in one
all-reduce of a ``(N, 2)`` tensor after the merge (the sums of the table in
``csrc/common/kd_math.h``): two collectives in forward (an all-gather of N×11 and an all-reduce of
N×2 values), still none in backward.

The per-shard phases are the ``kd_shard`` op family of the backend registry: the fused kernels of
``fastkd._C`` for the cpu and cuda backends, the vectorised PyTorch of
``fastkd/_reference/kd_shard.py`` otherwise (float32 accumulation, float64 for float64 inputs), so
every device and every ``torch.distributed`` backend (gloo, NCCL) works. This module holds the
collectives, the layout checks and the autograd around them.

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

from typing import Optional, Union

import torch
import torch.distributed as dist

from . import _inputs
from ._backends import registry
from ._ops import capture as _capture_ops
from ._ops.kd import scale_rows
from ._reference.kd_shard import STATS_WIDTH, merge_stats, shard_stats
from ._settings import (SUMS_DIVERGENCES, acc_dtype, capture_settings, check, check_hard_target, check_int, check_k,
                        kd_settings)
from .cache.teacher import SparseTeacher, check_generator, draw_uniforms
from .losses import check_sparse_teacher, sparse_settings

__all__ = ["kd_loss", "sparse_kd_loss", "capture", "shard_stats", "merge_stats", "STATS_WIDTH"]

# The metadata row stores integers in base-2^12 digits so float32 keeps them exact.
_DIGIT = 4096


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
# The vocab-parallel dense loss: gradients in forward, no communication in backward
# --------------------------------------------------------------------------------------------
class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, target, divisor, cfg):
        rows, grad_s, grad_t = _vocab_parallel_forward(student, teacher, target, divisor, cfg)
        ctx.teacher_grad = grad_t is not None
        ctx.backend = cfg["backend"]
        ctx.save_for_backward(grad_s, grad_t if grad_t is not None else grad_s.new_empty(0))
        return rows

    @staticmethod
    def backward(ctx, g_rows):
        grad_s, grad_t = ctx.saved_tensors
        d_s = scale_rows(grad_s, g_rows, ctx.backend)
        d_t = scale_rows(grad_t, g_rows, ctx.backend) if ctx.teacher_grad else None
        return d_s, d_t, None, None, None


def _vocab_parallel_forward(student, teacher, target, divisor, cfg):
    group, world = cfg["group"], cfg["world"]
    phases = registry.implementation("kd_shard", cfg["backend"]).fn
    p = cfg["params"]
    layout = dict(col_offset=cfg["vocab_start"], vocab_total=cfg["vocab_size"])
    # the fused CUDA kernels keep float32 statistics for every input dtype
    stats = phases.stats(student, teacher, target, p, stats_dtype=acc_dtype(student.dtype), **layout)
    meta = _meta_row(cfg["vocab_start"], student.shape[1], cfg["vocab_size"], stats.dtype, stats.device,
                     target)
    n = stats.shape[0]
    # The one collective every divergence needs: partial stats of all shards, plus the layout row.
    gathered = _all_gather(torch.cat([stats, meta], 0), world, group)
    _check_layout(gathered[:, n], target, p.ignore_index)
    merged = merge_stats(gathered[:, :n])

    div_sums = None
    if cfg["sums"]:
        div_sums = phases.div_sums(student, teacher, target, merged, p, **layout)
        # The second collective of JSD, TVD and skew KL: their two sums (the loss value and the
        # gradient's row constants), summed over shards.
        dist.all_reduce(div_sums, group=group)
    return phases.finish(student, teacher, target, merged, div_sums, divisor, p,
                         teacher_grad=cfg["teacher_grad"], **layout)


def _layout_args(vocab_start, vocab_size, width, group):
    """(rank, world, vocab_start, vocab_size, kept) with the defaults of equal slices in rank order.

    ``kept``: how many of this rank's ``width`` columns lie below ``vocab_size``. The shards of a
    padded head tile more than the vocabulary; the columns at and past ``vocab_size`` are padding,
    which each rank drops (``shard[..., :kept]``), so they never get probability and get exactly
    zero gradient."""
    check_int("vocab_start", vocab_start, low=0, allow_none=True)
    check("vocab_size", vocab_size)
    rank, world = _group_info(group)
    vocab_start = rank * width if vocab_start is None else vocab_start
    vocab_size = world * width if vocab_size is None else vocab_size
    kept = min(width, vocab_size - vocab_start)
    if kept < 1:
        raise ValueError(f"this rank's columns [{vocab_start}, {vocab_start + width}) lie wholly past "
                         f"vocab_size={vocab_size}: every rank must hold at least one column of the vocabulary")
    return rank, world, vocab_start, vocab_size, kept


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
    skew: float = 0.1,
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
    tensor of row statistics (JSD, TVD and skew KL add one all-reduce of ``(N, 2)``); backward
    communicates nothing.
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
            with the statistics: ``ValueError`` on CPU, a device-side assert on GPU. A padded head's
            shards may reach past it: the columns at and past ``vocab_size`` are padding (each rank
            drops its share of them; they never get probability and get exactly zero gradient), as
            ``vocab_size=`` of :func:`fastkd.kd_loss`.
        temperature, soft_weight, hard_weight, divergence, beta, skew, ignore_index, label_smoothing,
        reduction, t2_scale, softcap, num_items: as in :func:`fastkd.kd_loss`.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``, resolved against
            the device as in :func:`fastkd.kd_loss`. ``"cpu"`` and ``"cuda"`` run the shard phases
            in the fused kernels of ``fastkd._C``; ``"triton"`` and ``"torch"`` run them as
            vectorised PyTorch on the logits' device.

    Returns:
        float32 loss (float64 for float64 inputs), identical on every rank of ``group``.
    """
    settings = kd_settings(temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
                           divergence=divergence, beta=beta, skew=skew, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction, t2_scale=t2_scale,
                           softcap=softcap, backend=backend)
    _inputs.check_pair(student_shard, teacher_shard, student_name="student_shard", teacher_name="teacher_shard")
    check_hard_target(settings, target, what="global class ids of shape student_shard.shape[:-1]")
    lead_shape = student_shard.shape[:-1]
    device = student_shard.device
    if target is not None:
        _inputs.check_target_layout(target, lead_shape, device, what="global class ids")
    resolved = registry.resolve("kd_shard", settings.backend, device)
    registry.check_dtype("kd_shard", resolved, student_shard.dtype)
    _, world, vocab_start, vocab_size, width = _layout_args(vocab_start, vocab_size, student_shard.shape[-1], group)
    student_shard = _inputs.narrow_vocab("student_shard", student_shard, width)
    teacher_shard = _inputs.narrow_vocab("teacher_shard", teacher_shard, width)
    if soft_weight == 0.0:  # no soft term: the second collective of the sums divergences would carry zeros
        settings = settings.replace(divergence="forward_kl")

    # the kernels take row strides and a unit column stride
    s2 = _inputs.rows(student_shard, width)
    t2 = _inputs.rows(teacher_shard, width)
    y = None if target is None else target.reshape(-1).long().contiguous()
    divisor = _inputs.divisor(y, s2.shape[0], reduction, num_items, ignore_index, device, acc_dtype(s2.dtype))
    cfg = dict(group=group, world=world, vocab_start=vocab_start, vocab_size=vocab_size, backend=resolved,
               params=settings.kernel_params(), sums=settings.kernel_divergence in SUMS_DIVERGENCES,
               teacher_grad=bool(teacher_shard.requires_grad))
    rows = _VocabParallelKD.apply(s2, t2, y, divisor, cfg)
    return _inputs.reduce_rows(rows, reduction, lead_shape)


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
    n, width = t2.shape
    k_local = min(k, width)
    ids, logp, lse = _capture_ops.capture_topk(t2, k=k_local, temperature=temperature, backend=backend)
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


def _capture_sample(t2, num_samples, sampling, temperature, generator, vocab_start, vocab_size, world, group):
    n, width = t2.shape
    acc = acc_dtype(t2.dtype)
    s = (t2.to(acc) / temperature).to(torch.float64)
    lse_local = torch.logsumexp(s, dim=1)
    uniforms = draw_uniforms(n, num_samples, sampling, generator, t2.device)
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
            num_samples: int = 50, generator: Optional[torch.Generator] = None, sampling: str = "systematic",
            backend: str = "auto"):
    r"""Vocab-parallel :func:`fastkd.capture`: the teacher's logits are sharded along the vocabulary.

    With ``teacher = torch.cat(all ranks' teacher_shard, -1)`` every rank returns the same
    :class:`fastkd.SparseTeacher` as ``fastkd.capture(teacher, k=k, temperature=temperature,
    mode=mode, num_samples=num_samples, generator=generator, sampling=sampling)`` (ids and counts
    exactly, values and
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
      ``sampling`` ("iid" or "systematic") draws the uniforms as :func:`fastkd.capture` does.

    Layout arguments (``group``, ``vocab_start``, ``vocab_size``) are those of :func:`kd_loss`.
    """
    cs = capture_settings(mode=mode, k=k, num_samples=num_samples, sampling=sampling, temperature=temperature,
                          backend=backend)
    _inputs.check_logits("teacher_shard", teacher_shard)
    _, world, vocab_start, vocab_size, width = _layout_args(vocab_start, vocab_size, teacher_shard.shape[-1], group)
    teacher_shard = _inputs.narrow_vocab("teacher_shard", teacher_shard, width)
    if cs.mode == "topk":
        check_k(k, vocab_size)
    else:
        check_generator(generator, teacher_shard.device)
    op = "capture_topk" if cs.mode == "topk" else "capture_sample"
    resolved = registry.resolve(op, cs.backend, teacher_shard.device)
    registry.check_dtype(op, resolved, teacher_shard.dtype)

    lead = teacher_shard.shape[:-1]
    t2 = _inputs.rows(teacher_shard.detach(), width)
    temperature = cs.temperature
    if cs.mode == "topk":
        ids, values, lse, digits = _capture_topk(t2, k, temperature, vocab_start, vocab_size, world, group,
                                                 resolved)
        _check_capture_layout(digits)
        return SparseTeacher("topk", ids.reshape(*lead, k), lse.reshape(lead), temperature=temperature,
                             vocab_size=vocab_size, values=values.reshape(*lead, k), validate=False)
    ids, counts, lse, u_sums, digits = _capture_sample(t2, num_samples, cs.sampling, temperature, generator,
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
                         counts=counts.reshape(*lead, width_out), num_samples=num_samples, validate=False)


# --------------------------------------------------------------------------------------------
# Distributed sparse KD: a vocab-sharded student against a (replicated) SparseTeacher
# --------------------------------------------------------------------------------------------
class _VocabParallelSparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, ids, w, target, divisor, cfg):
        phases = registry.implementation("sparse_kd_shard", "torch").fn
        stats = phases.stats(student, ids, w, target, vocab_start=cfg["vocab_start"],
                             temperature=cfg["temperature"], ignore_index=cfg["ignore_index"])
        meta = _meta_row(cfg["vocab_start"], student.shape[1], cfg["vocab_size"], stats.dtype,
                         stats.device, target)
        n = stats.shape[0]
        # the one collective: partial student statistics relative to the stored ids, + layout row
        gathered = _all_gather(torch.cat([stats, meta], 0), cfg["world"], cfg["group"])
        _check_layout(gathered[:, n], target, cfg["ignore_index"])
        merged = phases.merge(gathered[:, :n])
        rows, grad = phases.finish(
            student, ids, w, target, merged, divisor, vocab_start=cfg["vocab_start"],
            vocab_size=cfg["vocab_size"], tail=cfg["tail"], temperature=cfg["temperature"],
            soft_scale=cfg["soft_scale"], hard_weight=cfg["hard_weight"],
            ignore_index=cfg["ignore_index"], label_smoothing=cfg["label_smoothing"])
        ctx.save_for_backward(grad)
        return rows

    @staticmethod
    def backward(ctx, g_rows):
        (grad,) = ctx.saved_tensors
        return scale_rows(grad, g_rows, "torch"), None, None, None, None, None


def sparse_kd_loss(student_shard: torch.Tensor, sparse_teacher, target: Optional[torch.Tensor] = None, *,
                   group=None, vocab_start: Optional[int] = None, tail: str = "bucket",
                   temperature: Optional[float] = None, soft_weight: float = 1.0, hard_weight: float = 0.0,
                   divergence: str = "forward_kl", ignore_index: int = -100, label_smoothing: float = 0.0,
                   reduction: str = "mean", t2_scale: bool = True,
                   num_items: Union[int, torch.Tensor, None] = None, backend: str = "auto",
                   vocab_size: Optional[int] = None) -> torch.Tensor:
    r"""Vocab-parallel :func:`fastkd.sparse_kd_loss`: the student's logits are sharded along the vocabulary.

    ``sparse_teacher`` (global ids, e.g. from :func:`capture` or a ``TeacherCache``) is the same on
    every rank. With ``student = torch.cat(all ranks' student_shard, -1)`` the result equals, on every
    rank, ``fastkd.sparse_kd_loss(student, sparse_teacher, target, tail=tail, ...)`` and
    ``student_shard.grad`` is this rank's slice of the full gradient. Forward runs one all-gather of
    an ``(N, 11)`` tensor (the student's normaliser, the normaliser of the complement of the stored
    ids for the tail bucket, Σ w·z/τ over the stored ids, and the hard-term statistics); backward
    communicates nothing. The shard phases are vectorised PyTorch for every ``backend`` (which is
    still checked against the device).

    ``vocab_start`` defaults to ``rank * Vs``; the full vocabulary is ``sparse_teacher.vocab_size``
    (``vocab_size``, if given, must equal it). A padded student head's shards may reach past it: the
    columns there are padding, dropped as in :func:`kd_loss`. Other arguments as in
    :func:`fastkd.sparse_kd_loss`.
    """
    settings = kd_settings(allow_default_temperature=True, tail=tail, temperature=temperature,
                           soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence,
                           ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
                           t2_scale=t2_scale, backend=backend)
    check("vocab_size", vocab_size)
    _inputs.check_logits("student_shard", student_shard)
    lead = student_shard.shape[:-1]
    device = student_shard.device
    st = check_sparse_teacher(sparse_teacher, lead, device, settings)
    if vocab_size is not None and vocab_size != st.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} must equal sparse_teacher.vocab_size={st.vocab_size}")
    settings = sparse_settings(settings, st)
    check_hard_target(settings, target, what="global class ids of shape student_shard.shape[:-1]")
    if target is not None:
        _inputs.check_target_layout(target, lead, device, what="global class ids")
    # The shard phases are the torch backend's for every backend; the name is still checked.
    registry.resolve("kd", settings.backend, device)
    _, world, vocab_start, vocab_size, width = _layout_args(vocab_start, st.vocab_size, student_shard.shape[-1], group)
    student_shard = _inputs.narrow_vocab("student_shard", student_shard, width)

    flat = st.flatten()
    ids = flat.ids.long()
    _inputs.check_sparse_ids(ids, vocab_size)
    acc = acc_dtype(student_shard.dtype)
    w = torch.where(ids >= 0, flat.teacher_probs(acc), torch.zeros((), dtype=acc, device=device))
    s2 = _inputs.rows(student_shard, width)
    y = _inputs.flat_target(target)
    divisor = _inputs.divisor(y, s2.shape[0], reduction, num_items, ignore_index, device, acc)
    cfg = dict(group=group, world=world, vocab_start=vocab_start, vocab_size=vocab_size, tail=settings.tail,
               temperature=float(settings.temperature), soft_scale=settings.soft_scale,
               hard_weight=float(hard_weight), ignore_index=ignore_index, label_smoothing=float(label_smoothing))
    rows = _VocabParallelSparseKD.apply(s2, ids, w, y, divisor, cfg)
    return _inputs.reduce_rows(rows, reduction, lead)
