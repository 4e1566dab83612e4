"""The teacher-logit cache: capture a sparse teacher in one pass (``teacher``), and keep it on disk
(``store``). ``fastkd.sparse_kd_loss`` (in ``fastkd.losses``) trains a student against it."""
from __future__ import annotations

import importlib

from .._settings import MODES, SAMPLINGS, TAILS
from .store import FORMAT_VERSION, MANIFEST_NAME, TeacherCache, TeacherCacheError, TeacherCacheWarning
from .teacher import PAD_ID, SparseTeacher, capture, logprobs_from_vllm

__all__ = ["SparseTeacher", "capture", "logprobs_from_vllm", "PAD_ID", "TeacherCache", "TeacherCacheError", "TeacherCacheWarning",
           "sparse_kd_loss", "MODES", "SAMPLINGS", "TAILS", "FORMAT_VERSION", "MANIFEST_NAME"]


def __getattr__(name):
    # sparse_kd_loss sits with the other losses; it is reachable here too, loaded on first use
    # (fastkd.losses imports this package, so importing it here at module level would be a cycle).
    if name == "sparse_kd_loss":
        return importlib.import_module("fastkd.losses").sparse_kd_loss
    raise AttributeError(f"module 'fastkd.cache' has no attribute {name!r}")
