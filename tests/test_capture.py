"""The ``capture_topk`` and ``capture_sample`` op families: ``fastkd.capture`` and ``SparseTeacher``.

Part 1: the C++ kernel (and the torch backend) against the float64 reference of
``fastkd/_reference/capture.py``, and what every backend shares (NaN rows, unbiased and systematic
draws). Part 2: the GPU kernels on CPU tensors (``triton`` under the interpreter, ``cuda_emu`` on the
CUDA emulation) against the C++ kernel: top-k ids and sampled ids/counts exactly (the same float32
t/τ, the same order; uniforms kept away from cdf boundaries, where float32 mass rounding may move a
draw), values and lse within float32 rounding. Part 3: the real ``cuda``/``triton`` backends on a GPU.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CPU_TENSOR_BACKENDS, HAS_GPU, ROOT, teacher_logits

import fastkd
from fastkd import SparseTeacher, capture
from fastkd._reference import capture as R

GPU_KERNELS_ON_CPU = ("triton", "cuda_emu")  # the GPU kernels, on CPU tensors (interpreter, emulation)


def _close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# ================================================================================================
# Part 1: the C++ kernel, and every backend
# ================================================================================================
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v,k,scale,tau,mask", [(41, 1271, 17, 3.0, 1.0, 0), (7, 507, 64, 20.0, 2.5, 0),
                                                    (5, 300, 40, 2.0, 0.7, 280), (3, 1, 1, 1.0, 1.0, 0),
                                                    (4, 2, 2, 1.0, 1.0, 0)])
def test_cpu_topk_matches_reference(dtype, n, v, k, scale, tau, mask):
    t = teacher_logits(n, v, dtype, scale, seed=n + v, mask_cols=mask)
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


@pytest.mark.parametrize("v", [50257, 128256])
def test_cpu_topk_large_vocab(v):
    t = teacher_logits(3, v, torch.bfloat16, 4.0, seed=v)
    st = capture(t, k=64, temperature=1.0, backend="cpu")
    ids, vals, lse = R.capture_topk(t.double(), 64, 1.0)
    torch.testing.assert_close(t.double().gather(1, st.ids), t.double().gather(1, ids), rtol=0, atol=0)
    torch.testing.assert_close(st.values.double(), vals, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
def test_topk_nan_row_gives_nan(use_backend, backend):
    use_backend(backend)
    t = teacher_logits(3, 200)
    t[1, 7] = float("nan")
    st = capture(t, k=5, backend=backend)
    assert torch.isnan(st.lse[1]) and torch.isnan(st.values[1]).all()
    assert torch.isfinite(st.lse[[0, 2]]).all() and torch.isfinite(st.values[[0, 2]]).all()
    assert ((st.ids >= 0) & (st.ids < 200)).all()


def test_triton_topk_nan_row_in_the_large_k_fallback(use_backend):
    use_backend("triton")
    t = teacher_logits(2, 600)
    t[0, :3] = float("nan")
    st = capture(t, k=600, backend="triton")  # past the one-sweep kernel's buffer: the torch fallback
    assert torch.isnan(st.lse[0]) and torch.isnan(st.values[0]).all() and torch.isfinite(st.values[1]).all()
    assert ((st.ids >= 0) & (st.ids < 600)).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_sample_matches_reference(dtype):
    t = teacher_logits(64, 777, dtype, 2.5, seed=3, mask_cols=100)
    st = capture(t, mode="sample", num_samples=50, temperature=1.3, generator=torch.Generator().manual_seed(11),
                 sampling="iid", backend="cpu")
    u = torch.rand(64, 50, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
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


_P = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01, 0.0], dtype=torch.float64)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sample_unbiased_and_deterministic(backend):
    rows = 4000
    t = _P.log().expand(rows, -1).contiguous()
    st = capture(t, mode="sample", num_samples=50, generator=torch.Generator().manual_seed(5), backend=backend)
    st2 = capture(t, mode="sample", num_samples=50, generator=torch.Generator().manual_seed(5), backend=backend)
    assert torch.equal(st.ids, st2.ids) and torch.equal(st.counts, st2.counts)
    freq = st.dense_probs(torch.float64).mean(0)
    sigma = (_P * (1 - _P) / (rows * 50)).sqrt()
    assert ((freq - _P).abs() <= 5 * sigma + 1e-12).all(), (freq, _P)
    assert freq[-1] == 0.0


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_systematic_sampling(backend):
    """Stratified comb u_j = (j + U)/N: same draws as the reference on those uniforms, E[count/N] = p,
    and every id with p_i >= 1/N drawn floor(N p_i) or ceil(N p_i) times (i.i.d. draws are not)."""
    rows, n = 4000, 50
    t = _P.log().expand(rows, -1).contiguous()
    kw = dict(mode="sample", num_samples=n, sampling="systematic", backend=backend)
    st = capture(t, generator=torch.Generator().manual_seed(5), **kw)
    st2 = capture(t, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(st.ids, st2.ids) and torch.equal(st.counts, st2.counts)
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(rows, 1, generator=torch.Generator().manual_seed(5),
                                                            dtype=torch.float64)) / n
    ids, counts, _ = R.capture_sample(t, u, 1.0)
    assert torch.equal(st.ids, ids) and torch.equal(st.counts, counts)
    dense = st.dense_probs(torch.float64) * n
    freq = dense.mean(0) / n
    sigma = (_P * (1 - _P) / (rows * n)).sqrt()
    assert ((freq - _P).abs() <= 5 * sigma + 1e-12).all(), (freq, _P)
    big = _P >= 1.0 / n
    lo, hi = torch.floor(n * _P[big]), torch.ceil(n * _P[big])
    assert ((dense[:, big] >= lo) & (dense[:, big] <= hi)).all()
    iid = capture(t, mode="sample", num_samples=n, generator=torch.Generator().manual_seed(5), sampling="iid",
                  backend=backend)
    dense_iid = iid.dense_probs(torch.float64)[:, big] * n
    assert ((dense_iid < lo) | (dense_iid > hi)).any()  # the i.i.d. counts spread further
    with pytest.raises(ValueError, match="sampling"):
        capture(t, mode="sample", sampling="stratified")


def test_capture_bad_input():
    t = teacher_logits(4, 10)
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


@pytest.mark.parametrize("backend", GPU_KERNELS_ON_CPU)
def test_float64_is_refused_by_the_gpu_kernels(use_backend, backend):
    use_backend(backend)
    t = teacher_logits(2, 50, torch.float64)
    for mode in ("topk", "sample"):
        with pytest.raises(TypeError, match=f"float64 logits are supported by the cpu and torch backends, not '{backend}'"):
            capture(t, k=3, mode=mode, backend=backend)


def test_sparse_teacher_indexing():
    st = capture(teacher_logits(6, 30).reshape(2, 3, 30), k=4)
    assert st.shape == (2, 3) and st.flatten().shape == (6,)
    sub = st.flatten()[1:4]
    assert torch.equal(sub.ids, st.ids.reshape(6, 4)[1:4]) and torch.equal(sub.lse, st.lse.reshape(6)[1:4])
    cat = SparseTeacher.cat([st.flatten()[:2], st.flatten()[2:]])
    assert torch.equal(cat.values, st.values.reshape(6, 4))
    assert torch.equal(st[1].ids, st.ids[1])


def test_opcheck():
    t = teacher_logits(5, 37, torch.float32, 2.0, seed=14)
    torch.library.opcheck(torch.ops.fastkd.capture_topk.default, (t,), dict(k=6, temperature=1.5, backend="cpu"))
    u = torch.rand(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(torch.ops.fastkd.capture_sample.default, (t, u), dict(temperature=1.5, backend="cpu"))


def test_compile_fullgraph():
    t = teacher_logits(6, 40, torch.float32, 2.0, seed=16)

    def f(x):
        st = capture(x, k=8, temperature=1.5, backend="cpu")
        return st.values, st.ids, st.lse

    eager = f(t)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(t)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ================================================================================================
# Part 2: the GPU kernels on CPU tensors, against the C++ kernel
# ================================================================================================
def _topk_vs_cpu(backend, t, k, tau):
    st = capture(t, k=k, temperature=tau, backend=backend)
    cpu = capture(t, k=k, temperature=tau, backend="cpu")
    assert st.ids.dtype == torch.int64 and st.ids.shape == cpu.ids.shape
    assert st.values.dtype == torch.float32 and st.lse.dtype == torch.float32
    # the same float32 t/τ and the same (value desc, id asc) order: the same ids, ties included
    assert torch.equal(st.ids, cpu.ids), (st.ids, cpu.ids)
    _close(st.lse, cpu.lse, 2e-6, "lse vs cpu")
    _close(st.values, cpu.values, 2e-6, "values vs cpu")
    _, vals, lse = R.capture_topk(t.double(), k, tau)
    s = t.double() / tau
    if backend == "triton":
        # float32 t/τ and lse: ~ulp(max |t/τ|) absolute
        tol = 2e-6 * max(1.0, float(s[torch.isfinite(s)].abs().max()))
        _close(st.lse, lse, tol, "lse vs float64")
        _close(st.values, vals, tol, "values vs float64")
        # the values are the stored ids' log-probabilities over the FULL vocabulary
        _close(st.values, s.gather(1, st.ids) - lse[:, None], tol, "values at ids")
    else:
        _close(st.lse, lse, 2e-6, "lse vs float64")
        _close(st.values, vals, 2e-6, "values vs float64")
        # kept values are the row's own (no id collisions)
        s32 = t.float() * (1.0 / tau)
        torch.testing.assert_close(s32.gather(1, st.ids), st.values + st.lse[:, None], rtol=0, atol=4e-6,
                                   equal_nan=True)
    return st


TOPK_CASES = [  # (n, v, k, scale, tau, mask, dtype)
    (3, 517, 17, 3.0, 1.0, 0, torch.float32),    # odd V, several chunks; k > groups: cut-backs only
    (3, 300, 5, 20.0, 2.5, 0, torch.bfloat16),   # peaked, bf16 ties, the group-maximum raise
    (2, 129, 1, 1.0, 1.0, 0, torch.float32),     # k = 1
    (2, 300, 300, 1.0, 1.3, 0, torch.float32),   # k = V in the kernel
    (2, 600, 600, 1.0, 1.0, 0, torch.bfloat16),  # k = V past the Triton kernel's buffer: its torch fallback
] + [(n, v, k, scale, tau, 0, dt) for dt in (torch.float32, torch.bfloat16, torch.float16) for n, v, k, scale, tau in [
    (3, 1999, 17, 3.0, 1.3),     # odd V: scalar loads, ragged last tile
    (2, 2056, 700, 3.0, 1.0),    # 16-byte loads; k larger than a tile (512 f32 / 1024 16-bit)
    (3, 37, 1, 2.0, 0.7),        # k = 1, one partial tile
    (2, 300, 300, 2.0, 1.0),     # k = V
]]
MASKED_TOPK_CASES = [  # fewer finite entries than k: −inf entries fill, the smallest id first
    (3, 300, 40, 2.0, 0.7, 280, torch.float16),
] + [(3, 600, 40, 2.0, 2.5, 580, dt) for dt in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("backend", GPU_KERNELS_ON_CPU)
@pytest.mark.parametrize("n,v,k,scale,tau,mask,dtype", TOPK_CASES,
                         ids=[f"{c[0]}x{c[1]}-k{c[2]}-{str(c[6])[6:]}" for c in TOPK_CASES])
def test_topk_matches_cpu_and_reference(use_backend, backend, n, v, k, scale, tau, mask, dtype):
    use_backend(backend)
    _topk_vs_cpu(backend, teacher_logits(n, v, dtype, scale, seed=n * v + k, mask_cols=mask), k, tau)


@pytest.mark.parametrize("backend", GPU_KERNELS_ON_CPU)
@pytest.mark.parametrize("n,v,k,scale,tau,mask,dtype", MASKED_TOPK_CASES,
                         ids=[f"{c[0]}x{c[1]}-k{c[2]}-{str(c[6])[6:]}" for c in MASKED_TOPK_CASES])
def test_topk_with_masked_columns_matches_cpu(use_backend, backend, n, v, k, scale, tau, mask, dtype):
    """−inf values: ids equal, the finite values close, the rest −inf."""
    use_backend(backend)
    t = teacher_logits(n, v, dtype, scale, seed=n * v + k, mask_cols=mask)
    got = capture(t, k=k, temperature=tau, backend=backend)
    cpu = capture(t, k=k, temperature=tau, backend="cpu")
    assert torch.equal(got.ids, cpu.ids)
    fin = torch.isfinite(cpu.values)
    torch.testing.assert_close(got.values[fin], cpu.values[fin], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got.lse, cpu.lse, rtol=2e-6, atol=2e-6)
    assert torch.isneginf(got.values[~fin]).all()


@pytest.mark.parametrize("backend", GPU_KERNELS_ON_CPU)
def test_topk_ties_and_adversarial_orders(use_backend, backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(3)
    rows = [
        torch.randint(-2, 3, (400,), generator=g).float(),  # heavy ties: smaller id first
        torch.arange(400).float() / 7,                       # ascending: every entry a new candidate
        -torch.arange(400).float(),                          # descending: the first chunk decides
        torch.zeros(400),                                    # one value everywhere
        torch.where(torch.arange(400) % 3 == 0, -0.0, 0.0),  # −0 and +0 are one value
    ]
    _topk_vs_cpu(backend, torch.stack(rows), 24, 1.0)
    _topk_vs_cpu(backend, torch.stack(rows), 3, 0.5)
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
    _topk_vs_cpu(backend, torch.stack([row, row2]), 17, 1.0)
    # many equal values (integers in bf16) and −0/+0 over a longer row
    t = torch.randint(-3, 4, (4, 1031), generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    t[0, ::7] = -0.0
    t[1] = 0.0
    t[1, ::2] = -0.0
    for k in (1, 100, 600):
        _topk_vs_cpu(backend, t, k, 1.0)


@pytest.mark.parametrize("backend", GPU_KERNELS_ON_CPU)
@pytest.mark.parametrize("order", ["ascending", "descending", "sawtooth"])
def test_topk_adversarial_rows_compact_repeatedly(use_backend, backend, order):
    """Rising rows make every element a new candidate: the buffer is compacted again and again."""
    use_backend(backend)
    v, k = 3000, 200
    base = torch.linspace(-5, 5, v)
    row = {"ascending": base, "descending": base.flip(0),
           "sawtooth": base.reshape(6, 500).flip(0).reshape(-1)}[order]
    t = torch.stack([row, row + 0.5 * torch.randn(v, generator=torch.Generator().manual_seed(1))])
    _topk_vs_cpu(backend, t, k, 1.0)


def test_triton_topk_selects_without_tl_topk_on_an_older_triton():
    """tl.topk exists from Triton 3.4 on (torch 2.4-2.7 bring 3.0-3.3): without it the compiled
    kernel selects by repeated max extraction, as the interpreter does."""
    import types

    from fastkd._backends.triton import capture as tc

    older, newer = types.SimpleNamespace(), types.SimpleNamespace(topk=lambda *a, **k: None)
    assert tc._selection_network(older, interpret=False) is False
    assert tc._selection_network(newer, interpret=False) is True
    assert tc._selection_network(newer, interpret=True) is False


def test_triton_topk_bitonic_network_path(use_backend, monkeypatch):
    """The compiled kernels select with tl.topk; the interpreter's default (repeated max) is swapped
    for it here, on a small k (the network is slow in the interpreter)."""
    use_backend("triton")
    from fastkd._backends.triton import capture as tc

    monkeypatch.setattr(tc, "_TOPK_NETWORK", True)
    t = teacher_logits(2, 300, torch.float32, 3.0, seed=5)
    t[1, :200] = torch.arange(200).float()  # cut-backs too
    _topk_vs_cpu("triton", t, 3, 1.0)


@pytest.mark.parametrize("backend", GPU_KERNELS_ON_CPU)
def test_topk_row_layouts_and_determinism(use_backend, backend):
    use_backend(backend)
    wide = teacher_logits(4, 1300, torch.bfloat16, 3.0, seed=9)
    t = wide[:, 3:1203]     # rows start at a 6-byte offset: scalar loads
    t_al = wide[:, 8:1208]  # 16-byte aligned rows of a wider tensor
    k = 90
    a = _topk_vs_cpu(backend, t, k, 1.1)
    _topk_vs_cpu(backend, t_al, k, 1.1)
    c = capture(t, k=k, temperature=1.1, backend=backend)
    for x, y in zip((a.ids, a.values, a.lse), (c.ids, c.values, c.lse)):
        assert torch.equal(x, y)
    tn = t.clone()
    tn[2, 77] = float("nan")
    b = capture(tn, k=k, temperature=1.1, backend=backend)
    assert torch.isnan(b.lse[2]) and torch.isnan(b.values[2]).all()
    keep = torch.tensor([0, 1, 3])
    assert torch.equal(b.ids[keep], a.ids[keep]) and torch.equal(b.lse[keep], a.lse[keep])


def test_cuda_topk_global_workspace(use_backend, cuda_emulation):
    """When the per-row candidate buffer does not fit shared memory the kernel uses a global
    workspace: same results."""
    use_backend("cuda_emu")
    lib = cuda_emulation.lib
    wide = teacher_logits(4, 1300, torch.bfloat16, 3.0, seed=9)
    t = wide[:, 3:1203]
    a = capture(t, k=90, temperature=1.1, backend="cuda_emu")
    with cuda_emulation.shared_memory(2048):  # 4 blocks on the global workspace
        assert lib.emu_topk_ws(4, 1200, 90, 2) > 0
        b = capture(t, k=90, temperature=1.1, backend="cuda_emu")
    for x, y in zip((a.ids, a.values, a.lse), (b.ids, b.values, b.lse)):
        assert torch.equal(x, y)
    t = teacher_logits(2, 1500, torch.float32, 2.0, seed=4)
    assert lib.emu_topk_ws(2, 1500, 1500, 0) == 0  # still fits the emulated 99 KB
    with cuda_emulation.shared_memory(8192):
        assert lib.emu_topk_ws(2, 1500, 1500, 0) > 0
        _topk_vs_cpu("cuda_emu", t, 1500, 1.0)
        _topk_vs_cpu("cuda_emu", t, 1000, 1.0)


def _safe_uniforms(t, tau, num, seed, margin=1e-5):
    """Uniforms whose point u·cdf_V is more than ``margin`` (relative) from every CDF boundary of the
    float64 CDF of the kernels' own float32 scaled logits: there float32 exponentials (any kernel)
    and float64 ones pick the same id."""
    g = torch.Generator().manual_seed(seed)
    s = (t.float() * (1.0 / tau)).double()
    s = torch.where(torch.isnan(s), torch.zeros_like(s), s)
    m = s.max(-1, keepdim=True).values
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    cdf = torch.cumsum(p, -1)
    total = cdf[:, -1:]
    u = torch.rand(t.shape[0], num, generator=g, dtype=torch.float64)
    for _ in range(100):
        x = u * total
        pos = torch.searchsorted(cdf, x).clamp_max(cdf.shape[1] - 1)
        near = (cdf.gather(1, pos) - x).abs().minimum((cdf.gather(1, (pos - 1).clamp_min(0)) - x).abs())
        bad = near <= margin * total
        if not bad.any():
            return u
        u = torch.where(bad, torch.rand(u.shape, generator=g, dtype=torch.float64), u)
    raise AssertionError("could not place uniforms away from the cdf boundaries")


def _sample(backend, t, u, tau):
    return torch.ops.fastkd.capture_sample(t, u, temperature=tau, backend=backend)


def _sample_vs_cpu(backend, t, u, tau, exact_reference=True):
    ids, counts, lse = _sample(backend, t, u, tau)
    c_ids, c_counts, c_lse = _sample("cpu", t, u, tau)
    assert ids.dtype == torch.int64 and counts.dtype == torch.int32 and lse.dtype == torch.float32
    assert ids.shape == (t.shape[0], min(u.shape[1], t.shape[1]))
    assert torch.equal(ids, c_ids), (ids, c_ids)
    assert torch.equal(counts, c_counts)
    torch.testing.assert_close(lse, c_lse, rtol=2e-6, atol=2e-6, equal_nan=True)
    if exact_reference:
        r_ids, r_counts, r_lse = R.capture_sample(t.double(), u, tau)
        assert torch.equal(ids, r_ids) and torch.equal(counts, r_counts)
        _close(lse, r_lse, 2e-6, "lse vs float64")
    assert (counts.sum(1) == u.shape[1]).all()
    assert ((counts > 0) == (ids >= 0)).all()
    return ids, counts, lse


SAMPLE_CASES = [  # (n, v, num, dtype, scale, tau, mask)
    (3, 300, 50, torch.float32, 2.5, 1.0, 0),
    (3, 517, 20, torch.bfloat16, 2.5, 1.7, 100),   # zero-probability ids are never drawn
    (2, 40, 100, torch.float16, 2.5, 0.8, 0),      # more draws than ids: width V
    (2, 300, 1, torch.float32, 2.5, 3.0, 0),       # one draw
    (3, 1999, 50, torch.float32, 3.0, 1.3, 0),     # odd V: scalar loads, ragged last segment
    (3, 2056, 64, torch.bfloat16, 20.0, 1.0, 0),   # peaked: most draws on one id
    (2, 777, 300, torch.float16, 0.01, 1.0, 0),    # flat: draws in every segment, repeats
    (3, 777, 64, torch.float32, 2.5, 0.9, 100),    # masked columns never drawn
]


@pytest.mark.parametrize("backend", GPU_KERNELS_ON_CPU)
@pytest.mark.parametrize("n,v,num,dtype,scale,tau,mask", SAMPLE_CASES,
                         ids=[f"{c[0]}x{c[1]}-N{c[2]}-{str(c[3])[6:]}" for c in SAMPLE_CASES])
def test_sample_matches_cpu_exactly(use_backend, backend, n, v, num, dtype, scale, tau, mask):
    use_backend(backend)
    t = teacher_logits(n, v, dtype, scale, seed=v + num, mask_cols=mask)
    ids, _, _ = _sample_vs_cpu(backend, t, _safe_uniforms(t, tau, num, seed=7), tau)
    if mask:
        assert torch.isfinite(t.double().gather(1, ids.clamp_min(0))[ids >= 0]).all()


@pytest.mark.parametrize("backend", GPU_KERNELS_ON_CPU)
def test_sample_degenerate_rows_and_extreme_uniforms(use_backend, backend):
    use_backend(backend)
    v, num = 1200, 40
    t = teacher_logits(6, v, torch.float32, 2.0, seed=21)
    t[0, :300] = float("-inf")   # u = 0 -> the first id with mass
    t[1, 900:] = float("-inf")   # u -> 1 -> the last id with mass
    t[2, 5] = float("nan")       # as the CPU kernel: every draw on V − 1, lse NaN
    t[3] = float("-inf")         # no mass: every draw on V − 1, lse −inf
    u = _safe_uniforms(t[4:], 1.0, num, seed=2)[:1].expand(6, num).clone()
    u[0, 0] = 0.0
    u[1, 0] = 1.0 - 2.0 ** -53
    u[1, 1] = 1.0 - 1e-12
    u[1, 2] = 1.5 if backend == "cuda_emu" else u[1, 2]  # outside [0, 1): past every bound, the last id with mass
    ids, counts, lse = _sample_vs_cpu(backend, t, u, 1.0, exact_reference=False)
    assert ids[0, 0] == 300 and ids[1, (ids[1] >= 0).sum() - 1] == 899
    assert ids[2, 0] == v - 1 and counts[2, 0] == num and (ids[2, 1:] == -1).all()
    assert ids[3, 0] == v - 1 and counts[3, 0] == num and torch.isnan(lse[2]) and torch.isneginf(lse[3])
    again = _sample(backend, t, u, 1.0)
    for x, y in zip((ids, counts, lse), again):
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))
    wide = teacher_logits(3, v + 9, torch.bfloat16, 3.0, seed=22)
    tm = wide[:, 1:v + 1]  # misaligned rows
    _sample_vs_cpu(backend, tm, _safe_uniforms(tm, 1.0, num, seed=3), 1.0)


def test_cuda_sample_global_workspace(use_backend, cuda_emulation):
    use_backend("cuda_emu")
    t = teacher_logits(5, 1200, torch.float32, 2.0, seed=21)
    u = _safe_uniforms(t, 1.0, 40, seed=2)
    a = _sample("cuda_emu", t, u, 1.0)
    with cuda_emulation.shared_memory(1024):
        assert cuda_emulation.lib.emu_sample_ws(5, 1200, 40, 0) > 0
        b = _sample("cuda_emu", t, u, 1.0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", GPU_KERNELS_ON_CPU)
@pytest.mark.parametrize("v", [1, 2])
def test_tiny_vocabularies(use_backend, backend, v):
    use_backend(backend)
    t = teacher_logits(3, v, seed=v)
    _topk_vs_cpu(backend, t, v, 1.0)
    u = torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(v))
    got, want = _sample(backend, t, u, 1.0), _sample("cpu", t, u, 1.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", GPU_KERNELS_ON_CPU)
def test_public_api_same_generator_same_draws(use_backend, backend):
    use_backend(backend)
    t = teacher_logits(3, 257, torch.bfloat16, 3.0, seed=12)
    kw = dict(mode="sample", num_samples=40, temperature=1.2)
    a = capture(t, generator=torch.Generator().manual_seed(9), backend=backend, **kw)
    b = capture(t, generator=torch.Generator().manual_seed(9), backend="cpu", **kw)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts)
    assert a.num_samples == 40 and a.mode == "sample"


@pytest.mark.parametrize("backend", GPU_KERNELS_ON_CPU)
def test_opcheck_gpu_kernels(use_backend, backend):
    use_backend(backend)
    t = teacher_logits(3, 37, torch.float32, 2.0, seed=14)
    torch.library.opcheck(torch.ops.fastkd.capture_topk.default, (t,), dict(k=4, temperature=1.5, backend=backend))
    u = torch.rand(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.library.opcheck(torch.ops.fastkd.capture_sample.default, (t, u), dict(temperature=1.5, backend=backend))


@pytest.mark.slow
def test_triton_capture_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects (loop-carried type changes, scalar ops on
    specialised constants): build every capture kernel for sm_90 as the "triton" backend would
    launch it (Triton's own ptxas builds the cubin; no GPU needed)."""
    code = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        from fastkd._backends.triton import capture as C

        target = GPUTarget("cuda", 90, 32)

        def build(fn, sig, consts, warps, maxnreg=None):
            sig = dict(sig, **{k: "constexpr" for k in consts})
            opts = {"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})}
            c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=opts)
            assert c.asm.get("cubin"), fn

        # (the first autotune config of k = 64 and every config of k = 1: the others take minutes)
        # NET=False: the selection a Triton without tl.topk (before 3.4) compiles
        for kp, dt, configs, nets in ((64, "*bf16", C._topk_configs(64)[:1], (True, False)),
                                      (1, "*fp32", C._topk_configs(1), (True,))):
            for cfg in configs:
                for net in nets:
                    build(C._topk_kernel, {"t_ptr": dt, "buf_ptr": "*i64", "ids_ptr": "*i64", "vals_ptr": "*fp32",
                                           "lse_ptr": "*fp32", "V": "i32", "K": "i32", "stride_t": "i32",
                                           "stride_buf": "i32", "inv_t": "fp32"},
                          dict(cfg.kwargs, KP=kp, NET=net), cfg.num_warps, cfg.maxnreg)
        build(C._sample_stats_kernel, {"t_ptr": "*fp16", "m_ptr": "*fp32", "d_ptr": "*fp32", "V": "i32",
                                       "NSB": "i32", "stride_t": "i32", "inv_t": "fp32"},
              {"SUB": 256, "BLOCK": 4096}, 8)
        build(C._sample_draw_kernel, {"t_ptr": "*bf16", "m_ptr": "*fp32", "d_ptr": "*fp32", "u_ptr": "*fp64",
                                      "ids_ptr": "*i64", "cnt_ptr": "*i32", "lse_ptr": "*fp32", "V": "i32",
                                      "NSB": "i32", "S": "i32", "W": "i32", "stride_t": "i32", "stride_u": "i32",
                                      "inv_t": "fp32"},
              {"SUB": 256, "NSB_P": 512, "WB": 64}, 4)
        print("compiled")
    """)
    _compile_in_a_fresh_process(code)


def _triton_ptxas():
    """The ptxas Triton builds cubins with (its own bundled one, unless TRITON_PTXAS_PATH), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return None
    try:  # Triton >= 3.5 picks the ptxas per architecture
        tool = get_ptxas(90) if "arch" in inspect.signature(get_ptxas).parameters else get_ptxas()
        path = tool.path
    except Exception:  # triton raises when it finds none
        return None
    return path if path and os.path.exists(path) else None


def _compile_in_a_fresh_process(code):
    pytest.importorskip("triton")
    if _triton_ptxas() is None:
        pytest.skip("this Triton has no ptxas to build cubins with")
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]


# ================================================================================================
# Part 3: the GPU backends on CUDA tensors, against the C++ kernel on the same inputs
# ================================================================================================
DEV = "cuda"
GPU = ("cuda", "triton")


def gpu_logits(n, v, dtype=torch.float32, scale=3.0, seed=0, mask_cols=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, v, generator=g, device=DEV) * scale
    x[1::4] *= 6.0  # some peaked rows
    if mask_cols:
        x[:, torch.randperm(v, generator=g, device=DEV)[:mask_cols]] = float("-inf")
    return x.to(dtype)


def _s_tol(t, tau):
    s = t.double() / tau
    return 2e-6 * max(1.0, float(s[torch.isfinite(s)].abs().max()))


def _gpu_topk(backend, t, k, tau):
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


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("v", [32000, 50257, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_topk_matches_cpu(use_backend, backend, v, dtype):
    use_backend(backend, "cuda")
    _gpu_topk(backend, gpu_logits(24, v, dtype, seed=v), 64, 1.0 if dtype == torch.bfloat16 else 0.8)


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_topk_k_sizes_ties_and_orders(use_backend, backend):
    use_backend(backend, "cuda")
    v = 50257
    t = gpu_logits(8, v, torch.bfloat16, seed=1)
    g = torch.Generator(device=DEV).manual_seed(2)
    t[0] = torch.randint(-3, 4, (v,), device=DEV, generator=g).to(t.dtype)  # heavy ties: smaller id first
    t[1] = torch.arange(v, device=DEV).to(t.dtype) / 1000.0                 # ascending: every entry a candidate
    t[2] = -torch.arange(v, device=DEV).to(t.dtype) / 1000.0
    t[3] = 0.0
    t[4, 100:] = float("-inf")                                              # fewer finite entries than k
    for k in (1, 5, 64, 300, 1000):
        _gpu_topk(backend, t, k, 1.3)


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_topk_nan_row(use_backend, backend):
    use_backend(backend, "cuda")
    t = gpu_logits(3, 32000)
    t[1, 7] = float("nan")
    st = capture(t, k=64, backend=backend)
    assert torch.isnan(st.lse[1]) and torch.isnan(st.values[1]).all()
    assert torch.isfinite(st.lse[[0, 2]]).all()
    assert ((st.ids >= 0) & (st.ids < 32000)).all()


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("v,num,dtype,tau", [(128256, 50, torch.bfloat16, 1.0), (50257, 1000, torch.float16, 0.7),
                                             (32000, 50, torch.float32, 2.0)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_sample_matches_cpu_exactly(use_backend, backend, v, num, dtype, tau):
    use_backend(backend, "cuda")
    t = gpu_logits(16, v, dtype, seed=v + num, mask_cols=1000)
    # a 1e-6 margin: the CUDA kernel compares against a float64 total, the CPU kernel a float32 one
    u = _safe_uniforms(t.cpu(), tau, num, seed=5, margin=1e-6).to(DEV)
    ids, counts, lse = _sample(backend, t, u, tau)
    ids_c, counts_c, lse_c = _sample("cpu", t.cpu(), u.cpu(), tau)
    assert ids.dtype == torch.int64 and counts.dtype == torch.int32 and ids.shape == (16, min(num, v))
    assert torch.equal(ids.cpu(), ids_c) and torch.equal(counts.cpu(), counts_c)
    assert (counts.sum(1) == num).all()
    _close(lse, lse_c, _s_tol(t, tau), "lse")


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_sample_degenerate_rows(use_backend, backend):
    use_backend(backend, "cuda")
    v, num = 32001, 40
    t = gpu_logits(3, v)
    t[0] = float("-inf")
    t[1, 5] = float("nan")
    u = torch.rand(3, num, dtype=torch.float64, device=DEV, generator=torch.Generator(device=DEV).manual_seed(3))
    ids, counts, lse = _sample(backend, t, u, 1.0)
    for r in (0, 1):  # every draw to the last id, as the CPU kernel does
        assert ids[r, 0] == v - 1 and counts[r, 0] == num and (ids[r, 1:] == -1).all()
    assert lse[0] == float("-inf") and torch.isnan(lse[1]) and torch.isfinite(lse[2])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_auto_prefers_a_gpu_kernel():
    from fastkd._backends import registry

    assert registry.resolve("capture_topk", "auto", torch.device(DEV)) in ("cuda", "triton")
    assert fastkd.capture(gpu_logits(2, 1000), k=4).ids.device.type == "cuda"
