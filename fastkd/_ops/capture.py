"""``fastkd::capture_topk`` and ``fastkd::capture_sample``: one pass over teacher logits to the
sparse teacher the cache stores, as custom ops with fake implementations (no autograd: the teacher
gets no gradient through a capture).
"""
from __future__ import annotations

import torch

from .._backends import registry
from .._settings import acc_dtype


@torch.library.custom_op("fastkd::capture_topk", mutates_args=())
def capture_topk(teacher: torch.Tensor, *, k: int, temperature: float,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (N, k) int64, log-probabilities over the full vocabulary (N, k), lse (N,) of t/τ."""
    n = teacher.shape[0]
    acc = acc_dtype(teacher.dtype)
    ids = torch.empty((n, k), dtype=torch.int64, device=teacher.device)
    values = torch.empty((n, k), dtype=acc, device=teacher.device)
    lse = torch.empty((n,), dtype=acc, device=teacher.device)
    registry.implementation("capture_topk", backend).fn(teacher, k, temperature, ids, values, lse)
    return ids, values, lse


@capture_topk.register_fake
def _(teacher, *, k, temperature, backend):
    torch._check(teacher.dim() == 2, lambda: "capture_topk: teacher logits must be 2-D (N, V)")
    torch._check(1 <= k, lambda: "capture_topk: k must be >= 1")
    torch._check(k <= teacher.shape[1], lambda: "capture_topk: k must be <= V")
    n = teacher.shape[0]
    acc = acc_dtype(teacher.dtype)
    return (teacher.new_empty((n, k), dtype=torch.int64), teacher.new_empty((n, k), dtype=acc),
            teacher.new_empty((n,), dtype=acc))


@torch.library.custom_op("fastkd::capture_sample", mutates_args=())
def capture_sample(teacher: torch.Tensor, uniforms: torch.Tensor, *, temperature: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique drawn ids ascending (N, W) int64 padded with −1, their counts (N, W) int32 (padding 0),
    lse (N,); W = min(uniforms.shape[1], V)."""
    n, v = teacher.shape
    width = min(uniforms.shape[1], v)
    ids = torch.empty((n, width), dtype=torch.int64, device=teacher.device)
    counts = torch.empty((n, width), dtype=torch.int32, device=teacher.device)
    lse = torch.empty((n,), dtype=acc_dtype(teacher.dtype), device=teacher.device)
    registry.implementation("capture_sample", backend).fn(teacher, uniforms, temperature, ids, counts, lse)
    return ids, counts, lse


@capture_sample.register_fake
def _(teacher, uniforms, *, temperature, backend):
    torch._check(teacher.dim() == 2, lambda: "capture_sample: teacher logits must be 2-D (N, V)")
    torch._check(uniforms.dim() == 2 and uniforms.shape[0] == teacher.shape[0],
                 lambda: "capture_sample: uniforms must be (N, num_samples)")
    torch._check(uniforms.dtype == torch.float64, lambda: "capture_sample: uniforms must be float64")
    n, v = teacher.shape
    width = min(uniforms.shape[1], v)
    return (teacher.new_empty((n, width), dtype=torch.int64), teacher.new_empty((n, width), dtype=torch.int32),
            teacher.new_empty((n,), dtype=acc_dtype(teacher.dtype)))
