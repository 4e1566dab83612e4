"""The ``triton`` backend: Triton kernels for ``kd`` (``kd.py``), ``capture_topk`` and
``capture_sample`` (``capture.py``) and ``sparse_kd`` (``sparse_kd.py``); its ``kd_shard`` runs the
PyTorch phases of the torch backend on the GPU.

Triton is imported only where it can run: when a CUDA device is present, or under
``TRITON_INTERPRET=1`` (then it also takes CPU tensors, which is how the tests run the kernels
without a GPU). Importing Triton costs ~0.3 s and fixes compile-versus-interpret mode at its first
import, so nothing imports it before a call asks for this backend.
"""
from __future__ import annotations

import os

import torch

from .. import registry

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _register() -> None:
    if not (torch.cuda.is_available() or _INTERPRET):
        registry.unavailable("triton", "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)")
        return
    try:
        from . import capture, kd, sparse_kd
    except Exception as exc:  # triton missing or too old
        registry.unavailable("triton", f"triton could not be imported ({type(exc).__name__}: {exc})")
        return
    from .. import pytorch

    devices = ("cuda", "cpu") if _INTERPRET else ("cuda",)
    registry.register("triton", "kd", kd.triton_kd, devices=devices, dtypes=_DTYPES, caps=("loss_only",))
    registry.register("triton", "kd_shard", pytorch.KD_SHARD, devices=devices, dtypes=_DTYPES)
    registry.register("triton", "scale_rows", kd.scale_rows_, devices=devices, dtypes=_DTYPES)
    registry.register("triton", "capture_topk", capture.triton_capture_topk, devices=devices, dtypes=_DTYPES)
    registry.register("triton", "capture_sample", capture.triton_capture_sample, devices=devices, dtypes=_DTYPES)
    registry.register("triton", "sparse_kd", sparse_kd.triton_sparse_kd, devices=devices, dtypes=_DTYPES)


_register()
