"""The settings of every fastkd entry point, validated by one function, each rule written once.

:func:`kd_settings` turns the keyword arguments of a loss (``kd_loss``, ``KDLoss``,
``sparse_kd_loss``, ``fused_linear_kd_loss``, the ``fastkd.distributed`` losses, the trainer) into a
frozen :class:`KDSettings`; :func:`capture_settings` does the same for ``capture``,
``fastkd.distributed.capture`` and ``TeacherCache``. A bad value raises the same exception with the
same message whichever entry point received it.

A :class:`KDSettings` yields what the layers below need: :meth:`KDSettings.kernel_params` (the
scalar settings every fused kernel takes, with TRL's JSD special cases and τ² applied) and
:meth:`KDSettings.reference_kwargs` (the arguments of the float64 reference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, NamedTuple, Optional

import torch

from ._backends import registry

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
REDUCTIONS = ("mean", "sum", "none")
TAILS = ("bucket", "renorm", "sampled")
MODES = ("topk", "sample")
SAMPLINGS = ("iid", "systematic")
# Divergence codes of the kernels (csrc/common/problems.h: enum Divergence).
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3, "skew_forward_kl": 4,
                    "skew_reverse_kl": 5}
# The divergences whose value needs the row's final normalisers before it can be summed: the kernels
# run one more pass over the row for them (and the vocab-parallel loss one more all-reduce).
SUMS_DIVERGENCES = ("jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
# Tail codes of the sparse kernels (csrc/common/problems.h: enum SparseTail).
TAIL_CODES = {"bucket": 0, "renorm": 1, "sampled": 2}


def effective_divergence(divergence: str, beta: float, skew: float = 0.1) -> str:
    """The divergence the kernels run: TRL's convention (``generalized_jsd_loss``) makes JSD with
    β = 0 forward KL and with β = 1 reverse KL; skew KL with α = 0 is the plain KL of its direction."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence in ("skew_forward_kl", "skew_reverse_kl") and skew == 0.0:
        return divergence[len("skew_"):]
    return divergence


def mixture_weight(divergence: str, beta: float, skew: float) -> float:
    """The kernels' mixture weight of a divergence: β of the JSD, α of skew KL (unused otherwise)."""
    return float(skew) if divergence.startswith("skew_") else float(beta)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and loss) dtype of logits of ``dtype``: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# The rules
# ------------------------------------------------------------------------------------------------
def check_real(name: str, value, *, low=None, high=None, low_open=False, finite=False,
               allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    if finite and math.isinf(value):
        raise ValueError(f"{name} must be finite")


def check_int(name: str, value, *, low=None, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def check_choice(name: str, value, choices, *, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


_RULES = {
    "temperature": lambda v, n: check_real(n, v, low=0.0, low_open=True, finite=True),
    "soft_weight": lambda v, n: check_real(n, v),
    "hard_weight": lambda v, n: check_real(n, v),
    "beta": lambda v, n: check_real(n, v, low=0.0, high=1.0),
    "skew": lambda v, n: check_real(n, v, low=0.0, high=1.0),
    "label_smoothing": lambda v, n: check_real(n, v, low=0.0, high=1.0),
    "softcap": lambda v, n: check_real(n, v, low=0.0, low_open=True, allow_none=True),
    "divergence": lambda v, n: check_choice(n, v, DIVERGENCES),
    "reduction": lambda v, n: check_choice(n, v, REDUCTIONS),
    "ignore_index": lambda v, n: check_int(n, v),
    "t2_scale": lambda v, n: None,
    "backend": lambda v, n: registry.check_backend(v),
    "tail": lambda v, n: check_choice(n, v, TAILS),
    "mode": lambda v, n: check_choice(n, v, MODES),
    "k": lambda v, n: check_int(n, v),  # its range needs V: check_k
    "num_samples": lambda v, n: check_int(n, v, low=1),
    "sampling": lambda v, n: check_choice(n, v, SAMPLINGS),
    # the real vocabulary of logits whose head is padded wider (None: the logits' own width)
    "vocab_size": lambda v, n: check_int(n, v, low=1, allow_none=True),
}


def check_k(k, vocab: Optional[int] = None) -> None:
    """k of a top-k capture: an int in [1, V] (V unknown: k >= 1)."""
    check_int("k", k)
    if vocab is None:
        if k < 1:
            raise ValueError(f"k must lie in [1, V], got {k}")
    elif not 1 <= k <= vocab:
        raise ValueError(f"k must lie in [1, V={vocab}], got {k}")


def check(name: str, value) -> None:
    """Apply the rule of setting ``name`` (raises TypeError/ValueError naming it)."""
    _RULES[name](value, name)


# ------------------------------------------------------------------------------------------------
# Loss settings
# ------------------------------------------------------------------------------------------------
class KernelParams(NamedTuple):
    """The scalar settings every fused kd kernel takes, by name (see ``csrc/common/problems.h``)."""

    temperature: float
    soft_scale: float      # soft_weight · (τ² if t2_scale else 1)
    hard_weight: float
    divergence: int        # DIVERGENCE_CODES, after the special cases of effective_divergence
    beta: float            # the mixture weight: JSD's β, or skew KL's α (mixture_weight)
    ignore_index: int
    label_smoothing: float
    softcap: float         # 0.0: no softcap


@dataclass(frozen=True)
class KDSettings:
    """Validated settings of a distillation loss; see :func:`fastkd.kd_loss` for their meaning.

    ``tail`` is used by losses against a sparse teacher only; ``temperature=None`` is allowed there
    (it then means the capture temperature) and resolved with :meth:`with_temperature`.
    """

    temperature: Optional[float] = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    ignore_index: int = -100
    label_smoothing: float = 0.0
    reduction: str = "mean"
    t2_scale: bool = True
    softcap: Optional[float] = None
    backend: str = "auto"
    tail: str = "bucket"

    @property
    def kernel_divergence(self) -> str:
        """The divergence the kernels run (:func:`effective_divergence`)."""
        return effective_divergence(self.divergence, self.beta, self.skew)

    @property
    def mixture_weight(self) -> float:
        """β for the JSD, α for skew KL: the one mixture weight the kernels take."""
        return mixture_weight(self.kernel_divergence, self.beta, self.skew)

    @property
    def soft_scale(self) -> float:
        """The soft term's weight: soft_weight · τ² (t2_scale) or soft_weight."""
        t = self.temperature
        return float(self.soft_weight * (t * t if self.t2_scale else 1.0))

    def kernel_params(self) -> KernelParams:
        return KernelParams(float(self.temperature), self.soft_scale, float(self.hard_weight),
                            DIVERGENCE_CODES[self.kernel_divergence], self.mixture_weight, int(self.ignore_index),
                            float(self.label_smoothing), float(self.softcap or 0.0))

    def reference_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``fastkd._reference.kd.kd_loss_rows``."""
        return dict(temperature=self.temperature, soft_weight=self.soft_weight, hard_weight=self.hard_weight,
                    divergence=self.kernel_divergence, beta=self.beta, skew=self.skew,
                    ignore_index=self.ignore_index,
                    label_smoothing=self.label_smoothing, t2_scale=self.t2_scale, softcap=self.softcap)

    def with_temperature(self, temperature: float) -> "KDSettings":
        check("temperature", temperature)
        return replace(self, temperature=float(temperature))

    def replace(self, **changes) -> "KDSettings":
        return kd_settings(**{**self.as_dict(), **changes})

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


KD_SETTING_NAMES = tuple(f.name for f in fields(KDSettings))


def kd_settings(*, allow_default_temperature: bool = False, **kwargs) -> KDSettings:
    """Validate loss settings (any subset of :class:`KDSettings`' fields) into a KDSettings.

    ``allow_default_temperature``: ``temperature=None`` is accepted (sparse teachers: it then means
    the capture temperature, filled in later by :meth:`KDSettings.with_temperature`).
    """
    unknown = set(kwargs) - set(KD_SETTING_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    for name, value in kwargs.items():
        if name == "temperature" and value is None and allow_default_temperature:
            continue
        check(name, value)
    if "softcap" in kwargs and kwargs["softcap"] is not None:
        kwargs["softcap"] = float(kwargs["softcap"])
    if "t2_scale" in kwargs:
        kwargs["t2_scale"] = bool(kwargs["t2_scale"])
    return KDSettings(**kwargs)


def check_hard_target(settings: KDSettings, target, *, what: str) -> None:
    """A hard-label term needs labels: ``what`` says which (e.g. "class ids of shape ...")."""
    if settings.hard_weight != 0.0 and target is None:
        raise ValueError(f"hard_weight != 0 needs target ({what})")


# ------------------------------------------------------------------------------------------------
# Capture settings
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptureSettings:
    """Validated settings of a capture (see :func:`fastkd.capture`)."""

    mode: str = "topk"
    k: int = 64
    num_samples: int = 50
    sampling: str = "systematic"
    temperature: float = 1.0
    backend: str = "auto"


CAPTURE_SETTING_NAMES = tuple(f.name for f in fields(CaptureSettings))


def capture_settings(**kwargs) -> CaptureSettings:
    """Validate capture settings; only the mode's own count (k or num_samples) and sampling are
    checked, as the other mode ignores them."""
    unknown = set(kwargs) - set(CAPTURE_SETTING_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    mode = kwargs.get("mode", "topk")
    check("mode", mode)
    for name, value in kwargs.items():
        if name == "mode":
            continue
        if mode == "topk" and name in ("num_samples", "sampling"):
            continue
        if mode == "sample" and name == "k":
            continue
        check(name, value)
    if "temperature" in kwargs:
        kwargs["temperature"] = float(kwargs["temperature"])
    return CaptureSettings(**kwargs)


# ------------------------------------------------------------------------------------------------
# Cross-tokenizer (ULD and hybrid) settings
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ULDSettings:
    """Validated settings of ``fastkd.uld_loss`` / ``fastkd.hybrid_uld_loss`` (see there).

    ``teacher_temperature=None`` means: ``temperature`` for teacher logits, the capture temperature
    for a ``SparseTeacher``. ``matched_weight``/``unmatched_weight`` are the hybrid's weights, both
    ``None`` (the vocabulary overlap decides) or both numbers.
    """

    k: int = 256
    temperature: float = 1.0
    teacher_temperature: Optional[float] = None
    matched_weight: Optional[float] = None
    unmatched_weight: Optional[float] = None
    reduction: str = "mean"
    backend: str = "auto"


ULD_SETTING_NAMES = tuple(f.name for f in fields(ULDSettings))


def uld_settings(**kwargs) -> ULDSettings:
    """Validate cross-tokenizer loss settings; the shared ones (temperature, reduction, backend) by
    their rules above, so a bad value reads the same as in every other entry point."""
    unknown = set(kwargs) - set(ULD_SETTING_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    for name, value in kwargs.items():
        if name == "k":
            check_int("k", value, low=1)
        elif name == "teacher_temperature":
            check_real(name, value, low=0.0, low_open=True, finite=True, allow_none=True)
        elif name in ("matched_weight", "unmatched_weight"):
            check_real(name, value, low=0.0, finite=True, allow_none=True)
        else:
            check(name, value)
    if (kwargs.get("matched_weight") is None) != (kwargs.get("unmatched_weight") is None):
        raise ValueError("matched_weight and unmatched_weight must both be None (weights from the vocabulary "
                         "overlap) or both be numbers")
    for name in ("temperature", "teacher_temperature", "matched_weight", "unmatched_weight"):
        if kwargs.get(name) is not None:
            kwargs[name] = float(kwargs[name])
    return ULDSettings(**kwargs)
