"""The Triton teacher-cache kernels under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors.

Oracles: the CPU kernels (same float32 t/τ, so top-k ids and sampled ids/counts must match exactly)
and ``fastkd._cache_reference`` in float64. The interpreter runs with small blocks (128 entries,
32-key candidate buffers, 32-entry sampling sub-blocks), so V of a few hundred spans several
chunks, masked tails, threshold raises and buffer cut-backs; shapes stay tiny for CI time.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# Triton decides between compiling and interpreting when it is imported, so the interpreter must be
# switched on before the first `import triton` (see tests/test_triton.py). When another module of
# this session imported triton first, the cases run in a fresh child process instead.
_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
_ENV_AT_IMPORT = os.environ.get("TRITON_INTERPRET")
if not _PRELOADED:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import fastkd  # noqa: E402
from fastkd import _cache_reference as R  # noqa: E402
from fastkd import _ops, _sparse_ops  # noqa: E402
from fastkd.cache import SparseTeacher, capture, sparse_kd_loss  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf − inf in masked lanes
_interp = pytest.mark.skipif(_PRELOADED, reason="triton was imported before TRITON_INTERPRET=1; "
                             "these cases run in test_cases_in_a_fresh_interpreter_process")
_cpu = pytest.mark.skipif("cpu" not in _sparse_ops._SPARSE_KD_IMPLS,
                          reason="fastkd._C cache kernels not built (the CPU kernel is the exact oracle)")


@pytest.fixture(scope="module", autouse=True)
def _interpreter_env():
    """The interpreter on for these cases (another module's teardown may have switched it off), and
    afterwards as it was: later modules must not see Triton as available on CPU tensors."""
    if not _PRELOADED:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _ENV_AT_IMPORT is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _ENV_AT_IMPORT


@pytest.mark.skipif(not _PRELOADED, reason="the cases run directly in this process")
def test_cases_in_a_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x",
                        "-p", "no:cacheprovider", "-m", "not slow"], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"child pytest failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]


def _logits(n, v, dtype=torch.float32, scale=3.0, seed=0, mask_cols=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    if mask_cols:
        x[:, torch.randperm(v, generator=g)[:mask_cols]] = float("-inf")
    return x.to(dtype)


def _close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------
# capture, top-k
# ----------------------------------------------------------------------------------------------
def _check_topk(t, k, tau):
    st = capture(t, k=k, temperature=tau, backend="triton")
    cpu = capture(t, k=k, temperature=tau, backend="cpu")
    assert st.ids.dtype == torch.int64 and st.ids.shape == cpu.ids.shape
    assert st.values.dtype == torch.float32 and st.lse.dtype == torch.float32
    # the same float32 t/τ and the same (value desc, id asc) order: the same ids, ties included
    assert torch.equal(st.ids, cpu.ids), (st.ids, cpu.ids)
    _close(st.lse, cpu.lse, 2e-6, "lse vs cpu")
    _close(st.values, cpu.values, 2e-6, "values vs cpu")
    _, vals, lse = R.capture_topk(t.double(), k, tau)
    s = t.double() / tau
    # float32 t/τ and lse: ~ulp(max |t/τ|) absolute
    tol = 2e-6 * max(1.0, float(s[torch.isfinite(s)].abs().max()))
    _close(st.lse, lse, tol, "lse vs float64")
    _close(st.values, vals, tol, "values vs float64")
    # the values are the stored ids' log-probabilities over the FULL vocabulary
    _close(st.values, s.gather(1, st.ids) - lse[:, None], tol, "values at ids")
    return st


@_interp
@_cpu
@pytest.mark.parametrize("n,v,k,scale,tau,mask,dtype", [
    (3, 517, 17, 3.0, 1.0, 0, torch.float32),   # odd V, several chunks; k > groups: cut-backs only
    (3, 300, 5, 20.0, 2.5, 0, torch.bfloat16),  # peaked, bf16 ties, the group-maximum raise
    (3, 300, 40, 2.0, 0.7, 280, torch.float16),  # 20 finite entries: −inf ones fill, smallest id first
    (2, 129, 1, 1.0, 1.0, 0, torch.float32),    # k = 1
    (2, 300, 300, 1.0, 1.3, 0, torch.float32),  # k = V in the kernel
    (2, 600, 600, 1.0, 1.0, 0, torch.bfloat16),  # k = V past the kernel's buffer: the torch fallback
])
def test_capture_topk_matches_cpu_and_reference(n, v, k, scale, tau, mask, dtype):
    _check_topk(_logits(n, v, dtype, scale, seed=n + v + k, mask_cols=mask), k, tau)


@_interp
@_cpu
def test_capture_topk_ties_and_adversarial_orders():
    g = torch.Generator().manual_seed(3)
    rows = [
        torch.randint(-2, 3, (400,), generator=g).float(),  # heavy ties: smaller id first
        torch.arange(400).float() / 7,                       # ascending: every entry a new candidate
        -torch.arange(400).float(),                          # descending: the first chunk decides
        torch.zeros(400),                                    # one value everywhere
        torch.where(torch.arange(400) % 3 == 0, -0.0, 0.0),  # −0 and +0 are one value
    ]
    _check_topk(torch.stack(rows), 24, 1.0)
    _check_topk(torch.stack(rows), 3, 0.5)
    # A cut-back in the first chunk keeps 16 entries of 100 and one of 50 (the 17th, the threshold);
    # a later 75 beats the threshold, not the 16th, and belongs in the top 17.
    row = torch.zeros(400)
    row[:16] = 100.0
    row[16] = 50.0
    row[300] = 75.0
    # The first chunk leaves more than k candidates behind a low threshold; the second chunk's 40
    # candidates overflow the buffer, whose cut-back raises the threshold past all of them: the
    # buffer's k-th best at that cut is the row's k-th.
    row2 = torch.zeros(400)
    row2[:17] = 120.0 - torch.arange(17.0)
    row2[64:74] = 119.5 - torch.arange(10.0)
    row2[128:168] = 105.0
    _check_topk(torch.stack([row, row2]), 17, 1.0)


@_interp
@_cpu
def test_capture_topk_bitonic_network_path(monkeypatch):
    """The compiled kernels select with tl.topk; the interpreter's default (repeated max) is swapped
    for it here, on a small k (the network is slow in the interpreter)."""
    from fastkd._triton import cache as tc

    monkeypatch.setattr(tc, "_TOPK_NETWORK", True)
    t = _logits(2, 300, torch.float32, 3.0, seed=5)
    t[1, :200] = torch.arange(200).float()  # cut-backs too
    _check_topk(t, 3, 1.0)


@_interp
@_cpu
@pytest.mark.parametrize("v", [1, 2])
def test_tiny_vocabularies(v):
    t = _logits(3, v, seed=v)
    _check_topk(t, v, 1.0)
    u = torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(v))
    (ids, counts, lse), (ids_c, counts_c, lse_c) = _sample_both(t, u, 1.0)
    assert torch.equal(ids, ids_c) and torch.equal(counts, counts_c)
    st = capture(t, k=1)
    z = _logits(3, v, seed=v + 1)
    y = torch.tensor([0, -100, v - 1])
    loss, gz, go = _loss_and_grad(z, st, y, "triton", "none", hard_weight=0.5, label_smoothing=0.1)
    loss_c, gz_c, _ = _loss_and_grad(z, st, y, "cpu", "none", hard_weight=0.5, label_smoothing=0.1)
    _close(loss, loss_c, 1e-6, "loss")
    _close(gz, gz_c, 1e-6, "grad")


@_interp
def test_capture_topk_nan_row():
    t = _logits(3, 200)
    t[1, 7] = float("nan")
    st = capture(t, k=5, backend="triton")
    assert torch.isnan(st.lse[1]) and torch.isnan(st.values[1]).all()
    assert torch.isfinite(st.lse[[0, 2]]).all() and torch.isfinite(st.values[[0, 2]]).all()
    assert ((st.ids >= 0) & (st.ids < 200)).all()
    t = _logits(2, 600)
    t[0, :3] = float("nan")
    st = capture(t, k=600, backend="triton")  # the fallback of large k
    assert torch.isnan(st.lse[0]) and torch.isnan(st.values[0]).all() and torch.isfinite(st.values[1]).all()
    assert ((st.ids >= 0) & (st.ids < 600)).all()


# ----------------------------------------------------------------------------------------------
# capture, sample
# ----------------------------------------------------------------------------------------------
def _safe_uniforms(t, tau, num, seed, margin=1e-6):
    """Uniforms at least `margin` (relative) away from every cdf boundary of the float64 reference:
    there, float32 mass rounding cannot move a draw, so Triton and the CPU kernel must agree exactly."""
    g = torch.Generator().manual_seed(seed)
    s = t.double() / tau
    p = torch.softmax(torch.where(torch.isnan(s), torch.zeros_like(s), s), dim=-1)
    cdf = torch.cumsum(p, -1)
    cdf = cdf / cdf[:, -1:]
    u = torch.rand(t.shape[0], num, generator=g, dtype=torch.float64)
    for _ in range(100):
        i = torch.searchsorted(cdf, u).clamp_max(cdf.shape[1] - 1)
        near = (cdf.gather(1, i) - u).abs() < margin
        near |= (cdf.gather(1, (i - 1).clamp_min(0)) - u).abs() < margin
        if not near.any():
            return u
        u = torch.where(near, torch.rand(u.shape, generator=g, dtype=torch.float64), u)
    raise AssertionError("could not place uniforms away from the cdf boundaries")


def _sample_both(t, u, tau):
    a = torch.ops.fastkd.capture_sample(t, u, tau, "triton")
    b = torch.ops.fastkd.capture_sample(t, u, tau, "cpu")
    return a, b


@_interp
@_cpu
@pytest.mark.parametrize("n,v,num,dtype,tau,mask", [
    (3, 300, 50, torch.float32, 1.0, 0),
    (3, 517, 20, torch.bfloat16, 1.7, 100),  # zero-probability ids are never drawn
    (2, 40, 100, torch.float16, 0.8, 0),     # more draws than ids: width V
    (2, 300, 1, torch.float32, 3.0, 0),      # one draw
])
def test_capture_sample_matches_cpu_exactly(n, v, num, dtype, tau, mask):
    t = _logits(n, v, dtype, 2.5, seed=v + num, mask_cols=mask)
    u = _safe_uniforms(t, tau, num, seed=7)
    (ids, counts, lse), (ids_c, counts_c, lse_c) = _sample_both(t, u, tau)
    assert ids.dtype == torch.int64 and counts.dtype == torch.int32 and lse.dtype == torch.float32
    assert ids.shape == (n, min(num, v))
    assert torch.equal(ids, ids_c), (ids, ids_c)
    assert torch.equal(counts, counts_c)
    assert (counts.sum(1) == num).all()
    _close(lse, lse_c, 2e-6, "lse vs cpu")
    _close(lse, R.capture_sample(t.double(), u, tau)[2], 2e-6, "lse vs float64")
    ref_ids, ref_counts, _ = R.capture_sample(t.double(), u, tau)
    assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts)


@_interp
@_cpu
def test_capture_sample_degenerate_rows_and_top_draws():
    v, num = 200, 30
    t = _logits(4, v, seed=11)
    t[0] = float("-inf")              # no mass: every draw to the last id, as the CPU kernel does
    t[1, 3] = float("nan")            # NaN: likewise, and lse NaN
    t[2, 150:] = float("-inf")        # the top draw past the mass goes to the last id with mass
    u = _safe_uniforms(torch.where(torch.isnan(t), 0.0, t), 1.0, num, seed=3)
    u[2, 0] = 1.0 - 2.0 ** -53
    (ids, counts, lse), (ids_c, counts_c, lse_c) = _sample_both(t, u, 1.0)
    assert torch.equal(ids, ids_c) and torch.equal(counts, counts_c)
    assert ids[0, 0] == v - 1 and counts[0, 0] == num and (ids[0, 1:] == -1).all() and (counts[0, 1:] == 0).all()
    assert ids[1, 0] == v - 1 and torch.isnan(lse[1]) and lse[0] == float("-inf")
    assert ids[2][ids[2] >= 0].max() == 149
    _close(lse, lse_c, 2e-6, "lse")


@_interp
@_cpu
def test_capture_sample_public_api_same_generator_same_draws():
    t = _logits(3, 257, torch.bfloat16, 3.0, seed=12)
    a = capture(t, mode="sample", num_samples=40, temperature=1.2, generator=torch.Generator().manual_seed(9),
                backend="triton")
    b = capture(t, mode="sample", num_samples=40, temperature=1.2, generator=torch.Generator().manual_seed(9),
                backend="cpu")
    assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts)
    assert a.num_samples == 40 and a.mode == "sample"


# ----------------------------------------------------------------------------------------------
# sparse loss
# ----------------------------------------------------------------------------------------------
def _loss_and_grad(z, st, y, backend, reduction, seed=0, **kw):
    zz = z.detach().clone().requires_grad_()
    loss = sparse_kd_loss(zz, st, y, reduction=reduction, backend=backend, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    go = (torch.rand(loss.shape, generator=g, dtype=loss.dtype) + 0.5) if reduction == "none" \
        else torch.tensor(1.7, dtype=loss.dtype)
    (gz,) = torch.autograd.grad(loss, zz, go.to(loss.dtype))
    return loss.detach(), gz, go


def _oracle(z, st, y, tail, reduction, go, *, ignore_index=-100, temperature=None, soft_weight=1.0,
            hard_weight=0.0, label_smoothing=0.0, num_items=None):
    tau = st.temperature if temperature is None else temperature
    flat = st.flatten()
    z64 = z.double().requires_grad_()
    tail_code = R.TAIL_SAMPLED if st.mode == "sample" else (R.TAIL_BUCKET if tail == "bucket" else R.TAIL_RENORM)
    rows = R.sparse_kd_rows(z64, flat.ids, flat.teacher_probs(torch.float64), y, tail=tail_code, temperature=tau,
                            soft_scale=soft_weight * tau * tau, hard_weight=hard_weight, ignore_index=ignore_index,
                            label_smoothing=label_smoothing)
    count = (y != ignore_index).sum().clamp_min(1).double() if y is not None else float(z.shape[0])
    ref = {"none": rows, "sum": rows.sum(),
           "mean": rows.sum() / (num_items if num_items is not None else count)}[reduction]
    (g,) = torch.autograd.grad(ref, z64, go.double())
    return ref.detach(), g


def _teacher(mode, n, v, tau=1.5, k=17, num=20, seed=4):
    t = _logits(n, v, torch.float32, 4.0, seed=seed)
    return capture(t, k=k, mode=mode, temperature=tau, num_samples=num, generator=torch.Generator().manual_seed(seed))


@_interp
@_cpu
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("hard", [0.0, 0.5])
@pytest.mark.parametrize("mode,tail", [("topk", "bucket"), ("topk", "renorm"), ("sample", "sampled")])
def test_sparse_loss_matches_cpu_and_reference(mode, tail, hard, reduction):
    n, v = 5, 301
    st = _teacher(mode, n, v)
    z = _logits(n, v, torch.float32, 2.0, seed=2)
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    y[1] = -100
    kw = dict(tail=tail, hard_weight=hard, label_smoothing=0.1, soft_weight=0.9)
    loss, gz, go = _loss_and_grad(z, st, y, "triton", reduction, **kw)
    loss_c, gz_c, _ = _loss_and_grad(z, st, y, "cpu", reduction, **kw)
    assert loss.dtype == torch.float32 and gz.dtype == torch.float32 and loss.shape == loss_c.shape
    ref, gref = _oracle(z, st, y, tail, reduction, go, hard_weight=hard, label_smoothing=0.1, soft_weight=0.9)
    _close(loss, loss_c, 1e-5, "loss vs cpu")
    _close(loss, ref, 1e-5, "loss vs float64")
    scale = float(gref.abs().max())
    _close(gz, gz_c, 1e-5 * scale, "grad vs cpu")
    _close(gz, gref, 1e-5 * scale, "grad vs float64")
    assert (gz[1] == 0).all()
    if reduction == "none":
        assert loss[1] == 0


@_interp
@_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_loss_half_precision(dtype):
    n, v = 4, 300
    st = _teacher("topk", n, v, tau=1.0, k=20)
    z = _logits(n, v, dtype, 2.0, seed=5)
    y = torch.tensor([3, -100, 299, 0])
    kw = dict(hard_weight=0.5, label_smoothing=0.05)
    loss, gz, go = _loss_and_grad(z, st, y, "triton", "mean", **kw)
    loss_c, gz_c, _ = _loss_and_grad(z, st, y, "cpu", "mean", **kw)
    ref, gref = _oracle(z, st, y, "bucket", "mean", go, **kw)
    assert loss.dtype == torch.float32 and gz.dtype == dtype
    _close(loss, ref, 1e-5, "loss vs float64")
    _close(loss, loss_c, 1e-5, "loss vs cpu")
    # the gradient is rounded once into `dtype`, then scaled by grad_output in `dtype`
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    err = (gz.double() - gref).abs()
    assert (err <= 2 * ulp * gref.abs() + 1e-6 * gref.abs().amax(-1, keepdim=True)).all()
    assert ((gz.double() - gz_c.double()).abs() <= 2 * ulp * gz_c.double().abs() + 1e-7).all()


@_interp
@_cpu
def test_sparse_loss_padding_ids_k_equals_v_and_no_target():
    v = 200
    t = _logits(3, v, torch.float32, 3.0, seed=6)
    z = _logits(3, v, torch.float32, 2.0, seed=7)
    st = capture(t, k=12, temperature=2.0)
    ids, vals = st.ids.clone(), st.values.clone()
    ids[0, [2, 7]] = -1  # padding in the middle of a row: weight 0, not part of I
    vals[0, [2, 7]] = float("-inf")
    ids[2, :] = -1       # a row with no stored id: the whole teacher mass is the tail bucket
    vals[2, :] = float("-inf")
    padded = SparseTeacher("topk", ids, st.lse, values=vals, temperature=2.0, vocab_size=v)
    for tail in ("bucket", "renorm"):
        loss, gz, go = _loss_and_grad(z, padded, None, "triton", "none", tail=tail)
        loss_c, gz_c, _ = _loss_and_grad(z, padded, None, "cpu", "none", tail=tail)
        _close(loss, loss_c, 1e-5, f"{tail} loss vs cpu")  # (renorm over no id: NaN in both)
        keep = torch.isfinite(loss_c)
        _close(gz[keep], gz_c[keep], 1e-6, f"{tail} grad vs cpu")
    # k = V: no complement, the bucket loss is the dense forward KL (+ the hard term, τ = 1)
    full = capture(t, k=v, temperature=1.0)
    y = torch.tensor([5, -100, 17])
    loss, gz, go = _loss_and_grad(z, full, y, "triton", "sum", hard_weight=0.3)
    zz = z.double().requires_grad_()
    dense = fastkd.kd_loss(zz, t.double(), y, hard_weight=0.3, reduction="sum", backend="torch")
    (gd,) = torch.autograd.grad(dense, zz, go.double())
    _close(loss, dense, 1e-5, "k = V loss vs kd_loss")
    _close(gz, gd, 1e-6, "k = V grad vs kd_loss")


@_interp
@_cpu
def test_sparse_loss_row_stride_and_num_items():
    base = _logits(4, 330, torch.float32, 2.0, seed=8)
    z = base[:, 13:313]  # rows of a wider buffer
    assert z.stride(0) == 330 and not z.is_contiguous()
    st = _teacher("sample", 4, 300, tau=0.7, num=30, seed=9)
    y = torch.tensor([0, 299, -100, 150])
    kw = dict(hard_weight=1.0, num_items=7)
    loss, gz, go = _loss_and_grad(z, st, y, "triton", "mean", **kw)
    loss_c, gz_c, _ = _loss_and_grad(z, st, y, "cpu", "mean", **kw)
    ref, gref = _oracle(z, st, y, "sampled", "mean", go, **kw)
    _close(loss, ref, 1e-5, "loss")
    _close(gz, gref, 1e-5 * float(gref.abs().max()), "grad")
    _close(gz, gz_c, 1e-5 * float(gref.abs().max()), "grad vs cpu")


def _direct(z, ids, w, y, divisor=1.0, tail=R.TAIL_BUCKET, hard=1.0):
    _sparse_ops.pick_backend("triton", z.device, _sparse_ops._SPARSE_KD_IMPLS)  # registers the kernels
    n = z.shape[0]
    loss = torch.empty(n)
    grad = torch.empty_like(z)
    _sparse_ops._SPARSE_KD_IMPLS["triton"](z, ids, w, y, torch.tensor(divisor), loss, grad, tail, 1.0, 1.0, hard,
                                           -100, 0.0)
    return loss, grad


@_interp
def test_sparse_loss_bad_rows_give_nan_and_divisor_is_read():
    v = 150
    z = _logits(5, v, seed=10)
    st = capture(_logits(5, v, seed=11), k=6)
    ids, w = st.ids.clone(), st.teacher_probs()
    y = torch.tensor([1, 2, -100, 160, 4])
    ids[1, 3] = ids[1, 0]  # a repeated id
    ids[4, 2] = v          # an id out of range (the Python layer rejects it; the kernel must not read it)
    loss, grad = _direct(z, ids, w, y)
    assert torch.isfinite(loss[0]) and torch.isfinite(grad[0]).all()
    for r in (1, 3, 4):  # repeated id, target out of range, id out of range
        assert torch.isnan(loss[r]) and torch.isnan(grad[r]).all(), r
    assert loss[2] == 0 and (grad[2] == 0).all()
    loss4, grad4 = _direct(z, ids, w, y, divisor=4.0)
    torch.testing.assert_close(loss4[0] * 4, loss[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grad4[0] * 4, grad[0], rtol=1e-6, atol=1e-12)
    again = _direct(z, ids, w, y, divisor=4.0)
    assert torch.equal(again[0][[0, 2]], loss4[[0, 2]]) and torch.equal(again[1][0], grad4[0])


@_interp
def test_backend_selection_and_dtypes():
    assert _ops.resolve_backend("auto", torch.device("cpu")) in ("cpu", "torch")
    t = _logits(2, 50, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        capture(t, k=3, backend="triton")
    st = capture(t.float(), k=3)
    with pytest.raises(TypeError, match="float64"):
        sparse_kd_loss(t, st, backend="triton")


@_interp
@_cpu
def test_opcheck_triton_backend():
    t = _logits(3, 37, torch.float32, 2.0, seed=14)
    _sparse_ops.pick_backend("triton", t.device, _sparse_ops._SPARSE_KD_IMPLS)  # registers the kernels
    torch.library.opcheck(torch.ops.fastkd.capture_topk, (t, 4, 1.5, "triton"))
    u = torch.rand(3, 8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastkd.capture_sample, (t, u, 1.5, "triton"))
    st = capture(t, k=4, temperature=1.5)
    z = _logits(3, 37, torch.float32, 1.0, seed=15).requires_grad_()
    args = (z, st.ids, st.teacher_probs(), torch.tensor([1, -100, 4]), torch.tensor(2.0), 0, 1.5, 2.25, 0.5,
            -100, 0.1, True, "triton")
    torch.library.opcheck(torch.ops.fastkd.sparse_kd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------------------------
# the same kernels, compiled for a GPU (no GPU needed: Triton's own ptxas builds the cubin)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects (loop-carried type changes, scalar ops on
    specialised constants): build every kernel for sm_90 as the "triton" backend would launch it."""
    code = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        from fastkd._triton import cache as C

        target = GPUTarget("cuda", 90, 32)

        def build(fn, sig, consts, warps, maxnreg=None):
            sig = dict(sig, **{k: "constexpr" for k in consts})
            opts = {"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})}
            c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=opts)
            assert c.asm.get("cubin"), fn

        # (the first autotune config of k = 64 and every config of k = 1: the others take minutes)
        for kp, dt, configs in ((64, "*bf16", C._topk_configs(64)[:1]), (1, "*fp32", C._topk_configs(1))):
            for cfg in configs:
                build(C._topk_kernel, {"t_ptr": dt, "buf_ptr": "*i64", "ids_ptr": "*i64", "vals_ptr": "*fp32",
                                       "lse_ptr": "*fp32", "V": "i32", "K": "i32", "stride_t": "i32",
                                       "stride_buf": "i32", "inv_t": "fp32"},
                      dict(cfg.kwargs, KP=kp, NET=True), cfg.num_warps, cfg.maxnreg)
        build(C._sample_stats_kernel, {"t_ptr": "*fp16", "m_ptr": "*fp32", "d_ptr": "*fp32", "V": "i32",
                                       "NSB": "i32", "stride_t": "i32", "inv_t": "fp32"},
              {"SUB": 256, "BLOCK": 4096}, 8)
        build(C._sample_draw_kernel, {"t_ptr": "*bf16", "m_ptr": "*fp32", "d_ptr": "*fp32", "u_ptr": "*fp64",
                                      "ids_ptr": "*i64", "cnt_ptr": "*i32", "lse_ptr": "*fp32", "V": "i32",
                                      "NSB": "i32", "S": "i32", "W": "i32", "stride_t": "i32", "stride_u": "i32",
                                      "inv_t": "fp32"},
              {"SUB": 256, "NSB_P": 512, "WB": 64}, 4)
        for flags in (dict(TAIL=0, HAS_TARGET=True, USE_HARD=True, TAU_ONE=False, NEED_SUM=True),
                      dict(TAIL=1, HAS_TARGET=False, USE_HARD=False, TAU_ONE=True, NEED_SUM=False)):
            build(C._sparse_kd_kernel.fn, {"z_ptr": "*bf16", "sid_ptr": "*i64", "sw_ptr": "*fp32", "y_ptr": "*i64",
                                        "div_ptr": "*fp32", "loss_ptr": "*fp32", "g_ptr": "*bf16", "V": "i32",
                                        "K": "i32", "stride_z": "i32", "stride_g": "i32", "stride_y": "i32",
                                        "inv_t": "fp32", "soft_scale": "fp32", "hard": "fp32", "eps": "fp32",
                                        "ignore_index": "i32"},
                  dict(flags, BLOCK=4096, KB=64), 16)
        print("compiled")
    """)
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("this Triton has no ptxas to build cubins with")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]
