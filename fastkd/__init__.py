"""fastkd: fused, memory-lean knowledge-distillation losses for large-vocabulary outputs."""
from .losses import KDLoss, kd_loss
from . import methods
from . import distributed  # vocab-parallel losses; importing needs no process group
from .linear import fused_linear_kd_loss
from .cache import SparseTeacher, TeacherCache, capture, sparse_kd_loss

__version__ = "0.1.0"

__all__ = ["kd_loss", "KDLoss", "fused_linear_kd_loss", "capture", "SparseTeacher", "sparse_kd_loss", "TeacherCache", "methods", "distributed", "__version__"]
