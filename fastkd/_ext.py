"""Loads the compiled extension ``fastkd._C``; never requires CUDA to import.

Without the extension fastkd still works on the ``torch`` (and, on a GPU, ``triton``) backends, but
many times slower on CPU. So a failed load is never silent: ``import fastkd`` warns once, saying why
and what to do, and ``LOAD_ERROR`` keeps the reason for the error messages of the backends. With
``FASTKD_REQUIRE_EXTENSION=1`` a failed load raises instead (the test suite sets it).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

C = None
LOAD_ERROR: str | None = None


def _why(exc: ImportError) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    if importlib.util.find_spec("fastkd._C") is None:
        why = f"no compiled module fastkd._C next to {here}"
        if os.path.exists(os.path.join(os.path.dirname(here), "pyproject.toml")):
            why += (": this is fastkd's source tree (Python was started in the repository root, or it is "
                    "on sys.path), which holds no build; run from another directory to use the installed "
                    "package, or build the sources in place with `pip install -e .`")
        else:
            why += ": reinstall fastkd (`pip install .` from a checkout builds it)"
        return why
    return f"fastkd._C failed to load: {type(exc).__name__}: {exc}"


try:
    C = importlib.import_module("fastkd._C")
except ImportError as exc:
    LOAD_ERROR = _why(exc)
    if os.environ.get("FASTKD_REQUIRE_EXTENSION") not in (None, "", "0"):
        raise ImportError(f"fastkd: FASTKD_REQUIRE_EXTENSION is set but {LOAD_ERROR}") from exc
    warnings.warn(f"fastkd: the compiled kernels are unavailable ({LOAD_ERROR}); backend='auto' falls back "
                  "to the PyTorch reference, which is many times slower on CPU", RuntimeWarning, stacklevel=2)

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
