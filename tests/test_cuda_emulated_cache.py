"""The teacher-cache CUDA kernels' logic on a CPU: csrc/cuda/cache.cu compiled by g++ against the host
emulation of CUDA in tests/cuda_emu (one std::thread per CUDA thread, barriers for __syncthreads and
the warp intrinsics), as tests/test_cuda_emulated.py does for kd.cu.

Checked against the CPU kernels (csrc/cpu/cache.cpp: ids, counts and tie order exactly) and the float64
reference (fastkd/_cache_reference.py): the top-k filter, radix-select compaction (also on adversarial
rows that compact every tile) and bitonic sort; the sampled capture's segment CDF, the re-scan of the
segments holding draws and the unique/count output; the sparse loss for every tail with and without
the hard term, padding ids, ignored and bad rows; 16-byte and scalar row layouts, ragged row ends, and
the global-workspace fallback. Timing and the real SFU math are for the GPU tests.
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

from fastkd import _cache_reference as R
from fastkd import _ext, _sparse_ops

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.skipif("cpu" not in _sparse_ops._SPARSE_KD_IMPLS,
                                reason="needs the CPU cache kernels of fastkd._C as the oracle")

_SHIM = r'''
#include <cstdio>
static int fail(const std::exception& e) { std::fprintf(stderr, "emu: %s\n", e.what()); return 1; }
extern "C" void emu_limits(int sms, int smem_optin) { emu::dev_sms = sms; emu::dev_smem_optin = smem_optin; }
extern "C" int64_t emu_topk_ws(int64_t n, int64_t v, int64_t k, int dtype) {
  return fastkd::capture_topk_workspace_cuda(n, v, k, dtype, 0);
}
extern "C" int64_t emu_sample_ws(int64_t n, int64_t v, int64_t ns, int dtype) {
  return fastkd::capture_sample_workspace_cuda(n, v, ns, dtype, 0);
}
extern "C" int64_t emu_sparse_ws(int64_t n, int64_t v, int64_t k, int dtype) {
  return fastkd::sparse_kd_workspace_cuda(n, v, k, dtype, 0);
}
extern "C" int emu_topk(int64_t t, int64_t ids, int64_t values, int64_t lse, int64_t ws, int64_t n, int64_t v,
                        int64_t stride, int dtype, double temperature, int64_t k) {
  fastkd::CaptureProblem p{};
  p.dtype = dtype; p.t = (const void*)t; p.ids = (int64_t*)ids; p.values = (void*)values; p.lse = (void*)lse;
  p.n = n; p.v = v; p.stride_t = stride; p.temperature = temperature; p.k = k;
  try { fastkd::capture_topk_cuda(p, (void*)ws, 0, 0); } catch (const std::exception& e) { return fail(e); }
  return 0;
}
extern "C" int emu_sample(int64_t t, int64_t u, int64_t ids, int64_t counts, int64_t lse, int64_t ws, int64_t n,
                          int64_t v, int64_t stride, int dtype, double temperature, int64_t ns, int64_t width) {
  fastkd::CaptureProblem p{};
  p.dtype = dtype; p.t = (const void*)t; p.u = (const double*)u; p.ids = (int64_t*)ids;
  p.counts = (int32_t*)counts; p.lse = (void*)lse; p.n = n; p.v = v; p.stride_t = stride;
  p.temperature = temperature; p.num_samples = ns; p.width = width;
  try { fastkd::capture_sample_cuda(p, (void*)ws, 0, 0); } catch (const std::exception& e) { return fail(e); }
  return 0;
}
extern "C" int emu_sparse(int64_t z, int64_t ids, int64_t w, int64_t target, int64_t divisor, int64_t loss,
                          int64_t grad, int64_t ws, int64_t n, int64_t v, int64_t k, int64_t sz, int64_t sg,
                          int dtype, int tail, double temperature, double soft_scale, double hard,
                          int64_t ignore, double ls) {
  fastkd::SparseKDProblem p{};
  p.dtype = dtype; p.z = (const void*)z; p.ids = (const int64_t*)ids; p.w = (const void*)w;
  p.target = (const int64_t*)target; p.divisor = (const void*)divisor; p.loss = (void*)loss; p.grad = (void*)grad;
  p.n = n; p.v = v; p.k = k; p.stride_z = sz; p.stride_g = sg; p.tail = tail; p.temperature = temperature;
  p.soft_scale = soft_scale; p.hard_weight = hard; p.ignore_index = ignore; p.label_smoothing = ls;
  try { fastkd::sparse_kd_cuda(p, (void*)ws, 0, 0); } catch (const std::exception& e) { return fail(e); }
  return 0;
}
'''

SMEM_DEFAULT = 99 * 1024


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++20 compiler (g++)")
    src = open(os.path.join(ROOT, "csrc", "cuda", "cache.cu")).read()
    # kernel<<<grid, threads, smem, stream>>>(args);  ->  emu::launch(grid, threads, smem, [&] { kernel(args); });
    src, count = re.subn(r"(\w+(?:<[^;<>]*>)?)<<<([^,]+), ([^,]+?), ([^,]+?), stream>>>\((.*?)\);",
                         lambda m: (f"emu::launch({m.group(2)}, {m.group(3)}, {m.group(4)}, "
                                    f"[&] {{ {m.group(1)}({m.group(5)}); }});"),
                         src, flags=re.S)
    assert count == 3 and "<<<" not in src, "unexpected launch syntax in csrc/cuda/cache.cu"
    decl = "extern __shared__ __align__(16) unsigned char fkc_smem[];"
    assert src.count(decl) == 3, "unexpected dynamic shared memory declaration in csrc/cuda/cache.cu"
    src = src.replace(decl, "unsigned char* fkc_smem = emu::dyn_smem;")
    out = tmp_path_factory.mktemp("cuda_emu_cache")
    cpp, so = out / "cache_emu.cpp", out / "libcache_emu.so"
    cpp.write_text(src + _SHIM)
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-fPIC", "-shared", f"-I{HERE}/cuda_emu", f"-I{ROOT}/csrc",
                        str(cpp), "-o", str(so), "-lpthread"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    L = ctypes.CDLL(str(so))
    i64, i32, f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_double
    L.emu_limits.argtypes = [i32, i32]
    for name in ("emu_topk_ws", "emu_sample_ws", "emu_sparse_ws"):
        getattr(L, name).argtypes = [i64, i64, i64, i32]
        getattr(L, name).restype = i64
    L.emu_topk.argtypes = [i64] * 8 + [i32, f64, i64]
    L.emu_sample.argtypes = [i64] * 9 + [i32, f64, i64, i64]
    L.emu_sparse.argtypes = [i64] * 13 + [i32, i32, f64, f64, f64, i64, f64]
    L.emu_limits(2, SMEM_DEFAULT)
    return L


class _Limits:
    """Shrink the emulated device's shared memory so that the kernels take the global workspace."""

    def __init__(self, lib, smem):
        self.lib, self.smem = lib, smem

    def __enter__(self):
        self.lib.emu_limits(2, self.smem)

    def __exit__(self, *exc):
        self.lib.emu_limits(2, SMEM_DEFAULT)


def _ws(nbytes):
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8), int(nbytes)


def _logits(n, v, dtype=torch.float32, scale=3.0, seed=0, mask_cols=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    if mask_cols:
        x[:, torch.randperm(v, generator=g)[:mask_cols]] = float("-inf")
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------
# top-k
# ----------------------------------------------------------------------------------------------
def emu_topk(lib, t, k, tau):
    n, v = t.shape
    ids = torch.full((n, k), -7, dtype=torch.int64)
    values = torch.empty(n, k)
    lse = torch.empty(n)
    ws, nbytes = _ws(lib.emu_topk_ws(n, v, k, _ext.dtype_code(t.dtype)))
    rc = lib.emu_topk(t.data_ptr(), ids.data_ptr(), values.data_ptr(), lse.data_ptr(),
                      ws.data_ptr() if nbytes else 0, n, v, t.stride(0), _ext.dtype_code(t.dtype), tau, k)
    assert rc == 0
    return ids, values, lse


def _check_topk(t, k, tau, got):
    ids, values, lse = got
    c_ids, c_vals, c_lse = _sparse_ops.run_capture_topk(t, k, tau, "cpu")
    assert torch.equal(ids, c_ids), (ids, c_ids)  # the CPU's order: value desc, ties by the smaller id
    torch.testing.assert_close(lse, c_lse, rtol=2e-6, atol=2e-6, equal_nan=True)
    torch.testing.assert_close(values, c_vals, rtol=2e-6, atol=2e-6, equal_nan=True)
    _, r_vals, r_lse = R.capture_topk(t.double(), k, tau)
    torch.testing.assert_close(lse.double(), r_lse, rtol=2e-6, atol=2e-6, equal_nan=True)
    torch.testing.assert_close(values.double(), r_vals, rtol=2e-6, atol=2e-6, equal_nan=True)
    # kept values are the row's own (no id collisions)
    s = t.float() * (1.0 / tau)
    torch.testing.assert_close(s.gather(1, ids), values + lse[:, None], rtol=0, atol=4e-6, equal_nan=True)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("n,v,k,scale,tau,mask", [
    (3, 1999, 17, 3.0, 1.3, 0),     # odd V: scalar loads, ragged last tile
    (2, 2056, 700, 3.0, 1.0, 0),    # 16-byte loads; k larger than a tile (512 f32 / 1024 16-bit)
    (3, 37, 1, 2.0, 0.7, 0),        # k = 1, one partial tile
    (2, 300, 300, 2.0, 1.0, 0),     # k = V
    (3, 600, 40, 2.0, 2.5, 580),    # fewer finite entries than k: −inf ties by the smaller id
])
def test_topk_matches_cpu_and_reference(lib, dtype, n, v, k, scale, tau, mask):
    t = _logits(n, v, dtype, scale, seed=n * v + k, mask_cols=mask)
    got = emu_topk(lib, t, k, tau)
    if mask:  # −inf values: check ids and the finite values only
        c_ids, c_vals, c_lse = _sparse_ops.run_capture_topk(t, k, tau, "cpu")
        assert torch.equal(got[0], c_ids)
        fin = torch.isfinite(c_vals)
        torch.testing.assert_close(got[1][fin], c_vals[fin], rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(got[2], c_lse, rtol=2e-6, atol=2e-6)
        assert torch.isneginf(got[1][~fin]).all()
    else:
        _check_topk(t, k, tau, got)


def test_topk_ties_and_signed_zeros(lib):
    """Many equal values (integers in bf16) and −0/+0: the order must be the CPU's exactly."""
    g = torch.Generator().manual_seed(3)
    t = torch.randint(-3, 4, (4, 1031), generator=g).to(torch.bfloat16)
    t[0, ::7] = -0.0
    t[1] = 0.0
    t[1, ::2] = -0.0
    for k in (1, 100, 600):
        _check_topk(t, k, 1.0, emu_topk(lib, t, k, 1.0))


@pytest.mark.parametrize("order", ["ascending", "descending", "sawtooth"])
def test_topk_adversarial_rows_compact_repeatedly(lib, order):
    """Rising rows make every element a new candidate: the buffer is compacted again and again."""
    v, k = 3000, 200
    base = torch.linspace(-5, 5, v)
    row = {"ascending": base, "descending": base.flip(0),
           "sawtooth": base.reshape(6, 500).flip(0).reshape(-1)}[order]
    t = torch.stack([row, row + 0.5 * torch.randn(v, generator=torch.Generator().manual_seed(1))])
    _check_topk(t, k, 1.0, emu_topk(lib, t, k, 1.0))


def test_topk_layouts_workspace_nan_and_determinism(lib):
    wide = _logits(4, 1300, torch.bfloat16, 3.0, seed=9)
    t = wide[:, 3:1203]  # rows start at a 6-byte offset: scalar loads
    t_al = wide[:, 8:1208]  # 16-byte aligned rows of a wider tensor
    k = 90
    a = emu_topk(lib, t, k, 1.1)
    _check_topk(t, k, 1.1, a)
    _check_topk(t_al, k, 1.1, emu_topk(lib, t_al, k, 1.1))
    with _Limits(lib, 2048):  # the candidate buffer no longer fits: global workspace, 4 blocks
        assert lib.emu_topk_ws(4, 1200, k, _ext.dtype_code(t.dtype)) > 0
        b = emu_topk(lib, t, k, 1.1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = emu_topk(lib, t, k, 1.1)
    for x, y in zip(a, c):
        assert torch.equal(x, y)
    tn = t.clone()
    tn[2, 77] = float("nan")
    ids, values, lse = emu_topk(lib, tn, k, 1.1)
    assert torch.isnan(lse[2]) and torch.isnan(values[2]).all()
    keep = torch.tensor([0, 1, 3])
    assert torch.equal(ids[keep], a[0][keep]) and torch.equal(lse[keep], a[2][keep])


def test_topk_large_k_in_global_workspace(lib):
    t = _logits(2, 1500, torch.float32, 2.0, seed=4)
    assert lib.emu_topk_ws(2, 1500, 1500, 0) == 0  # still fits the emulated 99 KB
    with _Limits(lib, 8192):
        assert lib.emu_topk_ws(2, 1500, 1500, 0) > 0
        _check_topk(t, 1500, 1.0, emu_topk(lib, t, 1500, 1.0))
        _check_topk(t, 1000, 1.0, emu_topk(lib, t, 1000, 1.0))


# ----------------------------------------------------------------------------------------------
# sampled capture
# ----------------------------------------------------------------------------------------------
def emu_sample(lib, t, u, tau):
    n, v = t.shape
    ns = u.shape[1]
    width = min(ns, v)
    ids = torch.full((n, width), -7, dtype=torch.int64)
    counts = torch.full((n, width), -7, dtype=torch.int32)
    lse = torch.empty(n)
    ws, nbytes = _ws(lib.emu_sample_ws(n, v, ns, _ext.dtype_code(t.dtype)))
    rc = lib.emu_sample(t.data_ptr(), u.data_ptr(), ids.data_ptr(), counts.data_ptr(), lse.data_ptr(),
                        ws.data_ptr() if nbytes else 0, n, v, t.stride(0), _ext.dtype_code(t.dtype), tau, ns,
                        width)
    assert rc == 0
    return ids, counts, lse


def _safe_uniforms(t, tau, ns, seed, margin=1e-5):
    """Uniforms whose point u·cdf_V is more than `margin` (relative) from every CDF boundary of the
    float64 CDF of the kernels' own scaled logits: there, float32 exponentials (either kernel) and
    float64 ones pick the same id."""
    g = torch.Generator().manual_seed(seed)
    s = (t.float() * (1.0 / tau)).double()
    m = s.max(-1, keepdim=True).values
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    cdf = torch.cumsum(p, -1)
    total = cdf[:, -1:]
    u = torch.rand(t.shape[0], ns, generator=g, dtype=torch.float64)
    for _ in range(50):
        x = u * total
        pos = torch.searchsorted(cdf, x).clamp_max(cdf.shape[1] - 1)
        near = (cdf.gather(1, pos) - x).abs().minimum((cdf.gather(1, (pos - 1).clamp_min(0)) - x).abs())
        bad = near <= margin * total
        if not bad.any():
            return u
        u = torch.where(bad, torch.rand(u.shape, generator=g, dtype=torch.float64), u)
    raise AssertionError("could not draw boundary-free uniforms")


def _check_sample(t, u, tau, got, exact_reference=True):
    ids, counts, lse = got
    c_ids, c_counts, c_lse = _sparse_ops.run_capture_sample(t, u, tau, "cpu")
    assert torch.equal(ids, c_ids), (ids, c_ids)
    assert torch.equal(counts, c_counts)
    torch.testing.assert_close(lse, c_lse, rtol=2e-6, atol=2e-6, equal_nan=True)
    if exact_reference:
        r_ids, r_counts, _ = R.capture_sample(t, u, tau)
        assert torch.equal(ids, r_ids) and torch.equal(counts, r_counts)
    ns = u.shape[1]
    assert (counts.sum(1) == ns).all()
    valid = ids >= 0
    assert ((counts > 0) == valid).all()


@pytest.mark.parametrize("dtype,n,v,ns,scale,tau,mask", [
    (torch.float32, 3, 1999, 50, 3.0, 1.3, 0),     # odd V: scalar loads, ragged last segment
    (torch.bfloat16, 3, 2056, 64, 20.0, 1.0, 0),   # peaked: most draws on one id
    (torch.float16, 2, 777, 300, 0.01, 1.0, 0),    # flat: draws in every segment, repeats
    (torch.float32, 3, 777, 64, 2.5, 0.9, 100),    # masked columns never drawn
    (torch.bfloat16, 2, 40, 100, 1.0, 1.0, 0),     # num_samples > V: width V
    (torch.float32, 2, 500, 1, 2.0, 1.0, 0),       # one draw
])
def test_sample_matches_cpu_and_reference(lib, dtype, n, v, ns, scale, tau, mask):
    t = _logits(n, v, dtype, scale, seed=v + ns, mask_cols=mask)
    u = _safe_uniforms(t, tau, ns, seed=ns)
    got = emu_sample(lib, t, u, tau)
    _check_sample(t, u, tau, got)
    if mask:
        assert torch.isfinite(t.double().gather(1, got[0].clamp_min(0))[got[0] >= 0]).all()


def test_sample_extreme_uniforms_degenerate_rows_and_workspace(lib):
    v, ns = 1200, 40
    t = _logits(5, v, torch.float32, 2.0, seed=21)
    t[0, :300] = float("-inf")   # u = 0 -> the first id with mass
    t[1, 900:] = float("-inf")   # u -> 1 -> the last id with mass
    t[2, 5] = float("nan")       # as the CPU: every draw on V − 1, lse NaN
    t[3] = float("-inf")         # no mass: every draw on V − 1, lse −inf
    u = _safe_uniforms(t[4:], 1.0, ns, seed=2).expand(5, ns).clone()
    u[0, 0] = 0.0
    u[1, 0] = 1.0 - 2.0 ** -53
    u[1, 1] = 1.0 - 1e-12
    u[1, 2] = 1.5  # outside [0, 1): past every bound, the last id with mass (as the CPU)
    got = emu_sample(lib, t, u, 1.0)
    _check_sample(t, u, 1.0, got, exact_reference=False)
    ids, counts, lse = got
    assert ids[0, 0] == 300 and ids[1, (ids[1] >= 0).sum() - 1] == 899
    assert ids[2, 0] == v - 1 and counts[2, 0] == ns and (ids[2, 1:] == -1).all()
    assert ids[3, 0] == v - 1 and counts[3, 0] == ns and torch.isnan(lse[2]) and torch.isneginf(lse[3])
    with _Limits(lib, 1024):  # global workspace
        assert lib.emu_sample_ws(5, v, ns, 0) > 0
        again = emu_sample(lib, t, u, 1.0)
    for x, y in zip(got, again):
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))
    wide = _logits(3, v + 9, torch.bfloat16, 3.0, seed=22)
    tm = wide[:, 1:v + 1]  # misaligned rows
    um = _safe_uniforms(tm, 1.0, ns, seed=3)
    _check_sample(tm, um, 1.0, emu_sample(lib, tm, um, 1.0))


# ----------------------------------------------------------------------------------------------
# sparse KD loss
# ----------------------------------------------------------------------------------------------
def emu_sparse(lib, z, ids, w, target, divisor, tail, tau, soft_scale, hard, ls, ignore=-100):
    n, v = z.shape
    k = ids.shape[1]
    loss = torch.full((n,), 7.0)
    grad = torch.full((n, v), 7.0).to(z.dtype)
    div = torch.tensor(float(divisor))
    ws, nbytes = _ws(lib.emu_sparse_ws(n, v, k, _ext.dtype_code(z.dtype)))
    rc = lib.emu_sparse(z.data_ptr(), ids.data_ptr(), w.data_ptr(), 0 if target is None else target.data_ptr(),
                        div.data_ptr(), loss.data_ptr(), grad.data_ptr(), ws.data_ptr() if nbytes else 0, n, v, k,
                        z.stride(0), grad.stride(0), _ext.dtype_code(z.dtype), tail, tau, soft_scale, hard, ignore,
                        ls)
    assert rc == 0
    return loss, grad


def cpu_sparse(z, ids, w, target, divisor, tail, tau, soft_scale, hard, ls, ignore=-100):
    loss = torch.empty(z.shape[0])
    grad = torch.empty(z.shape, dtype=z.dtype)
    _sparse_ops._SPARSE_KD_IMPLS["cpu"](z, ids, w, target, torch.tensor(float(divisor)), loss, grad, tail, tau,
                                        soft_scale, hard, ignore, ls)
    return loss, grad


def _teacher(n, v, mode, k, tau, seed, pad_rows=()):
    t = _logits(n, v, torch.float32, 3.0, seed=seed)
    if mode == "topk":
        ids, values, _ = _sparse_ops.run_capture_topk(t, k, tau, "cpu")
        w = values.exp()
        for r in pad_rows:  # padding inside a top-k row: its weight leaves the stored set
            ids[r, 1::3] = -1
            w[r, 1::3] = 0.0
    else:
        u = torch.rand(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ids, counts, _ = _sparse_ops.run_capture_sample(t, u, tau, "cpu")
        w = counts.float() / k
    return ids.contiguous(), w.contiguous()


def _reference(z, ids, w, target, divisor, tail, tau, soft_scale, hard, ls, go):
    z64 = z.double().requires_grad_()
    rows = R.sparse_kd_rows(z64, ids, w.double(), target, tail=tail, temperature=tau, soft_scale=soft_scale,
                            hard_weight=hard, ignore_index=-100, label_smoothing=ls) / divisor
    (g,) = torch.autograd.grad((rows * go).sum(), z64)
    return rows.detach(), g


def _check_sparse(z, got, cpu, ref, go, ignored=()):
    loss, grad = got
    c_loss, c_grad = cpu
    r_loss, r_grad = ref
    torch.testing.assert_close(loss, c_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(loss.double(), r_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
    gz = grad.double() * go[:, None]  # the op's backward scales the stored gradient by grad_output
    if z.dtype == torch.float32:
        scale = float(r_grad.abs().max())
        torch.testing.assert_close(grad, c_grad, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(gz, r_grad, rtol=1e-5, atol=1e-6 * scale)
    else:  # one rounding of a float32 gradient to bf16/fp16 (either kernel may round the other way)
        ulp = 2.0 ** -7 if z.dtype == torch.bfloat16 else 2.0 ** -10
        tiny = 0.0 if z.dtype == torch.bfloat16 else 2.0 ** -24  # fp16 subnormal spacing
        row_max = r_grad.abs().amax(-1, keepdim=True)
        bound = ulp * c_grad.double().abs() + 1e-6 * row_max + tiny
        assert ((grad.double() - c_grad.double()).abs() <= bound).all()
        assert ((gz - r_grad).abs() <= (ulp * r_grad.abs() + 1e-6 * row_max + tiny) * go[:, None]).all()
    for r in ignored:
        assert loss[r] == 0 and (grad[r] == 0).all()


CASES = [  # (mode, tail, hard, dtype)
    ("topk", R.TAIL_BUCKET, 0.0, torch.float32), ("topk", R.TAIL_BUCKET, 0.5, torch.float32),
    ("topk", R.TAIL_RENORM, 0.0, torch.float32), ("topk", R.TAIL_RENORM, 0.5, torch.float32),
    ("sample", R.TAIL_SAMPLED, 0.0, torch.float32), ("sample", R.TAIL_SAMPLED, 0.5, torch.float32),
    ("topk", R.TAIL_BUCKET, 0.5, torch.bfloat16), ("sample", R.TAIL_SAMPLED, 0.0, torch.float16),
]


@pytest.mark.parametrize("mode,tail,hard,dtype", CASES,
                         ids=[f"{m}-{t}-h{h}-{str(d)[6:]}" for m, t, h, d in CASES])
@pytest.mark.parametrize("v", [1999, 2056], ids=["odd_v", "aligned_v"])
def test_sparse_matches_cpu_and_reference(lib, mode, tail, hard, dtype, v):
    n, k, tau = 5, 48, 1.7 if tail != R.TAIL_RENORM else 1.0
    ids, w = _teacher(n, v, mode, k, tau, seed=v, pad_rows=(1,))
    z = _logits(n, v, dtype, 2.0, seed=v + 1, mask_cols=3)
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(5))
    y[3] = -100
    y[0] = ids[0, 0]  # the target among the stored ids
    kw = dict(tail=tail, tau=tau, soft_scale=0.9 * tau * tau, hard=hard, ls=0.1)
    got = emu_sparse(lib, z, ids, w, y, 3.0, **kw)
    cpu = cpu_sparse(z, ids, w, y, 3.0, **kw)
    go = torch.rand(n, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.5
    ref = _reference(z, ids, w, y, 3.0, **kw, go=go)
    _check_sparse(z, got, cpu, ref, go, ignored=(3,))
    assert got[1].dtype == dtype


def test_sparse_edge_rows(lib):
    """k = V (no complement), all padding, no target, NaN, bad target, repeated and out-of-range ids."""
    v = 300
    t = _logits(2, v, torch.float32, 2.0, seed=30)
    ids_all, vals, _ = _sparse_ops.run_capture_topk(t, v, 1.0, "cpu")
    z = _logits(2, v, torch.float32, 2.0, seed=31)
    go = torch.ones(2, dtype=torch.float64)
    for tail in (R.TAIL_BUCKET, R.TAIL_RENORM):
        kw = dict(tail=tail, tau=1.0, soft_scale=1.0, hard=0.0, ls=0.0)
        w = vals.exp().contiguous()
        got = emu_sparse(lib, z, ids_all, w, None, 1.0, **kw)
        _check_sparse(z, got, cpu_sparse(z, ids_all, w, None, 1.0, **kw),
                      _reference(z, ids_all, w, None, 1.0, **kw, go=go), go)
    # all-padding row (bucket: the whole mass is the tail), no target
    ids = torch.full((2, 8), -1, dtype=torch.int64)
    ids[1, :3] = torch.tensor([5, 9, 2])
    w = torch.zeros(2, 8)
    w[1, :3] = torch.tensor([0.5, 0.2, 0.1])
    kw = dict(tail=R.TAIL_BUCKET, tau=2.0, soft_scale=4.0, hard=0.0, ls=0.0)
    got = emu_sparse(lib, z, ids, w, None, 2.0, **kw)
    _check_sparse(z, got, cpu_sparse(z, ids, w, None, 2.0, **kw), _reference(z, ids, w, None, 2.0, **kw, go=go), go)
    # bad rows: NaN loss and NaN gradient, never an out-of-bounds read; the other rows unaffected
    n = 6
    z6 = _logits(n, v, torch.bfloat16, 2.0, seed=32)
    ids6 = torch.arange(8).repeat(n, 1) * 7
    w6 = torch.full((n, 8), 0.1)
    y6 = torch.tensor([1, v, 2, 3, 4, -100])
    ids6[2, 3] = ids6[2, 5]       # repeated id
    ids6[3, 0] = v                # id out of range
    z6[4, 100] = float("nan")     # NaN input
    kw = dict(tail=R.TAIL_BUCKET, tau=1.0, soft_scale=1.0, hard=1.0, ls=0.0)
    loss, grad = emu_sparse(lib, z6, ids6, w6, y6, 1.0, **kw)
    c_loss, _ = cpu_sparse(z6, ids6, w6, y6, 1.0, **kw)
    for r in (1, 2, 3):
        assert torch.isnan(loss[r]) and torch.isnan(grad[r].float()).all()
    assert torch.isnan(loss[4]) and torch.isnan(c_loss[4])
    assert loss[5] == 0 and (grad[5] == 0).all()
    torch.testing.assert_close(loss[0], c_loss[0], rtol=1e-5, atol=1e-6)
    again = emu_sparse(lib, z6, ids6, w6, y6, 1.0, **kw)
    assert torch.equal(loss.nan_to_num(9.0), again[0].nan_to_num(9.0))
    assert torch.equal(grad.float().nan_to_num(9.0), again[1].float().nan_to_num(9.0))


def test_sparse_layouts_and_workspace(lib):
    v, k = 1032, 40
    ids, w = _teacher(4, v, "topk", k, 1.0, seed=40)
    wide = _logits(4, v + 8, torch.float16, 2.0, seed=41)
    y = torch.tensor([3, -100, 7, ids[3, 2].item()])
    kw = dict(tail=R.TAIL_BUCKET, tau=1.0, soft_scale=1.0, hard=0.3, ls=0.2)
    go = torch.ones(4, dtype=torch.float64)
    results = []
    for off in (0, 3):  # 16-byte aligned rows of a wider tensor, then misaligned ones
        z = wide[:, off:off + v]
        got = emu_sparse(lib, z, ids, w, y, 2.0, **kw)
        _check_sparse(z, got, cpu_sparse(z, ids, w, y, 2.0, **kw), _reference(z, ids, w, y, 2.0, **kw, go=go), go,
                      ignored=(1,))
        results.append(got)
    with _Limits(lib, 512):  # global workspace
        assert lib.emu_sparse_ws(4, v, k, _ext.dtype_code(torch.float16)) > 0
        got = emu_sparse(lib, wide[:, :v], ids, w, y, 2.0, **kw)
    assert torch.equal(got[0], results[0][0]) and torch.equal(got[1], results[0][1])
    assert math.isfinite(float(got[0].sum()))
