"""The CUDA kd kernels' logic on a CPU: csrc/cuda/kd.cu compiled by g++ against a host emulation of
CUDA (tests/cuda_emu: one std::thread per CUDA thread, barriers for __syncthreads and shuffles).

This checks everything but the hardware: the row split into vector/scalar parts, the per-thread
online stats and their block merge, the JSD pass, the backwards gradient pass, the four modes of
the shard contract and the scale-rows backward helper, against the float64 reference and the CPU
backend. Timing, coalescing and the real SFU math are covered by tests/test_kd_gpu.py on a GPU.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

from fastkd import _ext, _ops, _reference

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_SHIM = r'''
extern "C" void emu_kd(int mode, int64_t z, int64_t t, int64_t target, int64_t divisor, int64_t loss,
                       int64_t gz, int64_t gt, int64_t so, int64_t si, int64_t jo, int64_t ji,
                       int64_t n, int64_t v, int64_t sz, int64_t st, int64_t sgz, int64_t sgt,
                       int64_t col, int64_t vt, int dtype, float temperature, float soft_scale,
                       float hard, int div, float beta, int64_t ignore, float ls, float cap) {
  fastkd::KDProblem p{};
  p.mode = mode; p.dtype = dtype;
  p.z = (const void*)z; p.t = (const void*)t; p.target = (const int64_t*)target;
  p.divisor = (const void*)divisor; p.loss = (void*)loss; p.grad_z = (void*)gz; p.grad_t = (void*)gt;
  p.stats_out = (void*)so; p.stats_in = (const void*)si; p.jsd_out = (void*)jo; p.jsd_in = (const void*)ji;
  p.n = n; p.v = v; p.stride_z = sz; p.stride_t = st; p.stride_gz = sgz; p.stride_gt = sgt;
  p.col_offset = col; p.vocab_total = vt;
  p.args.temperature = temperature; p.args.soft_scale = soft_scale; p.args.hard_weight = hard;
  p.args.divergence = div; p.args.beta = beta; p.args.ignore_index = ignore;
  p.args.label_smoothing = ls; p.args.softcap = cap; p.args.has_target = target != 0;
  fastkd::kd_run_cuda(p, 0, 0);
}
extern "C" void emu_scale(int64_t grad, int64_t n, int64_t v, int64_t stride, int dtype, int64_t g,
                          int64_t g_stride) {
  fastkd::scale_rows_cuda(grad, n, v, stride, dtype, g, g_stride, 0, 0);
}
'''


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++20 compiler (g++)")
    src = open(os.path.join(ROOT, "csrc", "cuda", "kd.cu")).read()
    # kernel<<<grid, threads, 0, stream>>>(args);  ->  emu::launch(grid, threads, [&] { kernel(args); });
    src, count = re.subn(r"(\w+(?:<[^;<>]*>)?)<<<([^,]+), ([^,]+?), 0, stream>>>\((.*?)\);",
                         lambda m: f"emu::launch({m.group(2)}, {m.group(3)}, [&] {{ {m.group(1)}({m.group(4)}); }});",
                         src, flags=re.S)
    assert count >= 5 and "<<<" not in src, "unexpected launch syntax in csrc/cuda/kd.cu"
    out = tmp_path_factory.mktemp("cuda_emu")
    cpp, so = out / "kd_emu.cpp", out / "libkd_emu.so"
    cpp.write_text(src + _SHIM)
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-fPIC", "-shared", f"-I{HERE}/cuda_emu", f"-I{ROOT}/csrc",
                        str(cpp), "-o", str(so), "-lpthread"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    L = ctypes.CDLL(str(so))
    i64, f32, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_int
    L.emu_kd.argtypes = [i32] + [i64] * 19 + [i32, f32, f32, f32, i32, f32, i64, f32, f32]
    L.emu_scale.argtypes = [i64, i64, i64, i64, i32, i64, i64]
    return L


def _p(t):
    return 0 if t is None else t.data_ptr()


def _params(*, temperature=1.0, soft_weight=1.0, t2_scale=True, hard_weight=0.0, divergence="forward_kl",
            beta=0.5, label_smoothing=0.0, softcap=None, has_target=True):
    return _ops.KDParams(float(temperature), float(soft_weight * (temperature ** 2 if t2_scale else 1.0)),
                         float(hard_weight), _ops.DIVERGENCE_CODES[divergence], float(beta), -100,
                         float(label_smoothing), float(softcap or 0.0), has_target)


def _run(lib, mode, z, t, y, p, *, divisor=None, loss=None, gs=None, gt=None, so=None, si=None, jo=None,
         ji=None, col=0, vt=None):
    lib.emu_kd(mode, _p(z), _p(t), _p(y), _p(divisor), _p(loss), _p(gs), _p(gt), _p(so), _p(si), _p(jo),
               _p(ji), z.shape[0], z.shape[1], z.stride(0), t.stride(0), 0 if gs is None else gs.stride(0),
               0 if gt is None else gt.stride(0), col, z.shape[1] if vt is None else vt,
               _ext.dtype_code(z.dtype), p.temperature, p.soft_scale, p.hard_weight, p.divergence, p.beta,
               p.ignore_index, p.label_smoothing, p.softcap)


def _fused(lib, z, t, y, p, divisor=1.0, teacher_grad=True):
    loss = torch.empty(z.shape[0])
    gs = torch.empty(z.shape, dtype=z.dtype)
    gt = torch.empty(t.shape, dtype=t.dtype) if teacher_grad else None
    _run(lib, 0, z, t, y, p, divisor=torch.tensor(float(divisor)), loss=loss, gs=gs, gt=gt)
    return loss, gs, gt


def _expected(z, t, y, divisor=1.0, **kw):
    """float64 reference: loss rows / divisor and their gradients."""
    zd = z.double().requires_grad_()
    td = t.double().requires_grad_()
    rows = _reference.kd_loss_rows(zd, td, y, **kw) / divisor
    rows.sum().backward()
    return rows.detach(), zd.grad, td.grad


def _inputs(seed, n, v, *, scale=3.0, dtype=torch.float32, ignore_rows=(), target=True):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=g) if target else None
    for r in ignore_rows:
        y[r] = -100
    return z, t, y


def _close(got, want, what, dtype=torch.float32, floor=1e-2):
    """Entry-wise within 1e-5 of the largest entry (at least `floor`: a gradient that is a
    cancellation of O(1) float32 terms, like a peaked JSD teacher gradient, cannot be resolved
    better than ~ulp(max |logit|/τ) absolute, whatever the kernel)."""
    got = got.double()
    if dtype == torch.float32 or got.dim() == 1:  # losses are float32 whatever the input dtype
        scale = float(want.abs().max().clamp_min(floor if want.dim() > 1 else 1e-30))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")
    else:  # one rounding of the float32 gradient to the input dtype
        eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        torch.testing.assert_close(got, want, rtol=eps, atol=1e-6 * float(want.abs().max()) + 1e-7,
                                   msg=lambda m: f"{what}: {m}")


SETTINGS = [
    dict(),
    dict(temperature=2.0, hard_weight=0.5, soft_weight=0.7, label_smoothing=0.1),
    dict(temperature=0.7, hard_weight=1.0, softcap=5.0, beta=0.3, t2_scale=False),
]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("setting", SETTINGS, ids=["plain", "tau2_hard_ls", "softcap"])
def test_fused_matches_reference(lib, divergence, setting):
    z, t, y = _inputs(1, 5, 300, ignore_rows=(2,))
    got = _fused(lib, z, t, y, _params(divergence=divergence, **setting), divisor=3.0)
    want = _expected(z, t, y, 3.0, divergence=divergence, **setting)
    for g, w, name in zip(got, want, ("loss", "student grad", "teacher grad")):
        _close(g, w, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("offsets", [(0, 0), (3, 3), (1, 6)], ids=["aligned", "same_misalign", "mixed"])
def test_half_precision_and_row_layouts(lib, dtype, offsets):
    """16-byte vectors with a scalar head/tail, and the all-scalar path when rows disagree."""
    wide_z, wide_t, _ = _inputs(2, 4, 700, dtype=dtype, target=False)
    z, t = wide_z[:, offsets[0]:offsets[0] + 651], wide_t[:, offsets[1]:offsets[1] + 651]
    y = torch.tensor([5, 650, -100, 0])
    kw = dict(divergence="jsd", hard_weight=0.5, temperature=1.5, beta=0.6)
    got = _fused(lib, z, t, y, _params(**kw))
    want = _expected(z, t, y, **kw)
    for g, w, name in zip(got, want, ("loss", "student grad", "teacher grad")):
        _close(g, w, name, dtype)
    assert got[1].dtype == dtype


@pytest.mark.parametrize("v", [1, 2, 9])
def test_tiny_vocabularies_without_teacher_grad(lib, v):
    z, t, y = _inputs(3, 3, v)
    kw = dict(hard_weight=1.0, label_smoothing=0.2, divergence="reverse_kl")
    got = _fused(lib, z, t, y, _params(**kw), teacher_grad=False)
    want = _expected(z, t, y, **kw)
    _close(got[0], want[0], "loss")
    _close(got[1], want[1], "student grad")


def test_peaked_and_masked_columns(lib):
    z, t, y = _inputs(4, 4, 240, scale=20.0, ignore_rows=(3,))
    cols = torch.ones(240, dtype=torch.bool)
    cols[torch.randperm(240, generator=torch.Generator().manual_seed(0))[:30]] = False
    cols[y[y >= 0]] = True
    z[:, ~cols] = float("-inf")
    t[:, ~cols] = float("-inf")
    new_id = torch.cumsum(cols.long(), 0) - 1
    y_kept = torch.where(y == -100, y, new_id[y.clamp_min(0)])
    for div in ("forward_kl", "reverse_kl", "jsd"):
        kw = dict(hard_weight=1.0, divergence=div, beta=0.8)
        got = _fused(lib, z, t, y, _params(**kw))
        want = _expected(z[:, cols], t[:, cols], y_kept, **kw)
        _close(got[0], want[0], f"{div} loss")
        # logits ~±60: float32 log-probabilities carry ~ulp(60) = 4e-6 absolute error
        _close(got[1][:, cols], want[1], f"{div} student grad", floor=1.0)
        _close(got[2][:, cols], want[2], f"{div} teacher grad", floor=1.0)
        assert (got[1][:, ~cols] == 0).all() and (got[2][:, ~cols] == 0).all()


def test_soft_only_no_target(lib):
    z, t, _ = _inputs(5, 3, 333, target=False)
    p = _params(divergence="reverse_kl", temperature=3.0, has_target=False)
    got = _fused(lib, z, t, None, p)
    want = _expected(z, t, None, divergence="reverse_kl", temperature=3.0)
    for g, w, name in zip(got, want, ("loss", "student grad", "teacher grad")):
        _close(g, w, name)


def test_ignored_bad_target_nan_and_determinism(lib):
    z, t, y = _inputs(6, 4, 130, dtype=torch.bfloat16)
    y[1] = 130  # out of [0, V) and not ignore_index
    y[2] = -100
    z[3, 5] = float("nan")
    p = _params(hard_weight=1.0, divergence="jsd")
    a = _fused(lib, z, t, y, p)
    b = _fused(lib, z, t, y, p)
    for x, x2 in zip(a, b):
        assert torch.equal(x.nan_to_num(3.0), x2.nan_to_num(3.0))
    loss, gs, gt = a
    assert torch.isnan(loss[1]) and torch.isnan(gs[1].float()).all() and torch.isnan(gt[1].float()).all()
    assert loss[2] == 0 and (gs[2] == 0).all() and (gt[2] == 0).all()
    assert torch.isnan(loss[3])
    assert torch.isfinite(loss[0]) and torch.isfinite(gs[0].float()).all()


@pytest.mark.skipif(not hasattr(_ext.C, "kd_shard_cpu"), reason="CPU shard entry not built")
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_shard_modes_match_cpu_and_fused(lib, divergence):
    """stats per slice == the CPU kernel's; merged stats -> [JSD sums] -> finish == the fused loss."""
    from fastkd.distributed import merge_stats

    n, v, cut = 6, 1000, 389
    z, t, y = _inputs(7, n, v, dtype=torch.bfloat16, ignore_rows=(1,))
    y[0], y[3] = cut, cut - 1  # targets at the slice boundary
    kw = dict(temperature=2.0, hard_weight=0.5, label_smoothing=0.1, divergence=divergence, beta=0.3)
    p = _params(**kw)
    divisor = torch.tensor(7.0)
    fused = _fused(lib, z, t, y, p, divisor=7.0)
    parts = [(0, cut), (cut, v)]
    stats = []
    for a, b in parts:
        st = torch.empty(n, 11)
        _run(lib, 1, z[:, a:b], t[:, a:b], y, p, so=st, col=a, vt=v)
        st_cpu = torch.empty(n, 11)
        _ext.C.kd_shard_cpu(1, z[:, a:b].data_ptr(), t[:, a:b].data_ptr(), y.data_ptr(), 0, 0, 0, 0,
                            st_cpu.data_ptr(), 0, 0, 0, n, b - a, v, v, 0, 0, a, v, _ext.dtype_code(z.dtype),
                            p.temperature, p.soft_scale, p.hard_weight, p.divergence, p.beta, p.ignore_index,
                            p.label_smoothing, p.softcap, 1)
        torch.testing.assert_close(st, st_cpu, rtol=1e-5, atol=1e-5)
        stats.append(st)
    merged = merge_stats(torch.stack(stats)).contiguous()
    jsd = None
    if divergence == "jsd":
        sums = []
        for a, b in parts:
            js = torch.empty(n, 2)
            _run(lib, 2, z[:, a:b], t[:, a:b], y, p, si=merged, jo=js, col=a, vt=v)
            sums.append(js)
        jsd = (sums[0] + sums[1]).contiguous()
    gs, gt, loss = torch.empty_like(z), torch.empty_like(t), torch.empty(n)
    for a, b in parts:
        _run(lib, 3, z[:, a:b], t[:, a:b], y, p, divisor=divisor, loss=loss, gs=gs[:, a:b], gt=gt[:, a:b],
             si=merged, ji=jsd, col=a, vt=v)
    torch.testing.assert_close(loss, fused[0], rtol=1e-5, atol=1e-6)
    # the merge order differs from the fused block merge: the gradients may differ in the last bit
    torch.testing.assert_close(gs.float(), fused[1].float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(gt.float(), fused[2].float(), rtol=2 ** -7, atol=1e-6)
    want = _expected(z, t, y, 7.0, **kw)
    _close(loss, want[0], "sharded loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_scale_rows(lib, dtype):
    g = torch.tensor([1.0, 2.5, 1.0, -0.75, 0.5])
    wide = torch.randn(5, 1008, generator=torch.Generator().manual_seed(8)).to(dtype)
    for off in (0, 3):
        buf = wide.clone()
        view = buf[:, off:off + 1000]
        want = (wide[:, off:off + 1000].float() * g[:, None]).to(dtype)
        lib.emu_scale(view.data_ptr(), 5, 1000, view.stride(0), _ext.dtype_code(dtype), g.data_ptr(), 1)
        assert torch.equal(view, want)
        assert torch.equal(buf[:, :off], wide[:, :off]) and torch.equal(buf[:, off + 1000:], wide[:, off + 1000:])
    one = torch.tensor(1.0)
    buf = wide.clone()
    lib.emu_scale(buf.data_ptr(), 5, 1008, buf.stride(0), _ext.dtype_code(dtype), one.data_ptr(), 0)
    assert torch.equal(buf, wide)
    assert math.isfinite(float(buf.float().sum()))
