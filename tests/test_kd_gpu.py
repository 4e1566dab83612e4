"""The GPU backends of kd_loss ("cuda" and "triton") at real vocabulary sizes, against the float64
reference (``fastkd._reference``, run on the GPU in float64). Skipped without a CUDA device.

float32: within 1e-5 relative (gradients: relative to the largest entry, floor 1e-7 absolute).
bf16/fp16: error vs float64 no worse than 2x that of PyTorch's own ops in the same dtype.
"""
from __future__ import annotations

import os

import pytest
import torch

import fastkd
from fastkd import _ops, _reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = torch.device("cuda")
RTOL = 1e-5


def _backends():
    out = []
    if torch.cuda.is_available():
        for b in ("cuda", "triton"):
            if b == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
                continue
            if _ops.backend_available(b, DEV):
                out.append(b)
    return out or ["cuda", "triton"]  # (reported as failures on a GPU machine without them)


BACKENDS = _backends()


def _inputs(seed, n, v, *, scale=3.0, dtype=torch.float32, ignore_every=5, mask_cols=0, target=True):
    g = torch.Generator(device=DEV).manual_seed(seed)
    z = (torch.randn(n, v, generator=g, device=DEV) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g, device=DEV) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=g, device=DEV) if target else None
    if mask_cols:
        cols = torch.randperm(v, generator=g, device=DEV)[:mask_cols]
        if y is not None:
            cols = cols[~torch.isin(cols, y)]
        z[:, cols] = float("-inf")
        t[:, cols] = float("-inf")
    if y is not None and ignore_every:
        y[1::ignore_every] = -100
    return z, t, y


def _run(z, t, y, *, backend, teacher_grad=True, reduction="mean", **kw):
    zz = z.detach().clone().requires_grad_()
    tt = t.detach().clone().requires_grad_(teacher_grad)
    loss = fastkd.kd_loss(zz, tt, y, reduction=reduction, backend=backend, **kw)
    w = torch.rand(loss.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(7)) + 0.5
    (loss * w.to(loss.dtype)).sum().backward()
    return loss.detach(), zz.grad, (tt.grad if teacher_grad else None)


def _oracle(z, t, y, **kw):
    return _run(z.double(), t.double(), y, backend="torch", **kw)


def _torch_own(z, t, y, *, reduction="mean", teacher_grad=True, num_items=None, **kw):
    """PyTorch's own ops in the input dtype (the bf16/fp16 error yardstick)."""
    zz = z.detach().clone().requires_grad_()
    tt = t.detach().clone().requires_grad_(teacher_grad)
    rows = _reference.kd_loss_rows(zz, tt, y, compute_dtype=z.dtype, **kw)
    if reduction == "mean":
        count = (y != kw.get("ignore_index", -100)).sum() if y is not None else rows.shape[0]
        loss = rows.sum() / (num_items if num_items is not None else count)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows
    w = torch.rand(loss.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(7)) + 0.5
    (loss * w.to(loss.dtype)).sum().backward()
    return loss.detach(), zz.grad, (tt.grad if teacher_grad else None)


def _close(actual, expected, what, rtol=RTOL, floor=1e-2):
    actual = actual.double()
    # (gradients: at least `floor` as the scale; a peaked JSD teacher gradient is a cancellation of
    # O(1) float32 terms, resolvable to ~ulp(max |logit|/τ) absolute only)
    scale = expected.abs().max().clamp_min(floor if expected.dim() > 1 else 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(scale), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _check(z, t, y, *, backend, teacher_grad=True, **kw):
    got = _run(z, t, y, backend=backend, teacher_grad=teacher_grad, **kw)
    ref = _oracle(z, t, y, teacher_grad=teacher_grad, **kw)
    names = ("loss", "student grad", "teacher grad")
    if z.dtype == torch.float32:
        for g, r, name in zip(got, ref, names):
            if g is not None:
                _close(g, r, name)
    else:
        own = _torch_own(z, t, y, teacher_grad=teacher_grad, **kw)
        for g, o, r, name in zip(got, own, ref, names):
            if g is None:
                continue
            assert g.dtype == (torch.float32 if name == "loss" else z.dtype)
            err = (g.double() - r).abs().max()
            err_own = (o.double() - r).abs().max()
            assert err <= 2 * err_own + 1e-7, f"{name}: {float(err)} vs PyTorch's own {float(err_own)}"
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [32000, 128256, 256000, 50257, 1271])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_real_vocab_sizes(backend, v, divergence, dtype):
    z, t, y = _inputs(v % 97, 12, v, dtype=dtype)
    _check(z, t, y, backend=backend, divergence=divergence, hard_weight=0.5, temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("setting", [
    dict(),
    dict(temperature=1.0, hard_weight=1.0, label_smoothing=0.1),
    dict(temperature=0.5, hard_weight=0.3, soft_weight=2.0, softcap=30.0, t2_scale=False, beta=0.2),
    dict(reduction="sum", temperature=3.0),
    dict(reduction="none", hard_weight=1.0),
    dict(num_items=37, hard_weight=1.0, beta=0.9),
], ids=["plain", "tau1_ls", "softcap", "sum", "none", "num_items"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_settings(backend, divergence, setting, dtype):
    z, t, y = _inputs(11, 9, 32003, dtype=dtype)
    _check(z, t, y, backend=backend, divergence=divergence, **setting)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_only_peaked_and_masked(backend):
    z, t, _ = _inputs(3, 6, 50257, scale=20.0, target=False)
    _check(z, t, None, backend=backend, divergence="reverse_kl")
    # −inf columns in both: the oracle (whose autograd gives NaN through them) runs on the rest
    z, t, y = _inputs(4, 6, 32000, scale=20.0, mask_cols=3000)
    cols = torch.isfinite(z[0])
    new_id = torch.cumsum(cols.long(), 0) - 1
    y_kept = torch.where(y == -100, y, new_id[y.clamp_min(0)])
    for div in ("forward_kl", "jsd"):
        got = _run(z, t, y, backend=backend, divergence=div, hard_weight=1.0)
        ref = _oracle(z[:, cols], t[:, cols], y_kept, divergence=div, hard_weight=1.0)
        _close(got[0], ref[0], "loss")
        _close(got[1][:, cols], ref[1], "student grad", floor=1.0)
        _close(got[2][:, cols], ref[2], "teacher grad", floor=1.0)
        assert (got[1][:, ~cols] == 0).all() and (got[2][:, ~cols] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_row_strides_and_misalignment(backend, dtype):
    """Rows of wider buffers: aligned (vector path), equally misaligned, and differently misaligned
    (scalar path) student and teacher rows."""
    wide_z, wide_t, _ = _inputs(5, 7, 32768 + 64, dtype=dtype, target=False)
    y = torch.randint(0, 32001, (7,), device=DEV)
    for oz, ot in [(0, 0), (3, 3), (1, 6)]:
        z, t = wide_z[:, oz:oz + 32001], wide_t[:, ot:ot + 32001]
        _check(z, t, y, backend=backend, hard_weight=1.0, divergence="jsd")


def _direct(backend, z, t, y, *, divergence=0, divisor=1.0, teacher_grad=True):
    n = z.shape[0]
    loss = torch.empty(n, device=DEV)
    gs = torch.empty_like(z)
    gt = torch.empty_like(t) if teacher_grad else None
    p = _ops.KDParams(temperature=1.0, soft_scale=1.0, hard_weight=1.0, divergence=divergence, beta=0.5,
                      ignore_index=-100, label_smoothing=0.0, softcap=0.0, has_target=y is not None)
    _ops._KD_IMPLS[backend](z, t, y, torch.tensor(divisor, device=DEV), loss, gs, gt, p)
    return loss, gs, gt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", [0, 1, 2])
def test_ignored_bad_target_nan_and_determinism(backend, divergence):
    z, t, y = _inputs(8, 6, 128256, dtype=torch.bfloat16, ignore_every=0)
    y[1] = 128256      # out of range, not ignore_index
    y[2] = -100        # ignored
    z[3, 77] = float("nan")
    a = _direct(backend, z, t, y, divergence=divergence, divisor=3.0)
    b = _direct(backend, z, t, y, divergence=divergence, divisor=3.0)
    for x, x2 in zip(a, b):  # bitwise reproducible
        assert torch.equal(x.nan_to_num(7.0), x2.nan_to_num(7.0))
    loss, gs, gt = a
    assert torch.isnan(loss[1]) and torch.isnan(gs[1].float()).all() and torch.isnan(gt[1].float()).all()
    assert loss[2] == 0 and (gs[2] == 0).all() and (gt[2] == 0).all()
    assert torch.isnan(loss[3])
    ok = [0, 4, 5]
    assert torch.isfinite(loss[ok]).all() and torch.isfinite(gs[ok].float()).all()
    one = _direct(backend, z, t, y, divergence=divergence, divisor=1.0)
    torch.testing.assert_close(loss[ok] * 3.0, one[0][ok], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_side_stream_and_no_host_sync(backend):
    z, t, y = _inputs(9, 8, 32000)
    ref = _run(z, t, y, backend=backend, hard_weight=1.0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the loss raises
        try:
            got = _run(z, t, y, backend=backend, hard_weight=1.0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.current_stream().wait_stream(s)
    for g, r in zip(got, ref):
        assert torch.equal(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_and_compile(backend):
    z, t, y = _inputs(10, 4, 32000, dtype=torch.bfloat16)
    assert _ops.resolve_backend("auto", DEV) == BACKENDS[0]
    eager = _run(z, t, y, backend=backend, hard_weight=1.0)

    def f(a, b, c):
        return fastkd.kd_loss(a, b, c, hard_weight=1.0, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    zz = z.clone().requires_grad_()
    tt = t.clone().requires_grad_()
    loss = compiled(zz, tt, y)
    w = torch.rand((), device=DEV, generator=torch.Generator(device=DEV).manual_seed(7)) + 0.5
    (loss * w).backward()
    # (the compiled graph may sum the row losses in another order: not bitwise, but one rounding)
    torch.testing.assert_close(loss.detach(), eager[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(zz.grad.float(), eager[1].float(), rtol=2 ** -8, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peak_memory_is_one_gradient_buffer(backend):
    n, v = 256, 128256
    z, t, y = _inputs(12, n, v, dtype=torch.bfloat16)
    z.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fastkd.kd_loss(z, t, y, hard_weight=1.0, backend=backend)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = n * v * z.element_size()
    assert extra <= grad_bytes + 4 * 1024 * 1024, f"peak {extra} bytes over inputs, gradient is {grad_bytes}"


def test_cuda_shard_phases_merge_to_the_fused_loss():
    """kd_shard_cuda's stats / JSD sums / finish over two vocabulary slices == the fused kernel."""
    if "cuda" not in _ops._KD_IMPLS:
        pytest.skip("fastkd._C built without CUDA kernels")
    from fastkd import _cuda_impls
    from fastkd.distributed import merge_stats

    n, v, cut = 10, 50257, 20000
    z, t, y = _inputs(13, n, v, dtype=torch.bfloat16)
    for div in (0, 1, 2):
        p = _ops.KDParams(temperature=2.0, soft_scale=4.0, hard_weight=0.5, divergence=div, beta=0.3,
                          ignore_index=-100, label_smoothing=0.1, softcap=0.0, has_target=True)
        divisor = torch.tensor(7.0, device=DEV)
        fused = _direct_params("cuda", z, t, y, p, divisor)
        parts = [(0, cut), (cut, v)]
        stats = []
        for a, b in parts:
            st = torch.empty(n, 11, device=DEV)
            _cuda_impls.cuda_kd_shard(1, z[:, a:b], t[:, a:b], y, p, col_offset=a, vocab_total=v,
                                      stats_out=st)
            stats.append(st)
        merged = merge_stats(torch.stack(stats)).contiguous()
        jsd = None
        if div == 2:
            sums = []
            for a, b in parts:
                js = torch.empty(n, 2, device=DEV)
                _cuda_impls.cuda_kd_shard(2, z[:, a:b], t[:, a:b], y, p, col_offset=a, vocab_total=v,
                                          stats_in=merged, jsd_out=js)
                sums.append(js)
            jsd = (sums[0] + sums[1]).contiguous()
        gs = torch.empty_like(z)
        gt = torch.empty_like(t)
        loss = torch.empty(n, device=DEV)
        for a, b in parts:
            _cuda_impls.cuda_kd_shard(3, z[:, a:b], t[:, a:b], y, p, col_offset=a, vocab_total=v,
                                      divisor=divisor, loss=loss, grad_s=gs[:, a:b], grad_t=gt[:, a:b],
                                      stats_in=merged, jsd_in=jsd)
        torch.testing.assert_close(loss, fused[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs.float(), fused[1].float(), rtol=1e-2, atol=1e-6)
        torch.testing.assert_close(gt.float(), fused[2].float(), rtol=1e-2, atol=1e-6)


def _direct_params(backend, z, t, y, p, divisor):
    loss = torch.empty(z.shape[0], device=DEV)
    gs = torch.empty_like(z)
    gt = torch.empty_like(t)
    _ops._KD_IMPLS[backend](z, t, y, divisor, loss, gs, gt, p)
    return loss, gs, gt


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_offsets_past_2_31_elements(backend):
    """N·V > 2^31 (bf16, ~13 GB): the last rows must still be right."""
    n, v = 8400, 256000
    if torch.cuda.get_device_properties(DEV).total_memory < 24 * 2**30:
        pytest.skip("needs ~16 GB of GPU memory")
    g = torch.Generator(device=DEV).manual_seed(14)
    z = torch.randn(n, v, generator=g, device=DEV, dtype=torch.bfloat16)
    t = torch.randn(n, v, generator=g, device=DEV, dtype=torch.bfloat16)
    y = torch.randint(0, v, (n,), generator=g, device=DEV)
    loss = torch.empty(n, device=DEV)
    gs = torch.empty_like(z)
    p = _ops.KDParams(temperature=1.0, soft_scale=1.0, hard_weight=1.0, divergence=0, beta=0.5,
                      ignore_index=-100, label_smoothing=0.0, softcap=0.0, has_target=True)
    _ops._KD_IMPLS[backend](z, t, y, torch.tensor(1.0, device=DEV), loss, gs, None, p)
    tail = slice(n - 3, n)
    zd = z[tail].double().requires_grad_()
    rows = _reference.kd_loss_rows(zd, t[tail].double(), y[tail], hard_weight=1.0)
    rows.sum().backward()
    _close(loss[tail], rows.detach(), "loss", rtol=1e-4)
    err = (gs[tail].double() - zd.grad).abs().max()
    assert err <= 2 ** -8 * zd.grad.abs().max(), float(err)
    del z, t, gs
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_scale_rows_skips_unit_factors(dtype):
    """The backward helpers: grad[r] *= g[r] in place, rows with g == 1 untouched, any row stride."""
    from fastkd._triton.kd import scale_rows_ as triton_scale

    helpers = [triton_scale]
    if "cuda" in _ops._KD_IMPLS:
        from fastkd._cuda_impls import scale_rows_ as cuda_scale
        helpers.append(cuda_scale)
    g = torch.tensor([1.0, 2.5, 1.0, -0.75, 0.5], device=DEV)
    wide = torch.randn(5, 32001 + 8, device=DEV).to(dtype)
    for off in (0, 3):  # 16-byte aligned rows, and rows of a wider buffer at an odd offset
        x = wide[:, off:off + 32001]
        want = (x.float() * g[:, None]).to(dtype)
        for scale in helpers:
            buf = wide.clone()
            view = buf[:, off:off + 32001]
            scale(view, g)
            assert torch.equal(view, want), scale.__module__
            assert torch.equal(buf[:, :off], wide[:, :off]) and torch.equal(buf[:, off + 32001:], wide[:, off + 32001:])
            buf = wide.clone()
            scale(buf[:, off:off + 32001], torch.tensor(1.0, device=DEV))
            assert torch.equal(buf, wide)
