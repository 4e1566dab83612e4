"""Classical distillation methods as small composable pieces (one module per paper).

Each piece plugs into an ordinary PyTorch training loop; every logit-level term runs through
:func:`fastkd.kd_loss`.

=========================  ==========================================================================
module                     paper
=========================  ==========================================================================
``hinton``                 Hinton, Vinyals & Dean 2015 — soft targets, ensemble of teachers
``fitnets``                Romero et al. 2015 — hints through a learned regressor, two stages
``self_distillation``      Zhang et al. 2019 — "Be Your Own Teacher": auxiliary exits taught by the deepest
``born_again``             Furlanello et al. 2018 — Born-Again Networks, generations and their ensemble
``function_matching``      Beyer et al. 2022 — consistent (same mixup input) and patient teaching
``contrastive``            Tian et al. 2020 — contrastive representation distillation (InfoNCE, bounded queue)
``cosine``                 Sanh et al. 2019 — DistilBERT's cosine loss on hidden states
``label_smoothing``        Müller et al. 2019 — label smoothing, the regulariser KD is compared with
=========================  ==========================================================================
"""
from ._common import freeze
from .born_again import BornAgainEnsemble, born_again_loss, generations
from .contrastive import ContrastiveDistiller
from .cosine import cosine_embedding_loss
from .fitnets import FeatureCapture, HintRegressor, TwoStageSchedule, guided_parameters, hint_loss
from .function_matching import function_matching_loss, mixup
from .hinton import ensemble_kd_loss, ensemble_logits
from .label_smoothing import label_smoothing_loss, uniform_teacher_loss
from .self_distillation import AuxiliaryHead, ExitOutputs, SelfDistillation, self_distillation_loss

__all__ = [
    "freeze",
    "ensemble_logits", "ensemble_kd_loss",
    "FeatureCapture", "HintRegressor", "hint_loss", "guided_parameters", "TwoStageSchedule",
    "AuxiliaryHead", "SelfDistillation", "ExitOutputs", "self_distillation_loss",
    "born_again_loss", "generations", "BornAgainEnsemble",
    "mixup", "function_matching_loss",
    "ContrastiveDistiller",
    "cosine_embedding_loss",
    "label_smoothing_loss", "uniform_teacher_loss",
]
