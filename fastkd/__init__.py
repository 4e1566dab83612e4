"""fastkd: fused, memory-lean knowledge-distillation losses for large-vocabulary outputs."""
import importlib

from . import _ext  # noqa: F401  (loads the compiled kernels now: a failed load warns at import, saying why)
from .losses import KDLoss, kd_loss

__version__ = "0.1.0"

# Imported on first use (PEP 562): fastkd.linear pulls in torch._dynamo (~1.5 s), and most users of
# kd_loss need none of these.
_LAZY = {
    "fused_linear_kd_loss": ("linear", "fused_linear_kd_loss"),
    "capture": ("cache", "capture"),
    "SparseTeacher": ("cache", "SparseTeacher"),
    "sparse_kd_loss": ("losses", "sparse_kd_loss"),
    "TeacherCache": ("cache", "TeacherCache"),
    "uld_loss": ("cross_tokenizer", "uld_loss"),
    "hybrid_uld_loss": ("cross_tokenizer", "hybrid_uld_loss"),
    "align_tokens": ("cross_tokenizer", "align_tokens"),
    "TokenAlignment": ("cross_tokenizer", "TokenAlignment"),
    "VocabMap": ("cross_tokenizer", "VocabMap"),
    "logprobs_from_vllm": ("cache", "logprobs_from_vllm"),
    "methods": ("methods", None),
    "distributed": ("distributed", None),  # vocab-parallel losses; importing needs no process group
}

__all__ = ["kd_loss", "KDLoss", "fused_linear_kd_loss", "capture", "SparseTeacher", "sparse_kd_loss",
           "TeacherCache", "logprobs_from_vllm", "uld_loss", "hybrid_uld_loss", "align_tokens", "TokenAlignment",
           "VocabMap", "methods", "distributed", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(f".{module}", __name__)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
