"""Helpers shared by the Triton kernel modules."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _inv_temperature(temperature: float) -> float:
    # The CPU kernel forms 1/τ in float32 (Acc(1) / Acc(τ)); the same rounding keeps t/τ, and so
    # the top-k keys and their ties, bitwise equal across backends.
    return float(np.float32(1.0) / np.float32(temperature))


def _device_ctx(t: torch.Tensor):
    # Triton launches on the current stream of the current device
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_dtype(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 {what}, got {t.dtype}")
