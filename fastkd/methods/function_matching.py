r"""Function matching: "Knowledge distillation: A good teacher is patient and consistent"
(Beyer et al. 2022, CVPR; arXiv 2021).

Distillation as matching two *functions*: on every step the teacher is run on the very same
augmented input the student sees (consistent teaching; no precomputed teacher outputs), with
aggressive input mixing (mixup) so the student is probed away from the training points, and the
schedule is long (patient teaching). No labels are needed::

    x̃ = λ·x + (1 − λ)·x[π],  λ ~ Beta(α, α) per example, π a random permutation of the batch
    L  = τ² · KL(softmax(teacher(x̃)/τ) ‖ softmax(student(x̃)/τ))          (the paper: τ = 1)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..losses import kd_loss
from ._common import check_module, check_positive, check_tensor

__all__ = ["mixup", "function_matching_loss"]


def mixup(inputs: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """Mixes every example with a random partner of the same batch (Zhang et al. 2018, "mixup").

    Returns ``lam * inputs + (1 - lam) * inputs[perm]`` with ``lam`` of shape ``(N, 1, ...)`` drawn
    from Beta(α, α) per example and ``perm = torch.randperm(N)``; draws come from torch's global
    generator (seed it with ``torch.manual_seed``). Labels are not mixed: function matching needs none.
    """
    check_tensor("inputs", inputs)
    check_positive("alpha", alpha)
    n = inputs.shape[0]
    a = torch.tensor(float(alpha), dtype=torch.float32, device=inputs.device)
    lam = torch.distributions.Beta(a, a).sample((n,)).to(inputs.dtype)
    perm = torch.randperm(n, device=inputs.device)
    lam = lam.view(n, *([1] * (inputs.dim() - 1)))
    return lam * inputs + (1.0 - lam) * inputs[perm]


def function_matching_loss(student: nn.Module, teacher: nn.Module, inputs: torch.Tensor, *,
                           augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = mixup,
                           temperature: float = 1.0, return_logits: bool = False, **kd_kwargs):
    r"""One function-matching step's loss: both models see the same augmented batch.

    Equals::

        x = augment(inputs) if augment is not None else inputs
        with torch.no_grad():
            t = teacher(x)
        fastkd.kd_loss(student(x), t, temperature=temperature, **kd_kwargs)

    The teacher runs under ``torch.no_grad()`` (and is never trained); put it in eval mode yourself.
    With ``return_logits=True`` returns ``(loss, student_logits, teacher_logits)``.
    """
    check_module("student", student)
    check_module("teacher", teacher)
    check_tensor("inputs", inputs)
    if kd_kwargs.get("hard_weight", 0.0) != 0.0:
        raise ValueError("function matching uses no labels: hard_weight must be 0 (the mixed inputs have none)")
    x = augment(inputs) if augment is not None else inputs
    with torch.no_grad():
        t = teacher(x)
    z = student(x)
    loss = kd_loss(z, t.to(z.dtype), temperature=temperature, **kd_kwargs)
    if return_logits:
        return loss, z, t
    return loss
