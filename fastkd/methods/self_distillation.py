r"""Self-distillation: "Be Your Own Teacher" (Zhang et al. 2019, ICCV).

Auxiliary classifiers ("exits") are attached at chosen depths of one network; the deepest exit (the
network's own classifier) teaches the shallower ones, and every exit also learns from the labels.
With exits i = 1..C−1 (shallow to deep), C the deepest, q_i their logits, F_i their embeddings::

    L = CE(q_C, y) + Σ_{i<C} [ hard_weight · CE(q_i, y)
                               + soft_weight · τ² · KL(softmax(q_C/τ) ‖ softmax(q_i/τ))
                               + hint_weight · ‖F_i − F_C‖²_mean ]

The deepest exit's logits and embedding are detached in the teaching terms (the teacher is not
pulled towards its students); each KL and CE term goes through :func:`fastkd.kd_loss`. After
training, any exit is a classifier on its own (early exit): shallower exits are cheaper.

:class:`SelfDistillation` wraps an unmodified model: it captures the features at the chosen layer
names with forward hooks (registered only for the duration of each forward pass) and runs an
:class:`AuxiliaryHead` on each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
from torch import nn

from ..losses import kd_loss
from ._common import check_module, check_positive, cross_entropy
from .fitnets import FeatureCapture

__all__ = ["AuxiliaryHead", "SelfDistillation", "ExitOutputs", "self_distillation_loss"]


class AuxiliaryHead(nn.Module):
    """A small classifier attached to an intermediate feature; returns ``(logits, embedding)``.

    kinds, for ``(N, C, H, W)`` features:
      * ``"attention"``: a spatial attention mask ``sigmoid(conv1x1(relu(conv3x3(x))))`` multiplies the
        feature (as in the attention modules of SCAN/BYOT), then a 1×1 conv to ``embed_dim``, ReLU,
        global average pooling and a linear classifier.
      * ``"bottleneck"``: 1×1 conv, ReLU, 3×3 conv (stride 2), ReLU, 1×1 conv to ``embed_dim``, ReLU,
        pooling, linear classifier (BYOT's bottleneck exits).
    and for ``(N, D)`` features ``"mlp"``: Linear → ReLU → Linear to ``embed_dim`` → ReLU → classifier.

    ``embed_dim`` should equal the size of the deepest embedding when feature hints are used.
    """

    def __init__(self, in_channels: int, num_classes: int, *, embed_dim: int, kind: str = "attention",
                 hidden: Optional[int] = None):
        super().__init__()
        for n, v in (("in_channels", in_channels), ("num_classes", num_classes), ("embed_dim", embed_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        hidden = hidden or max(in_channels, embed_dim)
        self.kind = kind
        if kind == "attention":
            self.attn = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(hidden, 1, 1), nn.Sigmoid())
            self.body = nn.Sequential(nn.Conv2d(in_channels, embed_dim, 1), nn.ReLU())
        elif kind == "bottleneck":
            self.body = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(),
                                      nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(hidden, embed_dim, 1), nn.ReLU())
        elif kind == "mlp":
            self.body = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(),
                                      nn.Linear(hidden, embed_dim), nn.ReLU())
        else:
            raise ValueError(f"kind must be 'attention', 'bottleneck' or 'mlp', got {kind!r}")
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor):
        if self.kind == "mlp":
            if x.dim() != 2:
                raise ValueError(f"an 'mlp' AuxiliaryHead expects (N, D) features, got shape {tuple(x.shape)}")
            emb = self.body(x)
        else:
            if x.dim() != 4:
                raise ValueError(f"a {self.kind!r} AuxiliaryHead expects (N, C, H, W) features, "
                                 f"got shape {tuple(x.shape)}")
            if self.kind == "attention":
                x = x * self.attn(x)
            emb = self.body(x).mean(dim=(2, 3))
        return self.classifier(emb), emb


@dataclass
class ExitOutputs:
    """Logits of every exit, shallow to deep (the last is the wrapped model's own output), and their
    embeddings (``None`` when no ``feature_layer`` was given)."""

    logits: List[torch.Tensor]
    features: Optional[List[torch.Tensor]]


class SelfDistillation(nn.Module):
    """Wraps ``model`` with auxiliary exits at the named layers; the model itself is not edited.

    Args:
        model: the network; its output is the deepest exit's logits.
        heads: ``{layer name: head}`` in shallow-to-deep order; each head gets that layer's output
            and returns logits or ``(logits, embedding)`` (as :class:`AuxiliaryHead` does).
        feature_layer: name of the layer whose *input* is the deepest embedding (typically the final
            classifier); needed for the feature-hint term.

    ``forward(x)`` returns :class:`ExitOutputs`; ``predict(x, exit=i)`` the logits of one exit.
    """

    def __init__(self, model: nn.Module, heads: Mapping[str, nn.Module], *, feature_layer: Optional[str] = None):
        super().__init__()
        check_module("model", model)
        if not isinstance(heads, Mapping) or not heads:
            raise ValueError("heads must be a non-empty mapping {layer name: head module}")
        for name, head in heads.items():
            check_module(f"heads[{name!r}]", head)
        self.model = model
        self.layer_names = list(heads)
        # ModuleDict keys may not contain '.', layer names often do.
        self.heads = nn.ModuleList(heads.values())
        self.feature_layer = feature_layer
        # Validate the names now rather than at the first forward.
        FeatureCapture(model, self.layer_names).remove()
        if feature_layer is not None:
            FeatureCapture(model, [feature_layer], capture="input").remove()

    def forward(self, x) -> ExitOutputs:
        with FeatureCapture(self.model, self.layer_names) as cap:
            if self.feature_layer is not None:
                with FeatureCapture(self.model, [self.feature_layer], capture="input") as fcap:
                    final = self.model(x)
                    deep_feature = fcap[self.feature_layer]
            else:
                final, deep_feature = self.model(x), None
            inter = [cap[n] for n in self.layer_names]
        logits, feats = [], []
        for head, f in zip(self.heads, inter):
            out = head(f)
            if isinstance(out, (tuple, list)):
                logits.append(out[0])
                feats.append(out[1])
            else:
                logits.append(out)
                feats.append(None)
        logits.append(final)
        if deep_feature is None or any(f is None for f in feats):
            return ExitOutputs(logits, None)
        feats.append(deep_feature.flatten(1) if deep_feature.dim() > 2 else deep_feature)
        return ExitOutputs(logits, feats)

    @torch.no_grad()
    def predict(self, x, exit: int = -1) -> torch.Tensor:
        """Logits of one exit (``-1``: the model's own classifier, which needs no heads at all)."""
        if exit == -1 or exit == len(self.heads):
            return self.model(x)
        return self.forward(x).logits[exit]


def self_distillation_loss(outputs, target: torch.Tensor, *, temperature: float = 3.0,
                           soft_weight: float = 0.3, hard_weight: float = 0.7, hint_weight: float = 0.03,
                           ignore_index: int = -100) -> torch.Tensor:
    r"""BYOT's loss over all exits (deepest last); see the module docstring for the formula.

    Equals, with ``z = outputs.logits``, ``f = outputs.features`` and ``T = temperature``::

        F.cross_entropy(z[-1], y) + sum(
            hard_weight * F.cross_entropy(z[i], y)
            + soft_weight * T**2 * F.kl_div(F.log_softmax(z[i] / T, -1), F.log_softmax(z[-1].detach() / T, -1),
                                            log_target=True, reduction="batchmean")
            + hint_weight * F.mse_loss(f[i], f[-1].detach())           # only if features are given
            for i in range(len(z) - 1))

    (rows whose label is ``ignore_index`` count in no CE or KL term; the hint covers all rows). ``outputs`` is an :class:`ExitOutputs` or a
    list of logits. BYOT's defaults: τ = 3, soft 0.3, hard 0.7, hint 0.03.
    """
    if isinstance(outputs, ExitOutputs):
        logits, feats = outputs.logits, outputs.features
    elif isinstance(outputs, (list, tuple)):
        logits, feats = list(outputs), None
    else:
        raise TypeError(f"outputs must be ExitOutputs or a list of logits, got {type(outputs).__name__}")
    if len(logits) < 2:
        raise ValueError(f"outputs must hold at least two exits (shallow ones and the deepest), got {len(logits)}")
    check_positive("temperature", temperature)
    deep = logits[-1]
    teacher = deep.detach()
    total = cross_entropy(deep, target, ignore_index=ignore_index)
    for i, z in enumerate(logits[:-1]):
        if z.shape != deep.shape:
            raise ValueError(f"exit {i} logits have shape {tuple(z.shape)}, the deepest exit's {tuple(deep.shape)}")
        total = total + kd_loss(z, teacher.to(z.dtype), target, temperature=temperature, soft_weight=soft_weight,
                                hard_weight=hard_weight, ignore_index=ignore_index)
    if feats is not None and hint_weight != 0.0:
        deep_f = feats[-1].detach()
        for i, f in enumerate(feats[:-1]):
            if f.shape != deep_f.shape:
                raise ValueError(f"exit {i} embedding has shape {tuple(f.shape)} but the deepest embedding has "
                                 f"{tuple(deep_f.shape)}; set AuxiliaryHead(embed_dim={deep_f.shape[-1]})")
            total = total + hint_weight * (f - deep_f).pow(2).mean()
    return total
