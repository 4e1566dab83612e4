"""The backend registry: which backend implements which op family, and the one rule that picks one.

This module imports no other fastkd module. Backend modules (``fastkd._backends.<name>``) are
imported by name the first time a call needs them; on import each one calls :func:`register` once
per op family it implements, and registers nothing when what it needs is missing (the compiled
extension, nvcc-built kernels, an importable Triton), recording why with :func:`unavailable`.

Op families (``OPS``):

==================  ===========================================================================
``kd``              the fused dense loss: loss rows and the gradients of both logits, in one call
``kd_shard``        the vocab-parallel phases of ``kd`` (partial statistics, JSD sums, finish)
``scale_rows``      in-place ``grad *= grad_output`` per row, rows whose factor is 1 skipped (GPU backward)
``capture_topk``    top-k capture of a teacher: ids, log-probabilities over the full vocabulary, lse
``capture_sample``  sampled capture: inverse-CDF draws, unique ids and counts, lse
``sparse_kd``       the loss against a captured (sparse) teacher, and the student's gradient
``sparse_kd_shard`` the vocab-parallel phases of ``sparse_kd``
``uld``             the Universal Logit Distillation loss (sorted probabilities), and the student's gradient
==================  ===========================================================================

The rule (:func:`resolve`): ``backend="auto"`` takes the first backend of the device type's order
(CUDA tensors: cuda, triton, torch; CPU tensors: cpu, torch; any other device: torch) that
implements the op family for that device; a backend asked for by name is used if it implements the
op family for that device, and is an error otherwise. The dtype is checked after that choice
(:func:`check_dtype`), so that float64 on a GPU backend is an error, never a silent switch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

import torch

OPS = ("kd", "kd_shard", "scale_rows", "capture_topk", "capture_sample", "sparse_kd", "sparse_kd_shard", "uld")


@dataclass(frozen=True)
class BackendInfo:
    """A backend: the module that registers its implementations, and what it needs to run."""

    module: str
    needs: str


# The backends, by name. Adding a backend is a module that calls register() plus one line here (and
# its place in AUTO_ORDER if "auto" should pick it).
_BACKEND_INFO: Dict[str, BackendInfo] = {
    "cpu": BackendInfo("fastkd._backends.cpu", "CPU tensors and the compiled extension fastkd._C"),
    "cuda": BackendInfo("fastkd._backends.cuda", "CUDA tensors and fastkd._C built with nvcc"),
    "triton": BackendInfo("fastkd._backends.triton",
                          "CUDA tensors (or TRITON_INTERPRET=1) and an importable triton"),
    "torch": BackendInfo("fastkd._backends.pytorch", "nothing beyond PyTorch"),
}
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_DEFAULT_ORDER = ("torch",)

_OP_WORDS = {
    "kd": "fused kd", "kd_shard": "vocab-parallel kd", "scale_rows": "in-place row scaling",
    "capture_topk": "teacher-cache (top-k capture)",
    "capture_sample": "teacher-cache (sampled capture)", "sparse_kd": "teacher-cache (sparse loss)",
    "sparse_kd_shard": "vocab-parallel sparse kd", "uld": "cross-tokenizer (ULD)",
}


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op family.

    ``fn`` is the callable whose contract the op family defines (see ``fastkd/_backends/README.md``);
    ``devices`` the device types it takes tensors of (``"*"``: any); ``dtypes`` the logits dtypes it takes;
    ``caps`` optional abilities, e.g. ``"loss_only"`` (kd: computes the loss without writing any
    gradient when none is wanted) and ``"autograd"`` (returns differentiable rows instead of
    filling buffers: the torch reference).
    """

    backend: str
    op: str
    fn: Callable
    devices: FrozenSet[str]
    dtypes: FrozenSet[torch.dtype]
    caps: FrozenSet[str]

    def takes(self, device_type: str) -> bool:
        return device_type in self.devices or "*" in self.devices


_IMPLS: Dict[Tuple[str, str], Impl] = {}
_LOADED: Dict[str, bool] = {}
_WHY_NOT: Dict[str, str] = {}


def register(backend: str, op: str, fn: Callable, *, devices: Iterable[str], dtypes: Iterable[torch.dtype],
             caps: Iterable[str] = ()) -> None:
    """Called by a backend module at import: ``backend`` implements ``op`` with ``fn``."""
    if backend not in _BACKEND_INFO:
        raise ValueError(f"unknown backend {backend!r}: add it to _BACKEND_INFO first")
    if op not in OPS:
        raise ValueError(f"unknown op family {op!r}; one of {OPS}")
    _IMPLS[(op, backend)] = Impl(backend, op, fn, frozenset(devices), frozenset(dtypes), frozenset(caps))


def unavailable(backend: str, why: str) -> None:
    """Called by a backend module that cannot register (what is missing, for error messages)."""
    _WHY_NOT[backend] = why


def _load(backend: str) -> None:
    if _LOADED.get(backend):
        return
    _LOADED[backend] = True
    try:
        importlib.import_module(_BACKEND_INFO[backend].module)
    except Exception as exc:  # a backend that fails to import is just unavailable; say why on use
        _WHY_NOT.setdefault(backend, f"{type(exc).__name__}: {exc}")


def find(op: str, backend: str, device_type: Optional[str] = None) -> Optional[Impl]:
    """The implementation of ``op`` by ``backend`` (for tensors of ``device_type``), or None."""
    _load(backend)
    impl = _IMPLS.get((op, backend))
    if impl is None or (device_type is not None and not impl.takes(device_type)):
        return None
    return impl


def implementation(op: str, backend: str) -> Impl:
    """The registered implementation of a backend already chosen by :func:`resolve`."""
    impl = find(op, backend)
    if impl is None:
        raise ValueError(f"backend {backend!r} has no {_OP_WORDS.get(op, op)} kernel")
    return impl


def _as_device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def backend_choices() -> Tuple[str, ...]:
    """What ``backend=`` may be: "auto" or a registered backend name."""
    return ("auto",) + tuple(_BACKEND_INFO)


def check_backend(requested) -> None:
    choices = backend_choices()
    if requested not in choices:
        raise ValueError(f"backend must be one of {choices}, got {requested!r}")


def resolve(op: str, requested: str, device) -> str:
    """The backend that runs ``op`` on tensors of ``device`` when the caller asked for ``requested``."""
    check_backend(requested)
    dtype = _as_device(device).type
    if requested == "auto":
        for cand in AUTO_ORDER.get(dtype, _DEFAULT_ORDER):
            if find(op, cand, dtype) is not None:
                return cand
        raise ValueError(f"no backend implements {_OP_WORDS.get(op, op)} for {dtype} tensors")
    if find(op, requested, dtype) is not None:
        return requested
    usable = any(impl.backend == requested and impl.takes(dtype) for impl in _IMPLS.values())
    if usable:  # the backend runs here, but not this op family
        raise ValueError(f"backend={requested!r} has no {_OP_WORDS.get(op, op)} kernel; use backend='auto' "
                         f"or 'torch'")
    why = _WHY_NOT.get(requested)
    raise ValueError(f"backend={requested!r} is not available for {dtype} tensors: it needs "
                     f"{_BACKEND_INFO[requested].needs}" + (f" ({why})" if why else ""))


def check_dtype(op: str, backend: str, dtype: torch.dtype, what: str = "logits") -> None:
    """TypeError when ``backend`` does not take ``dtype`` for ``op``, naming the backends that do."""
    impl = implementation(op, backend)
    if dtype in impl.dtypes:
        return
    for b in _BACKEND_INFO:  # the error names every backend that would take it
        _load(b)
    takers = [b for b in _BACKEND_INFO if (op, b) in _IMPLS and dtype in _IMPLS[(op, b)].dtypes]
    name = str(dtype).replace("torch.", "")
    raise TypeError(f"{name} {what} are supported by the {' and '.join(takers)} backends, not {backend!r}")


def available(op: str, device) -> List[str]:
    """Every backend that implements ``op`` for tensors of ``device`` (auto's order first)."""
    dtype = _as_device(device).type
    order = list(AUTO_ORDER.get(dtype, _DEFAULT_ORDER)) + [b for b in _BACKEND_INFO
                                                           if b not in AUTO_ORDER.get(dtype, _DEFAULT_ORDER)]
    return [b for b in order if find(op, b, dtype) is not None]


def why_unavailable(backend: str) -> Optional[str]:
    """What a backend module reported missing when it registered nothing (None if it loaded)."""
    _load(backend)
    return _WHY_NOT.get(backend)


