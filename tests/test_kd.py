"""The ``kd`` op family: ``fastkd.kd_loss`` / ``KDLoss`` on every backend against the float64 reference.

Part 1 runs on CPU tensors on every backend (``cpu``, ``torch``, ``triton`` under the interpreter,
``cuda_emu``: the CUDA kernels on the host emulation); part 2 holds what only the C++ kernel or the
op layer has (the full setting grid, in-place gradients, buffer hand-over, gradcheck, opcheck,
compile, host syncs, argument errors); part 3 runs the real ``cuda`` and ``triton`` backends on a
GPU at real vocabulary sizes (``gpu`` marker; skipped without a CUDA device).

Oracle: the reference rows of ``fastkd/_reference/kd.py`` in float64, reduced here.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_TENSOR_BACKENDS, GPU_BACKENDS, HAS_GPU, assert_close, assert_no_worse_than, grad_weights, logits

import fastkd
from fastkd._backends import registry
from fastkd._reference import kd as ref
from fastkd._settings import KernelParams, kd_settings

DIVS = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"]
REDS = ["mean", "sum", "none"]


# ------------------------------------------------------------------------------------------------
# Running the loss and its oracle
# ------------------------------------------------------------------------------------------------
def run(backend, z, t, y, grad_out=None, *, teacher_grad=True, **kw):
    """(loss, d student, d teacher) of ``(loss * grad_out).sum()`` (grad_out 1 if None)."""
    zz = z.detach().clone().requires_grad_(True)
    tt = t.detach().clone().requires_grad_(teacher_grad)
    loss = fastkd.kd_loss(zz, tt, y, backend=backend, **kw)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    (loss * g).sum().backward()
    return loss.detach(), zz.grad, (tt.grad if teacher_grad else None)


def oracle(z, t, y, grad_out=None, *, teacher_grad=True, reduction="mean", num_items=None, ignore_index=-100,
           **kw):
    """The same in float64 from the reference rows; the reduction is done here."""
    zd = z.detach().double().requires_grad_(True)
    td = t.detach().double().requires_grad_(teacher_grad)
    flat_y = None if y is None else y.reshape(-1)
    rows = ref.kd_loss_rows(zd.reshape(-1, z.shape[-1]), td.reshape(-1, t.shape[-1]), flat_y,
                            ignore_index=ignore_index, **kw)
    if reduction == "none":
        loss = rows.reshape(z.shape[:-1])
    elif reduction == "sum":
        loss = rows.sum()
    else:
        if num_items is not None:
            count = float(num_items)
        elif flat_y is None:
            count = float(max(rows.shape[0], 1))
        else:
            count = float(max(int((flat_y != ignore_index).sum()), 1))
        loss = rows.sum() / count
    g = torch.ones_like(loss) if grad_out is None else grad_out.double()
    (loss * g).sum().backward()
    return loss.detach(), zd.grad, (td.grad if teacher_grad else None)


# The bounds of part 1 against the float64 oracle (float32 inputs), on every backend: 1e-5 of each
# tensor's scale (gradients: a scale of at least 1e-2, see conftest.assert_close). Part 2 holds
# the C++ kernel to 1e-6 on its own grid.
def tol(backend, grad=False):
    return dict(rtol=1e-5, atol_frac=1e-5, floor=1e-2 if grad else 1e-30)


def check(backend, got, want, *, teacher=True, floor=None):
    for g, w, name in zip(got, want, ("loss", "student grad", "teacher grad")):
        if g is None or (name == "teacher grad" and not teacher):
            continue
        bounds = tol(backend, grad=name != "loss")
        if floor is not None and name != "loss":
            bounds["floor"] = floor
        assert_close(g, w, what=name, **bounds)


# ================================================================================================
# Part 1: every backend, CPU tensors
# ================================================================================================
SETTINGS = [
    dict(),
    dict(temperature=2.0, hard_weight=0.5, soft_weight=0.7, label_smoothing=0.1),
    dict(temperature=0.7, hard_weight=1.0, softcap=5.0, beta=0.3, skew=0.3, t2_scale=False),
]


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("setting", SETTINGS, ids=["plain", "tau2_hard_ls", "softcap"])
def test_settings_match_reference(use_backend, backend, divergence, setting):
    use_backend(backend)
    z, t, y = logits(5, 300, seed=1, ignore_rows=(2,))
    go = grad_weights((), seed=1)
    check(backend, run(backend, z, t, y, go, divergence=divergence, **setting),
          oracle(z, t, y, go, divergence=divergence, **setting))


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("reduction", REDS)
def test_reductions_and_num_items(use_backend, backend, reduction):
    use_backend(backend)
    z, t, y = logits(4, 257, seed=2, ignore_rows=(0,))
    kw = dict(hard_weight=0.3, temperature=1.5, reduction=reduction)
    if reduction == "mean":
        kw["num_items"] = 7
    go = grad_weights((4,) if reduction == "none" else (), seed=2)
    got = run(backend, z, t, y, go, **kw)
    check(backend, got, oracle(z, t, y, go, **kw))
    if reduction == "none":
        assert got[0].shape == (4,) and got[0][0] == 0  # the ignored row
        assert torch.all(got[1][0] == 0) and torch.all(got[2][0] == 0)


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("ignore_index", [-1, 7])
@pytest.mark.parametrize("reduction, num_items", [("mean", None), ("mean", 5), ("sum", None), ("none", None)])
def test_custom_ignore_index_under_every_reduction(use_backend, backend, ignore_index, reduction, num_items):
    """Rows whose target is ``ignore_index`` (not -100) contribute nothing and are not counted."""
    use_backend(backend)
    z, t, y = logits(9, 40, seed=60 + ignore_index)
    y[[1, 4, 6]] = ignore_index
    kw = dict(hard_weight=0.5, temperature=1.5, ignore_index=ignore_index, reduction=reduction)
    if num_items is not None:
        kw["num_items"] = num_items
    go = grad_weights((9,) if reduction == "none" else (), seed=61)
    got = run(backend, z, t, y, go, **kw)
    check(backend, got, oracle(z, t, y, go, **kw))
    assert (got[1][[1, 4, 6]] == 0).all() and (got[2][[1, 4, 6]] == 0).all()


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("reduction", REDS)
def test_all_ignored_batch(use_backend, backend, reduction):
    use_backend(backend)
    z, t, _ = logits(6, 50, seed=9)
    y = torch.full((6,), -100)
    loss, gs, gt = run(backend, z, t, y, reduction=reduction, hard_weight=1.0)
    assert torch.all(loss == 0)
    assert torch.all(gs == 0) and torch.all(gt == 0)


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
def test_soft_only_no_target_and_row_stride(use_backend, backend):
    """Rows of a wider buffer (row stride 300 for V = 211): the kernel honours the stride."""
    use_backend(backend)
    base_z, base_t, _ = logits(4, 300, seed=3, target=False)
    z, t = base_z[:, 40:251], base_t[:, 17:228]
    assert z.stride(0) == 300 and not z.is_contiguous()
    go = grad_weights((), seed=3)
    kw = dict(divergence="reverse_kl", temperature=3.0)
    check(backend, run(backend, z, t, None, go, **kw), oracle(z, t, None, go, **kw))


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
def test_peaked_logits_and_masked_columns(use_backend, backend, divergence):
    """−inf columns (in both) add nothing: the oracle runs on the other columns only, since its
    autograd returns NaN through −inf entries; the masked columns' gradients must be exactly 0."""
    use_backend(backend)
    z, t, y = logits(4, 240, seed=4, scale=20.0, mask_cols=30, ignore_rows=(3,))
    cols = torch.isfinite(z[0])
    new_id = torch.cumsum(cols.long(), 0) - 1
    y_kept = torch.where(y == -100, y, new_id[y.clamp_min(0)])
    kw = dict(hard_weight=1.0, divergence=divergence, beta=0.8)
    go = grad_weights((), seed=4)
    got = run(backend, z, t, y, go, **kw)
    want = oracle(z[:, cols], t[:, cols], y_kept, go, **kw)
    assert_close(got[0], want[0], what="loss", **tol(backend))
    # logits ~±60: float32 log-probabilities carry ~ulp(60) = 4e-6 absolute error
    assert_close(got[1][:, cols], want[1], what="student grad", **{**tol(backend, True), "floor": 1.0})
    assert_close(got[2][:, cols], want[2], what="teacher grad", **{**tol(backend, True), "floor": 1.0})
    assert (got[1][:, ~cols] == 0).all() and (got[2][:, ~cols] == 0).all()


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("v", [1, 2, 9, 129])
@pytest.mark.parametrize("teacher_grad", [True, False], ids=["teacher_grad", "frozen_teacher"])
def test_tiny_vocabularies(use_backend, backend, v, teacher_grad):
    use_backend(backend)
    z, t, y = logits(3, v, seed=5)
    for divergence in ("jsd", "reverse_kl"):
        kw = dict(hard_weight=1.0, label_smoothing=0.2, divergence=divergence)
        check(backend, run(backend, z, t, y, teacher_grad=teacher_grad, **kw),
              oracle(z, t, y, teacher_grad=teacher_grad, **kw), teacher=teacher_grad)


def _own_low_precision(z, t, y, grad_out=None, **kw):
    """PyTorch's own: the reference expression evaluated with every op in the inputs' dtype."""
    zz, tt = z.clone().requires_grad_(), t.clone().requires_grad_()
    rows = ref.kd_loss_rows(zz, tt, y, compute_dtype=z.dtype, **kw)
    loss = rows.sum() / (y != -100).sum()
    (loss * (1.0 if grad_out is None else grad_out.to(z.dtype))).backward()
    return loss.detach(), zz.grad, tt.grad


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("divergence", DIVS)
def test_low_precision_no_worse_than_twice_pytorch(use_backend, backend, dtype, divergence):
    """Error vs float64 at most 2× that of PyTorch's own ops in the same dtype."""
    use_backend(backend)
    z, t, y = logits(6, 300, seed=6, dtype=dtype, ignore_rows=(1,))
    kw = dict(temperature=2.0, hard_weight=0.5, divergence=divergence)
    got = run(backend, z, t, y, **kw)
    want = oracle(z, t, y, **kw)
    own = _own_low_precision(z, t, y, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    for g, o, w, name in zip(got, own, want, ("loss", "student grad", "teacher grad")):
        assert_no_worse_than(g, o, w, slack=1e-6 if backend == "cpu" else 1e-7, what=name)


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("offsets", [(0, 0), (3, 3), (1, 6)], ids=["aligned", "same_misalign", "mixed"])
def test_row_layouts(use_backend, backend, dtype, offsets):
    """Rows of wider buffers at 16-byte aligned, equally misaligned and differently misaligned
    offsets (GPU kernels: vector loads with a scalar head/tail, or scalar loads throughout)."""
    use_backend(backend)
    wide_z, wide_t, _ = logits(4, 700, seed=7, dtype=dtype, target=False)
    z, t = wide_z[:, offsets[0]:offsets[0] + 651], wide_t[:, offsets[1]:offsets[1] + 651]
    y = torch.tensor([5, 650, -100, 0])
    kw = dict(divergence="jsd", hard_weight=0.5, temperature=1.5, beta=0.6)
    got = run(backend, z, t, y, **kw)
    want = oracle(z, t, y, **kw)
    assert got[1].dtype == dtype
    if dtype == torch.float32:
        check(backend, got, want)
    else:  # one rounding of a float32 gradient to the input dtype
        assert_close(got[0], want[0], what="loss", **tol(backend))
        eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        if backend == "triton":  # the interpreter's float32 -> bf16/fp16 cast truncates: one ulp
            eps *= 2
        for g, w, name in ((got[1], want[1], "student grad"), (got[2], want[2], "teacher grad")):
            torch.testing.assert_close(g.double(), w, rtol=eps, atol=1e-6 * float(w.abs().max()) + 1e-7,
                                       msg=lambda m, name=name: f"{name}: {m}")


def _direct(backend, z, t, y, *, divergence=0, hard_weight=1.0, teacher_grad=True, divisor=1.0):
    """The backend's ``kd`` implementation called directly: no argument checks in front of it (so a
    target out of range reaches the kernel)."""
    impl = registry.implementation("kd", backend).fn
    loss = torch.empty(z.shape[0])
    gs = torch.empty_like(z)
    gt = torch.empty_like(t) if teacher_grad else None
    p = KernelParams(temperature=1.0, soft_scale=1.0, hard_weight=hard_weight, divergence=divergence, beta=0.5,
                     ignore_index=-100, label_smoothing=0.0, softcap=0.0)
    impl(z, t, y, torch.tensor(divisor), loss, gs, gt, p)
    return loss, gs, gt


FUSED = ("cpu", "triton", "cuda_emu")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("divergence", range(len(DIVS)), ids=DIVS)
def test_ignored_and_bad_targets_and_nan_rows(use_backend, backend, divergence):
    use_backend(backend)
    z, t, y = logits(4, 130, seed=8, dtype=torch.bfloat16)
    y[1] = 130   # out of [0, V) and not ignore_index
    y[2] = -100  # ignored
    z[3, 5] = float("nan")
    loss, gs, gt = _direct(backend, z, t, y, divergence=divergence)
    assert torch.isnan(loss[1]) and torch.isnan(gs[1].float()).all() and torch.isnan(gt[1].float()).all()
    assert loss[2] == 0 and (gs[2] == 0).all() and (gt[2] == 0).all()
    assert torch.isnan(loss[3])
    assert torch.isfinite(loss[0]) and torch.isfinite(gs[0].float()).all()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("divergence", DIVS)
def test_inplace_grad_equals_a_separate_gradient_buffer(use_backend, backend, divergence):
    """With the gradient written over the logits (inplace_grad, the fused linear loss), every
    kernel must read z — the target's logit included — before any thread overwrites it."""
    use_backend(backend)
    for seed in range(6):
        z, t, y = logits(7, 37, seed=40 + seed)
        kw = dict(hard_weight=0.3, divergence=divergence, reduction="none")
        want, want_grad, _ = run(backend, z, t, y, teacher_grad=False, **kw)
        zz = z.clone() * torch.ones((), requires_grad=True)
        got = fastkd.kd_loss(zz, t, y, inplace_grad=True, backend=backend, **kw)
        got.sum().backward()
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
        torch.testing.assert_close(zz.detach(), want_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_divisor_is_read_from_the_tensor_and_results_are_deterministic(use_backend, backend):
    use_backend(backend)
    z, t, y = logits(3, 200, seed=9)
    a = _direct(backend, z, t, y, divisor=1.0, divergence=2)
    b = _direct(backend, z, t, y, divisor=4.0, divergence=2)
    c = _direct(backend, z, t, y, divisor=4.0, divergence=2)
    torch.testing.assert_close(b[0] * 4, a[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(b[1] * 4, a[1], rtol=1e-6, atol=1e-12)
    for x, x2 in zip(b, c):  # bitwise reproducible
        assert torch.equal(x, x2)


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("divergence", DIVS)
def test_nan_input_gives_nan_loss(use_backend, backend, where, divergence):
    use_backend(backend)
    z, t, y = logits(4, 600, seed=13)
    (z if where == "student" else t)[2, 517] = math.nan
    loss = fastkd.kd_loss(z, t, y, divergence=divergence, reduction="none", hard_weight=0.5, backend=backend)
    assert math.isnan(loss[2].item())
    assert torch.isfinite(loss[[0, 1, 3]]).all()
    assert math.isnan(fastkd.kd_loss(z, t, y, divergence=divergence, backend=backend).item())


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
def test_nan_in_an_ignored_row_contributes_nothing(use_backend, backend):
    use_backend(backend)
    z, t, y = logits(4, 60, seed=14)
    z[1, 3] = math.nan
    y[1] = -100
    assert torch.isfinite(fastkd.kd_loss(z, t, y, hard_weight=1.0, backend=backend))


@pytest.mark.parametrize("backend", ("triton", "cuda_emu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_scale_rows_skips_unit_factors(use_backend, backend, dtype):
    """The GPU backward's in-place row scaling: grad[r] *= g[r], rows with g == 1 untouched, any row
    stride, a 0-d factor broadcast."""
    use_backend(backend)
    scale = registry.implementation("scale_rows", backend).fn
    g = torch.tensor([1.0, 2.5, 1.0, -0.75, 0.5])
    wide = torch.randn(5, 1008, generator=torch.Generator().manual_seed(8)).to(dtype)
    for off in (0, 3):
        buf = wide.clone()
        view = buf[:, off:off + 1000]
        want = (wide[:, off:off + 1000].float() * g[:, None]).to(dtype)
        scale(view, g)
        # (within one ulp of the dtype: the interpreter's float32 -> bf16/fp16 cast need not round to nearest)
        ulp = {torch.float32: 0.0, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
        torch.testing.assert_close(view.float(), want.float(), rtol=ulp, atol=0)
        assert torch.equal(view[0], wide[0, off:off + 1000]) and torch.equal(view[2], wide[2, off:off + 1000])
        assert torch.equal(buf[:, :off], wide[:, :off]) and torch.equal(buf[:, off + 1000:], wide[:, off + 1000:])
    buf = wide.clone()
    scale(buf, torch.tensor(1.0))
    assert torch.equal(buf, wide)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype, v", [(torch.bfloat16, 3333), (torch.float32, 1667)], ids=["bf16", "f32"])
@pytest.mark.parametrize("divergence", DIVS)
def test_long_rows_at_every_offset(use_backend, backend, dtype, v, divergence):
    """Rows long enough for the GPU kernels' steady-state loops (the CUDA kernel's two vectors per
    iteration, several Triton body chunks) and of an odd byte length, so that consecutive rows start
    at every offset from a 16-byte boundary (V = 50257 in bf16 does the same): a vector body with an
    element-wise head and tail. Against the oracle, and the gradient written over the logits
    (inplace_grad) bitwise equal to a separate buffer."""
    use_backend(backend)
    z, t, y = logits(5, v, seed=v + 3, dtype=dtype, ignore_rows=(2,))
    y[0] = v - 1  # the target in the tail of one row ...
    y[3] = 1      # ... and in the head of another
    kw = dict(divergence=divergence, hard_weight=0.5, temperature=1.5, label_smoothing=0.05)
    got = run(backend, z, t, y, **kw)
    want = oracle(z, t, y, **kw)
    if dtype == torch.float32:
        check(backend, got, want)
    else:
        assert_close(got[0], want[0], what="loss", **tol(backend))
        eps = 2.0 ** -7  # one rounding into bf16 (the interpreter truncates: one more ulp)
        for g, w, name in ((got[1], want[1], "student grad"), (got[2], want[2], "teacher grad")):
            torch.testing.assert_close(g.double(), w, rtol=eps, atol=1e-6 * float(w.abs().max()) + 1e-7,
                                       msg=lambda m, name=name: f"{name}: {m}")
    kw.update(reduction="none")
    want_rows, want_grad, _ = run(backend, z, t, y, teacher_grad=False, **kw)
    zz = z.clone() * torch.ones((), requires_grad=True)
    rows = fastkd.kd_loss(zz, t, y, inplace_grad=True, backend=backend, **kw)
    rows.sum().backward()
    assert torch.equal(rows.detach(), want_rows) and torch.equal(zz.detach(), want_grad)


@pytest.mark.parametrize("backend", FUSED)
def test_no_grad_forward_writes_no_gradient_on_every_fused_backend(use_backend, backend, monkeypatch):
    """Eval / torch.no_grad: the fused kernels run without a gradient buffer (cap "loss_only": the
    backend is handed grad_s = None and writes nothing N×V), with the same loss as a training step."""
    use_backend(backend)
    z, t, y = logits(6, 500, seed=31, ignore_every=5, dtype=torch.bfloat16)
    impl = registry.implementation("kd", backend)
    assert "loss_only" in impl.caps
    seen = []

    def spy(student, teacher, target, divisor, loss, grad_s, grad_t, p):
        seen.append((grad_s, grad_t))
        return impl.fn(student, teacher, target, divisor, loss, grad_s, grad_t, p)

    monkeypatch.setitem(registry._IMPLS, ("kd", backend),
                        registry.Impl(backend, "kd", spy, impl.devices, impl.dtypes, impl.caps))
    kw = dict(hard_weight=0.5, divergence="jsd", reduction="none")
    with torch.no_grad():
        loss = fastkd.kd_loss(z, t, y, backend=backend, **kw)
    assert seen == [(None, None)]
    train = fastkd.kd_loss(z.clone().requires_grad_(), t, y, backend=backend, **kw)
    assert seen[1][0] is not None
    assert torch.equal(loss, train.detach())


@pytest.mark.parametrize("backend", ("triton", "cuda_emu"))
def test_gpu_backward_rule_in_place_once_out_of_place_when_retained(use_backend, backend, monkeypatch):
    """The GPU backward (forced here on CPU tensors): a backward that runs once scales the stored
    gradient in place with the backend's scale_rows kernel; under retain_graph, repeated
    autograd.grad and gradcheck (which re-run the same node) the product is formed out of place, so
    the saved gradient is never scaled twice."""
    import fastkd._ops.kd as kd_ops

    use_backend(backend)
    monkeypatch.setattr(kd_ops, "_HOST_DEVICES", frozenset())
    impl = registry.implementation("scale_rows", backend)
    calls = []

    def spy(grad, g):
        calls.append(grad.data_ptr())
        return impl.fn(grad, g)

    monkeypatch.setitem(registry._IMPLS, ("scale_rows", backend),
                        registry.Impl(backend, "scale_rows", spy, impl.devices, impl.dtypes, impl.caps))
    z, t, y = logits(5, 300, seed=33, ignore_rows=(1,))
    kw = dict(hard_weight=0.4, temperature=2.0)
    # once: in place; the leaf's .grad is the kernel's buffer
    zz = z.clone().requires_grad_()
    fastkd.kd_loss(zz, t, y, backend=backend, **kw).backward()
    want = oracle(z, t, y, teacher_grad=False, **kw)
    assert len(calls) == 1 and zz.grad.data_ptr() == calls[0]
    assert_close(zz.grad, want[1], what="gradient scaled in place", **tol(backend, grad=True))
    # retain_graph: out of place, and the second backward adds the same gradient again
    calls.clear()
    zz = z.clone().requires_grad_()
    loss = fastkd.kd_loss(zz, t, y, backend=backend, **kw) * 0.5
    loss.backward(retain_graph=True)
    assert calls == []
    first = zz.grad.clone()
    loss.backward()  # the last use of the saved gradient: in place again
    assert len(calls) == 1
    torch.testing.assert_close(zz.grad, 2 * first, rtol=0, atol=0)
    assert_close(first, 0.5 * want[1], what="retained graph", **tol(backend, grad=True))
    # repeated autograd.grad with different grad_outputs on one graph
    calls.clear()
    zz = z.clone().requires_grad_()
    rows = fastkd.kd_loss(zz, t, y, backend=backend, reduction="none", **kw)
    for seed in (1, 2):
        go = grad_weights((5,), seed=seed)
        (g,) = torch.autograd.grad(rows, zz, go.float(), retain_graph=True)
        want_g = oracle(z, t, y, go, teacher_grad=False, reduction="none", **kw)[1]
        assert_close(g, want_g, what=f"autograd.grad #{seed}", **tol(backend, grad=True))
    assert calls == []
    # gradcheck (float32, so loose bounds: it catches a gradient scaled twice, not rounding)
    zs, ts, ys = logits(2, 9, seed=34, scale=1.0)

    def f(a, b):
        return fastkd.kd_loss(a, b, ys, hard_weight=0.4, temperature=2.0, reduction="none", backend=backend)

    with warnings.catch_warnings():  # gradcheck's advice to use float64 inputs
        warnings.filterwarnings("ignore", message="Input #.* is not a double precision")
        assert torch.autograd.gradcheck(f, (zs.requires_grad_(), ts.requires_grad_()), eps=1e-2, atol=2e-3,
                                        rtol=2e-2)


def test_triton_autotuner_benchmarks_every_config_on_the_logits(use_backend, monkeypatch):
    """With inplace_grad the gradient overwrites the student logits, and the autotuner runs every
    config on the same arguments: each run must start from the logits (restore_value), not from the
    previous config's gradient. The interpreter never autotunes, so two configs and a benchmark
    that runs each kernel twice are put in for the test."""
    import triton

    use_backend("triton")
    from fastkd._backends.triton import kd as tk

    kernel = tk._kd_rows_kernel
    assert "z_ptr" in kernel.restore_value
    runs = []

    def bench(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        runs.append(1)
        return [float(len(runs))] * 3

    monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK": 64}, num_warps=4),
                                            triton.Config({"BLOCK": 128}, num_warps=4)])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setitem(kernel.__dict__, "do_bench", bench)
    z, t, y = logits(4, 203, seed=35)
    kw = dict(hard_weight=0.3, divergence="jsd", reduction="none")
    want_rows, want_grad, _ = run("cpu", z, t, y, teacher_grad=False, **kw)
    zz = z.clone() * torch.ones((), requires_grad=True)
    rows = fastkd.kd_loss(zz, t, y, inplace_grad=True, backend="triton", **kw)
    rows.sum().backward()
    assert len(runs) == 2 and len(kernel.configs_timings) == 2  # both configs were benchmarked
    assert_close(rows.detach(), want_rows, what="loss after autotuning", **tol("triton"))
    assert_close(zz.detach(), want_grad, what="in-place gradient after autotuning", **tol("triton", grad=True))


def test_cuda_launcher_restores_the_callers_device_when_it_throws(cuda_emulation):
    """The kd launcher makes the tensors' device current and puts the caller's back on every way
    out: a bad divergence code throws inside the launch, and the current device is still the
    caller's afterwards (emulated runtime: cudaSetDevice only records the device)."""
    lib = cuda_emulation.lib
    z, t, y = logits(2, 64, seed=36)
    loss, gs = torch.empty(2), torch.empty_like(z)
    good = KernelParams(temperature=1.0, soft_scale=1.0, hard_weight=0.0, divergence=0, beta=0.5,
                        ignore_index=-100, label_smoothing=0.0, softcap=0.0)
    lib.emu_set_device(0)
    cuda_emulation.kd(z, t, y, torch.tensor(1.0), loss, gs, None, good, device=1)
    assert lib.emu_current_device() == 0
    with pytest.raises(RuntimeError, match="kd failed"):
        cuda_emulation.kd(z, t, y, torch.tensor(1.0), loss, gs, None, good._replace(divergence=7), device=1)
    assert lib.emu_current_device() == 0
    with pytest.raises(RuntimeError, match="kd failed"):  # a bad mode throws before the scope: same
        cuda_emulation.kd(z, t, y, torch.tensor(1.0), loss, gs, None, good, device=1, mode=9)
    assert lib.emu_current_device() == 0


def test_auto_never_picks_triton_or_the_emulation_on_cpu():
    assert registry.resolve("kd", "auto", torch.device("cpu")) == "cpu"


# ================================================================================================
# Part 2: the C++ kernel's full grid, and what the op layer does
# ================================================================================================
def check_against_torch32(z, t, y, **kw):
    """Where float32 itself is the limit (peaked or saturated logits: the rounding of z/τ ~ 1e2 is
    ~1e-5 absolute), hold the kernel to no worse than 2× PyTorch's own float32 error on the same
    inputs, plus a 1e-7-of-scale floor."""
    got = run("cpu", z, t, y, **kw)
    p32 = run("torch", z, t, y, **kw)
    want = oracle(z, t, y, **kw)
    assert torch.isfinite(got[0]).all()
    for name, g, mine, w in zip(("loss", "student grad", "teacher grad"), got, p32, want):
        err = (g.double() - w).abs().max().item()
        ref_err = (mine.double() - w).abs().max().item()
        assert err <= 2 * ref_err + 1e-7 * w.abs().max().item() + 1e-12, f"{name}: {err:.3e} vs torch {ref_err:.3e}"


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cpu_grid_matches_reference(divergence, reduction, temperature, label_smoothing):
    z, t, y = logits(13, 257, seed=int(temperature * 10) + len(divergence), ignore_every=5)
    kw = dict(temperature=temperature, soft_weight=0.7, hard_weight=0.4, divergence=divergence,
              beta=0.3, label_smoothing=label_smoothing, reduction=reduction)
    go = torch.rand(13) + 0.5 if reduction == "none" else torch.tensor(1.7)
    got = run("cpu", z, t, y, go, **kw)
    want = oracle(z, t, y, go, **kw)
    assert got[0].dtype == torch.float32
    assert_close(got[0], want[0], what="loss")
    assert_close(got[1], want[1], what="student grad")
    # The teacher gradients of the divergences with a sums pass subtract a row sum from an O(1) term
    # (JSD: β·p_j·(log p_j/m_j − S_p); TVD: ½·p_j·(sgn_j − Σ p·sgn)): at the teacher's argmax with a
    # small τ (p ≈ 1) the two cancel, and float32 leaves ~1e-7 absolute there, ~1.5e-5 of the max.
    sums = divergence in ("jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
    assert_close(got[2], want[2], atol_frac=3e-5 if sums else 1e-6, what="teacher grad")


@pytest.mark.parametrize("shape", [(41, 1271), (252, 507), (3, 1), (5, 2), (4, 50257)])
@pytest.mark.parametrize("divergence", DIVS)
def test_cpu_odd_shapes_and_vocab_sizes(shape, divergence):
    n, v = shape
    z, t, y = logits(n, v, seed=v, ignore_every=5)
    kw = dict(temperature=2.0, soft_weight=1.0, hard_weight=0.5, divergence=divergence)
    got = run("cpu", z, t, y, **kw)
    want = oracle(z, t, y, **kw)
    assert_close(got[0], want[0], what="loss", floor=1.0)
    # One column: every divergence and its exact gradient are 0. The KLs' gradients are exact
    # differences (q − p = 0); skew KL's row sums round to 1 ± ulp, leaving ~3e-8 of a gradient whose
    # other terms are O(1): bounded on that O(1) scale.
    floor = 1.0 if v == 1 and divergence.startswith("skew_") else 1e-30
    assert_close(got[1], want[1], what="student grad", floor=floor)
    assert_close(got[2], want[2], what="teacher grad", floor=floor)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_cpu_peaked_logits(divergence, temperature):
    z, t, y = logits(17, 999, scale=20.0, seed=3, ignore_every=5)
    check_against_torch32(z, t, y, temperature=temperature, soft_weight=1.0, hard_weight=1.0, divergence=divergence)


@pytest.mark.parametrize("divergence", DIVS)
def test_cpu_softcap(divergence):
    z, t, y = logits(9, 300, scale=20.0, seed=4, ignore_every=5)
    check_against_torch32(z, t, y, temperature=1.5, hard_weight=0.3, softcap=15.0, divergence=divergence,
                          label_smoothing=0.05)


@pytest.mark.parametrize("divergence", DIVS)
def test_cpu_masked_columns(divergence):
    """−inf in both logits at the same columns (e.g. a padded vocabulary) is skipped."""
    z, t, y = logits(7, 120, seed=11, ignore_every=5)
    z[:, 100:] = -math.inf
    t[:, 100:] = -math.inf
    y = y.clamp(max=99)
    kw = dict(temperature=1.3, hard_weight=0.5, divergence=divergence)
    got = run("cpu", z, t, y, **kw)
    want = oracle(z, t, y, **kw)
    assert all(torch.isfinite(x).all() for x in got)
    assert torch.all(got[1][:, 100:] == 0)
    assert_close(got[0], want[0], what="loss")
    assert_close(got[1], want[1], what="student grad")


@pytest.mark.parametrize("divergence", DIVS)
def test_cpu_one_side_masked_in_whole_chunks(divergence):
    """A teacher (or student) that is −inf over whole 512-column chunks before its first finite
    value: the other side's sums must still accumulate there."""
    z, t, y = logits(3, 5000, seed=30, ignore_every=5)
    t[:, :3000] = -math.inf
    loss = fastkd.kd_loss(z, t, y, hard_weight=0.5, divergence=divergence, reduction="none", backend="cpu")
    want = oracle(z, t, y, teacher_grad=False, hard_weight=0.5, divergence=divergence, reduction="none")[0]
    assert_close(loss, want, what="loss (teacher masked)")
    z2 = z.clone()
    z2[:, :3000] = -math.inf
    y2 = y.clamp(min=3000)
    t2 = t.clone().fill_(0) + z
    loss = fastkd.kd_loss(z2, t2, y2, divergence=divergence, reduction="none", backend="cpu")
    want = fastkd.kd_loss(z2.double(), t2.double(), y2, divergence=divergence, reduction="none", backend="torch")
    assert_close(loss, want, what="loss (student masked)")


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0], ids=["tau1", "tau2_pow", "tau3"])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["frozen_teacher", "teacher_grad"])
def test_cpu_later_passes_from_the_kept_exponentials(divergence, temperature, teacher_grad):
    """Pass 1 keeps exp(s − M) per 512-column chunk, M the running maximum then, and the later passes
    rescale it per chunk. Rows built so that M moves a lot: one side −inf over the first chunks,
    a small-valued start, a maximum 60 above it in a late chunk, a masked tail; and a row whose
    maximum sits in the first chunk. Loss and both gradients against the float64 oracle."""
    z, t, y = logits(6, 3000, seed=31, ignore_every=4)
    # one side without mass over two whole chunks: the side whose zero mass there keeps the
    # divergence finite (forward KL: the teacher; reverse KL: the student)
    (z if divergence == "reverse_kl" else t)[0, :1100] = -math.inf
    y[0] = 2000
    z[1, :600] = -math.inf           # both sides without mass over the first chunk
    t[1, :600] = -math.inf
    y[1] = 2000
    z[2, :] *= 0.01
    z[2, 2600] = 60.0                # the student's maximum jumps in the sixth chunk
    t[3, 2999] = 40.0                # the teacher's in the last element
    z[4, 3] = 30.0                   # in the first chunk: every later factor is exp(0 − log d)
    z[5, 2800:] = -math.inf          # a masked tail on both sides
    t[5, 2800:] = -math.inf
    y[5] = min(int(y[5]), 2799)
    kw = dict(temperature=temperature, hard_weight=0.5, divergence=divergence)  # no smoothing: −inf columns
    got = run("cpu", z, t, y, teacher_grad=teacher_grad, **kw)
    want = oracle(z, t, y, teacher_grad=teacher_grad, **kw)
    assert all(torch.isfinite(x).all() for x in got if x is not None)
    assert torch.all(got[1][5, 2800:] == 0)
    check("cpu", got[:2], want[:2])
    if teacher_grad:
        # skew KL's teacher gradient p_j·(log(p_j/m_j) − w·p_j/m_j + c) is a small difference of O(1)
        # terms where the student is far more peaked than the teacher (row 2): ~2e-7 absolute in
        # float32, as for the other sums divergences in test_cpu_grid_matches_reference
        frac = 3e-5 if divergence.startswith("skew_") else 1e-5
        assert_close(got[2], want[2], rtol=1e-5, atol_frac=frac, floor=1e-2, what="teacher grad")


def test_cpu_results_do_not_depend_on_the_thread_count():
    """Threads take rows in blocks on demand; every row is computed by one thread in a fixed order,
    so any thread count gives the same bits. Also checks that a thread's kept exponentials from a
    wider call never leak into a narrower one."""
    z, t, y = logits(97, 2100, seed=32, ignore_every=6)
    kw = dict(temperature=2.0, hard_weight=0.5, divergence="jsd")
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(run("cpu", z, t, y, **kw))
            run("cpu", z[:, :700], t[:, :700], y.clamp(max=699), **kw)  # a narrower row in between
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
    check("cpu", outs[0], oracle(z, t, y, **kw))


def test_cpu_student_minus_inf_where_teacher_has_mass_is_inf():
    z, t, _ = logits(3, 20, seed=12)
    z[1, 4] = -math.inf
    loss = fastkd.kd_loss(z, t, reduction="none", backend="cpu")
    assert math.isinf(loss[1].item()) and loss[1].item() > 0
    assert torch.isfinite(loss[0]) and torch.isfinite(loss[2])


def test_matches_the_hand_written_idiom():
    """Same number and gradient as the usual idiom (no ignored labels)."""
    z, t, y = logits(32, 1000, seed=5)
    T = 2.0
    loss, gs, _ = run("cpu", z, t, y, teacher_grad=False, temperature=T, soft_weight=0.5, hard_weight=0.5)
    s64 = z.double().requires_grad_()
    want = 0.5 * T * T * F.kl_div(F.log_softmax(s64 / T, -1), F.log_softmax(t.double() / T, -1),
                                  reduction="batchmean", log_target=True) + 0.5 * F.cross_entropy(s64, y)
    want.backward()
    assert_close(loss, want.detach(), what="loss")
    assert_close(gs, s64.grad, what="grad")


def test_docstring_expression_with_ignored_rows():
    z, t, y = logits(30, 333, seed=6, ignore_every=4)
    T, eps = 3.0, 0.1
    loss, _, _ = run("cpu", z, t, y, teacher_grad=False, temperature=T, soft_weight=0.8, hard_weight=0.2,
                     label_smoothing=eps)
    s64, t64 = z.double(), t.double()
    keep = y != -100
    kl = F.kl_div(F.log_softmax(s64 / T, -1), F.log_softmax(t64 / T, -1), reduction="none",
                  log_target=True).sum(-1)
    ce = F.cross_entropy(s64, y, ignore_index=-100, reduction="none", label_smoothing=eps)
    want = (0.8 * T**2 * kl + 0.2 * ce)[keep].sum() / keep.sum()
    assert_close(loss, want, what="loss")


def trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL's generalized_jsd_loss (batchmean over rows), transcribed from its formula."""
    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(m, t, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(m, s, reduction="none", log_target=True)
    return jsd.sum() / s.shape[0]


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_jsd_equals_trl(beta):
    z, t, _ = logits(11, 400, seed=7)
    loss = fastkd.kd_loss(z, t, divergence="jsd", beta=beta, temperature=2.0, t2_scale=False, backend="cpu")
    assert_close(loss, trl_generalized_jsd(z.double(), t.double(), beta, 2.0), what="loss")


def test_jsd_beta_endpoints_are_the_kls():
    z, t, y = logits(8, 100, seed=8, ignore_every=5)
    for beta, div in [(0.0, "forward_kl"), (1.0, "reverse_kl")]:
        a = fastkd.kd_loss(z, t, y, divergence="jsd", beta=beta, hard_weight=0.1, backend="cpu")
        b = fastkd.kd_loss(z, t, y, divergence=div, hard_weight=0.1, backend="cpu")
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Total variation and skew KL against the peers' published formulas
# ------------------------------------------------------------------------------------------------
def liger_tvd(p, q):
    """Liger-Kernel's TVD (its torch reference): ½·|p − q| on probability tensors, "batchmean"."""
    return (0.5 * (p - q).abs()).sum() / p.shape[0]


def distillkit_tvd(student_logits, teacher_ids, teacher_logprobs, mask, temperature):
    """DistillKit's sparse TVD with every teacher entry stored: ½·(Σ_ids |P − Q| + max(1 − Σ_ids Q, 0))
    per token, summed over the tokens the mask keeps."""
    q = torch.softmax(student_logits / temperature, -1).gather(-1, teacher_ids)
    p = teacher_logprobs.exp()
    per_token = 0.5 * ((p - q).abs().sum(-1) + (1.0 - q.sum(-1)).clamp_min(0.0))
    return (per_token * mask).sum()


def distillm_skew(student_logits, teacher_logits, labels, lam, reverse):
    """DistiLLM's skewed_forward_kl / skewed_reverse_kl (Ko et al. 2024), from their formulas: the
    forward one returns the cross-entropy −Σ p·log(λp + (1−λ)q) (the teacher's entropy dropped), the
    reverse one Σ q·(log q − log((1−λ)p + λq)); masked mean over tokens."""
    p = torch.softmax(teacher_logits, -1)
    q = torch.softmax(student_logits, -1)
    if reverse:
        x = (q * (torch.log((1 - lam) * p + lam * q) - torch.log_softmax(student_logits, -1))).sum(-1)
    else:
        x = (p * torch.log(lam * p + (1 - lam) * q)).sum(-1)
    keep = (labels != -100).to(x.dtype)
    return -(x * keep).sum() / keep.sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tvd_equals_liger_and_distillkit(temperature):
    z, t, y = logits(12, 300, seed=40, ignore_every=4, dtype=torch.float64)
    zd, td = z, t
    p, q = torch.softmax(td / temperature, -1), torch.softmax(zd / temperature, -1)
    ours = fastkd.kd_loss(z, t, divergence="tvd", temperature=temperature, t2_scale=False, backend="cpu")
    assert_close(ours, liger_tvd(p, q), rtol=1e-12, atol_frac=1e-12, what="TVD vs Liger")
    ids = torch.arange(300).expand(12, 300)
    keep = (y != -100).double()
    want = distillkit_tvd(zd, ids, torch.log_softmax(td / temperature, -1), keep, temperature)
    got = fastkd.kd_loss(z, t, y, divergence="tvd", temperature=temperature, t2_scale=False, reduction="sum",
                         backend="cpu")
    assert_close(got, want, rtol=1e-12, atol_frac=1e-12, what="TVD vs DistillKit")


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
def test_tvd_subgradient_is_zero_where_p_equals_q(use_backend, backend):
    """Swapping two teacher logits leaves every other column with p_i = q_i exactly. fastkd takes
    sgn(0) = 0 there (as ``torch.abs``'s backward): those columns enter the gradient only through the
    row term Σ q·sgn(p − q), whose tie columns add nothing; identical rows get a zero gradient."""
    use_backend(backend)
    z = torch.randn(3, 40, generator=torch.Generator().manual_seed(41))
    t = z.clone()
    t[0, [0, 1]] = z[0, [1, 0]]  # row 0: ties everywhere but columns 0 and 1
    t[1, [5, 30]] = z[1, [30, 5]]
    zz = z.clone().requires_grad_()
    loss = fastkd.kd_loss(zz, t, divergence="tvd", reduction="sum", backend=backend)
    loss.backward()
    q, p = torch.softmax(z.double(), -1), torch.softmax(t.double(), -1)
    sg = torch.sign(p - q)
    sg[p == q] = 0.0
    want = -0.5 * q * (sg - (q * sg).sum(-1, keepdim=True))
    assert torch.equal(zz.grad[2], torch.zeros(40))  # identical rows
    assert float(loss.detach()) == pytest.approx(float(0.5 * (p - q).abs().sum()), rel=1e-5)
    assert_close(zz.grad, want, floor=1e-2, what="TVD subgradient")
    # Liger's convention (sgn(0) = −1) would move every tie column by ½·q_j·Σ_tie q: a visible change
    liger_like = torch.where(p == q, -torch.ones_like(sg), sg)
    other = -0.5 * q * (liger_like - (q * liger_like).sum(-1, keepdim=True))
    assert (other - want)[:2].abs().max() > 1e-3


@pytest.mark.parametrize("lam", [0.1, 0.3])
@pytest.mark.parametrize("reverse", [False, True], ids=["skew_forward_kl", "skew_reverse_kl"])
def test_skew_kl_equals_distillm(lam, reverse):
    # float64 through the C++ kernel: agreement of the definitions, free of float32 rounding (the
    # float32 bounds of every divergence are the business of the tests above)
    z, t, y = logits(10, 250, seed=42, ignore_every=4, dtype=torch.float64)
    zd = z.clone().requires_grad_()
    want = distillm_skew(zd, t.double(), y, lam, reverse)
    (want_grad,) = torch.autograd.grad(want, zd)
    zz = z.clone().requires_grad_()
    div = "skew_reverse_kl" if reverse else "skew_forward_kl"
    got = fastkd.kd_loss(zz, t, y, divergence=div, skew=lam, backend="cpu")
    got.backward()
    if not reverse:  # DistiLLM returns KL(p‖m) + H(p): the same student gradient, a constant apart
        p = torch.softmax(t, -1)
        keep = (y != -100).double()
        entropy = ((-(p * torch.log(p)).sum(-1)) * keep).sum() / keep.sum()
        want = want - entropy
    assert_close(got, want.detach(), rtol=1e-12, atol_frac=1e-12, what="skew KL vs DistiLLM")
    assert_close(zz.grad, want_grad, rtol=1e-10, atol_frac=1e-12, what="skew KL gradient vs DistiLLM")


def test_skew_kl_endpoints_and_bound():
    z, t, y = logits(8, 100, seed=43, ignore_every=5)
    for div, plain in (("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        a = run("cpu", z, t, y, divergence=div, skew=0.0, hard_weight=0.1)
        b = run("cpu", z, t, y, divergence=plain, hard_weight=0.1)
        for x, w in zip(a, b):
            assert torch.equal(x, w)  # α = 0 is the plain KL, bit for bit
        loss, gz, gt = run("cpu", z, t, None, divergence=div, skew=1.0)  # m is the side itself: D = 0
        assert float(loss) == 0.0 and gz.abs().max() < 1e-7 and gt.abs().max() < 1e-7
    # KL(p‖αp + (1−α)q) <= log(1/α) however little mass the student puts where the teacher has it
    z2 = torch.full((2, 50), -30.0)
    z2[:, 0] = 30.0
    t2 = torch.zeros(2, 50)
    for alpha in (0.1, 0.5):
        rows = fastkd.kd_loss(z2, t2, divergence="skew_forward_kl", skew=alpha, reduction="none", backend="cpu")
        assert (rows <= math.log(1.0 / alpha) + 1e-5).all() and (rows > 0.5 * math.log(1.0 / alpha)).all()
    assert (fastkd.kd_loss(z2, t2, reduction="none", backend="cpu") > 50).all()


def test_custom_ignore_index_and_num_items():
    z, t, y = logits(10, 64, seed=10)
    y[3] = 7777
    loss = fastkd.kd_loss(z, t, y, hard_weight=1.0, ignore_index=7777, num_items=25, backend="cpu")
    want = oracle(z, t, y, hard_weight=1.0, ignore_index=7777, num_items=25)[0]
    assert_close(loss, want, what="loss")
    loss2 = fastkd.kd_loss(z, t, y, hard_weight=1.0, ignore_index=7777, num_items=torch.tensor(25.0), backend="cpu")
    torch.testing.assert_close(loss, loss2)


def test_leading_shape_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(15)
    wide_z = torch.randn(2, 5, 300, generator=g)
    wide_t = torch.randn(2, 5, 300, generator=g)
    z, t = wide_z[..., :257], wide_t[..., 10:267]  # row stride 300, unit column stride
    y = torch.randint(0, 257, (2, 5), generator=g)
    y[0, 1] = -100
    kw = dict(temperature=2.0, hard_weight=0.5, reduction="none")
    got = run("cpu", z, t, y, **kw)
    want = oracle(z, t, y, **kw)
    assert got[0].shape == (2, 5)
    assert_close(got[0], want[0], what="loss")
    assert_close(got[1], want[1], what="student grad")
    # a column-strided (transposed) input goes through a copy
    zt = torch.randn(257, 6, generator=g).t()
    tt = torch.randn(257, 6, generator=g).t()
    assert_close(fastkd.kd_loss(zt, tt, backend="cpu"), oracle(zt, tt, None, teacher_grad=False)[0],
                 what="transposed")


def test_teacher_without_grad_gets_none():
    z, t, y = logits(5, 40, seed=17, ignore_every=5)
    zz = z.clone().requires_grad_()
    tt = t.clone()
    fastkd.kd_loss(zz, tt, y, backend="cpu").backward()
    assert zz.grad is not None and tt.grad is None
    # a teacher that does require grad gets one (mutual learning)
    tt.requires_grad_()
    fastkd.kd_loss(zz, tt, y, backend="cpu").backward()
    assert tt.grad is not None and tt.grad.abs().sum() > 0


def test_inplace_grad_overwrites_student_storage():
    z, t, y = logits(12, 333, seed=18, ignore_every=5)
    w = torch.ones((), requires_grad=True)
    zh = z.clone() * w  # non-leaf student logits, as from a head
    loss = fastkd.kd_loss(zh, t, y, hard_weight=0.5, temperature=2.0, backend="cpu", inplace_grad=True)
    ptr = zh.data_ptr()
    (2.5 * loss).backward()
    want_loss, want_grad, _ = oracle(z, t, y, torch.tensor(2.5), hard_weight=0.5, temperature=2.0)
    assert_close(loss.detach(), want_loss, what="loss")
    assert_close(zh.detach(), want_grad, what="gradient written in place")
    assert zh.data_ptr() == ptr
    assert_close(w.grad, (want_grad * z.double()).sum(), rtol=1e-4, what="chain rule through the head")


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_second_backward_through_retained_graph(scale):
    z, t, y = logits(4, 30, seed=19, ignore_every=5)
    z.requires_grad_()
    loss = fastkd.kd_loss(z, t, y, backend="cpu") * scale
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * first)


def test_unit_grad_output_hands_over_the_buffer(monkeypatch):
    """loss.backward() needs no second N×V buffer: the leaf's .grad is the kernel's own buffer."""
    import fastkd._ops.kd as kd_op

    z, t, y = logits(64, 1000, seed=29, ignore_every=5)
    z.requires_grad_()
    handed = []
    orig = kd_op.scale_rows

    def spy(grad, g, backend):
        out = orig(grad, g, backend)
        handed.append((grad.data_ptr(), out.data_ptr()))
        return out

    monkeypatch.setattr(kd_op, "scale_rows", spy)
    fastkd.kd_loss(z, t, y, backend="cpu").backward()
    assert len(handed) == 1
    stored, returned = handed[0]
    assert returned == stored  # no copy for grad_output ≡ 1 ...
    assert z.grad.data_ptr() == stored  # ... and autograd took the buffer over as .grad


def test_no_grad_forward_writes_no_gradient(monkeypatch):
    """Under torch.no_grad the C++ kernel runs its statistics pass alone (cap "loss_only")."""
    z, t, y = logits(6, 500, seed=31, ignore_every=5)
    seen = []
    impl = registry.implementation("kd", "cpu")
    real = impl.fn

    def spy(student, teacher, target, divisor, loss, grad_s, grad_t, p):
        seen.append((grad_s, grad_t))
        return real(student, teacher, target, divisor, loss, grad_s, grad_t, p)

    monkeypatch.setitem(registry._IMPLS, ("kd", "cpu"), registry.Impl("cpu", "kd", spy, impl.devices, impl.dtypes,
                                                                       impl.caps))
    with torch.no_grad():
        loss = fastkd.kd_loss(z, t, y, hard_weight=0.5, backend="cpu")
    assert seen == [(None, None)]
    assert_close(loss, oracle(z, t, y, teacher_grad=False, hard_weight=0.5)[0], what="loss")


def test_deterministic():
    z, t, y = logits(64, 3001, seed=20, ignore_every=5)
    a = run("cpu", z, t, y, hard_weight=0.5, divergence="jsd")
    b = run("cpu", z, t, y, hard_weight=0.5, divergence="jsd")
    for x, x2 in zip(a, b):
        assert torch.equal(x, x2)


def test_kdloss_module():
    z, t, y = logits(6, 70, seed=21, ignore_every=5)
    m = fastkd.KDLoss(temperature=2.0, hard_weight=0.25, backend="cpu")
    assert "temperature=2.0" in repr(m)
    torch.testing.assert_close(m(z, t, y), fastkd.kd_loss(z, t, y, temperature=2.0, hard_weight=0.25, backend="cpu"))
    with pytest.raises(TypeError, match="alpha"):
        fastkd.KDLoss(alpha=0.5)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_gradcheck_float64(backend, divergence, softcap):
    z, t, y = logits(3, 7, seed=22, dtype=torch.float64)
    y[1] = -100
    z.requires_grad_()
    t.requires_grad_()

    def f(a, b):
        return fastkd.kd_loss(a, b, y, temperature=1.7, hard_weight=0.3, label_smoothing=0.1,
                              divergence=divergence, softcap=softcap, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(f, (z, t), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("divergence", DIVS)
def test_opcheck(divergence):
    z, t, y = logits(5, 33, seed=23, ignore_every=5)
    p = kd_settings(temperature=2.0, soft_weight=1.0, hard_weight=0.5, beta=0.5, label_smoothing=0.1,
                    divergence=divergence).kernel_params()
    for teacher_grad in (False, True):
        for target in (y, None):
            args = (z.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad), target, torch.tensor(3.0))
            kwargs = dict(p._asdict(), student_grad=True, teacher_grad=teacher_grad, backend="cpu")
            torch.library.opcheck(torch.ops.fastkd.kd.default, args, kwargs)


@pytest.mark.parametrize("divergence", DIVS)
def test_torch_compile_fullgraph(divergence):
    z, t, y = logits(8, 96, seed=24, ignore_every=5)

    def step(a, b, target):
        return fastkd.kd_loss(a, b, target, temperature=2.0, hard_weight=0.5, divergence=divergence,
                              backend="cpu") * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a1 = z.clone().requires_grad_()
    a2 = z.clone().requires_grad_()
    l1 = compiled(a1, t, y)
    l1.backward()
    l2 = step(a2, t, y)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(a1.grad, a2.grad)


def test_no_host_sync_in_fused_forward(monkeypatch):
    """The fused forward never converts a tensor to a Python number (`.item()`/`bool()`/`float()`).

    (Backward may test a CPU grad_output for all-ones to skip a multiply; that reads host memory,
    never a device, and is skipped for device tensors and under tracing.)"""
    z, t, _ = logits(6, 80, seed=25)
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    z.requires_grad_()
    loss = fastkd.kd_loss(z, t, None, temperature=2.0, backend="cpu")
    monkeypatch.undo()
    assert calls == []
    loss.backward()
    assert z.grad is not None


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(beta=1.5, divergence="jsd"), ValueError, "beta"),
    (dict(beta=-0.1, divergence="jsd"), ValueError, "beta"),
    (dict(label_smoothing=1.2), ValueError, "label_smoothing"),
    (dict(divergence="kl"), ValueError, "divergence"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(num_items=0), ValueError, "num_items"),
    (dict(temperature="2"), TypeError, "temperature"),
])
def test_bad_arguments(kwargs, exc, match):
    z, t, y = logits(4, 10, seed=26)
    with pytest.raises(exc, match=match):
        fastkd.kd_loss(z, t, y, **kwargs)


def test_bad_tensors():
    z, t, y = logits(4, 10, seed=27)
    with pytest.raises(ValueError, match="teacher_logits"):
        fastkd.kd_loss(z, t[:, :9], y)
    with pytest.raises(TypeError, match="teacher_logits"):
        fastkd.kd_loss(z, t.double(), y)
    with pytest.raises(TypeError, match="student_logits"):
        fastkd.kd_loss(z.long(), t.long(), y)
    with pytest.raises(ValueError, match="student_logits"):
        fastkd.kd_loss(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="target"):
        fastkd.kd_loss(z, t, y[:3])
    with pytest.raises(TypeError, match="target"):
        fastkd.kd_loss(z, t, y.float())
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 10\)"):
        fastkd.kd_loss(z, t, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="target"):
        fastkd.kd_loss(z, t, torch.tensor([0, -1, 3, 2]))
    with pytest.raises(ValueError, match="hard_weight"):
        fastkd.kd_loss(z, t, None, hard_weight=0.5)
    with pytest.raises(TypeError, match="student_logits"):
        fastkd.kd_loss([1.0], t)
    with pytest.raises(ValueError, match="inplace_grad"):
        fastkd.kd_loss(z.clone().requires_grad_(), t, y, inplace_grad=True)
    with pytest.raises(ValueError, match="inplace_grad=True needs a fused backend"):
        fastkd.kd_loss(z.clone() * 1.0, t, y, inplace_grad=True, backend="torch")


def test_device_mismatch_meta():
    z, t, y = logits(4, 10, seed=28)
    with pytest.raises(ValueError, match="device"):
        fastkd.kd_loss(z, t.to("meta"), y)


# ================================================================================================
# Part 3: the GPU backends on CUDA tensors
# ================================================================================================
DEV = "cuda"


def gpu_logits(seed, n, v, **kw):
    kw.setdefault("ignore_every", 5)
    return logits(n, v, seed=seed, device=DEV, **kw)


def _gpu_check(backend, z, t, y, *, teacher_grad=True, **kw):
    go = grad_weights((z.shape[0],) if kw.get("reduction") == "none" else (), seed=7, device=DEV)
    got = run(backend, z, t, y, go, teacher_grad=teacher_grad, **kw)
    want = oracle(z, t, y, go, teacher_grad=teacher_grad, **kw)
    names = ("loss", "student grad", "teacher grad")
    if z.dtype == torch.float32:
        for g, w, name in zip(got, want, names):
            if g is not None:
                assert_close(g, w, rtol=1e-5, atol_frac=1e-5, floor=1e-2 if name != "loss" else 1e-30, what=name)
    else:
        zz, tt = z.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
        rows = ref.kd_loss_rows(zz, tt, y, compute_dtype=z.dtype,
                                **{k: v for k, v in kw.items() if k not in ("reduction", "num_items")})
        red = kw.get("reduction", "mean")
        if red == "mean":
            own = rows.sum() / (kw.get("num_items") or (y != -100).sum() if y is not None else rows.shape[0])
        else:
            own = rows.sum() if red == "sum" else rows
        (own * go.to(own.dtype)).sum().backward()
        for g, o, w, name in zip(got, (own.detach(), zz.grad, tt.grad), want, names):
            if g is None:
                continue
            assert g.dtype == (torch.float32 if name == "loss" else z.dtype)
            assert_no_worse_than(g, o, w, what=name)
    return got


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("v", [32000, 128256, 256000, 50257, 1271])
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_real_vocab_sizes(use_backend, backend, v, divergence, dtype):
    use_backend(backend, "cuda")
    z, t, y = gpu_logits(v % 97, 12, v, dtype=dtype)
    _gpu_check(backend, z, t, y, divergence=divergence, hard_weight=0.5, temperature=2.0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("setting", [
    dict(),
    dict(temperature=1.0, hard_weight=1.0, label_smoothing=0.1),
    dict(temperature=0.5, hard_weight=0.3, soft_weight=2.0, softcap=30.0, t2_scale=False, beta=0.2),
    dict(reduction="sum", temperature=3.0),
    dict(reduction="none", hard_weight=1.0),
    dict(num_items=37, hard_weight=1.0, beta=0.9),
], ids=["plain", "tau1_ls", "softcap", "sum", "none", "num_items"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_settings(use_backend, backend, divergence, setting, dtype):
    use_backend(backend, "cuda")
    z, t, y = gpu_logits(11, 9, 32003, dtype=dtype)
    _gpu_check(backend, z, t, y, divergence=divergence, **setting)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_soft_only_peaked_and_masked(use_backend, backend):
    use_backend(backend, "cuda")
    z, t, _ = gpu_logits(3, 6, 50257, scale=20.0, target=False)
    _gpu_check(backend, z, t, None, divergence="reverse_kl")
    # −inf columns in both: the oracle (whose autograd gives NaN through them) runs on the rest
    z, t, y = gpu_logits(4, 6, 32000, scale=20.0, mask_cols=3000)
    cols = torch.isfinite(z[0])
    new_id = torch.cumsum(cols.long(), 0) - 1
    y_kept = torch.where(y == -100, y, new_id[y.clamp_min(0)])
    for div in ("forward_kl", "jsd"):
        go = grad_weights((), seed=7, device=DEV)
        got = run(backend, z, t, y, go, divergence=div, hard_weight=1.0)
        want = oracle(z[:, cols], t[:, cols], y_kept, go, divergence=div, hard_weight=1.0)
        assert_close(got[0], want[0], atol_frac=1e-5, what="loss")
        assert_close(got[1][:, cols], want[1], atol_frac=1e-5, floor=1.0, what="student grad")
        assert_close(got[2][:, cols], want[2], atol_frac=1e-5, floor=1.0, what="teacher grad")
        assert (got[1][:, ~cols] == 0).all() and (got[2][:, ~cols] == 0).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_row_strides_and_misalignment(use_backend, backend, dtype):
    """Rows of wider buffers: aligned (vector path), equally misaligned, and differently misaligned
    (scalar path) student and teacher rows."""
    use_backend(backend, "cuda")
    wide_z, wide_t, _ = gpu_logits(5, 7, 32768 + 64, dtype=dtype, target=False)
    y = torch.randint(0, 32001, (7,), device=DEV, generator=torch.Generator(device=DEV).manual_seed(5))
    for oz, ot in [(0, 0), (3, 3), (1, 6)]:
        z, t = wide_z[:, oz:oz + 32001], wide_t[:, ot:ot + 32001]
        _gpu_check(backend, z, t, y, hard_weight=1.0, divergence="jsd")


def _gpu_direct(backend, z, t, y, p, divisor, teacher_grad=True):
    loss = torch.empty(z.shape[0], device=DEV)
    gs = torch.empty_like(z)
    gt = torch.empty_like(t) if teacher_grad else None
    registry.implementation("kd", backend).fn(z, t, y, divisor, loss, gs, gt, p)
    return loss, gs, gt


def _plain_params(divergence=0):
    return KernelParams(temperature=1.0, soft_scale=1.0, hard_weight=1.0, divergence=divergence, beta=0.5,
                        ignore_index=-100, label_smoothing=0.0, softcap=0.0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", range(len(DIVS)), ids=DIVS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_ignored_bad_target_nan_and_determinism(use_backend, backend, divergence):
    use_backend(backend, "cuda")
    z, t, y = gpu_logits(8, 6, 128256, dtype=torch.bfloat16, ignore_every=0)
    y[1] = 128256      # out of range, not ignore_index
    y[2] = -100        # ignored
    z[3, 77] = float("nan")
    p = _plain_params(divergence)
    three = torch.tensor(3.0, device=DEV)
    a = _gpu_direct(backend, z, t, y, p, three)
    b = _gpu_direct(backend, z, t, y, p, three)
    for x, x2 in zip(a, b):  # bitwise reproducible
        assert torch.equal(x.nan_to_num(7.0), x2.nan_to_num(7.0))
    loss, gs, gt = a
    assert torch.isnan(loss[1]) and torch.isnan(gs[1].float()).all() and torch.isnan(gt[1].float()).all()
    assert loss[2] == 0 and (gs[2] == 0).all() and (gt[2] == 0).all()
    assert torch.isnan(loss[3])
    ok = [0, 4, 5]
    assert torch.isfinite(loss[ok]).all() and torch.isfinite(gs[ok].float()).all()
    one = _gpu_direct(backend, z, t, y, p, torch.tensor(1.0, device=DEV))
    torch.testing.assert_close(loss[ok] * 3.0, one[0][ok], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_side_stream_and_no_host_sync(use_backend, backend):
    use_backend(backend, "cuda")
    z, t, y = gpu_logits(9, 8, 32000)
    want = run(backend, z, t, y, hard_weight=1.0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the loss raises
        try:
            got = run(backend, z, t, y, hard_weight=1.0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.current_stream().wait_stream(s)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_auto_and_compile(use_backend, backend):
    use_backend(backend, "cuda")
    z, t, y = gpu_logits(10, 4, 32000, dtype=torch.bfloat16)
    assert registry.resolve("kd", "auto", torch.device(DEV)) == registry.available("kd", torch.device(DEV))[0]
    eager = run(backend, z, t, y, hard_weight=1.0)

    def f(a, b, c):
        return fastkd.kd_loss(a, b, c, hard_weight=1.0, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    zz = z.clone().requires_grad_()
    tt = t.clone().requires_grad_()
    loss = compiled(zz, tt, y)
    loss.backward()
    # (the compiled graph may sum the row losses in another order: not bitwise, but one rounding)
    torch.testing.assert_close(loss.detach(), eager[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(zz.grad.float(), eager[1].float(), rtol=2 ** -8, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_peak_memory_is_one_gradient_buffer(use_backend, backend):
    use_backend(backend, "cuda")
    n, v = 256, 128256
    z, t, y = gpu_logits(12, n, v, dtype=torch.bfloat16)
    z.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fastkd.kd_loss(z, t, y, hard_weight=1.0, backend=backend).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = n * v * z.element_size()
    assert extra <= grad_bytes + 4 * 1024 * 1024, f"peak {extra} bytes over inputs, gradient is {grad_bytes}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_int64_offsets_past_2_31_elements(use_backend, backend):
    """N·V > 2^31 (bf16, ~13 GB): the last rows must still be right."""
    use_backend(backend, "cuda")
    n, v = 8400, 256000
    if torch.cuda.get_device_properties(DEV).total_memory < 24 * 2**30:
        pytest.skip("needs ~16 GB of GPU memory")
    g = torch.Generator(device=DEV).manual_seed(14)
    z = torch.randn(n, v, generator=g, device=DEV, dtype=torch.bfloat16)
    t = torch.randn(n, v, generator=g, device=DEV, dtype=torch.bfloat16)
    y = torch.randint(0, v, (n,), generator=g, device=DEV)
    loss, gs, _ = _gpu_direct(backend, z, t, y, _plain_params(), torch.tensor(1.0, device=DEV), teacher_grad=False)
    tail = slice(n - 3, n)
    zd = z[tail].double().requires_grad_()
    rows = ref.kd_loss_rows(zd, t[tail].double(), y[tail], hard_weight=1.0)
    rows.sum().backward()
    assert_close(loss[tail], rows.detach(), rtol=1e-4, atol_frac=1e-4, what="loss")
    err = (gs[tail].double() - zd.grad).abs().max()
    assert err <= 2 ** -8 * zd.grad.abs().max(), float(err)
    del z, t, gs
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_scale_rows_skips_unit_factors(use_backend, backend, dtype):
    """grad[r] *= g[r] in place, rows with g == 1 untouched, any row stride."""
    use_backend(backend, "cuda")
    scale = registry.implementation("scale_rows", backend).fn
    g = torch.tensor([1.0, 2.5, 1.0, -0.75, 0.5], device=DEV)
    wide = torch.randn(5, 32001 + 8, device=DEV).to(dtype)
    for off in (0, 3):  # 16-byte aligned rows, and rows of a wider buffer at an odd offset
        want = (wide[:, off:off + 32001].float() * g[:, None]).to(dtype)
        buf = wide.clone()
        view = buf[:, off:off + 32001]
        scale(view, g)
        assert torch.equal(view, want)
        assert torch.equal(buf[:, :off], wide[:, :off]) and torch.equal(buf[:, off + 32001:], wide[:, off + 32001:])
        buf = wide.clone()
        scale(buf[:, off:off + 32001], torch.tensor(1.0, device=DEV))
        assert torch.equal(buf, wide)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_device_mismatch():
    z, t, y = logits(4, 10, seed=28)
    with pytest.raises(ValueError, match="device"):
        fastkd.kd_loss(z.cuda(), t, y.cuda())
