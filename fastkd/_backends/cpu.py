"""The ``cpu`` backend: the fused C++ kernels of ``fastkd._C`` (``csrc/cpu/``), OpenMP over rows.

Implements ``kd`` (also loss-only, without writing a gradient), ``kd_shard``, ``capture_topk``,
``capture_sample``, ``sparse_kd`` and ``uld`` for CPU tensors of every float dtype. The thread count follows
``torch.get_num_threads()``. Registers nothing when the extension is not built.
"""
from __future__ import annotations

import torch

from .. import _ext
from . import registry
from ._kernel_args import (DIV_SUMS, FINISH, STATS, capture_sample_args, capture_topk_args, kd_args, sparse_kd_args,
                           uld_args)

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def kd(student, teacher, target, divisor, loss, grad_s, grad_t, p) -> None:
    _ext.C.kd_cpu(**kd_args(student, teacher, target, divisor, loss, grad_s, grad_t, p),
                  num_threads=torch.get_num_threads())


class _Shard:
    """The vocab-parallel phases (``kd_shard``): statistics (N, KD_STATS_WIDTH), divergence sums (N, 2)
    and finish, in the accumulation dtype of the logits."""

    @staticmethod
    def _run(mode, student, teacher, target, p, *, col_offset, vocab_total, **bufs):
        args = kd_args(student, teacher, target, bufs.pop("divisor", None), bufs.pop("loss", None),
                       bufs.pop("grad_s", None), bufs.pop("grad_t", None), p, mode=mode, col_offset=col_offset,
                       vocab_total=vocab_total, **bufs)
        _ext.C.kd_cpu(**args, num_threads=torch.get_num_threads())

    def stats(self, student, teacher, target, p, *, col_offset, vocab_total, stats_dtype):
        out = torch.empty(student.shape[0], _ext.C.KD_STATS_WIDTH, dtype=stats_dtype, device=student.device)
        self._run(STATS, student, teacher, target, p, col_offset=col_offset, vocab_total=vocab_total,
                  stats_out=out)
        return out

    def div_sums(self, student, teacher, target, merged, p, *, col_offset, vocab_total):
        out = torch.empty(student.shape[0], 2, dtype=merged.dtype, device=student.device)
        self._run(DIV_SUMS, student, teacher, target, p, col_offset=col_offset, vocab_total=vocab_total,
                  stats_in=merged, sums_out=out)
        return out

    def finish(self, student, teacher, target, merged, div_sums, divisor, p, *, col_offset, vocab_total,
               teacher_grad):
        loss = torch.empty(student.shape[0], dtype=merged.dtype, device=student.device)
        grad_s = torch.empty_like(student, memory_format=torch.contiguous_format)
        grad_t = torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad else None
        self._run(FINISH, student, teacher, target, p, col_offset=col_offset, vocab_total=vocab_total,
                  divisor=divisor.to(merged.dtype), loss=loss, grad_s=grad_s, grad_t=grad_t, stats_in=merged,
                  sums_in=div_sums)
        return loss, grad_s, grad_t


def capture_topk(teacher, k, temperature, ids, values, lse) -> None:
    _ext.C.capture_topk_cpu(**capture_topk_args(teacher, k, temperature, ids, values, lse),
                            num_threads=torch.get_num_threads())


def capture_sample(teacher, uniforms, temperature, ids, counts, lse) -> None:
    u = uniforms.contiguous()
    _ext.C.capture_sample_cpu(**capture_sample_args(teacher, u, temperature, ids, counts, lse),
                              num_threads=torch.get_num_threads())


def sparse_kd(student, ids, weights, target, divisor, loss, grad, **settings) -> None:
    _ext.C.sparse_kd_cpu(**sparse_kd_args(student, ids.contiguous(), weights.contiguous(), target, divisor, loss,
                                          grad, **settings), num_threads=torch.get_num_threads())


def uld(student, head, tail, cols, divisor, loss, grad, *, temperature, scale) -> None:
    c = None if cols is None else cols.to(torch.uint8).contiguous()
    _ext.C.uld_cpu(**uld_args(student, head.contiguous(), tail.contiguous(), c, divisor, loss, grad,
                              temperature=temperature, scale=scale), num_threads=torch.get_num_threads())


if _ext.C is None:
    registry.unavailable("cpu", f"extension failed to load: {_ext.LOAD_ERROR}")
else:
    _cpu = ("cpu",)
    registry.register("cpu", "kd", kd, devices=_cpu, dtypes=_DTYPES, caps=("loss_only",))
    registry.register("cpu", "kd_shard", _Shard(), devices=_cpu, dtypes=_DTYPES)
    registry.register("cpu", "capture_topk", capture_topk, devices=_cpu, dtypes=_DTYPES)
    registry.register("cpu", "capture_sample", capture_sample, devices=_cpu, dtypes=_DTYPES)
    registry.register("cpu", "sparse_kd", sparse_kd, devices=_cpu, dtypes=_DTYPES)
    registry.register("cpu", "uld", uld, devices=_cpu, dtypes=_DTYPES)
