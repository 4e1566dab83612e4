"""The public losses on one device: ``kd_loss`` / ``KDLoss`` (dense teacher logits) and
``sparse_kd_loss`` (a captured ``SparseTeacher``). Argument checks, shapes, reductions and docs;
the backend is chosen by ``fastkd._backends.registry.resolve`` and the math runs in the op layer.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import _inputs
from ._backends import registry
from ._ops.kd import kd_rows, kd_rows_inplace
from ._ops.sparse_kd import sparse_kd_rows
from ._settings import (DIVERGENCES, REDUCTIONS, TAIL_CODES, TAILS, KDSettings, acc_dtype, check, check_hard_target,
                        kd_settings)
from .cache.teacher import SparseTeacher

__all__ = ["kd_loss", "KDLoss", "sparse_kd_loss", "DIVERGENCES", "REDUCTIONS", "TAILS"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    t2_scale: bool = True,
    softcap: Optional[float] = None,
    num_items: Union[int, torch.Tensor, None] = None,
    backend: str = "auto",
    inplace_grad: bool = False,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    r"""Fused knowledge-distillation loss: soft-target divergence plus hard-label cross-entropy.

    With ``divergence="forward_kl"``, ``softcap=None``, ``reduction="mean"`` and
    ``keep = target != ignore_index`` it equals, in exact arithmetic::

        T = temperature
        s, t, y = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2), target.flatten()
        kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                      reduction="none", log_target=True).sum(-1)
        ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="none",
                             label_smoothing=label_smoothing)
        loss = (soft_weight * T**2 * kl + hard_weight * ce)[keep].sum() / keep.sum().clamp_min(1)

    which, when no label is ignored, is the familiar idiom
    ``soft_weight * T**2 * F.kl_div(..., reduction="batchmean", log_target=True)
    + hard_weight * F.cross_entropy(s, y)``. The fused kernels compute it in one sweep per row without
    materialising any probability tensor, and write the gradient during the forward pass.

    Args:
        student_logits: ``(..., V)`` float32/bfloat16/float16 (float64 on CPU). Rows are flattened.
        teacher_logits: same shape, dtype and device. Gets a gradient only if it requires grad
            (mutual learning); otherwise it is treated as a constant.
        target: ``(...)`` integer class ids, or None (soft loss only). Rows equal to ``ignore_index``
            contribute nothing to either term and are not counted by "mean".
        temperature: τ > 0 applied to both softmaxes of the soft term (the hard term uses τ = 1).
        soft_weight, hard_weight: weights of the divergence and of the cross-entropy.
        divergence: D(p, q), p the teacher's and q the student's distribution:

            * ``"forward_kl"``: KL(p‖q);
            * ``"reverse_kl"``: KL(q‖p);
            * ``"jsd"``: β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q (β = 0 / 1 give forward /
              reverse KL exactly, as TRL's ``generalized_jsd_loss``);
            * ``"tvd"``: total variation ½·Σ|p − q|. Its gradient w.r.t. the student's scaled logits
              s = z/τ is ``−½·q_j·(sgn(p_j − q_j) − Σ_i q_i·sgn(p_i − q_i))`` with the subgradient
              sgn(0) = 0 where p_j = q_j (as ``torch.abs``'s backward), so identical rows get a zero
              gradient;
            * ``"skew_forward_kl"``: KL(p‖αp + (1−α)q) and ``"skew_reverse_kl"``: KL(q‖αq + (1−α)p),
              the skew KL of DistiLLM (Ko et al., ICML 2024), bounded by log(1/α); α = 0 gives
              forward / reverse KL exactly, α = 1 gives 0.

            JSD, TVD and skew KL take one more pass over each row than the KLs (their sums need
            the final normalisers).
        beta: β ∈ [0, 1] of the JSD.
        skew: α ∈ [0, 1] of skew KL (DistiLLM's default 0.1).
        label_smoothing: ε ∈ [0, 1] of the hard term, as in ``F.cross_entropy``.
        reduction: ``"mean"`` over counted rows, ``"sum"``, or ``"none"`` (shape ``(...)``).
        t2_scale: multiply the soft term by τ² (Hinton et al.) so its gradient scale is τ-independent.
        softcap: if given, c·tanh(x/c) is applied to both logits first (Gemma-style).
        num_items: overrides the divisor of "mean" (int or 0-d tensor), e.g. the token count of a
            whole gradient-accumulation step.
        backend: ``"auto"``, ``"cpu"`` (fused C++), ``"cuda"``, ``"triton"``, or ``"torch"`` (pure
            PyTorch reference); see ``fastkd/_backends/README.md``.
        inplace_grad: fused backends only, eager only: write the gradient into the student logits'
            storage instead of a new buffer (saves one N×V buffer; the logits are overwritten, and
            must be a non-leaf tensor that nothing else saved for backward).
        vocab_size: the real vocabulary size when a head is padded wider: only the first
            ``vocab_size`` columns of each side count (``student_logits[..., :vocab_size]``, likewise
            the teacher's), so student and teacher may have different widths ≥ ``vocab_size``; the
            padded columns never get probability and their gradient is exactly 0. ``None``: both
            widths must be equal (a different width is a ``ValueError`` suggesting ``vocab_size=``).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or ``(...)`` for ``reduction="none"``.
    """
    settings = kd_settings(temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
                           divergence=divergence, beta=beta, skew=skew, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction, t2_scale=t2_scale,
                           softcap=softcap, backend=backend)
    student_logits, teacher_logits = narrow_pair(student_logits, teacher_logits, vocab_size,
                                                 student_name="student_logits", teacher_name="teacher_logits")
    check_hard_target(settings, target, what="class ids of shape student_logits.shape[:-1]")
    lead_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    device = student_logits.device
    if target is not None:
        _inputs.check_target(target, lead_shape, vocab, ignore_index, device)
    resolved = registry.resolve("kd", settings.backend, device)
    registry.check_dtype("kd", resolved, student_logits.dtype)

    s2 = _inputs.rows(student_logits, vocab)
    t2 = _inputs.rows(teacher_logits, vocab)
    y = _inputs.flat_target(target)
    divisor = _inputs.divisor(y, s2.shape[0], reduction, num_items, ignore_index, device, acc_dtype(s2.dtype))
    if inplace_grad:
        if "autograd" in registry.implementation("kd", resolved).caps:
            raise ValueError(f"inplace_grad=True needs a fused backend (cpu, cuda, triton), not {resolved!r}")
        if student_logits.is_leaf and student_logits.requires_grad:
            raise ValueError("inplace_grad=True cannot overwrite a leaf tensor that requires grad; "
                             "pass the output of the student's head (a non-leaf tensor)")
        if teacher_logits.requires_grad:
            raise ValueError("inplace_grad=True does not support a teacher that requires grad")
        if s2.data_ptr() != student_logits.data_ptr() or not s2.is_contiguous():
            raise ValueError("inplace_grad=True needs contiguous student_logits")
        rows = kd_rows_inplace(s2, t2, y, divisor, settings, backend=resolved)
    else:
        rows = kd_rows(s2, t2, y, divisor, settings, backend=resolved)
    return _inputs.reduce_rows(rows, reduction, lead_shape)


_KDLOSS_KEYS = ("temperature", "soft_weight", "hard_weight", "divergence", "beta", "skew", "ignore_index",
                "label_smoothing", "reduction", "t2_scale", "softcap", "num_items", "backend", "inplace_grad",
                "vocab_size")
_NOT_KD_SETTINGS = ("num_items", "inplace_grad", "vocab_size")


def narrow_pair(student, teacher, vocab_size: Optional[int], *, student_name: str, teacher_name: str):
    """Student and teacher logits cut to their first ``vocab_size`` columns (views), then checked as
    a pair (one shape, dtype and device); the rule of ``vocab_size=`` for every dense loss."""
    check("vocab_size", vocab_size)
    _inputs.check_logits(student_name, student)
    _inputs.check_logits(teacher_name, teacher)
    student = _inputs.narrow_vocab(student_name, student, vocab_size)
    teacher = _inputs.narrow_vocab(teacher_name, teacher, vocab_size)
    _inputs.check_pair(student, teacher, student_name=student_name, teacher_name=teacher_name)
    return student, teacher


class KDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`kd_loss`; the constructor takes the same keyword arguments and
    validates them at once."""

    def __init__(self, **kwargs):
        super().__init__()
        unknown = set(kwargs) - set(_KDLOSS_KEYS)
        if unknown:
            raise TypeError(f"KDLoss got unexpected keyword arguments {sorted(unknown)}")
        kd_settings(**{k: v for k, v in kwargs.items() if k not in _NOT_KD_SETTINGS})
        check("vocab_size", kwargs.get("vocab_size"))
        self.kwargs = kwargs

    def forward(self, student_logits, teacher_logits, target=None, **overrides):
        return kd_loss(student_logits, teacher_logits, target, **{**self.kwargs, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


def sparse_kd_loss(
    student_logits: torch.Tensor,
    sparse_teacher: SparseTeacher,
    target: Optional[torch.Tensor] = None,
    *,
    tail: str = "bucket",
    temperature: Optional[float] = None,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    divergence: str = "forward_kl",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    t2_scale: bool = True,
    num_items: Union[int, torch.Tensor, None] = None,
    backend: str = "auto",
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    r"""KD loss against a :class:`SparseTeacher`; the student is normalised over the FULL vocabulary.

    With ``T`` the capture temperature, ``log_q = F.log_softmax(student / T, -1)``, ``I`` the stored
    ids of a row, ``w`` the stored teacher probabilities (``exp(values)`` or ``counts / N``),
    ``P = w.sum(-1)`` and ``Q = log_q.exp()[I].sum(-1)``, the soft term ``D`` per row is:

    * ``tail="bucket"`` (top-k): KL over the K+1 buckets {i ∈ I} ∪ {tail}::

          D = (w * (w.log() - log_q[I])).sum(-1) + (1 - P) * (log(1 - P) - log(1 - Q))

      (log(1 − Q) is computed from the complement's own log-sum-exp). With k = V this is
      exactly ``kd_loss``'s forward KL.
    * ``tail="renorm"`` (top-k): the teacher renormalised over I (biased; matches tools that store
      renormalised top-k): ``w' = w / P``, ``D = (w' * (w'.log() - log_q[I])).sum(-1)``.
    * sampled teachers (any ``tail``; ``"sampled"`` names it): ``D = (w * (w.log() - log_q[I])).sum(-1)``
      with ``w = counts / N``: its gradient ``(q − counts/N)/T`` is an unbiased estimate of full KD's.

    Then, as in :func:`fastkd.kd_loss` (``keep = target != ignore_index``)::

        loss_row = soft_weight * (T**2 if t2_scale else 1) * D
                   + hard_weight * F.cross_entropy(student, target, reduction="none",
                                                   label_smoothing=label_smoothing)
        loss = loss_row[keep].sum() / keep.sum().clamp_min(1)      # reduction="mean"

    Args:
        student_logits: ``(..., V)`` float32/bfloat16/float16 (float64 on CPU); its leading dims must
            hold as many rows as ``sparse_teacher`` (e.g. both ``(B, T)``).
        sparse_teacher: from :func:`capture` or :meth:`TeacherCache.read`, same device, V equal.
        target, soft_weight, hard_weight, ignore_index, label_smoothing, reduction, t2_scale,
            num_items, backend: as in :func:`fastkd.kd_loss`.
        tail: ``"bucket"`` (default), ``"renorm"`` or ``"sampled"`` (the latter for sampled teachers only).
        temperature: ``None`` (default) uses the capture temperature; any other value must equal it,
            since the stored probabilities cannot be re-tempered without the full vocabulary.
        divergence: only ``"forward_kl"`` (reverse KL and JSD need p on every token the student
            favours, which a sparse teacher does not have).
        vocab_size: the real vocabulary size of a student head padded wider: only
            ``student_logits[..., :vocab_size]`` counts (the padded columns get no probability and
            exactly zero gradient); ``sparse_teacher.vocab_size`` must equal it (capture a padded
            teacher with ``capture(..., vocab_size=)``).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or ``(...)`` for ``reduction="none"``.
    """
    settings = kd_settings(allow_default_temperature=True, tail=tail, temperature=temperature,
                           soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence,
                           ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
                           t2_scale=t2_scale, backend=backend)
    check("vocab_size", vocab_size)
    _inputs.check_logits("student_logits", student_logits)
    student_logits = _inputs.narrow_vocab("student_logits", student_logits, vocab_size)
    st = check_sparse_teacher(sparse_teacher, student_logits.shape[:-1], student_logits.device, settings)
    vocab = student_logits.shape[-1]
    if st.vocab_size != vocab:
        raise ValueError(f"student_logits has V={vocab} but sparse_teacher was captured with "
                         f"vocab_size={st.vocab_size}" + ("" if vocab_size is not None or vocab < st.vocab_size else
                                                          "; for a student head padded past the teacher's "
                                                          "vocabulary pass vocab_size="))
    settings = sparse_settings(settings, st)
    check_hard_target(settings, target, what="class ids of shape student_logits.shape[:-1]")
    lead = student_logits.shape[:-1]
    device = student_logits.device
    if target is not None:
        _inputs.check_target(target, lead, vocab, ignore_index, device)

    flat = st.flatten()
    ids = flat.ids if flat.ids.dtype == torch.int64 else flat.ids.long()
    _inputs.check_sparse_ids(ids, vocab)
    resolved = registry.resolve("sparse_kd", settings.backend, device)
    registry.check_dtype("sparse_kd", resolved, student_logits.dtype)
    acc = acc_dtype(student_logits.dtype)
    weights = flat.teacher_probs(acc)
    s2 = _inputs.rows(student_logits, vocab)
    y = _inputs.flat_target(target)
    divisor = _inputs.divisor(y, s2.shape[0], reduction, num_items, ignore_index, device, acc)
    rows = sparse_kd_rows(s2, ids, weights, y, divisor, tail=TAIL_CODES[settings.tail],
                          temperature=settings.temperature, soft_scale=settings.soft_scale,
                          hard_weight=settings.hard_weight, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, backend=resolved)
    return _inputs.reduce_rows(rows, reduction, lead)


def check_sparse_teacher(sparse_teacher, lead_shape, device, settings: KDSettings) -> SparseTeacher:
    """A SparseTeacher with one row per student row, on the student's device, usable with ``settings``
    (shared by the single-device and vocab-parallel sparse losses)."""
    if not isinstance(sparse_teacher, SparseTeacher):
        raise TypeError(f"sparse_teacher must be a fastkd.SparseTeacher, got {type(sparse_teacher).__name__}")
    st = sparse_teacher
    n_rows = math.prod(lead_shape)
    if math.prod(st.shape) != n_rows:
        raise ValueError(f"sparse_teacher must hold one row per student row: student leading shape "
                         f"{tuple(lead_shape)} ({n_rows} rows), sparse_teacher shape {tuple(st.shape)}")
    if st.device != device:
        raise ValueError(f"sparse_teacher must be on the student's device {device}, got {st.device}")
    if st.mode == "topk" and settings.tail == "sampled":
        raise ValueError("tail='sampled' needs a sampled teacher (capture(mode='sample')); use 'bucket' or "
                         "'renorm' for a top-k teacher")
    if settings.divergence != "forward_kl":
        raise ValueError(f"sparse_kd_loss supports divergence='forward_kl' only, got {settings.divergence!r}")
    return st


def sparse_settings(settings: KDSettings, st: SparseTeacher) -> KDSettings:
    """The settings a loss against ``st`` runs with: the capture temperature (a given temperature
    must equal it), and the sampled tail for a sampled teacher."""
    if settings.temperature is None:
        settings = settings.with_temperature(st.temperature)
    if not math.isclose(settings.temperature, st.temperature, rel_tol=1e-6):
        raise ValueError(f"temperature={settings.temperature} differs from the capture temperature "
                         f"{st.temperature}; re-capture at this temperature")
    if st.mode == "sample" and settings.tail != "sampled":
        settings = settings.replace(tail="sampled")
    return settings
