r"""Hint-based training (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").

A *hint* is the output of a teacher layer; the student's *guided* layer learns to predict it through
a small learned regressor r (the paper's convolutional adaptation layer)::

    L_hint = ‖ r(v_s(x)) − u_t(x) ‖²              (the paper: ½‖·‖² per example)

Training runs in two stages: first the student up to the guided layer and the regressor are
trained on ``L_hint`` alone (:func:`guided_parameters` picks those parameters), then the whole
student is trained with knowledge distillation (:func:`fastkd.kd_loss`).

:class:`FeatureCapture` records intermediate outputs with forward hooks, so neither the teacher's
nor the student's model needs editing. The teacher's feature is always detached: the teacher is
never trained by the hint; the regressor and the student are.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ._common import check_module, check_tensor, resolve_layer

__all__ = ["FeatureCapture", "HintRegressor", "hint_loss", "guided_parameters", "TwoStageSchedule"]


def _first_tensor(value):
    """Layers of many libraries return tuples (hidden, attention, ...): the first tensor is the feature."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"captured value is a {type(value).__name__}, not a tensor or a tuple starting with one; "
                    "pass select= to FeatureCapture to pick the feature")


class FeatureCapture:
    """Records the outputs (or inputs) of named submodules during forward passes, via forward hooks.

    ``capture.features[name]`` holds the value of the latest call of that submodule. Use it as a
    context manager (hooks are removed on exit) or call :meth:`remove` yourself::

        with FeatureCapture(teacher, ["layer3"], detach=True) as tcap, FeatureCapture(student, ["block2"]) as scap:
            teacher(x); student(x)
            loss = hint_loss(scap["block2"], tcap["layer3"], regressor)

    Args:
        model: the model whose submodules are hooked (unchanged apart from the temporary hooks).
        layers: submodule names as in ``model.named_modules()``.
        detach: store detached tensors (for a fixed teacher; saves its autograd graph).
        capture: ``"output"`` (default) or ``"input"`` (the first positional input, e.g. the
            embedding a classifier layer receives).
        select: maps the raw output/input to a tensor; default: the tensor itself, or the first
            element of a tuple.
    """

    def __init__(self, model: nn.Module, layers: Union[str, Sequence[str]], *, detach: bool = False,
                 capture: str = "output", select: Optional[Callable] = None):
        check_module("model", model)
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError("layers must be a non-empty list of submodule names")
        if capture not in ("output", "input"):
            raise ValueError(f"capture must be 'output' or 'input', got {capture!r}")
        self.features: Dict[str, torch.Tensor] = {}
        self._handles = []
        self._detach = detach
        self._select = select or _first_tensor
        for name in layers:
            module = resolve_layer(model, name, "layers")
            if capture == "output":
                hook = module.register_forward_hook(self._make_output_hook(name))
            else:
                hook = module.register_forward_pre_hook(self._make_input_hook(name))
            self._handles.append(hook)

    def _store(self, name, value):
        t = self._select(value)
        self.features[name] = t.detach() if self._detach else t

    def _make_output_hook(self, name):
        def hook(_module, _inputs, output):
            self._store(name, output)
        return hook

    def _make_input_hook(self, name):
        def hook(_module, inputs):
            self._store(name, inputs)
        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.features:
            raise KeyError(f"no feature captured for {name!r} yet: run a forward pass of the model first "
                           f"(captured so far: {sorted(self.features)})")
        return self.features[name]

    def clear(self) -> None:
        """Drop the stored features (and the graphs they keep alive)."""
        self.features.clear()

    def remove(self) -> None:
        """Remove the hooks; the model is as it was before."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


class HintRegressor(nn.Module):
    """The learned adaptation layer r of FitNets, from the student's feature size to the teacher's.

    ``kind="conv"``: a ``kernel_size``×``kernel_size`` convolution without padding on ``(N, C, H, W)``
    features (the paper picks the kernel so that the student's spatial size maps onto the teacher's:
    ``kernel_size = H_s − H_t + 1``; 1 keeps the size). ``kind="linear"``: ``nn.Linear`` on ``(..., D)``.
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, kind: str = "conv", kernel_size: int = 1,
                 bias: bool = True):
        super().__init__()
        for n, v in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("kernel_size", kernel_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        if kind == "conv":
            self.proj = nn.Conv2d(student_dim, teacher_dim, kernel_size, bias=bias)
        elif kind == "linear":
            if kernel_size != 1:
                raise ValueError("kernel_size applies to kind='conv' only")
            self.proj = nn.Linear(student_dim, teacher_dim, bias=bias)
        else:
            raise ValueError(f"kind must be 'conv' or 'linear', got {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv" and x.dim() != 4:
            raise ValueError(f"a conv HintRegressor expects (N, C, H, W) features, got shape {tuple(x.shape)}")
        return self.proj(x)


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor,
              regressor: Optional[nn.Module] = None, *, reduction: str = "mean") -> torch.Tensor:
    r"""FitNets' hint loss: squared error between the regressed student feature and the teacher's.

    Equals, with ``r = regressor or identity``::

        d = r(student_feature) - teacher_feature.detach()
        d.pow(2).mean()                      # reduction="mean" (= F.mse_loss)
        d.pow(2).sum() / d.shape[0]          # reduction="batchmean" (2× the paper's ½‖·‖² per example)
        d.pow(2).sum()                       # reduction="sum"

    The teacher feature is detached, so gradients reach only the student and the regressor.
    """
    check_tensor("student_feature", student_feature)
    check_tensor("teacher_feature", teacher_feature)
    if reduction not in ("mean", "batchmean", "sum"):
        raise ValueError(f"reduction must be 'mean', 'batchmean' or 'sum', got {reduction!r}")
    pred = regressor(student_feature) if regressor is not None else student_feature
    if pred.shape != teacher_feature.shape:
        raise ValueError(f"teacher_feature has shape {tuple(teacher_feature.shape)} but the "
                         f"{'regressed ' if regressor is not None else ''}student feature has shape "
                         f"{tuple(pred.shape)}; pick a regressor (HintRegressor) that maps one onto the other")
    sq = (pred - teacher_feature.detach().to(pred.dtype)).pow(2)
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum()
    return sq.sum() / max(sq.shape[0], 1)


def guided_parameters(model: nn.Module, layer: str, example_input) -> List[nn.Parameter]:
    """Parameters FitNets' first stage trains: those of the modules that run up to ``layer``'s output.

    Found by one forward pass of ``example_input`` (under ``torch.no_grad()``) with hooks on every
    module that owns parameters: a module counts if its forward finished no later than the guided
    layer's (its own submodules included). The pass runs in eval mode (no running statistics move).
    Works for any model whose guided layer does not feed
    back into itself; the example input only needs the right shape.
    Parameters that the root module uses directly in its own ``forward`` are not included. ``example_input`` may be a
    tensor or a tuple of positional arguments.
    """
    check_module("model", model)
    target = resolve_layer(model, layer, "layer")
    order: List[nn.Module] = []
    done = {"flag": False}
    handles = []

    def mark(module):
        def hook(_m, _i, _o):
            if not done["flag"] and module not in order:
                order.append(module)
            if module is target:
                done["flag"] = True
        return hook

    for m in model.modules():
        if m is target or any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_hook(mark(m)))
    was_training = model.training
    try:
        model.eval()  # the dry run must not move batch-norm running statistics
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not done["flag"]:
        raise ValueError(f"layer={layer!r} did not run in the forward pass of example_input")
    seen, params = set(), []
    for m in order:
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    for p in target.parameters():  # submodules of the guided layer that finished inside it
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


class TwoStageSchedule:
    """FitNets' schedule as a plain step counter: stage ``"hint"`` for the first ``hint_steps`` steps,
    then ``"kd"``. Use it to choose the loss and the optimiser in your own loop::

        sched = TwoStageSchedule(hint_steps=500)
        for step, (x, y) in enumerate(loader):
            if sched.stage(step) == "hint":   # stage 1: guided layers + regressor, hint loss only
                ...
            else:                            # stage 2: whole student, fastkd.kd_loss
                ...
    """

    def __init__(self, hint_steps: int):
        if isinstance(hint_steps, bool) or not isinstance(hint_steps, int) or hint_steps < 0:
            raise ValueError(f"hint_steps must be an int >= 0, got {hint_steps!r}")
        self.hint_steps = hint_steps

    def stage(self, step: int) -> str:
        return "hint" if step < self.hint_steps else "kd"
