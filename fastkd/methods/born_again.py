r"""Born-Again Networks (Furlanello et al. 2018, "Born Again Neural Networks").

A sequence of generations of the *same* architecture: generation 0 learns from the labels, and
generation k+1 learns from generation k (the teacher, fixed). Per row, with z the student's and t
the previous generation's logits (the paper uses τ = 1)::

    BAN     L = τ² · KL(softmax(t/τ) ‖ softmax(z/τ))
    BAN+L   L = τ² · KL(softmax(t/τ) ‖ softmax(z/τ)) + label_weight · CE(z, y)

(the paper's cross-entropy to the teacher's output differs from the KL only by the teacher's
entropy, a constant, so the gradients are the same). The final predictor is the ensemble of the
generations: the mean of their softmax outputs (:class:`BornAgainEnsemble`).

:func:`generations` hands out a fresh student and the frozen previous generation; the training loop
stays yours.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from ..losses import kd_loss
from ._common import check_module, freeze
from .hinton import ensemble_logits

__all__ = ["born_again_loss", "generations", "BornAgainEnsemble"]


def born_again_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    target: Optional[torch.Tensor] = None, *, label_weight: float = 0.0,
                    temperature: float = 1.0, **kd_kwargs) -> torch.Tensor:
    r"""BAN (``label_weight=0``) or BAN+L (``label_weight > 0``) loss.

    Equals ``fastkd.kd_loss(student_logits, teacher_logits.detach(), target, temperature=temperature,
    soft_weight=1.0, hard_weight=label_weight, **kd_kwargs)``, i.e. without ignored labels and with
    ``reduction="mean"``::

        T**2 * F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(t / T, -1), log_target=True,
                        reduction="batchmean") + label_weight * F.cross_entropy(z, y)
    """
    if label_weight != 0.0 and target is None:
        raise ValueError("label_weight != 0 (BAN+L) needs target (class ids of shape student_logits.shape[:-1])")
    return kd_loss(student_logits, teacher_logits.detach(), target, temperature=temperature, soft_weight=1.0,
                   hard_weight=label_weight, **kd_kwargs)


def generations(make_model: Callable[[], nn.Module], num_generations: int
                ) -> Iterator[Tuple[int, nn.Module, Optional[nn.Module]]]:
    """Yields ``(k, student, teacher)`` for k = 0 .. num_generations−1.

    ``student`` is a fresh ``make_model()``; ``teacher`` is ``None`` for generation 0 and otherwise a
    frozen deep copy (eval mode, no grad) of the previous generation's student *as it was when the
    caller resumed the generator*, i.e. after the caller trained it::

        gens = []
        for k, student, teacher in generations(make_student, 3):
            train(student, teacher)        # your loop: born_again_loss if teacher is not None, else CE
            gens.append(copy.deepcopy(student).eval())
        predictor = BornAgainEnsemble(gens)
    """
    if not callable(make_model):
        raise TypeError("make_model must be a callable returning a fresh nn.Module")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive int, got {num_generations!r}")
    teacher = None
    for k in range(num_generations):
        student = make_model()
        check_module("make_model()", student)
        yield k, student, teacher
        teacher = freeze(copy.deepcopy(student))


class BornAgainEnsemble(nn.Module):
    """The mean of the generations' predicted distributions, returned as logits.

    ``forward(x)`` equals ``torch.log(torch.stack([m(x).softmax(-1) for m in models]).mean(0))``
    (computed as a log-sum-exp): log-probabilities, so ``argmax`` and ``softmax`` of the output are the
    ensemble's prediction and distribution.
    """

    def __init__(self, models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None):
        super().__init__()
        if not isinstance(models, (list, tuple)) or not models:
            raise ValueError("models must be a non-empty list of nn.Module generations")
        for i, m in enumerate(models):
            check_module(f"models[{i}]", m)
        self.members = nn.ModuleList(models)
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return ensemble_logits([m(*args, **kwargs) for m in self.members], temperature=1.0, weights=self.weights)
