"""The teacher-cache GPU backends ("triton", and "cuda" when its kernels are registered) at real
vocabulary sizes, against the CPU kernels on the same inputs moved to the CPU. Skipped without CUDA.

Top-k ids and sampled ids/counts must match the CPU kernel exactly (the same float32 t/τ and the same
order; uniforms are kept away from cdf boundaries, where float32 mass rounding may move a draw);
values, lse and losses within float32 rounding; gradients within one rounding of the student dtype.
"""
from __future__ import annotations

import os

import pytest
import torch

import fastkd
from fastkd import _cache_reference as R
from fastkd import _sparse_ops
from fastkd.cache import SparseTeacher, capture, sparse_kd_loss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = torch.device("cuda")
BACKENDS = ["triton", "cuda"]


def _need(backend):
    """Skip "cuda" until its cache kernels are registered; "triton" must be there when triton is."""
    if "cpu" not in _sparse_ops._SPARSE_KD_IMPLS:
        pytest.skip("fastkd._C cache kernels not built (the CPU kernel is the oracle)")
    if backend == "triton":
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("TRITON_INTERPRET=1: the interpreter cases are tests/test_triton_cache.py")
        pytest.importorskip("triton")
        _sparse_ops.pick_backend("triton", DEV, _sparse_ops._CAPTURE_TOPK_IMPLS)  # loads the kernels
    for reg in (_sparse_ops._CAPTURE_TOPK_IMPLS, _sparse_ops._CAPTURE_SAMPLE_IMPLS, _sparse_ops._SPARSE_KD_IMPLS):
        if backend not in reg:
            if backend == "cuda":
                pytest.skip("no CUDA teacher-cache kernels registered")
            raise AssertionError(f"backend {backend!r} lacks a teacher-cache kernel")


def _logits(n, v, dtype=torch.float32, scale=3.0, seed=0, mask_cols=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, v, generator=g, device=DEV) * scale
    x[1::4] *= 6.0  # some peaked rows
    if mask_cols:
        x[:, torch.randperm(v, generator=g, device=DEV)[:mask_cols]] = float("-inf")
    return x.to(dtype)


def _close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _s_tol(t, tau):
    s = t.double() / tau
    return 2e-6 * max(1.0, float(s[torch.isfinite(s)].abs().max()))


# ----------------------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------------------
def _check_topk(backend, t, k, tau):
    st = capture(t, k=k, temperature=tau, backend=backend)
    cpu = capture(t.cpu(), k=k, temperature=tau, backend="cpu")
    assert st.ids.device == t.device and st.ids.dtype == torch.int64 and st.values.dtype == torch.float32
    assert torch.equal(st.ids.cpu(), cpu.ids), "top-k ids differ from the CPU kernel"
    tol = _s_tol(t, tau)
    _close(st.lse, cpu.lse, tol, "lse")
    _close(st.values, cpu.values, tol, "values")
    s = t.double() / tau
    _close(st.values, s.gather(1, st.ids) - torch.logsumexp(s, -1, keepdim=True), tol, "values vs float64")
    return st


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [32000, 50257, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_capture_topk_matches_cpu(backend, v, dtype):
    _need(backend)
    _check_topk(backend, _logits(24, v, dtype, seed=v), 64, 1.0 if dtype == torch.bfloat16 else 0.8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_topk_k_sizes_ties_and_orders(backend):
    _need(backend)
    v = 50257
    t = _logits(8, v, torch.bfloat16, seed=1)
    t[0] = torch.randint(-3, 4, (v,), device=DEV).to(t.dtype)    # heavy ties: smaller id first
    t[1] = torch.arange(v, device=DEV).to(t.dtype) / 1000.0        # ascending: every entry a candidate
    t[2] = -torch.arange(v, device=DEV).to(t.dtype) / 1000.0
    t[3] = 0.0
    t[4, 100:] = float("-inf")                                     # fewer finite entries than k
    for k in (1, 5, 64, 300, 1000):
        _check_topk(backend, t, k, 1.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_topk_nan_row(backend):
    _need(backend)
    t = _logits(3, 32000)
    t[1, 7] = float("nan")
    st = capture(t, k=64, backend=backend)
    assert torch.isnan(st.lse[1]) and torch.isnan(st.values[1]).all()
    assert torch.isfinite(st.lse[[0, 2]]).all()
    assert ((st.ids >= 0) & (st.ids < 32000)).all()


def _safe_uniforms(t, tau, num, seed, margin=1e-6):
    g = torch.Generator(device=DEV).manual_seed(seed)
    s = t.double() / tau
    cdf = torch.cumsum(torch.softmax(s, dim=-1), -1)
    cdf = cdf / cdf[:, -1:]
    u = torch.rand(t.shape[0], num, generator=g, dtype=torch.float64, device=DEV)
    for _ in range(100):
        i = torch.searchsorted(cdf, u).clamp_max(cdf.shape[1] - 1)
        near = ((cdf.gather(1, i) - u).abs() < margin) | ((cdf.gather(1, (i - 1).clamp_min(0)) - u).abs() < margin)
        if not bool(near.any()):
            return u
        u = torch.where(near, torch.rand(u.shape, generator=g, dtype=torch.float64, device=DEV), u)
    raise AssertionError("could not place uniforms away from the cdf boundaries")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v,num,dtype,tau", [(128256, 50, torch.bfloat16, 1.0), (50257, 1000, torch.float16, 0.7),
                                             (32000, 50, torch.float32, 2.0)])
def test_capture_sample_matches_cpu_exactly(backend, v, num, dtype, tau):
    _need(backend)
    t = _logits(16, v, dtype, seed=v + num, mask_cols=1000)
    u = _safe_uniforms(t, tau, num, seed=5)
    ids, counts, lse = torch.ops.fastkd.capture_sample(t, u, tau, backend)
    ids_c, counts_c, lse_c = torch.ops.fastkd.capture_sample(t.cpu(), u.cpu(), tau, "cpu")
    assert ids.dtype == torch.int64 and counts.dtype == torch.int32 and ids.shape == (16, min(num, v))
    assert torch.equal(ids.cpu(), ids_c) and torch.equal(counts.cpu(), counts_c)
    assert (counts.sum(1) == num).all()
    _close(lse, lse_c, _s_tol(t, tau), "lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_sample_degenerate_rows(backend):
    _need(backend)
    v, num = 32001, 40
    t = _logits(3, v)
    t[0] = float("-inf")
    t[1, 5] = float("nan")
    u = torch.rand(3, num, dtype=torch.float64, device=DEV)
    ids, counts, lse = torch.ops.fastkd.capture_sample(t, u, 1.0, backend)
    for r in (0, 1):  # every draw to the last id, as the CPU kernel does
        assert ids[r, 0] == v - 1 and counts[r, 0] == num and (ids[r, 1:] == -1).all()
    assert lse[0] == float("-inf") and torch.isnan(lse[1]) and torch.isfinite(lse[2])


# ----------------------------------------------------------------------------------------------
# sparse loss
# ----------------------------------------------------------------------------------------------
def _loss_grad(z, st, y, backend, reduction, go=None, **kw):
    """Loss and d(loss·go)/dz, go ≠ 1 (drawn on the loss's device unless given)."""
    zz = z.detach().clone().requires_grad_()
    loss = sparse_kd_loss(zz, st, y, reduction=reduction, backend=backend, **kw)
    if go is None:
        g = torch.Generator(device=loss.device).manual_seed(7)
        go = (torch.rand(loss.shape, generator=g, device=loss.device) + 0.5) if reduction == "none" \
            else torch.tensor(1.7, device=loss.device)
    (gz,) = torch.autograd.grad(loss, zz, go.to(loss.device))
    return loss.detach(), gz, go


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [50257, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("mode,tail,hard", [("topk", "bucket", 0.5), ("topk", "renorm", 0.0),
                                            ("sample", "sampled", 1.0)])
def test_sparse_loss_matches_cpu(backend, v, dtype, mode, tail, hard):
    _need(backend)
    n = 16
    tau = 1.0 if mode == "sample" else 2.0
    st = capture(_logits(n, v, torch.bfloat16, seed=3), k=64, mode=mode, temperature=tau, num_samples=50,
                 generator=torch.Generator(device=DEV).manual_seed(4), backend=backend)
    z = _logits(n, v, dtype, 2.0, seed=5)
    y = torch.randint(0, v, (n,), device=DEV)
    y[::5] = -100
    kw = dict(tail=tail, hard_weight=hard, label_smoothing=0.1, soft_weight=0.8)
    for reduction in ("none", "mean"):
        loss, gz, go = _loss_grad(z, st, y, backend, reduction, **kw)
        loss_c, gz_c, _ = _loss_grad(z.cpu(), st.to("cpu"), y.cpu(), "cpu", reduction, go=go.cpu(), **kw)
        assert loss.dtype == torch.float32 and gz.dtype == dtype
        _close(loss, loss_c, 1e-5, f"{reduction} loss")
        gc = gz_c.double()
        err = (gz.double().cpu() - gc).abs()
        if dtype == torch.float32:
            assert float(err.max()) <= 1e-5 * float(gc.abs().max()), float(err.max())
        else:  # each side rounds twice into bf16 (the gradient, then its product with grad_output)
            assert (err <= 2 ** -6 * gc.abs() + 1e-6 * gc.abs().amax(-1, keepdim=True)).all()
        assert (gz[::5] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_loss_vs_float64_reference(backend):
    _need(backend)
    n, v, tau = 8, 32000, 1.5
    st = capture(_logits(n, v, seed=8), k=64, temperature=tau)
    z = _logits(n, v, torch.float32, 2.0, seed=9)
    y = torch.randint(0, v, (n,), device=DEV)
    y[3] = -100
    loss, gz, go = _loss_grad(z, st, y, backend, "none", hard_weight=0.5, label_smoothing=0.1)
    z64 = z.double().requires_grad_()
    rows = R.sparse_kd_rows(z64, st.ids, st.teacher_probs(torch.float64), y, tail=R.TAIL_BUCKET, temperature=tau,
                            soft_scale=tau * tau, hard_weight=0.5, ignore_index=-100, label_smoothing=0.1)
    (g64,) = torch.autograd.grad(rows, z64, go.double())
    _close(loss, rows, 1e-5, "loss")
    assert float((gz.double() - g64).abs().max()) <= 1e-5 * float(g64.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_loss_bad_rows(backend):
    _need(backend)
    v = 32000
    z = _logits(4, v, seed=10)
    st = capture(_logits(4, v, seed=11), k=8)
    ids, w = st.ids.clone(), st.teacher_probs()
    ids[1, 3] = ids[1, 0]  # repeated id
    y = torch.tensor([1, 2, -100, 3], device=DEV)
    loss = torch.empty(4, device=DEV)
    grad = torch.empty_like(z)
    _sparse_ops._SPARSE_KD_IMPLS[backend](z, ids, w, y, torch.tensor(1.0, device=DEV), loss, grad, R.TAIL_BUCKET,
                                          1.0, 1.0, 1.0, -100, 0.0)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert loss[2] == 0 and (grad[2] == 0).all()
    assert torch.isfinite(loss[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()


# ----------------------------------------------------------------------------------------------
# no host sync, torch.compile, memory
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_on_a_side_stream(backend):
    _need(backend)
    n, v = 16, 128256
    t = _logits(n, v, torch.bfloat16, seed=12)
    z = _logits(n, v, torch.bfloat16, 2.0, seed=13)
    y = torch.randint(0, v, (n,), device=DEV)

    def run():
        st = capture(t, k=64, backend=backend)
        ss = capture(t, mode="sample", num_samples=50, generator=torch.Generator(device=DEV).manual_seed(1),
                     backend=backend)
        out = []
        for teacher in (st, ss):
            zz = z.detach().clone().requires_grad_()
            loss = sparse_kd_loss(zz, teacher, y, hard_weight=0.5, backend=backend)
            loss.backward()
            out += [teacher.ids, loss.detach(), zz.grad]
        return out

    ref = run()  # warm-up: Triton compiles and autotunes (which synchronises) on first use
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
        try:
            got = run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    _need(backend)
    n, v = 8, 32000
    st = capture(_logits(n, v, seed=14), k=64, temperature=2.0, backend=backend)
    z = _logits(n, v, torch.bfloat16, 2.0, seed=15).requires_grad_()
    y = torch.randint(0, v, (n,), device=DEV)
    y[2] = -100

    def f(x, ids, values, lse):
        s = SparseTeacher("topk", ids, lse, values=values, temperature=2.0, vocab_size=v)
        return sparse_kd_loss(x, s, y, hard_weight=0.5, backend=backend)

    eager = f(z, st.ids, st.values, st.lse)
    (g_e,) = torch.autograd.grad(eager, z)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(z, st.ids, st.values, st.lse)
    (g_c,) = torch.autograd.grad(out, z)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_c.float(), g_e.float(), rtol=2 ** -8, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_loss_peak_memory_is_one_gradient_buffer(backend):
    _need(backend)
    n, v = 256, 128256
    st = capture(_logits(n, v, torch.bfloat16, seed=16), k=64)
    z = _logits(n, v, torch.bfloat16, 2.0, seed=17).requires_grad_()
    y = torch.randint(0, v, (n,), device=DEV)
    sparse_kd_loss(z, st, y, hard_weight=1.0, backend=backend).backward()  # warm-up (autotune)
    z.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sparse_kd_loss(z, st, y, hard_weight=1.0, backend=backend).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = n * v * z.element_size()
    assert extra <= grad_bytes + 4 * 1024 * 1024, f"peak {extra} bytes over inputs, gradient is {grad_bytes}"


def test_auto_prefers_a_gpu_kernel():
    if "cpu" not in _sparse_ops._SPARSE_KD_IMPLS:
        pytest.skip("fastkd._C not built")
    got = _sparse_ops.pick_backend("auto", DEV, _sparse_ops._SPARSE_KD_IMPLS)
    assert got in ("cuda", "triton"), got
    assert fastkd.capture(_logits(2, 1000), k=4).ids.device.type == "cuda"
