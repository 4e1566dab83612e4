"""fastkd.distributed: vocab-parallel KD over gloo on CPU, against the single-device loss.

Each world size is spawned ONCE (module-scoped fixture): the worker processes run every case in
sequence and write one JSON report per rank; the tests below only read those reports. This file is
also the worker script (``python tests/test_distributed.py --worker ...``), so no pickling of test
functions across processes is needed. Oracle: ``fastkd.kd_loss(..., backend="torch")`` on the full
float64 logits; the sharded loss runs in float32 and must match within 1e-5 relative.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER_TIMEOUT_S = 240
RTOL = 1e-5


# =============================================================================================
# Worker side
# =============================================================================================
def _bounds(vocab, world, rank, widths=None):
    if widths is None:
        base, extra = divmod(vocab, world)
        widths = [base + (1 if r < extra else 0) for r in range(world)]
    start = sum(widths[:rank])
    return start, start + widths[rank]


def _make_inputs(seed, n, vocab, *, scale=3.0, ignore_frac=0.2, mask_cols=False, with_target=True,
                 mask_shard=None, world=1, force_targets=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    y = None
    if with_target:
        y = torch.randint(0, vocab, (n,), generator=g)
        if force_targets:  # targets at every shard's first and last column
            edges = []
            for r in range(world):
                a, b = _bounds(vocab, world, r)
                edges += [a, b - 1]
            for i, e in enumerate(edges[: n // 2]):
                y[i] = e
        ignored = torch.rand(n, generator=g) < ignore_frac
        y[ignored] = -100
    if mask_cols:  # a few −inf columns, the same in student and teacher, never a target
        cols = torch.randperm(vocab, generator=g)[: max(1, vocab // 7)]
        if y is not None:
            cols = cols[~torch.isin(cols, y)]
        s[:, cols] = float("-inf")
        t[:, cols] = float("-inf")
    if mask_shard is not None:  # whole shard masked on some rows: an empty slice in the merge
        a, b = _bounds(vocab, world, mask_shard)
        rows = torch.arange(0, n, 3)
        if y is not None:
            rows = rows[(y[rows] < a) | (y[rows] >= b)]
        s[rows, a:b] = float("-inf")
        t[rows, a:b] = float("-inf")
    return s, t, y


def _grad_output(reduction, n, seed):
    g = torch.Generator().manual_seed(seed + 1)
    if reduction == "none":
        return torch.rand(n, generator=g, dtype=torch.float64) + 0.25
    return torch.tensor(0.7, dtype=torch.float64)


def _rel_err(a, b, scale=None):
    """max |a − b| over the finite entries of b, relative to ``scale`` (default max |b|)."""
    a, b = a.detach().double(), b.detach().double()
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf")
    if not finite.any():
        return 0.0
    if scale is None:
        scale = b[finite].abs().max()
    return float((a[finite] - b[finite]).abs().max() / max(float(scale), 1e-30))


def _grad_scale(g):
    g = g.detach()
    return g[torch.isfinite(g)].abs().max() if torch.isfinite(g).any() else 1.0


def _loss_and_grads(s, t, y, dtype, teacher_grad, gout, fn, **kw):
    s = s.detach().to(dtype).clone().requires_grad_()
    t = t.detach().to(dtype).clone().requires_grad_(teacher_grad)
    loss = fn(s, t, y, **kw)
    (loss * gout.to(loss.dtype)).sum().backward()
    return loss.detach(), s.grad, t.grad


def _oracle(s, t, y, *, reduction="mean", num_items=None, ignore_index=-100, **kw):
    """The float64 reference rows of ``fastkd/_reference/kd.py``, reduced here (not by kd_loss)."""
    from fastkd._reference.kd import kd_loss_rows

    rows = kd_loss_rows(s, t, y, ignore_index=ignore_index, **kw)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if num_items is not None:
        return rows.sum() / float(num_items)
    count = rows.shape[0] if y is None else int((y != ignore_index).sum())
    return rows.sum() / max(count, 1)


def _run_case(rank, world, group, cfg):
    """Sharded loss and gradient slices vs the float64 oracle and the single-device loss.

    Errors are relative to the scale of the whole quantity (the loss, or the full row-block
    gradient). The bar is ``tol`` (1e-5 for float32), or 2x the single-device loss's own error in
    the same dtype where that is larger (bf16/fp16 always; float32 only where the problem itself
    is ill-conditioned, e.g. the teacher gradient of forward KL on very peaked rows).
    """
    import fastkd
    import fastkd.distributed as fkd

    n, vocab = cfg["n"], cfg["vocab"]
    kw = dict(cfg.get("kw", {}))
    backend = kw.pop("backend", "auto")
    reduction = kw.get("reduction", "mean")
    dtype = cfg.get("dtype", torch.float32)
    teacher_grad = cfg.get("teacher_grad", False)
    tol = cfg.get("tol", RTOL)
    s, t, y = _make_inputs(cfg["seed"], n, vocab, world=world, **cfg.get("inputs", {}))
    if y is not None and "ignore_index" in kw:  # the ignored rows carry this run's ignore_index
        y = torch.where(y == -100, torch.full_like(y, kw["ignore_index"]), y)
    gout = _grad_output(reduction, n, cfg["seed"])

    # oracle: the float64 reference rows, reduced here. Columns that are −inf in both logits get
    # −1e4 instead: the same value in float64 (exp underflows to exactly 0) without autograd's
    # 0·(−inf − −inf) = NaN.
    s_fin = torch.where(torch.isneginf(s), torch.full_like(s, -1e4), s)
    t_fin = torch.where(torch.isneginf(t), torch.full_like(t, -1e4), t)
    ref = _loss_and_grads(s_fin, t_fin, y, torch.float64, teacher_grad, gout, _oracle, **kw)
    # the single-device loss in the same dtype (whatever backend "auto" picks on this machine)
    one = _loss_and_grads(s_fin, t_fin, y, dtype, teacher_grad, gout, fastkd.kd_loss, **kw)

    # sharded: the real −inf columns go in
    a, b = _bounds(vocab, world, rank, cfg.get("widths"))
    extra = dict(vocab_start=a, vocab_size=vocab) if cfg.get("explicit_layout", False) else {}
    mine = _loss_and_grads(s[:, a:b], t[:, a:b], y, dtype, teacher_grad, gout, fkd.kd_loss,
                           group=group, backend=backend, **extra, **kw)

    names = ["loss", "grad_student"] + (["grad_teacher"] if teacher_grad else [])
    bad = {}
    for i, name in enumerate(names):
        scale = None if i == 0 else _grad_scale(ref[i])
        sl = (lambda x: x) if i == 0 else (lambda x: x[:, a:b])
        err = _rel_err(mine[i], sl(ref[i]), scale)
        own = _rel_err(one[i], ref[i], scale)
        if not err <= max(tol, 2 * own):
            bad[name] = dict(err=err, single_device_err=own)
        if dtype == torch.float32 and i < 2:  # and close to the single-device float32 result
            err_one = _rel_err(mine[i], sl(one[i]), None if i == 0 else _grad_scale(one[i]))
            if not err_one <= RTOL:
                bad["vs_single_" + name] = err_one
    expected_loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if mine[0].dtype != expected_loss_dtype:
        bad["loss_dtype"] = str(mine[0].dtype)
    if mine[1].dtype != dtype:
        bad["grad_dtype"] = str(mine[1].dtype)
    if bad:
        raise AssertionError(f"errors above tolerance: {bad}")


def _kd_cases(world):
    """The comparison grid for one world size (different, overlapping settings per size)."""
    cases = {}
    v_even = 64 * world
    common = dict(n=23)
    cases["fkl_hard_tau2_mean"] = dict(common, seed=1, vocab=v_even, kw=dict(
        temperature=2.0, hard_weight=0.5, soft_weight=0.8))
    cases["rkl_softcap_smoothing_sum"] = dict(common, seed=2, vocab=v_even, kw=dict(
        divergence="reverse_kl", softcap=4.0, label_smoothing=0.1, hard_weight=1.0, reduction="sum"))
    cases["jsd_teacher_grad_none"] = dict(common, seed=3, vocab=v_even, teacher_grad=True, kw=dict(
        divergence="jsd", beta=0.3, temperature=1.5, hard_weight=0.25, reduction="none"))
    cases["fkl_teacher_grad_peaked"] = dict(common, seed=4, vocab=v_even, teacher_grad=True,
                                            inputs=dict(scale=60.0), kw=dict(reduction="none"))
    cases["rkl_teacher_grad_masked"] = dict(common, seed=5, vocab=v_even, teacher_grad=True,
                                            inputs=dict(mask_cols=True, mask_shard=world - 1),
                                            kw=dict(divergence="reverse_kl", hard_weight=0.3))
    cases["jsd_masked_empty_shard"] = dict(common, seed=6, vocab=v_even,
                                           inputs=dict(mask_cols=True, mask_shard=0),
                                           kw=dict(divergence="jsd", beta=0.7, softcap=10.0,
                                                   label_smoothing=0.05, hard_weight=0.5))
    cases["jsd_beta0_is_fkl"] = dict(common, seed=7, vocab=v_even, kw=dict(divergence="jsd", beta=0.0))
    cases["jsd_beta1_is_rkl"] = dict(common, seed=8, vocab=v_even, kw=dict(divergence="jsd", beta=1.0))
    cases["tvd_teacher_grad_masked"] = dict(common, seed=31, vocab=v_even, teacher_grad=True,
                                            inputs=dict(mask_cols=True, mask_shard=world - 1),
                                            kw=dict(divergence="tvd", temperature=1.5, hard_weight=0.25))
    cases["skew_fkl_softcap_none"] = dict(common, seed=32, vocab=v_even, teacher_grad=True, kw=dict(
        divergence="skew_forward_kl", skew=0.2, softcap=6.0, hard_weight=0.5, reduction="none"))
    # (skew KL's gradients subtract O(1) row constants: with peaked rows (logit scale 10-30) float32
    # leaves up to ~0.4 % of the largest student gradient between the sharded and single-device
    # summation orders, so this case keeps the default scale)
    cases["skew_rkl_sum"] = dict(common, seed=33, vocab=v_even, teacher_grad=True,
                                 kw=dict(divergence="skew_reverse_kl", reduction="sum"))
    cases["skew0_is_fkl"] = dict(common, seed=34, vocab=v_even, kw=dict(divergence="skew_forward_kl", skew=0.0))
    cases["no_target_t2off"] = dict(common, seed=9, vocab=v_even, inputs=dict(with_target=False),
                                    kw=dict(t2_scale=False, temperature=3.0))
    cases["num_items"] = dict(common, seed=10, vocab=v_even, kw=dict(hard_weight=1.0, num_items=57))
    cases["all_ignored_mean"] = dict(common, seed=11, vocab=v_even, inputs=dict(ignore_frac=1.1),
                                     kw=dict(hard_weight=1.0))
    cases["float64_tight"] = dict(common, seed=12, vocab=v_even, dtype=torch.float64, tol=1e-10,
                                  teacher_grad=True, kw=dict(divergence="jsd", hard_weight=0.5,
                                                              label_smoothing=0.2, reduction="none"))
    cases["bfloat16"] = dict(common, seed=13, vocab=v_even, dtype=torch.bfloat16,
                             kw=dict(temperature=2.0, hard_weight=0.5))
    cases["float16_jsd"] = dict(common, seed=16, vocab=v_even, dtype=torch.float16, teacher_grad=True,
                                kw=dict(divergence="jsd", beta=0.6, hard_weight=0.5, reduction="none"))
    for ignore_index in (-1, 7):  # rows ignored under an ignore_index other than -100
        for reduction, num_items in (("mean", None), ("mean", 19), ("sum", None), ("none", None)):
            tag = f"ignore{ignore_index}_{reduction}" + ("_num_items" if num_items else "")
            cases[tag] = dict(common, seed=20 + ignore_index, vocab=v_even, kw=dict(
                hard_weight=0.5, divergence="jsd" if ignore_index == 7 else "forward_kl", ignore_index=ignore_index,
                reduction=reduction, **({"num_items": num_items} if num_items else {})))
    uneven = 1271 if world == 2 else 507
    cases["uneven_explicit_layout"] = dict(n=41 if world == 2 else 25, seed=14, vocab=uneven,
                                           explicit_layout=True,
                                           kw=dict(divergence="jsd", hard_weight=0.5,
                                                   label_smoothing=0.1, temperature=0.7))
    return cases


def _all_kd_cases(world):
    """Every grid case with the fused shard kernels (backend "auto": the C++ ones on CPU when the
    extension is built) and again with the vectorised PyTorch shard phases (backend "torch")."""
    out = {}
    for name, cfg in _kd_cases(world).items():
        for backend in ("auto", "torch"):
            out[f"{name}[{backend}]"] = dict(cfg, kw=dict(cfg.get("kw", {}), backend=backend))
    return out


def _case_multidim(rank, world, group):
    """(B, T, Vs) logits and (B, T) targets flatten like the single-device loss."""
    import fastkd
    import fastkd.distributed as fkd

    vocab = 48 * world
    s, t, y = _make_inputs(99, 12, vocab, world=world)
    s3, t3, y3 = s.view(3, 4, vocab), t.view(3, 4, vocab), y.view(3, 4)
    a, b = _bounds(vocab, world, rank)
    s_sh = s3[..., a:b].float().requires_grad_()
    loss = fkd.kd_loss(s_sh, t3[..., a:b].float(), y3, group=group, hard_weight=0.5, reduction="none")
    ref = fastkd.kd_loss(s3.clone().requires_grad_(), t3, y3, hard_weight=0.5, reduction="none",
                         backend="torch")
    assert loss.shape == (3, 4), loss.shape
    assert _rel_err(loss, ref) <= RTOL


def _count_collectives(fn):
    """Run fn() with every public torch.distributed collective wrapped by a counter."""
    import torch.distributed as dist

    names = ["all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_coalesced",
             "all_gather_object", "all_reduce", "all_reduce_coalesced", "broadcast",
             "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
             "reduce_scatter_single", "all_to_all", "all_to_all_single", "gather", "scatter",
             "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv", "_all_gather_base"]
    calls = []
    saved = {}
    for name in names:
        orig = getattr(dist, name, None)
        if orig is None:
            continue
        saved[name] = orig

        def wrapper(*args, __name=name, __orig=orig, **kwargs):
            calls.append(__name)
            return __orig(*args, **kwargs)

        setattr(dist, name, wrapper)
    try:
        fn()
    finally:
        for name, orig in saved.items():
            setattr(dist, name, orig)
    return calls


def _case_collective_count(rank, world, group):
    """One collective in forward (two for JSD), none in backward; checked at the Python API and,
    independently, with the process group's own sequence number."""
    import torch.distributed as dist

    import fastkd.distributed as fkd

    pg = group if group is not None else dist.group.WORLD
    seq = getattr(pg, "_get_sequence_number_for_group", None)
    vocab = 32 * world
    s, t, y = _make_inputs(5, 9, vocab, world=world)
    a, b = _bounds(vocab, world, rank)
    for divergence, expected in (("forward_kl", 1), ("reverse_kl", 1), ("jsd", 2), ("tvd", 2),
                                 ("skew_forward_kl", 2), ("skew_reverse_kl", 2)):
        s_sh = s[:, a:b].float().requires_grad_()
        t_sh = t[:, a:b].float().requires_grad_()  # teacher grad too: still nothing in backward
        out = {}

        def fwd():
            out["loss"] = fkd.kd_loss(s_sh, t_sh, y, group=group, hard_weight=0.5, divergence=divergence)

        seq0 = seq() if seq else None
        fwd_calls = _count_collectives(fwd)
        seq1 = seq() if seq else None
        bwd_calls = _count_collectives(lambda: out["loss"].backward())
        seq2 = seq() if seq else None
        assert len(fwd_calls) == expected, (divergence, fwd_calls)
        assert bwd_calls == [], (divergence, bwd_calls)
        if seq is not None:
            assert seq1 - seq0 == expected and seq2 == seq1, (divergence, seq0, seq1, seq2)
        assert s_sh.grad is not None and t_sh.grad is not None
    # the sparse loss: one in forward, none in backward; capture: one (top-k) or two (sampling)
    import fastkd

    st = fastkd.capture(t.float(), k=5, backend="torch")
    s_sh = s[:, a:b].float().requires_grad_()
    out = {}
    fwd_calls = _count_collectives(lambda: out.setdefault("loss", fkd.sparse_kd_loss(
        s_sh, st, y, group=group, hard_weight=0.5)))
    bwd_calls = _count_collectives(lambda: out["loss"].backward())
    assert len(fwd_calls) == 1 and bwd_calls == [], (fwd_calls, bwd_calls)
    assert len(_count_collectives(lambda: fkd.capture(t[:, a:b].float(), group=group, k=5))) == 1
    gen = torch.Generator().manual_seed(0)
    assert len(_count_collectives(lambda: fkd.capture(t[:, a:b].float(), group=group, mode="sample",
                                                      generator=gen))) == 2


def _case_nan_propagates(rank, world, group):
    import fastkd.distributed as fkd

    vocab = 16 * world
    s, t, y = _make_inputs(21, 6, vocab, world=world, ignore_frac=0.0)
    s[2, vocab - 1] = float("nan")  # in the last rank's slice only
    y[4] = -100
    s[4, 0] = float("nan")          # an ignored row: contributes exactly 0
    a, b = _bounds(vocab, world, rank)
    rows = fkd.kd_loss(s[:, a:b].float(), t[:, a:b].float(), y, group=group, reduction="none",
                       hard_weight=0.5)
    assert torch.isnan(rows[2]), rows
    assert rows[4] == 0, rows
    assert torch.isfinite(rows[[0, 1, 3, 5]]).all(), rows


def _case_padded_vocab(rank, world, group):
    """A padded head: equal shards of width 8 tile 8·world columns, the vocabulary is 8·world − 5.
    With vocab_size= the loss, the capture and the sparse loss equal the single-device ones on the
    first vocab_size columns; the padded columns (large logits) get exactly zero gradient."""
    import fastkd
    import fastkd.distributed as fkd

    width, vocab = 8, 8 * world - 5
    g = torch.Generator().manual_seed(3)
    s_full = torch.randn(6, 8 * world, generator=g) * 2
    t_full = torch.randn(6, 8 * world, generator=g) * 2
    s_full[:, vocab:] = 30.0
    t_full[:, vocab:] = 30.0
    y = torch.tensor([0, 3, vocab - 1, -100, 5, 2])
    a = rank * width
    mine_s = s_full[:, a:a + width].clone().requires_grad_()
    mine = fkd.kd_loss(mine_s, t_full[:, a:a + width], y, group=group, vocab_size=vocab, temperature=2.0,
                       hard_weight=0.5)
    mine.backward()
    ref_s = s_full[:, :vocab].clone().requires_grad_()
    ref = fastkd.kd_loss(ref_s, t_full[:, :vocab], y, temperature=2.0, hard_weight=0.5)
    ref.backward()
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    kept = max(0, min(width, vocab - a))
    torch.testing.assert_close(mine_s.grad[:, :kept], ref_s.grad[:, a:a + kept], rtol=1e-5, atol=1e-7)
    assert (mine_s.grad[:, kept:] == 0).all()
    st = fkd.capture(t_full[:, a:a + width], group=group, vocab_size=vocab, k=5)
    st_ref = fastkd.capture(t_full[:, :vocab], k=5)
    assert st.vocab_size == vocab and torch.equal(st.ids, st_ref.ids)
    sp_s = s_full[:, a:a + width].clone().requires_grad_()
    sp = fkd.sparse_kd_loss(sp_s, st_ref, y, group=group, vocab_size=vocab)
    sp.backward()
    torch.testing.assert_close(sp, fastkd.sparse_kd_loss(s_full[:, :vocab], st_ref, y), rtol=1e-5, atol=1e-6)
    assert (sp_s.grad[:, kept:] == 0).all()


def _case_bad_layout(rank, world, group):
    """Unequal widths without vocab_start: every rank raises the same ValueError (no hang)."""
    import fastkd.distributed as fkd

    width = 10 + rank  # unequal slices, default layout assumes equal ones
    s = torch.randn(4, width)
    try:
        fkd.kd_loss(s, torch.randn(4, width), group=group)
    except ValueError as exc:
        assert "vocab_start" in str(exc), exc
    else:
        raise AssertionError("an inconsistent shard layout was accepted")
    # a target beyond the full vocabulary
    y = torch.tensor([0, 1, 2, 8 * world])
    try:
        fkd.kd_loss(torch.randn(4, 8), torch.randn(4, 8), y, group=group)
    except ValueError as exc:
        assert "target" in str(exc), exc
    else:
        raise AssertionError("an out-of-range target was accepted")
    # ranks disagreeing on the target
    y = torch.tensor([0, 1, 2, rank])
    try:
        fkd.kd_loss(torch.randn(4, 8), torch.randn(4, 8), y, group=group, hard_weight=1.0)
    except ValueError as exc:
        assert "same on every rank" in str(exc), exc
    else:
        raise AssertionError("different targets per rank were accepted")


def _case_ddp_single_device_loss(rank, world, group):
    """Plain data parallelism: DDP over fastkd.kd_loss equals one full-batch step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastkd

    torch.manual_seed(0)
    hidden, vocab, per_rank = 8, 37, 5
    student = torch.nn.Linear(hidden, vocab)
    teacher = torch.nn.Linear(hidden, vocab).requires_grad_(False)
    reference = torch.nn.Linear(hidden, vocab)
    reference.load_state_dict(student.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * per_rank, hidden, generator=g)
    y = torch.randint(0, vocab, (world * per_rank,), generator=g)
    kw = dict(temperature=2.0, hard_weight=0.5, divergence="jsd", beta=0.4)

    ddp = DDP(student, process_group=group)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    loss = fastkd.kd_loss(ddp(x[mine]), teacher(x[mine]), y[mine], **kw)
    loss.backward()
    opt.step()

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    fastkd.kd_loss(reference(x), teacher(x), y, backend="torch", **kw).backward()
    ref_opt.step()
    for p, q in zip(student.parameters(), reference.parameters()):
        assert _rel_err(p.detach(), q.detach()) <= RTOL, _rel_err(p.detach(), q.detach())
    # every replica holds the same weights after the step
    w = student.weight.detach().clone()
    dist.broadcast(w, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    assert torch.equal(w, student.weight.detach())


def _case_ddp_tensor_parallel(rank, world, group):
    """2-D parallelism on 4 ranks: DP=2 × TP=2. The LM head is vocab-parallel inside each TP pair,
    DDP averages over the DP pairs; one SGD step equals the single-device full-batch step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastkd
    import fastkd.distributed as fkd

    assert world == 4
    tp, dp = 2, 2
    tp_rank, dp_rank = rank % tp, rank // tp
    # every rank must create every group, in the same order
    tp_groups = [dist.new_group([d * tp + r for r in range(tp)]) for d in range(dp)]
    dp_groups = [dist.new_group([d * tp + r for d in range(dp)]) for r in range(tp)]
    tp_group, dp_group = tp_groups[dp_rank], dp_groups[tp_rank]

    hidden, vocab, per_rank = 8, 2 * 23, 6
    g = torch.Generator().manual_seed(3)
    w_s = torch.randn(vocab, hidden, generator=g) * 0.5
    w_t = torch.randn(vocab, hidden, generator=g) * 0.5
    x = torch.randn(dp * per_rank, hidden, generator=g)
    y = torch.randint(0, vocab, (dp * per_rank,), generator=g)
    y[::5] = -100
    kw = dict(temperature=1.5, hard_weight=0.5, label_smoothing=0.1)

    a, b = _bounds(vocab, tp, tp_rank)
    head = torch.nn.Linear(hidden, b - a, bias=False)
    with torch.no_grad():
        head.weight.copy_(w_s[a:b])
    ddp = DDP(head, process_group=dp_group)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.3)
    mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    xm, ym = x[mine], y[mine]
    # a "mean" over the whole global batch: each DP rank divides by the global count and DDP's
    # averaging is undone by the world factor, so uneven ignore patterns stay exact
    n_global = int((y != -100).sum())
    loss = fkd.kd_loss(ddp(xm), xm @ w_t[a:b].T, ym, group=tp_group, num_items=n_global, **kw) * dp
    loss.backward()
    opt.step()

    ref_w = w_s.clone().requires_grad_()
    fastkd.kd_loss(x @ ref_w.T, x @ w_t.T, y, backend="torch", **kw).backward()
    with torch.no_grad():
        ref_w -= 0.3 * ref_w.grad
    err = _rel_err(head.weight.detach(), ref_w.detach()[a:b])
    assert err <= RTOL, err


def _case_capture(rank, world, group):
    """Distributed capture equals the single-device capture: top-k (ties, −inf columns, k larger
    than a shard) and sampling, i.i.d. and systematic (same generator seed on every rank), ids and
    counts exactly."""
    import fastkd
    import fastkd.distributed as fkd

    g = torch.Generator().manual_seed(40)
    for vocab, k, temperature, widths in ((20 * world, 30, 1.0, None), (97, 7, 0.8, [30, 67]
                                                                      if world == 2 else [20, 25, 30, 22])):
        t = torch.randn(13, vocab, generator=g) * 2
        t[:4] = torch.randint(-3, 3, (4, vocab), generator=g).float()  # many exact ties
        t[5, vocab // 3:] = float("-inf")                             # whole shards without mass
        t3 = t.view(13, 1, vocab)                                      # a leading shape
        a, b = _bounds(vocab, world, rank, widths)
        layout = dict(vocab_start=a, vocab_size=vocab)
        for backend in ("auto", "torch"):
            mine = fkd.capture(t3[..., a:b], group=group, k=k, temperature=temperature, backend=backend,
                               **layout)
            ref = fastkd.capture(t3, k=k, temperature=temperature, backend="torch")
            assert mine.shape == ref.shape == (13, 1), (mine.shape, ref.shape)
            torch.testing.assert_close(mine.values, ref.values, rtol=1e-5, atol=1e-5)
            # Which of several logits tied at the k-th value is kept is torch.topk's (or the
            # kernel's) choice, so rows with ties (rows 0-3: equal logits, row 5: −inf columns)
            # are checked tie-agnostically; every other row must match exactly.
            strict = [4] + list(range(6, 13))
            assert torch.equal(mine.ids[strict], ref.ids[strict]), \
                (backend, (mine.ids[strict] != ref.ids[strict]).nonzero()[:5])
            picked = t3.gather(-1, mine.ids)
            assert torch.equal(picked, t3.gather(-1, ref.ids)), backend   # the same values, in order
            assert all(len(set(r)) == k for r in mine.ids.view(13, k).tolist())  # distinct ids
            same_value = picked[..., 1:] == picked[..., :-1]                  # ties: smaller id first
            assert bool((mine.ids[..., 1:] > mine.ids[..., :-1])[same_value].all()), backend
            torch.testing.assert_close(mine.lse, ref.lse, rtol=1e-6, atol=1e-6)
        for num_samples, sampling in ((1, "iid"), (50, "iid"), (3 * vocab, "iid"), (1, "systematic"),
                                      (50, "systematic"), (3 * vocab, "systematic")):
            gen_mine = torch.Generator().manual_seed(1234 + num_samples)
            gen_ref = torch.Generator().manual_seed(1234 + num_samples)
            mine = fkd.capture(t3[..., a:b], group=group, mode="sample", num_samples=num_samples,
                               temperature=temperature, generator=gen_mine, sampling=sampling, **layout)
            ref = fastkd.capture(t3, mode="sample", num_samples=num_samples, temperature=temperature,
                                 generator=gen_ref, sampling=sampling, backend="torch")
            assert torch.equal(mine.ids, ref.ids), (num_samples, mine.ids[:2], ref.ids[:2])
            assert torch.equal(mine.counts, ref.counts), num_samples
            assert int(mine.counts.sum()) == 13 * num_samples
            torch.testing.assert_close(mine.lse, ref.lse, rtol=1e-6, atol=1e-6)
    # generators out of step across ranks: every rank raises
    t = torch.randn(3, 8 * world)
    a, b = _bounds(8 * world, world, rank)
    try:
        fkd.capture(t[:, a:b], group=group, mode="sample", generator=torch.Generator().manual_seed(rank))
    except ValueError as exc:
        assert "generator" in str(exc), exc
    else:
        raise AssertionError("capture accepted generators in different states")


def _case_sparse_kd(rank, world, group):
    """Distributed sparse_kd_loss (student sharded, teacher cache replicated) equals the
    single-device sparse_kd_loss: top-k with the tail bucket / renormalised, k = V (no tail),
    sampled teachers, hard term, ignored rows, grad_output != 1."""
    import fastkd
    import fastkd.distributed as fkd

    vocab, n = 24 * world + 5, 17
    widths = [24] * world
    widths[-1] += 5
    s, t, y = _make_inputs(77, n, vocab, world=world, ignore_frac=0.2)
    a, b = _bounds(vocab, world, rank, widths)
    settings = [
        (dict(mode="topk", k=9, temperature=2.0), dict(tail="bucket", hard_weight=0.5, label_smoothing=0.1)),
        (dict(mode="topk", k=9, temperature=1.0), dict(tail="renorm", reduction="none")),
        (dict(mode="topk", k=vocab, temperature=1.0), dict(tail="bucket", reduction="sum")),
        (dict(mode="sample", num_samples=40, temperature=1.5), dict(tail="sampled", hard_weight=1.0,
                                                                    num_items=31)),
    ]
    for cap_kw, loss_kw in settings:
        gen = torch.Generator().manual_seed(5) if cap_kw["mode"] == "sample" else None
        st = fastkd.capture(t.float().view(n, 1, vocab), generator=gen, backend="torch", **cap_kw)
        gout = _grad_output(loss_kw.get("reduction", "mean"), n, 3).view(n, 1) \
            if loss_kw.get("reduction") == "none" else torch.tensor(0.6, dtype=torch.float64)
        ref_s = s.clone().view(n, 1, vocab).requires_grad_()
        ref = fastkd.sparse_kd_loss(ref_s, st, y.view(n, 1), backend="torch", **loss_kw)
        (ref * gout).sum().backward()
        mine_s = s[:, a:b].float().view(n, 1, b - a).requires_grad_()
        mine = fkd.sparse_kd_loss(mine_s, st, y.view(n, 1), group=group, vocab_start=a, **loss_kw)
        (mine * gout.float()).sum().backward()
        errs = dict(loss=_rel_err(mine, ref),
                    grad=_rel_err(mine_s.grad.view(n, -1), ref_s.grad.view(n, -1)[:, a:b],
                                  _grad_scale(ref_s.grad)))
        assert all(e <= RTOL for e in errs.values()), (cap_kw, loss_kw, errs)
        assert mine.dtype == torch.float32


def _worker_main(rank, world, init_file, out_path):
    import torch.distributed as dist
    from datetime import timedelta

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same global RNG state on every rank (inputs use explicit generators)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    results = {}
    cases = [(name, (lambda cfg: lambda r, w, g: _run_case(r, w, g, cfg))(cfg))
             for name, cfg in _all_kd_cases(world).items()]
    cases += [("multidim", _case_multidim), ("collective_count", _case_collective_count),
              ("nan_propagates", _case_nan_propagates), ("bad_layout", _case_bad_layout),
              ("ddp_single_device_loss", _case_ddp_single_device_loss), ("capture", _case_capture),
              ("sparse_kd", _case_sparse_kd), ("padded_vocab", _case_padded_vocab)]
    if world == 4:
        cases.append(("ddp_tensor_parallel", _case_ddp_tensor_parallel))
        # a sub-group: ranks {1, 3} run vocab-parallel KD while {0, 2} do the same on their own pair
        sub = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
        cases.append(("subgroup_kd", lambda r, w, g: _run_case(
            dist.get_rank(sub), 2, sub, dict(n=11, seed=31, vocab=90, kw=dict(divergence="jsd",
                                                                              hard_weight=0.5)))))
    times = {}
    for name, fn in cases:
        t0 = time.perf_counter()
        try:
            fn(rank, world, None)
            results[name] = None
        except Exception:  # report, keep the group in step for the next case
            results[name] = traceback.format_exc()
        times[name] = round(time.perf_counter() - t0, 3)
    results["__times__"] = times
    with open(out_path, "w") as f:
        json.dump(results, f)
    dist.barrier()
    # Leave without running destructors: tearing down a gloo group (ProcessGroupGloo's destructor
    # joining its threads, e.g. from a DDP Reducer freed after destroy_process_group) can hang, and
    # the results are already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# =============================================================================================
# pytest side
# =============================================================================================
def _spawn(world):
    tmp = tempfile.mkdtemp(prefix=f"fastkd_dist{world}_")
    init_file = os.path.join(tmp, "init")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs, outs = [], []
    for rank in range(world):
        out = os.path.join(tmp, f"rank{rank}.json")
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", str(rank), str(world), init_file, out],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=WORKER_TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"distributed workers (world={world}) hung past {WORKER_TIMEOUT_S}s")
    try:
        results = []
        for rank, (p, out) in enumerate(zip(procs, outs)):
            if p.returncode != 0 or not os.path.exists(out):
                every = "\n".join(f"--- rank {r} (exit {q.returncode}) ---\n{log[-3000:]}"
                                   for r, (q, log) in enumerate(zip(procs, logs)))
                pytest.fail(f"worker {rank}/{world} exited with {p.returncode}:\n{every}")
            with open(out) as f:
                results.append(json.load(f))
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def world2():
    return _spawn(2)


@pytest.fixture(scope="module")
def world4():
    return _spawn(4)


_COMMON = list(_all_kd_cases(2)) + ["multidim", "collective_count", "nan_propagates", "bad_layout",
                                "ddp_single_device_loss", "capture", "sparse_kd", "padded_vocab"]


def _check(results, case):
    for rank, res in enumerate(results):
        assert case in res, f"case {case} did not run"
        assert res[case] is None, f"rank {rank}: {res[case]}"


@pytest.mark.parametrize("case", _COMMON)
def test_world2(world2, case):
    _check(world2, case)


@pytest.mark.parametrize("case", _COMMON + ["ddp_tensor_parallel", "subgroup_kd"])
def test_world4(world4, case):
    _check(world4, case)


def test_import_without_process_group():
    import torch.distributed as dist

    import fastkd.distributed as fkd

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fkd.kd_loss(torch.randn(2, 5), torch.randn(2, 5))


def test_merge_stats_is_exact_in_any_split():
    """The merge rule alone: stats of random splits of a row merge to the stats of the whole row."""
    from fastkd.distributed import merge_stats, shard_stats

    s, t, y = _make_inputs(7, 9, 101, mask_cols=True)
    s, t = s.float(), t.float()
    whole = shard_stats(s, t, y, vocab_start=0, temperature=1.3, softcap=None)
    for cuts in ([0, 50, 101], [0, 1, 2, 101], [0, 33, 34, 80, 101]):
        parts = [shard_stats(s[:, a:b], t[:, a:b], y, vocab_start=a, temperature=1.3)
                 for a, b in zip(cuts[:-1], cuts[1:])]
        merged = merge_stats(torch.stack(parts))
        torch.testing.assert_close(merged, whole, rtol=1e-5, atol=1e-5, equal_nan=True)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
