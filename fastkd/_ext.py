"""Loads the compiled extension ``fastkd._C`` if it was built; never requires CUDA to import."""
from __future__ import annotations

import os

C = None
LOAD_ERROR: str | None = None
try:  # the extension is optional: without it the torch (and Triton) backends still work
    from . import _C as C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    LOAD_ERROR = str(exc)
    if os.environ.get("FASTKD_REQUIRE_EXTENSION"):
        raise

DTYPE_CODES = {}


def _init_dtype_codes():
    import torch

    DTYPE_CODES.update({torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3})


_init_dtype_codes()


def has_cpu_kernels() -> bool:
    return C is not None


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with CUDA kernels (says nothing about a GPU being present)."""
    return C is not None and bool(C.built_with_cuda())


def dtype_code(dtype) -> int:
    return DTYPE_CODES[dtype]
