"""The ``torch`` backend: the pure-PyTorch reference (``fastkd/_reference/``) for every op family,
on every device and float dtype. It is also the test oracle (called with float64 inputs).

Its ``kd``, ``sparse_kd`` and ``uld`` are plain autograd (cap ``"autograd"``): they return differentiable
loss rows instead of filling buffers, so the op layer calls them outside the custom ops.
"""
from __future__ import annotations

import torch

from .._reference import capture as _capture
from .._reference import kd as _kd
from .._reference import kd_shard as _kd_shard
from .._reference import sparse_kd as _sparse
from .._reference import sparse_kd_shard as _sparse_shard
from .._reference import uld as _uld
from .._settings import DIVERGENCE_CODES, TAIL_CODES
from . import registry

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_DIVERGENCE_NAMES = {code: name for name, code in DIVERGENCE_CODES.items()}
_TAIL_NAMES = {code: name for name, code in TAIL_CODES.items()}


def kd(student, teacher, target, divisor, p) -> torch.Tensor:
    """Loss rows / divisor, differentiable w.r.t. both logits (``p``: KernelParams)."""
    rows = _kd.kd_loss_rows(student, teacher, target, temperature=p.temperature, soft_weight=p.soft_scale,
                            t2_scale=False, hard_weight=p.hard_weight,
                            divergence=_DIVERGENCE_NAMES[p.divergence], beta=p.beta, skew=p.beta,
                            ignore_index=p.ignore_index, label_smoothing=p.label_smoothing,
                            softcap=p.softcap or None)
    return rows / divisor.to(rows.dtype)


class _Shard:
    """``kd_shard`` in PyTorch (``fastkd/_reference/kd_shard.py``)."""

    def stats(self, student, teacher, target, p, *, col_offset, vocab_total, stats_dtype):
        return _kd_shard.shard_stats(student, teacher, target, vocab_start=col_offset, temperature=p.temperature,
                                     softcap=p.softcap or None, ignore_index=p.ignore_index)

    def div_sums(self, student, teacher, target, merged, p, *, col_offset, vocab_total):
        return _kd_shard.shard_div_sums(student, teacher, merged, temperature=p.temperature,
                                        softcap=p.softcap or None, divergence=_DIVERGENCE_NAMES[p.divergence],
                                        weight=p.beta)

    def finish(self, student, teacher, target, merged, div_sums, divisor, p, *, col_offset, vocab_total,
               teacher_grad):
        return _kd_shard.shard_finish(
            student, teacher, target, merged, div_sums, divisor, vocab_start=col_offset, vocab_size=vocab_total,
            temperature=p.temperature, soft_scale=p.soft_scale, hard_weight=p.hard_weight,
            divergence=_DIVERGENCE_NAMES[p.divergence], weight=p.beta, ignore_index=p.ignore_index,
            label_smoothing=p.label_smoothing, softcap=p.softcap or None, teacher_grad=teacher_grad)


KD_SHARD = _Shard()


def capture_topk(teacher, k, temperature, ids, values, lse) -> None:
    i, v, s = _capture.capture_topk(teacher, k, temperature)
    ids.copy_(i)
    values.copy_(v)
    lse.copy_(s)


def capture_sample(teacher, uniforms, temperature, ids, counts, lse) -> None:
    i, c, s = _capture.capture_sample(teacher, uniforms, temperature)
    ids.copy_(i)
    counts.copy_(c)
    lse.copy_(s)


def sparse_kd(student, ids, weights, target, divisor, *, tail, temperature, soft_scale, hard_weight,
              ignore_index, label_smoothing) -> torch.Tensor:
    """Loss rows / divisor, differentiable w.r.t. the student."""
    rows = _sparse.sparse_kd_rows(student, ids, weights, target, tail=_TAIL_NAMES[tail], temperature=temperature,
                                  soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing)
    return rows / divisor.to(rows.dtype)


def uld(student, head, tail, cols, divisor, *, temperature, scale) -> torch.Tensor:
    """ULD loss rows / divisor, differentiable w.r.t. the student."""
    rows = _uld.uld_rows(student, head, tail, cols, temperature=temperature, scale=scale)
    return rows / divisor.to(rows.dtype)


class _SparseShard:
    """``sparse_kd_shard``: the phases of the vocab-parallel sparse loss."""

    stats = staticmethod(_sparse_shard.sparse_shard_stats)
    merge = staticmethod(_sparse_shard.sparse_merge)
    finish = staticmethod(_sparse_shard.sparse_shard_finish)


_ALL = ("*",)  # every device
registry.register("torch", "kd", kd, devices=_ALL, dtypes=_DTYPES, caps=("autograd",))
registry.register("torch", "kd_shard", KD_SHARD, devices=_ALL, dtypes=_DTYPES)
registry.register("torch", "capture_topk", capture_topk, devices=_ALL, dtypes=_DTYPES)
registry.register("torch", "capture_sample", capture_sample, devices=_ALL, dtypes=_DTYPES)
registry.register("torch", "sparse_kd", sparse_kd, devices=_ALL, dtypes=_DTYPES, caps=("autograd",))
registry.register("torch", "sparse_kd_shard", _SparseShard(), devices=_ALL, dtypes=_DTYPES)
registry.register("torch", "uld", uld, devices=_ALL, dtypes=_DTYPES, caps=("autograd",))
