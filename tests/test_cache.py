"""Teacher cache: capture, sparse_kd_loss and TeacherCache against the float64 reference."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fastkd
from fastkd import _cache_reference as R
from fastkd import _sparse_ops
from fastkd.cache import SparseTeacher, TeacherCache, TeacherCacheError, capture, sparse_kd_loss

HAS_CPU = "cpu" in _sparse_ops._SPARSE_KD_IMPLS
BACKENDS = ["torch"] + (["cpu"] if HAS_CPU else [])
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="fastkd._C cache kernels not built")


def _logits(n, v, dtype=torch.float32, scale=3.0, seed=0, mask_cols=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    if mask_cols:
        cols = torch.randperm(v, generator=g)[:mask_cols]
        x[:, cols] = float("-inf")
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v,k,scale,tau,mask", [(41, 1271, 17, 3.0, 1.0, 0), (7, 507, 64, 20.0, 2.5, 0),
                                                    (5, 300, 40, 2.0, 0.7, 280), (3, 1, 1, 1.0, 1.0, 0),
                                                    (4, 2, 2, 1.0, 1.0, 0)])
def test_capture_topk_matches_reference(dtype, n, v, k, scale, tau, mask):
    t = _logits(n, v, dtype, scale, seed=n + v, mask_cols=mask)
    st = capture(t, k=k, temperature=tau, backend="cpu")
    ids, vals, lse = R.capture_topk(t.double(), k, tau)
    assert st.ids.shape == (n, k) and st.values.shape == (n, k) and st.lse.shape == (n,)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(st.lse.double(), lse, rtol=tol, atol=tol)
    torch.testing.assert_close(st.values.double(), vals, rtol=tol, atol=tol)
    # ids: identical where the value is unique in its row; values at the ids always consistent
    s = t.double() / tau
    torch.testing.assert_close(s.gather(1, st.ids) - lse[:, None], vals, rtol=tol, atol=tol)
    # ids equal wherever the value occurs once in its row (bf16 rows have ties)
    unique = (s.unsqueeze(1) == (vals + lse[:, None]).unsqueeze(-1)).sum(-1) == 1
    assert unique.any()
    assert (st.ids[unique] == ids[unique]).all()


@needs_cpu
@pytest.mark.parametrize("v", [50257, 128256])
def test_capture_topk_large_vocab(v):
    t = _logits(3, v, torch.bfloat16, 4.0, seed=v)
    st = capture(t, k=64, temperature=1.0, backend="cpu")
    ids, vals, lse = R.capture_topk(t.double(), 64, 1.0)
    torch.testing.assert_close(t.double().gather(1, st.ids), t.double().gather(1, ids), rtol=0, atol=0)
    torch.testing.assert_close(st.values.double(), vals, rtol=1e-5, atol=1e-5)


def test_capture_nan_row_gives_nan():
    t = _logits(3, 100)
    t[1, 7] = float("nan")
    for backend in BACKENDS:
        st = capture(t, k=5, backend=backend)
        assert torch.isnan(st.lse[1]) and torch.isnan(st.values[1]).all()
        assert torch.isfinite(st.lse[[0, 2]]).all()


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_capture_sample_matches_reference(dtype):
    t = _logits(64, 777, dtype, 2.5, seed=3, mask_cols=100)
    g = torch.Generator().manual_seed(11)
    st = capture(t, mode="sample", num_samples=50, temperature=1.3, generator=g, backend="cpu")
    g = torch.Generator().manual_seed(11)
    u = torch.rand(64, 50, generator=g, dtype=torch.float64)
    ids, counts, lse = R.capture_sample(t, u, 1.3)
    assert st.ids.shape == (64, 50) and st.counts.dtype == torch.int32
    assert (st.counts.sum(1) == 50).all()
    valid = st.ids >= 0
    assert (st.counts[valid] > 0).all() and (st.counts[~valid] == 0).all()
    # unique ids, ascending, then padding; never an id with zero probability (a masked column)
    nxt = torch.where(valid[:, 1:], st.ids[:, 1:], torch.full_like(st.ids[:, 1:], 10**9))
    assert (nxt > st.ids[:, :-1]).all()
    assert torch.isfinite(t.double().gather(1, st.ids.clamp_min(0))[valid]).all()
    same = (st.ids == ids) & (st.counts == counts)
    if dtype == torch.float64:
        assert same.all()
    else:  # float32 mass vs float64 reference: a draw may land on the other side of a boundary
        assert same.float().mean() > 0.99
    torch.testing.assert_close(st.lse.double(), lse.double(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_sample_unbiased_and_deterministic(backend):
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01, 0.0], dtype=torch.float64)
    rows = 4000
    t = p.log().expand(rows, -1).contiguous()
    g1 = torch.Generator().manual_seed(5)
    st = capture(t, mode="sample", num_samples=50, generator=g1, backend=backend)
    g2 = torch.Generator().manual_seed(5)
    st2 = capture(t, mode="sample", num_samples=50, generator=g2, backend=backend)
    assert torch.equal(st.ids, st2.ids) and torch.equal(st.counts, st2.counts)
    freq = st.dense_probs(torch.float64).mean(0)
    sigma = (p * (1 - p) / (rows * 50)).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
    assert freq[-1] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_systematic_sampling(backend):
    """Stratified comb u_j = (j + U)/N: same draws as the reference on those uniforms, E[count/N] = p,
    and every id with p_i >= 1/N drawn floor(N p_i) or ceil(N p_i) times (i.i.d. draws are not)."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01, 0.0], dtype=torch.float64)
    rows, n = 4000, 50
    t = p.log().expand(rows, -1).contiguous()
    st = capture(t, mode="sample", num_samples=n, sampling="systematic", generator=torch.Generator().manual_seed(5),
                 backend=backend)
    st2 = capture(t, mode="sample", num_samples=n, sampling="systematic", generator=torch.Generator().manual_seed(5),
                  backend=backend)
    assert torch.equal(st.ids, st2.ids) and torch.equal(st.counts, st2.counts)
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(rows, 1, generator=torch.Generator().manual_seed(5),
                                                            dtype=torch.float64)) / n
    ids, counts, _ = R.capture_sample(t, u, 1.0)
    assert torch.equal(st.ids, ids) and torch.equal(st.counts, counts)
    dense = st.dense_probs(torch.float64) * n
    freq = dense.mean(0) / n
    sigma = (p * (1 - p) / (rows * n)).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
    big = p >= 1.0 / n
    lo, hi = torch.floor(n * p[big]), torch.ceil(n * p[big])
    assert ((dense[:, big] >= lo) & (dense[:, big] <= hi)).all()
    iid = capture(t, mode="sample", num_samples=n, generator=torch.Generator().manual_seed(5), backend=backend)
    dense_iid = iid.dense_probs(torch.float64)[:, big] * n
    assert ((dense_iid < lo) | (dense_iid > hi)).any()  # the i.i.d. counts spread further
    with pytest.raises(ValueError, match="sampling"):
        capture(t, mode="sample", sampling="stratified")


def test_cache_sampling_setting(tmp_path):
    logits = _logits(2 * 8, 300, torch.float32, 2.0, seed=21).reshape(2, 8, 300)
    with TeacherCache(tmp_path / "s", mode="sample", num_samples=20, sampling="systematic") as c:
        st = c.get_or_capture(range(2), lambda: logits, generator=torch.Generator().manual_seed(3))
        assert "sampling='systematic'" in repr(c)
    ref = capture(logits, mode="sample", num_samples=20, sampling="systematic",
                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(st.ids, ref.ids) and torch.equal(st.counts, ref.counts)
    assert TeacherCache(tmp_path / "s").manifest["sampling"] == "systematic"
    with pytest.raises(ValueError, match="manifest.json.*sampling"):
        TeacherCache(tmp_path / "s", sampling="iid")
    # a cache written before the setting existed drew i.i.d.
    man_path = tmp_path / "s" / "manifest.json"
    import json
    man = json.loads(man_path.read_text())
    del man["sampling"]
    man_path.write_text(json.dumps(man))
    assert TeacherCache(tmp_path / "s", sampling="iid").manifest.get("sampling") is None
    with pytest.raises(ValueError, match="sampling"):
        TeacherCache(tmp_path / "s", sampling="systematic")
    with pytest.raises(ValueError, match="sampling must be one of"):
        TeacherCache(tmp_path / "x", mode="sample", sampling="stratified")


def test_capture_bad_input():
    t = _logits(4, 10)
    with pytest.raises(ValueError, match="k must lie in"):
        capture(t, k=0)
    with pytest.raises(ValueError, match="k must lie in"):
        capture(t, k=11)
    with pytest.raises(TypeError, match="k must be an int"):
        capture(t, k=2.0)
    with pytest.raises(ValueError, match="num_samples"):
        capture(t, mode="sample", num_samples=0)
    with pytest.raises(ValueError, match="mode"):
        capture(t, mode="nucleus")
    with pytest.raises(ValueError, match="temperature"):
        capture(t, temperature=0.0)
    with pytest.raises(TypeError, match="teacher_logits"):
        capture(t.long())
    with pytest.raises(TypeError, match="generator"):
        capture(t, mode="sample", generator=5)


# ----------------------------------------------------------------------------------------------
# sparse_kd_loss
# ----------------------------------------------------------------------------------------------
def _reference_loss(z, st, y, tail, **kw):
    flat = st.flatten()
    code = R.TAIL_SAMPLED if st.mode == "sample" else (R.TAIL_BUCKET if tail == "bucket" else R.TAIL_RENORM)
    tau = st.temperature
    soft_scale = kw.get("soft_weight", 1.0) * (tau * tau if kw.get("t2_scale", True) else 1.0)
    rows = R.sparse_kd_rows(z.double().reshape(-1, z.shape[-1]), flat.ids, flat.teacher_probs(torch.float64),
                            None if y is None else y.reshape(-1), tail=code, temperature=tau,
                            soft_scale=soft_scale, hard_weight=kw.get("hard_weight", 0.0),
                            ignore_index=-100, label_smoothing=kw.get("label_smoothing", 0.0))
    return rows


@needs_cpu
@pytest.mark.parametrize("mode,tail", [("topk", "bucket"), ("topk", "renorm"), ("sample", "sampled"),
                                       ("sample", "bucket")])
@pytest.mark.parametrize("dtype,reduction", [(torch.float64, "mean"), (torch.float64, "none"),
                                             (torch.float32, "sum"), (torch.float32, "none"),
                                             (torch.bfloat16, "mean")])
def test_sparse_loss_matches_reference(mode, tail, dtype, reduction):
    n, v = 41, 1271
    t = _logits(n, v, torch.float32, 4.0, seed=1)
    z = _logits(n, v, dtype, 2.0, seed=2, mask_cols=3)
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    y[[3, 17, 30]] = -100
    st = capture(t, k=64, mode=mode, temperature=1.7, num_samples=50, generator=torch.Generator().manual_seed(4))
    kw = dict(hard_weight=0.4, label_smoothing=0.1, soft_weight=0.9)
    zc = z.clone().requires_grad_()
    loss = sparse_kd_loss(zc, st, y, tail=tail, reduction=reduction, backend="cpu", **kw)
    go = torch.rand(loss.shape, dtype=loss.dtype) + 0.5 if reduction == "none" else torch.tensor(1.7, dtype=loss.dtype)
    (gz,) = torch.autograd.grad(loss, zc, go)

    z64 = z.double().requires_grad_()
    rows = _reference_loss(z64, st, y, tail, **kw)
    keep = (y != -100).double()
    ref = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / keep.sum()}[reduction]
    (gref,) = torch.autograd.grad(ref, z64, go.double())
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype == torch.float64:
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gz, gref, rtol=1e-9, atol=1e-12)
    elif dtype == torch.float32:
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gz.double(), gref, rtol=1e-5, atol=1e-7)
    else:  # bf16 gradient: stored in bf16, then scaled by grad_output in bf16: two roundings at most
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        err = (gz.double() - gref).abs()
        # float32 cancellation (q − p, CE terms) is absolute: allow a little relative to the row
        assert (err <= 2 ** -7 * gref.abs() + 1e-6 * gref.abs().amax(-1, keepdim=True)).all()
    # ignored rows: no gradient
    assert (gz[[3, 17, 30]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [0.0, 0.5])
def test_topk_k_equals_v_is_kd_loss(backend, hard):
    v = 50
    t = _logits(9, v, torch.float64, 3.0, seed=7)
    z = _logits(9, v, torch.float64, 2.0, seed=8)
    y = torch.randint(0, v, (9,))
    st = capture(t, k=v, temperature=2.0)
    kw = dict(temperature=2.0, hard_weight=hard, label_smoothing=0.05)
    z1 = z.clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    l1 = sparse_kd_loss(z1, st, y, backend=backend, hard_weight=hard, label_smoothing=0.05)
    l2 = fastkd.kd_loss(z2, t, y, backend="torch", **kw)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-10, atol=1e-13)


def test_bucket_is_kl_of_buckets_and_renorm_is_biased():
    # k+1 bucket KL by hand for one row, and renorm differs from it when the tail carries mass
    t = _logits(1, 30, torch.float64, 1.0, seed=9)
    z = _logits(1, 30, torch.float64, 1.0, seed=10)
    st = capture(t, k=5)
    p = torch.softmax(t, -1)[0]
    q = torch.softmax(z, -1)[0]
    ids = st.ids[0]
    mask = torch.zeros(30, dtype=torch.bool)
    mask[ids] = True
    pb = torch.cat([p[ids], p[~mask].sum().reshape(1)])
    qb = torch.cat([q[ids], q[~mask].sum().reshape(1)])
    by_hand = (pb * (pb / qb).log()).sum()
    for backend in BACKENDS:
        torch.testing.assert_close(sparse_kd_loss(z, st, backend=backend), by_hand, rtol=1e-12, atol=1e-12)
        assert abs(sparse_kd_loss(z, st, tail="renorm", backend=backend) - by_hand) > 1e-3


@needs_cpu
def test_sparse_gradcheck_cpu():
    # The op scales its stored gradient in place (one backward per graph), while gradcheck runs
    # backward repeatedly; so the kernel's gradient is checked through a wrapper that re-runs the
    # op for every backward.
    t = _logits(3, 11, torch.float64, 2.0, seed=12)
    st = capture(t, k=4, temperature=1.5)
    y = torch.tensor([1, -100, 7])
    div = torch.tensor(1.0, dtype=torch.float64)

    for tail in (R.TAIL_BUCKET, R.TAIL_RENORM):
        args = (st.ids, st.teacher_probs(torch.float64), y, div, tail, 1.5, 1.5 ** 2 * 0.8, 0.3, -100, 0.1,
                True, "cpu")

        class Rows(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return torch.ops.fastkd.sparse_kd(x, *args)[0]

            @staticmethod
            def backward(ctx, g):
                (x,) = ctx.saved_tensors
                return torch.ops.fastkd.sparse_kd(x, *args)[1] * g[:, None]

        z = _logits(3, 11, torch.float64, 1.0, seed=13).requires_grad_()
        assert torch.autograd.gradcheck(Rows.apply, (z,))


@needs_cpu
def test_opcheck_custom_ops():
    t = _logits(5, 37, torch.float32, 2.0, seed=14)
    torch.library.opcheck(torch.ops.fastkd.capture_topk, (t, 6, 1.5, "cpu"))
    u = torch.rand(5, 8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastkd.capture_sample, (t, u, 1.5, "cpu"))
    st = capture(t, k=6, temperature=1.5)
    z = _logits(5, 37, torch.float32, 1.0, seed=15).requires_grad_()
    y = torch.tensor([1, 2, -100, 4, 5])
    args = (z, st.ids, st.teacher_probs(), y, torch.tensor(4.0), 0, 1.5, 2.25, 0.5, -100, 0.1, True, "cpu")
    torch.library.opcheck(torch.ops.fastkd.sparse_kd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_cpu
def test_compile_fullgraph():
    t = _logits(6, 40, torch.float32, 2.0, seed=16)
    st = capture(t, k=8)
    z = _logits(6, 40, torch.float32, 1.0, seed=17).requires_grad_()
    y = torch.tensor([1, 2, 3, -100, 5, 6])

    def f(x, ids, values, lse):
        s = SparseTeacher("topk", ids, lse, values=values, temperature=1.0, vocab_size=40)
        return sparse_kd_loss(x, s, y, hard_weight=0.5, backend="cpu")
    eager = f(z, st.ids, st.values, st.lse)
    (g_e,) = torch.autograd.grad(eager, z)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(z, st.ids, st.values, st.lse)
    (g_c,) = torch.autograd.grad(out, z)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_c, g_e)


def test_sparse_loss_bad_input():
    t = _logits(4, 10)
    st = capture(t, k=3, temperature=2.0)
    z = _logits(4, 10)
    with pytest.raises(ValueError, match="vocab_size"):
        sparse_kd_loss(_logits(4, 11), st)
    with pytest.raises(ValueError, match="one row per student row"):
        sparse_kd_loss(_logits(5, 10), st)
    with pytest.raises(ValueError, match="capture temperature"):
        sparse_kd_loss(z, st, temperature=1.0)
    with pytest.raises(ValueError, match="tail='sampled' needs a sampled teacher"):
        sparse_kd_loss(z, st, tail="sampled")
    with pytest.raises(ValueError, match="tail must be"):
        sparse_kd_loss(z, st, tail="nope")
    with pytest.raises(ValueError, match="forward_kl"):
        sparse_kd_loss(z, st, divergence="reverse_kl")
    with pytest.raises(TypeError, match="SparseTeacher"):
        sparse_kd_loss(z, t)
    bad = SparseTeacher("topk", st.ids.clone(), st.lse, values=st.values, temperature=2.0, vocab_size=10)
    bad.ids[1, 0] = 10
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        sparse_kd_loss(z, bad)
    with pytest.raises(ValueError, match="device"):
        sparse_kd_loss(z, st.to("meta"))
    with pytest.raises(ValueError, match="hard_weight"):
        sparse_kd_loss(z, st, hard_weight=1.0)
    with pytest.raises(ValueError, match="target"):
        sparse_kd_loss(z, st, torch.tensor([0, 1, 2, 10]), hard_weight=1.0)
    with pytest.raises(ValueError, match="k = 12"):
        SparseTeacher("topk", torch.zeros(2, 12, dtype=torch.long), torch.zeros(2), values=torch.zeros(2, 12),
                      temperature=1.0, vocab_size=10)


@needs_cpu
def test_kernel_flags_duplicate_ids_as_nan():
    st = capture(_logits(2, 20), k=4)
    ids = st.ids.clone()
    ids[0, 1] = ids[0, 0]
    dup = SparseTeacher("topk", ids, st.lse, values=st.values, temperature=1.0, vocab_size=20)
    rows = sparse_kd_loss(_logits(2, 20, seed=1), dup, reduction="none", backend="cpu")
    assert torch.isnan(rows[0]) and torch.isfinite(rows[1])


def test_sparse_teacher_indexing():
    st = capture(_logits(6, 30).reshape(2, 3, 30), k=4)
    assert st.shape == (2, 3) and st.flatten().shape == (6,)
    sub = st.flatten()[1:4]
    assert torch.equal(sub.ids, st.ids.reshape(6, 4)[1:4]) and torch.equal(sub.lse, st.lse.reshape(6)[1:4])
    cat = SparseTeacher.cat([st.flatten()[:2], st.flatten()[2:]])
    assert torch.equal(cat.values, st.values.reshape(6, 4))
    assert torch.equal(st[1].ids, st.ids[1])


# ----------------------------------------------------------------------------------------------
# TeacherCache
# ----------------------------------------------------------------------------------------------
def test_cache_roundtrip_topk_and_get_or_capture(tmp_path):
    logits = _logits(6 * 5, 1000, torch.float32, 3.0, seed=20).reshape(6, 5, 1000)
    calls = []

    def teacher():
        calls.append(1)
        return logits

    c = TeacherCache(tmp_path / "c", k=16, temperature=2.0, teacher="unit-test", dataset="abc")
    st = c.get_or_capture([10, 11, 12, 13, 14, 15], teacher)
    ref = capture(logits, k=16, temperature=2.0)
    assert st.shape == (6, 5) and torch.equal(st.ids, ref.ids)
    torch.testing.assert_close(st.lse, ref.lse, rtol=0, atol=0)                    # float32 lse
    torch.testing.assert_close(st.values, ref.values.half().float(), rtol=0, atol=0)  # float16 values
    st2 = c.get_or_capture([12, 10], teacher)  # all stored: the teacher does not run
    assert len(calls) == 1 and torch.equal(st2.ids, ref.ids[[2, 0]])
    # one-argument form: called with the positions of the missing rows only
    seen = []
    st3 = c.get_or_capture([11, 99, 10, 98], lambda pos: (seen.append(pos.tolist()), logits[[0, 1]])[1])
    assert seen == [[1, 3]] and torch.equal(st3.ids[[1, 3]], ref.ids[[0, 1]])
    assert "bytes/token" in repr(c) and len(c) == 8
    # a batch holding one missing sample twice stores it once
    st4 = c.get_or_capture([50, 51, 50], lambda: logits[[0, 1, 0]])
    assert len(c) == 10 and torch.equal(st4.ids[2], ref.ids[0])
    c.close()
    r = TeacherCache(tmp_path / "c", readonly=True)
    assert torch.equal(r.read([15]).ids, ref.ids[[5]])
    with pytest.raises(KeyError, match="1234"):
        r.read([1234])


def test_cache_roundtrip_sample(tmp_path):
    logits = _logits(4 * 8, 300, torch.float32, 2.0, seed=21).reshape(4, 8, 300)
    g = torch.Generator().manual_seed(3)
    with TeacherCache(tmp_path / "s", mode="sample", num_samples=20) as c:
        st = c.get_or_capture(range(4), lambda: logits, generator=g)
    ref = capture(logits, mode="sample", num_samples=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(st.ids, ref.ids) and torch.equal(st.counts, ref.counts)
    torch.testing.assert_close(st.lse, ref.lse, rtol=0, atol=0)


@pytest.mark.parametrize("kw,field", [(dict(k=32), "k"), (dict(temperature=1.0), "temperature"),
                                      (dict(teacher="other"), "teacher"), (dict(vocab_size=999), "vocab_size"),
                                      (dict(mode="sample"), "mode")])
def test_cache_manifest_mismatch(tmp_path, kw, field):
    c = TeacherCache(tmp_path / "m", k=8, temperature=2.0, teacher="t", vocab_size=100)
    c.write([0], capture(_logits(3, 100).reshape(1, 3, 100), k=8, temperature=2.0))
    c.close()
    with pytest.raises(ValueError, match=f"manifest.json.*{field}"):
        TeacherCache(tmp_path / "m", **kw)
    c = TeacherCache(tmp_path / "m")
    with pytest.raises(ValueError, match="does not match"):
        c.write([1], capture(_logits(3, 100).reshape(1, 3, 100), k=4, temperature=2.0))
    with pytest.raises(ValueError, match="already stored"):
        c.write([0], capture(_logits(3, 100).reshape(1, 3, 100), k=8, temperature=2.0))


def _fill(path, writer, ids, seed=0, **kw):
    c = TeacherCache(path, k=8, vocab_size=200, writer=writer, **kw)
    for i in ids:
        c.write([i], capture(_logits(4, 200, seed=seed + i).reshape(1, 4, 200), k=8))
    return c


def test_cache_torn_tail_resumes_and_corruption_is_an_error(tmp_path):
    path = tmp_path / "d"
    c = _fill(path, "w", range(3))
    c.close()
    shard = path / "shard-w.fkd"
    good_size = shard.stat().st_size
    with open(shard, "ab") as f:  # a crash mid-write: half a chunk past the commit log
        f.write(open(shard, "rb").read()[48:48 + 100])
    r = TeacherCache(path, readonly=True)  # readers ignore what was never committed
    assert sorted(r._index) == [0, 1, 2]
    c = _fill(path, "w", [3])  # the writer drops the torn tail and resumes
    assert sorted(c._index) == [0, 1, 2, 3]
    c.close()
    assert shard.stat().st_size > good_size
    r = TeacherCache(path, readonly=True)
    for i in range(4):
        assert torch.equal(r.read([i]).ids, capture(_logits(4, 200, seed=i).reshape(1, 4, 200), k=8).ids)

    # a flipped byte inside a committed row: a clear error naming the shard
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = TeacherCache(path, readonly=True)
    with pytest.raises(TeacherCacheError, match="shard-w.fkd"):
        r.read([3])
    # a truncated shard (shorter than its commit log): an error naming the shard
    shard.write_bytes(bytes(data[:-20]))
    with pytest.raises(TeacherCacheError, match="shard-w.fkd.*truncated"):
        TeacherCache(path, readonly=True)


def test_cache_several_writers_and_lock(tmp_path):
    path = tmp_path / "multi"
    a = _fill(path, "rank0", [0, 2, 4])
    b = _fill(path, "rank1", [1, 3])
    with pytest.raises(TeacherCacheError, match="another process"):
        _fill(path, "rank0", [7])
    r = TeacherCache(path, readonly=True)
    assert sorted(r._index) == [0, 1, 2, 3, 4]
    st = r.read([4, 1])
    assert torch.equal(st.ids[1], capture(_logits(4, 200, seed=1).reshape(1, 4, 200), k=8).ids[0])
    b.write([5], capture(_logits(4, 200, seed=5).reshape(1, 4, 200), k=8))
    assert 5 in r.missing([5]) and torch.equal(r.read([5]).ids, b.read([5]).ids)  # read() refreshes
    a.close()
    b.close()


def test_cache_bytes_per_token_topk64_v128k(tmp_path):
    v = 128256
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 24, v, generator=g).to(torch.bfloat16)
    with TeacherCache(tmp_path / "b", k=64, sync=False) as c:
        c.write([0, 1], capture(t, k=64))
        assert c.manifest["id_bits"] == 17
        assert c.bytes_per_token <= 272
        back = c.read([1])
    assert torch.equal(back.ids, capture(t[1:], k=64).ids)


_WRITER = textwrap.dedent("""
    import sys, torch
    from fastkd.cache import TeacherCache, capture
    path = sys.argv[1]
    c = TeacherCache(path, k=32, vocab_size=3000, writer="victim")
    i = 0
    while True:
        ids = list(range(4 * i, 4 * i + 4))
        g = torch.Generator().manual_seed(i)
        logits = torch.randn(4, 64, 3000, generator=g)
        c.write(ids, capture(logits, k=32))
        print("W", i, flush=True)
        i += 1
""")


def test_killed_writer_loses_nothing_reported(tmp_path):
    path = str(tmp_path / "kill")
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fastkd.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([pkg_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.Popen([sys.executable, str(script), path], stdout=subprocess.PIPE, env=env, text=True)
    reported = []
    try:
        deadline = time.time() + 60
        while len(reported) < 6 and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            reported.append(int(line.split()[1]))
        time.sleep(0.013)  # land somewhere inside a later write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for line in proc.stdout:  # lines printed before the kill still count as reported
            reported.append(int(line.split()[1]))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(reported) >= 6, "the writer did not get going"

    def expect(i):
        g = torch.Generator().manual_seed(i)
        return capture(torch.randn(4, 64, 3000, generator=g), k=32)

    r = TeacherCache(path, readonly=True)
    for i in reported:
        st = r.read(list(range(4 * i, 4 * i + 4)))
        assert torch.equal(st.ids, expect(i).ids)
    # the same writer reopens its shard, drops any torn tail, and goes on
    w = TeacherCache(path, writer="victim")
    nxt = max(w._index) // 4 + 1
    w.write(list(range(4 * nxt, 4 * nxt + 4)), expect(nxt))
    w.close()
    r = TeacherCache(path, readonly=True)
    assert torch.equal(r.read(list(range(4 * nxt, 4 * nxt + 4))).ids, expect(nxt).ids)
    for i in reported:
        assert torch.equal(r.read(list(range(4 * i, 4 * i + 4))).ids, expect(i).ids)


def test_cache_writer_torn_before_header_complete(tmp_path):
    path = tmp_path / "h"
    _fill(path, "w", [0]).close()
    (path / "shard-x.fkd").write_bytes(b"FKDSH")  # a writer died while writing its shard header
    r = TeacherCache(path, readonly=True)
    assert sorted(r._index) == [0]
    c = _fill(path, "x", [1])
    c.close()
    r = TeacherCache(path, readonly=True)
    assert sorted(r._index) == [0, 1]
    assert torch.equal(r.read([1]).ids, capture(_logits(4, 200, seed=1).reshape(1, 4, 200), k=8).ids)
