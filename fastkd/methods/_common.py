"""Small helpers shared by the method modules (not public API)."""
from __future__ import annotations

import torch
from torch import nn

from ..losses import kd_loss


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(logits, target, label_smoothing=..., ignore_index=...)`` through ``kd_loss``.

    The hard term of ``kd_loss`` with the soft term switched off, so every logit-level term of the
    methods runs through the same fused kernel. The "teacher" slot gets the detached student logits:
    with ``soft_weight=0`` it is read only for shape checks and contributes nothing.
    """
    return kd_loss(logits, logits.detach(), target, soft_weight=0.0, hard_weight=1.0,
                   label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode and stop its parameters from requiring grad; returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_module(name: str, value) -> None:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")


def check_tensor(name: str, value, *, min_dim: int = 1) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(value.shape)}")


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")


def named_modules_dict(model: nn.Module) -> dict:
    return dict(model.named_modules())


def resolve_layer(model: nn.Module, name: str, arg: str = "layer") -> nn.Module:
    """The submodule called ``name`` (as in ``model.named_modules()``), or a ValueError listing names."""
    if not isinstance(name, str):
        raise TypeError(f"{arg} must be a submodule name (str), got {type(name).__name__}")
    mods = named_modules_dict(model)
    if name not in mods:
        known = [n for n in mods if n]
        shown = ", ".join(repr(n) for n in known[:20]) + (" ..." if len(known) > 20 else "")
        raise ValueError(f"{arg}={name!r} is not a submodule of {type(model).__name__}; "
                         f"known names (model.named_modules()): {shown}")
    return mods[name]
