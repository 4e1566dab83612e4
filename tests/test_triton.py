"""The Triton kd kernel under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors.

Oracle: ``fastkd._reference`` in float64 on the same (dtype-rounded) inputs. The interpreter runs
the kernel in numpy, one program per row, with BLOCK = 128 (so V ~ 300 spans several chunks and a
masked tail); shapes stay tiny to keep this file well under a minute of CI time.
"""
from __future__ import annotations

import os
import subprocess
import sys

# Triton decides between compiling and interpreting when it is imported (its own tl.* helpers are
# decorated then), so the interpreter must be switched on before the first `import triton`. When
# another module of this session imported fastkd (and so triton) first, the cases run in a fresh
# child process instead (test_cases_in_a_fresh_interpreter_process).
_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
_SET_HERE = not _PRELOADED and os.environ.get("TRITON_INTERPRET") != "1"
if not _PRELOADED:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import fastkd  # noqa: E402
from fastkd import _ops, _reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf − inf in masked lanes
_interp = pytest.mark.skipif(_PRELOADED, reason="triton was imported before TRITON_INTERPRET=1; "
                             "these cases run in test_cases_in_a_fresh_interpreter_process")


@pytest.fixture(scope="module", autouse=True)
def _restore_env():
    """Later modules of the session must not see Triton as available on CPU tensors."""
    yield
    if _SET_HERE:
        os.environ.pop("TRITON_INTERPRET", None)


@pytest.mark.skipif(not _PRELOADED, reason="the cases run directly in this process")
def test_cases_in_a_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x",
                        "-p", "no:cacheprovider"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"child pytest failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    # every case ran (only this wrapper may be skipped in the child)
    assert " passed" in r.stdout and ", 1 skipped" in r.stdout.splitlines()[-1], r.stdout[-2000:]


RTOL = 1e-5


def _inputs(seed, n, v, *, scale=3.0, dtype=torch.float32, ignore_rows=(), mask_cols=0, target=True):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=g) if target else None
    if mask_cols:
        cols = torch.randperm(v, generator=g)[:mask_cols]
        if y is not None:
            cols = cols[~torch.isin(cols, y)]
        z[:, cols] = float("-inf")
        t[:, cols] = float("-inf")
    if y is not None:
        for r in ignore_rows:
            y[r] = -100
    return z, t, y


def _run(z, t, y, *, backend, teacher_grad=True, reduction="mean", grad_seed=0, **kw):
    """Loss and gradients of ``(loss * w).sum()`` for a fixed random w (grad_output != 1)."""
    zz = z.detach().clone().requires_grad_()
    tt = t.detach().clone().requires_grad_(teacher_grad)
    loss = fastkd.kd_loss(zz, tt, y, reduction=reduction, backend=backend, **kw)
    w = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed + 1)) + 0.5
    (loss * w.to(loss.dtype)).sum().backward()
    return loss.detach(), zz.grad, (tt.grad if teacher_grad else None)


def _oracle(z, t, y, **kw):
    return _run(z.double(), t.double(), y, backend="torch", **kw)


def _close(actual, expected, what, rtol=RTOL, floor=1e-2):
    actual = actual.double()
    # Entry-wise: rtol relative to the largest entry, at least `floor` for gradients (a peaked JSD
    # teacher gradient is p·(log(p/m) − S_p), a cancellation of O(1) terms that float32 resolves no
    # better than ~ulp(max |logit|/τ) absolute, whatever the kernel).
    scale = expected.abs().max().clamp_min(floor if expected.dim() > 1 else 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(scale), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _check_all(z, t, y, teacher_grad=True, **kw):
    got = _run(z, t, y, backend="triton", teacher_grad=teacher_grad, **kw)
    ref = _oracle(z, t, y, teacher_grad=teacher_grad, **kw)
    _close(got[0], ref[0], "loss")
    _close(got[1], ref[1], "student grad")
    if teacher_grad:
        _close(got[2], ref[2], "teacher grad")
    return got


@_interp
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("setting", [
    dict(),
    dict(temperature=2.0, hard_weight=0.5, soft_weight=0.7, label_smoothing=0.1),
    dict(temperature=0.7, hard_weight=1.0, softcap=5.0, beta=0.3, t2_scale=False),
], ids=["plain", "tau2_hard_ls", "softcap"])
def test_divergences_match_reference(divergence, setting):
    z, t, y = _inputs(1, 5, 300, ignore_rows=(2,))
    _check_all(z, t, y, divergence=divergence, **setting)


@_interp
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions_and_num_items(reduction):
    z, t, y = _inputs(2, 4, 257, ignore_rows=(0,))
    kw = dict(hard_weight=0.3, temperature=1.5)
    if reduction == "mean":
        kw["num_items"] = 7
    got = _check_all(z, t, y, reduction=reduction, **kw)
    if reduction == "none":
        assert got[0].shape == (4,) and got[0][0] == 0  # the ignored row
        assert torch.all(got[1][0] == 0) and torch.all(got[2][0] == 0)


@_interp
def test_soft_only_no_target_and_row_stride():
    # rows of a wider buffer (row stride 300 for V = 211): the kernel must honour the stride
    base_z, base_t, _ = _inputs(3, 4, 300, target=False)
    z, t = base_z[:, 40:251], base_t[:, 17:228]
    assert z.stride(0) == 300 and not z.is_contiguous()
    _check_all(z, t, None, divergence="reverse_kl", temperature=3.0)


@_interp
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_peaked_logits_and_masked_columns(divergence):
    """−inf columns (in both) add nothing: the oracle runs on the other columns only, since its
    autograd returns NaN through −inf entries; the masked columns' gradients must be exactly 0."""
    z, t, y = _inputs(4, 4, 240, scale=20.0, mask_cols=30, ignore_rows=(3,))
    cols = torch.isfinite(z[0])
    new_id = torch.cumsum(cols.long(), 0) - 1
    y_kept = torch.where(y == -100, y, new_id[y.clamp_min(0)])
    kw = dict(hard_weight=1.0, divergence=divergence, beta=0.8)
    got = _run(z, t, y, backend="triton", **kw)
    ref = _oracle(z[:, cols], t[:, cols], y_kept, **kw)
    _close(got[0], ref[0], "loss")
    # logits ~±60: float32 log-probabilities carry ~ulp(60) = 4e-6 absolute error
    _close(got[1][:, cols], ref[1], "student grad", floor=1.0)
    _close(got[2][:, cols], ref[2], "teacher grad", floor=1.0)
    assert (got[1][:, ~cols] == 0).all() and (got[2][:, ~cols] == 0).all()


@_interp
@pytest.mark.parametrize("v", [1, 2, 129])
def test_tiny_vocabularies(v):
    z, t, y = _inputs(5, 3, v)
    _check_all(z, t, y, hard_weight=1.0, label_smoothing=0.2, divergence="jsd")


@_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_twice_torch(dtype):
    """Error vs float64 at most 2x that of PyTorch's own kd idiom run in the same dtype."""
    z, t, y = _inputs(6, 4, 300, dtype=dtype, ignore_rows=(1,))
    kw = dict(temperature=2.0, hard_weight=0.5)
    got = _run(z, t, y, backend="triton", **kw)
    ref = _oracle(z, t, y, **kw)
    # PyTorch's own: the reference composed of torch ops, every op in `dtype`
    zz = z.clone().requires_grad_()
    tt = t.clone().requires_grad_()
    rows = _reference.kd_loss_rows(zz, tt, y, compute_dtype=dtype, **kw)
    own = rows.sum() / (y != -100).sum()
    w = torch.randn((), generator=torch.Generator().manual_seed(1)) + 0.5
    (own * w.to(dtype)).backward()
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for ours, torchs, exact, what in [(got[0], own.detach(), ref[0], "loss"), (got[1], zz.grad, ref[1], "student grad"),
                                      (got[2], tt.grad, ref[2], "teacher grad")]:
        err = (ours.double() - exact).abs().max()
        err_torch = (torchs.double() - exact).abs().max()
        assert err <= 2 * err_torch + 1e-7, f"{what}: {float(err)} vs torch's {float(err_torch)}"


def _direct(z, t, y, *, divergence=0, hard_weight=1.0, teacher_grad=True, divisor=1.0):
    """Call the registered impl directly (bypasses kd_loss's CPU-side target range check)."""
    n, _ = z.shape
    loss = torch.empty(n)
    gs = torch.empty_like(z)
    gt = torch.empty_like(t) if teacher_grad else None
    p = _ops.KDParams(temperature=1.0, soft_scale=1.0, hard_weight=hard_weight, divergence=divergence,
                      beta=0.5, ignore_index=-100, label_smoothing=0.0, softcap=0.0, has_target=y is not None)
    _ops._KD_IMPLS["triton"](z, t, y, torch.tensor(divisor), loss, gs, gt, p)
    return loss, gs, gt


@_interp
def test_bad_target_and_nan_inputs_give_nan():
    z, t, y = _inputs(7, 4, 130)
    y[1] = 130  # out of [0, V) and not ignore_index
    y[2] = -100
    z[3, 5] = float("nan")
    loss, gs, gt = _direct(z, t, y)
    assert torch.isnan(loss[1]) and torch.isnan(gs[1]).all() and torch.isnan(gt[1]).all()
    assert loss[2] == 0 and (gs[2] == 0).all() and (gt[2] == 0).all()
    assert torch.isnan(loss[3])
    assert torch.isfinite(loss[0]) and torch.isfinite(gs[0]).all()


@_interp
def test_divisor_is_read_from_the_tensor_and_results_are_deterministic():
    z, t, y = _inputs(8, 3, 200)
    a = _direct(z, t, y, divisor=1.0, divergence=2)
    b = _direct(z, t, y, divisor=4.0, divergence=2)
    c = _direct(z, t, y, divisor=4.0, divergence=2)
    torch.testing.assert_close(b[0] * 4, a[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(b[1] * 4, a[1], rtol=1e-6, atol=1e-12)
    for x, x2 in zip(b, c):
        assert torch.equal(x, x2)


@_interp
def test_auto_never_picks_triton_on_cpu():
    assert _ops.resolve_backend("auto", torch.device("cpu")) in ("cpu", "torch")


@_interp
def test_scale_rows_skips_unit_factors():
    from fastkd._triton.kd import scale_rows_

    x = torch.randn(4, 300).to(torch.bfloat16)
    g = torch.tensor([1.0, 2.5, 1.0, -0.75])
    want = (x.float() * g.unsqueeze(1)).to(torch.bfloat16)
    got = scale_rows_(x.clone(), g)
    # (within one bf16 ulp: the interpreter's float32 -> bf16 cast need not round to nearest)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0)
    assert torch.equal(got[0], x[0]) and torch.equal(got[2], x[2])
    assert torch.equal(scale_rows_(x.clone(), torch.tensor(1.0)), x)  # broadcast 0-d factor
