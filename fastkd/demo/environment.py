"""Where the demo runs: no network, the cache directory, the device and the autocast dtype.

Importing this module sets the Hugging Face offline switches (unless the caller set them), so that
nothing the demo does ever reaches for a download.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never downloads anything
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def default_cache_dir() -> str:
    """``$FASTKD_CACHE_DIR``, else ``./.fastkd_cache``."""
    return os.environ.get("FASTKD_CACHE_DIR", os.path.join(os.getcwd(), ".fastkd_cache"))


def pick_device(requested: Optional[str], preset_device: str, preset_name: str):
    """The ``torch.device`` to run on: the one asked for, else the preset's; CPU (with a warning)
    when that is CUDA and no GPU is visible."""
    import torch

    name = requested or preset_device
    if name == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"preset {preset_name!r} asks for a GPU but none is available: running on CPU (slow)")
        name = "cpu"
    return torch.device(name)


def autocast_dtype(autocast_bf16: bool, device):
    """bfloat16 when the preset asks for it and the device is a GPU, else None (no autocast)."""
    import torch

    return torch.bfloat16 if autocast_bf16 and device.type == "cuda" else None
