"""Pure-PyTorch reference of the dense distillation loss.

Two roles: the test oracle (called with float64 inputs) and the ``backend="torch"`` implementation
(inputs upcast to float32). Everything here is plain autograd-able PyTorch, written for clarity, not
speed: it materialises the probability tensors the fused kernels never build.

Row-wise math: z student logits, t teacher logits, τ temperature, p = softmax(t/τ),
q = softmax(z/τ)::

    loss_row = hard_weight · CE_ε(z, y) + soft_weight · (τ² if t2_scale else 1) · D(p, q)
"""
from __future__ import annotations

import math

import torch

from .._settings import DIVERGENCES, acc_dtype, effective_divergence


def _xlogy_diff(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a·(log a − log b) elementwise with 0·log 0 = 0 (and 0 where both log terms are −inf).

    Only exact zeros are skipped: a NaN probability (a NaN logit) stays NaN, so the row's loss is
    NaN, as the fused kernels report it."""
    # Double where: masked entries (−inf − −inf = NaN) must not leak NaN into the gradient either.
    keep = a != 0
    diff = torch.where(keep, log_a - log_b, torch.zeros_like(a))
    return torch.where(keep, a * diff, torch.zeros_like(a))


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row from log-probabilities."""
    return _xlogy_diff(log_p.exp(), log_p, log_q).sum(-1)


def _log_weight(w: float) -> float:
    return math.log(w) if w > 0.0 else -math.inf


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) elementwise from log a, log b; entries where a = b = 0 get a finite stand-in
    (they carry no mass in any sum below, and logaddexp's backward would be NaN there)."""
    both = torch.isneginf(log_a) & torch.isneginf(log_b)
    zero = torch.zeros_like(log_a)
    return torch.logaddexp(torch.where(both, zero, log_a) + _log_weight(w),
                           torch.where(both, zero, log_b) + _log_weight(1.0 - w))


def divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float,
                    skew: float = 0.1) -> torch.Tensor:
    """D(p, q) per row; p teacher, q student.

    ``jsd``: β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q (TRL's ``generalized_jsd_loss``);
    ``tvd``: ½·Σ|p − q|; ``skew_forward_kl``: KL(p‖αp + (1−α)q); ``skew_reverse_kl``:
    KL(q‖αq + (1−α)p) (α = ``skew``, DistiLLM's skew KL)."""
    divergence = effective_divergence(divergence, beta, skew)
    if divergence == "forward_kl":
        return kl_rows(log_p, log_q)
    if divergence == "reverse_kl":
        return kl_rows(log_q, log_p)
    if divergence == "jsd":
        log_m = log_mixture(log_p, log_q, beta)
        return beta * kl_rows(log_p, log_m) + (1.0 - beta) * kl_rows(log_q, log_m)
    if divergence == "tvd":
        # autograd's d|x|/dx at x = 0 is 0: the subgradient the kernels use where p_i = q_i
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if divergence == "skew_forward_kl":
        return kl_rows(log_p, log_mixture(log_p, log_q, skew))
    if divergence == "skew_reverse_kl":
        return kl_rows(log_q, log_mixture(log_q, log_p, skew))
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def hard_ce_rows(z: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(1−ε)(lse(z) − z_y) + ε(lse(z) − mean_i z_i) per row; target must be valid (no ignore)."""
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ce = lse - z_y
    if label_smoothing > 0.0:
        ce = (1.0 - label_smoothing) * ce + label_smoothing * (lse - z.mean(-1))
    return ce


def kd_loss_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    t2_scale: bool = True,
    softcap: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-row loss of shape (N,) for 2-D logits (N, V); rows whose target is ignored are 0.

    Differentiable with respect to both logits. ``compute_dtype`` (default: float64 for float64
    inputs, float32 otherwise) is the dtype every operation runs in.
    """
    if compute_dtype is None:
        compute_dtype = acc_dtype(student.dtype)
    z = student.to(compute_dtype)
    t = teacher.to(compute_dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
        t = softcap * torch.tanh(t / softcap)

    if target is not None:
        keep = target != ignore_index
        safe_target = torch.where(keep, target, torch.zeros_like(target))
    else:
        keep = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        safe_target = None

    loss = torch.zeros(z.shape[0], dtype=compute_dtype, device=z.device)
    if soft_weight != 0.0:
        log_p = torch.log_softmax(t / temperature, dim=-1)
        log_q = torch.log_softmax(z / temperature, dim=-1)
        scale = soft_weight * (temperature**2 if t2_scale else 1.0)
        loss = loss + scale * divergence_rows(log_p, log_q, divergence, beta, skew)
    if hard_weight != 0.0:
        if safe_target is None:
            raise ValueError("hard_weight != 0 needs a target")
        loss = loss + hard_weight * hard_ce_rows(z, safe_target, label_smoothing)
    # where(), not multiplication: an ignored row must give exactly 0 even if its terms are inf/NaN.
    return torch.where(keep, loss, torch.zeros_like(loss))


def idiom_loss(student, teacher, target, *, temperature=1.0, soft_weight=1.0, hard_weight=0.0,
               ignore_index=-100):
    """The usual hand-written KD idiom that ``kd_loss`` replaces (used by benchmarks and docs)."""
    import torch.nn.functional as F

    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1])
    soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                    reduction="batchmean", log_target=True)
    loss = soft_weight * temperature**2 * soft
    if hard_weight:
        loss = loss + hard_weight * F.cross_entropy(s, target.reshape(-1), ignore_index=ignore_index)
    return loss
