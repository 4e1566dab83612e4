"""Shared fixtures and helpers of the test suite.

Backends on CPU tensors. Every op family is tested on every backend this machine can run:

* ``cpu``: the C++ kernels of ``fastkd._C``;
* ``torch``: the PyTorch reference (float32 compute);
* ``triton``: the Triton kernels under the Triton interpreter (``TRITON_INTERPRET=1``, set below
  before anything imports Triton, when no CUDA device is present);
* ``cuda_emu``: the CUDA kernels compiled by g++ against the host emulation of CUDA in
  ``tests/cuda_emu/`` and registered as a test-only backend (``tests/cuda_emu/backend.py``).

On a machine with a CUDA device the ``gpu``-marked tests run the real ``cuda`` and ``triton``
backends on CUDA tensors; the interpreter is then off (Triton compiles for the device), so the
``triton`` cases on CPU tensors skip with that reason.

Oracles are float64: the reference formulas of ``fastkd/_reference/`` evaluated on float64 copies of
the inputs.
"""
from __future__ import annotations

import os
import random
import zlib

import numpy as np
import torch

if not torch.cuda.is_available():
    # Triton fixes compile-versus-interpret mode at its first import: this must come first.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A suite run without the compiled kernels would test the reference against itself: a missing or
# unloadable fastkd._C fails the run at import, with its load error (FASTKD_REQUIRE_EXTENSION=0 opts out).
os.environ.setdefault("FASTKD_REQUIRE_EXTENSION", "1")

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Backends that run on CPU tensors here, in the order the tests are listed.
CPU_TENSOR_BACKENDS = ("cpu", "torch", "triton", "cuda_emu")
GPU_BACKENDS = ("cuda", "triton")


@pytest.fixture(autouse=True)
def _seed_every_test(request):
    """Every test starts from global RNG states fixed by its own name (torch, numpy, random), so a
    failure reproduces whatever ran before it; tests that need randomness also use explicit
    generators."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def logits(n, v, *, seed, scale=3.0, dtype=torch.float32, device="cpu", ignore_every=0, ignore_rows=(),
           mask_cols=0, target=True):
    """Student and teacher logits ``(n, v)`` (normal × scale, drawn in float64 then rounded to
    ``dtype``) and class ids ``(n,)`` with some rows set to -100; ``mask_cols`` random columns are
    −inf in both (never a target's column)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, v, (n,), generator=g) if target else None
    if mask_cols:
        cols = torch.randperm(v, generator=g)[:mask_cols]
        if y is not None:
            cols = cols[~torch.isin(cols, y)]
        z[:, cols] = float("-inf")
        t[:, cols] = float("-inf")
    if y is not None:
        if ignore_every:
            y[::ignore_every] = -100
        for r in ignore_rows:
            y[r] = -100
    z, t = z.to(dtype).to(device), t.to(dtype).to(device)
    return z, t, (None if y is None else y.to(device))


def teacher_logits(n, v, dtype=torch.float32, scale=3.0, seed=0, mask_cols=0):
    """One logits tensor ``(n, v)``: normal × scale drawn in float64, ``mask_cols`` random columns −inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    if mask_cols:
        x[:, torch.randperm(v, generator=g)[:mask_cols]] = float("-inf")
    return x.to(dtype)


def grad_weights(shape, seed, device="cpu"):
    """A fixed grad_output ≠ 1 (uniform in [0.5, 1.5))."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).add_(0.5).to(device)


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------
def assert_close(got, want, *, rtol=1e-5, atol_frac=1e-6, floor=1e-30, what=""):
    """Entry-wise ``|got − want| <= rtol·|want| + atol_frac·scale`` with ``scale = max(max|want|, floor)``,
    and the same NaN pattern.

    ``floor`` bounds the scale from below where the exact values are tiny or 0 (V = 1): a one-sweep
    KL is a difference of log-normalisers, so its rounding is relative to them, and a gradient that
    cancels O(1) float32 terms (a peaked JSD teacher gradient) resolves to ~ulp(max |logit|/τ)."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern differs from the reference"
    finite = ~want.isnan()
    scale = max(want[finite].abs().max().item() if finite.any() else 0.0, floor)
    err = (got - want).abs()
    bound = rtol * want.abs() + atol_frac * max(scale, 1e-30)
    bad = (err > bound) & finite & ~(got == want)  # equal infinities are fine
    assert not bad.any(), f"{what}: max err {err[bad].max().item():.3e} (scale {scale:.3e})"


def assert_no_worse_than(got, own, exact, *, factor=2.0, slack=1e-7, what=""):
    """Max error of ``got`` vs ``exact`` at most ``factor`` × that of ``own`` (PyTorch's own ops in
    the same low-precision dtype) plus ``slack``."""
    err = (got.double() - exact).abs().max().item()
    err_own = (own.double() - exact).abs().max().item()
    assert err <= factor * err_own + slack, f"{what}: {err:.3e} vs PyTorch's own {err_own:.3e}"


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------
def backend_skip_reason(name: str, device: str = "cpu"):
    """Why ``name`` cannot run on ``device`` tensors here (None if it can); a checked precondition."""
    from fastkd._backends import registry

    if name == "cuda_emu":
        return None if device == "cpu" else "the CUDA emulation runs on CPU tensors"
    if name == "triton" and device == "cpu" and not INTERPRET:
        return "a CUDA device is present: Triton compiles for it, so its CPU-tensor interpreter is off"
    if name in ("cuda",) and not HAS_GPU:
        return "needs a CUDA device"
    if name == "triton" and device == "cuda" and not HAS_GPU:
        return "needs a CUDA device"
    if registry.find("kd", name, device) is None and name != "torch":
        why = registry.why_unavailable(name)
        if name == "triton" and why and "could not be imported" in why:
            return f"triton is not installed: {why}"
        return None  # an unregistered backend that should be here: the test must fail, not skip
    return None


@pytest.fixture(scope="session")
def cuda_emulation(tmp_path_factory):
    """The CUDA kernels built against the host emulation (g++), registered as backend "cuda_emu"."""
    from cuda_emu.backend import build

    return build(tmp_path_factory.mktemp("cuda_emu"))


@pytest.fixture
def use_backend(request):
    """Makes a backend usable for the test: registers the CUDA emulation when it is asked for, and
    turns a missing precondition into a skip with its reason."""

    def use(name: str, device: str = "cpu") -> str:
        reason = backend_skip_reason(name, device)
        if reason:
            pytest.skip(reason)
        if name == "cuda_emu":
            request.getfixturevalue("cuda_emulation").register()
            request.addfinalizer(request.getfixturevalue("cuda_emulation").unregister)
        return name

    return use
