"""The ``kd_shard`` op family: the vocab-parallel phases of the dense loss, in one process.

A row's vocabulary is cut into slices; ``stats`` per slice, ``merge_stats``, (JSD, TVD, skew KL: ``div_sums``
per slice, summed), then ``finish`` per slice must give the fused loss and gradient of the same
backend, and the float64 reference. Every backend: ``cpu`` and ``cuda_emu`` run the kernels' modes
1-3, ``torch`` (and ``triton``, which uses it) the PyTorch phases. The multi-process loss over
``torch.distributed`` is in ``test_distributed.py``.
"""
from __future__ import annotations

import pytest
import torch
from conftest import CPU_TENSOR_BACKENDS, GPU_BACKENDS, HAS_GPU, assert_close, logits

from fastkd._backends import registry
from fastkd._reference import kd as ref
from fastkd._reference.kd_shard import merge_stats
from fastkd._settings import DIVERGENCE_CODES, SUMS_DIVERGENCES, acc_dtype, kd_settings

DIVS = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"]


def _fused(backend, z, t, y, p, divisor):
    impl = registry.implementation("kd", backend)
    if "autograd" in impl.caps:
        zz, tt = z.clone().requires_grad_(), t.clone().requires_grad_()
        rows = impl.fn(zz, tt, y, divisor, p)
        rows.sum().backward()
        return rows.detach(), zz.grad, tt.grad
    loss = torch.empty(z.shape[0], dtype=acc_dtype(z.dtype), device=z.device)
    gs, gt = torch.empty_like(z), torch.empty_like(t)
    impl.fn(z, t, y, divisor, loss, gs, gt, p)
    return loss, gs, gt


def _sharded(backend, z, t, y, p, divisor, parts):
    phases = registry.implementation("kd_shard", backend).fn
    n, v = z.shape
    stats = [phases.stats(z[:, a:b], t[:, a:b], y, p, col_offset=a, vocab_total=v, stats_dtype=acc_dtype(z.dtype))
             for a, b in parts]
    merged = merge_stats(torch.stack(stats)).contiguous()
    sums = None
    if p.divergence in tuple(DIVERGENCE_CODES[d] for d in SUMS_DIVERGENCES):
        sums = sum(phases.div_sums(z[:, a:b], t[:, a:b], y, merged, p, col_offset=a, vocab_total=v)
                   for a, b in parts).contiguous()
    gs, gt = torch.empty_like(z), torch.empty_like(t)
    loss = None
    for a, b in parts:
        rows, g_s, g_t = phases.finish(z[:, a:b], t[:, a:b], y, merged, sums, divisor, p, col_offset=a,
                                       vocab_total=v, teacher_grad=True)
        loss = rows if loss is None else loss
        torch.testing.assert_close(rows, loss, rtol=0, atol=0)  # every slice finishes the same row loss
        gs[:, a:b], gt[:, a:b] = g_s, g_t
    return stats, loss, gs, gt


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
def test_shard_phases_merge_to_the_fused_loss(use_backend, backend, divergence):
    use_backend(backend)
    n, v, cut = 6, 1000, 389
    z, t, y = logits(n, v, seed=7, dtype=torch.bfloat16, ignore_rows=(1,))
    y[0], y[3] = cut, cut - 1  # targets at the slice boundary
    kw = dict(temperature=2.0, hard_weight=0.5, label_smoothing=0.1, divergence=divergence, beta=0.3, skew=0.2)
    p = kd_settings(**kw).kernel_params()
    divisor = torch.tensor(7.0)
    fused = _fused(backend, z, t, y, p, divisor)
    parts = [(0, cut), (cut, v)]
    stats, loss, gs, gt = _sharded(backend, z, t, y, p, divisor, parts)
    if backend != "cpu" and registry.find("kd_shard", "cpu", "cpu") is not None:
        # the statistics of every slice agree with the C++ kernel's
        cpu = registry.implementation("kd_shard", "cpu").fn
        for (a, b), st in zip(parts, stats):
            want = cpu.stats(z[:, a:b], t[:, a:b], y, p, col_offset=a, vocab_total=v, stats_dtype=torch.float32)
            torch.testing.assert_close(st.float(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.float(), fused[0].float(), rtol=1e-5, atol=1e-6)
    # the merge order differs from the fused block merge: the gradients may differ in the last bit
    torch.testing.assert_close(gs.float(), fused[1].float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(gt.float(), fused[2].float(), rtol=2 ** -7, atol=1e-6)
    rows = ref.kd_loss_rows(z.double(), t.double(), y, **kw) / 7.0
    assert_close(loss, rows, rtol=1e-5, atol_frac=1e-5, what="sharded loss")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_shard_phases_merge_to_the_fused_loss(use_backend, backend):
    """Two vocabulary slices of GPT-2's vocabulary on the GPU == the fused kernel."""
    use_backend(backend, "cuda")
    n, v, cut = 10, 50257, 20000
    z, t, y = logits(n, v, seed=13, dtype=torch.bfloat16, device="cuda", ignore_every=5)
    for divergence in DIVS:
        p = kd_settings(temperature=2.0, soft_weight=1.0, hard_weight=0.5, divergence=divergence, beta=0.3,
                        label_smoothing=0.1).kernel_params()
        divisor = torch.tensor(7.0, device="cuda")
        fused = _fused(backend, z, t, y, p, divisor)
        _, loss, gs, gt = _sharded(backend, z, t, y, p, divisor, [(0, cut), (cut, v)])
        torch.testing.assert_close(loss, fused[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs.float(), fused[1].float(), rtol=1e-2, atol=1e-6)
        torch.testing.assert_close(gt.float(), fused[2].float(), rtol=1e-2, atol=1e-6)
