"""Hugging Face ``transformers`` integration: a ``Trainer`` that distils through fastkd's fused losses.

The student's loss goes through :func:`fastkd.fused_linear_kd_loss`: the trainer takes the hidden
states entering the student's LM head and the head's weight, so the (tokens × vocabulary) student
logits are never materialised, and neither are the teacher's when the teacher is a live model. With a
:class:`fastkd.TeacherCache` the teacher's targets come from the cache (filled on the fly from a live
teacher the first time a sample is seen), so later epochs run no teacher at all.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Dict, Optional

import torch

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("fastkd.integrations.transformers needs the `transformers` package "
                      "(pip install transformers accelerate)") from exc

import fastkd
from fastkd._settings import check, kd_settings



@contextlib.contextmanager
def head_input_capture(model: torch.nn.Module):
    """Within the block, ``model``'s output-embedding (LM head) module records its input and returns
    a ``(..., 0)`` tensor instead of logits: the forward pass computes everything up to the head and
    the caller gets exactly the head's input, whatever the architecture. Yields ``(head, store)``;
    after the forward, ``store[0]`` holds the hidden states.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no output embedding (LM head) with a weight; "
                        "KDTrainer needs a causal-LM model such as *ForCausalLM")
    store = []

    def _capture(hidden, *args, **kwargs):
        store.append(hidden)
        return hidden.new_empty(hidden.shape[:-1] + (0,))

    head.forward = _capture  # an instance attribute shadows the class method for this call only
    try:
        yield head, store
    finally:
        del head.forward


def _forward_to_head(model: torch.nn.Module, head_owner: torch.nn.Module, inputs: Dict[str, Any]):
    """Runs ``model`` (possibly a DDP/accelerate wrapper of ``head_owner``) and returns
    ``(hidden_states_entering_the_head, head_weight, head_bias)``."""
    extra = {"use_cache": False} if "use_cache" in inspect.signature(head_owner.forward).parameters else {}
    with head_input_capture(head_owner) as (head, store):
        model(**inputs, **extra)  # no KV cache: it is never reused in training
    if len(store) != 1:
        raise RuntimeError(f"expected the LM head to be called once per forward, it was called {len(store)} times")
    return store[0], head.weight, getattr(head, "bias", None)


def shifted_teacher_logits(teacher: torch.nn.Module, inputs: Dict[str, Any], rows: Optional[torch.Tensor] = None,
                           vocab_size: Optional[int] = None) -> torch.Tensor:
    """The teacher's logits ``(b, T-1, V)`` in float32 for the sequences ``rows`` of the batch (all if
    None), from the first ``vocab_size`` rows of its head: what a :class:`fastkd.TeacherCache`
    captures, so the teacher runs only on the sequences not stored yet."""
    if rows is not None:
        rows = rows.to(inputs["input_ids"].device)
        inputs = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in inputs.items()}
    with torch.no_grad():
        h, w, b = _forward_to_head(teacher, teacher, inputs)
        if vocab_size is not None:
            w, b = w[:vocab_size], None if b is None else b[:vocab_size]
        z = torch.nn.functional.linear(h[:, :-1], w, b)
    return z.float()


def cached_teacher(cache, teacher: Optional[torch.nn.Module], inputs: Dict[str, Any],
                   sample_ids: Optional[torch.Tensor], *, vocab_size: Optional[int], device,
                   generator: Optional[torch.Generator], sample_id_key: str = "sample_id"):
    """The :class:`fastkd.SparseTeacher` rows ``(b, T-1)`` of a batch from ``cache``: read where stored;
    with a live ``teacher``, the missing sequences are captured (through :func:`shifted_teacher_logits`,
    drawing from ``generator`` for a sampled cache) and stored first; without one, a missing sample is
    an error naming the fix."""
    if sample_ids is None:
        raise ValueError(f"a TeacherCache needs each batch to carry `{sample_id_key}` "
                         "(one integer sample index per sequence)")
    ids = sample_ids.reshape(-1).to("cpu", torch.long)
    if teacher is not None:
        return cache.get_or_capture(ids, lambda rows: shifted_teacher_logits(teacher, inputs, rows, vocab_size),
                                    device=device, generator=generator)
    missing = cache.missing(ids)
    if missing:
        raise ValueError(f"{len(missing)} samples of this batch (e.g. {missing[:4]}) are not in the "
                         f"TeacherCache at {cache.path}; pass the teacher model too "
                         "(teacher=model, teacher_cache=cache) to fill it on the fly")
    return cache.read(ids, device=device)


def _head_rows(model: torch.nn.Module) -> Optional[int]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _check_vocab_size(vocab_size, student, teacher, cache, owner: str = "KDTrainer") -> Optional[int]:
    """The trainer's ``vocab_size`` checked against the heads (and the cache) at construction, so a
    mismatch is reported before any training step, naming the argument that fixes it."""
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    rows = {"student": _head_rows(student)}
    if teacher is not None:
        rows["teacher"] = _head_rows(teacher)
    known = {k: v for k, v in rows.items() if v is not None}
    if vocab_size is None:
        if len(set(known.values())) > 1:
            raise ValueError(f"the student's LM head has {known['student']} rows but the teacher's has "
                             f"{known['teacher']}: pass vocab_size=<the tokenizer's vocabulary size, at most "
                             f"{min(known.values())}> to {owner} so that only the first vocab_size rows "
                             "of each head count")
        return None
    for who, n in known.items():
        if vocab_size > n:
            raise ValueError(f"vocab_size={vocab_size} exceeds the {n} rows of the {who}'s LM head")
    cache_vocab = None if cache is None else (getattr(cache, "manifest", None) or {}).get("vocab_size")
    if cache_vocab is not None and cache_vocab != vocab_size:
        raise ValueError(f"vocab_size={vocab_size} must equal the TeacherCache's vocab_size {cache_vocab}")
    return vocab_size


class KDTrainer(Trainer):
    r"""``transformers.Trainer`` whose training loss is fastkd's fused knowledge-distillation loss.

    For a causal LM with labels ``y`` (shape ``(B, T)``, ``-100`` ignored), student head input
    ``h_s`` and head ``(W_s, b_s)``, and a live teacher with ``(h_t, W_t, b_t)``, the loss of a
    micro-batch equals::

        fastkd.fused_linear_kd_loss(h_s[:, :-1], W_s, h_t[:, :-1], W_t, y[:, 1:],
                                    student_bias=b_s, teacher_bias=b_t, vocab_size=vocab_size,
                                    num_items=num_items_in_batch, **kd_settings)

    i.e. with ``V = vocab_size`` (default: the common number of head rows)
    ``kd_loss(h_s[:, :-1] @ W_s[:V].T + b_s[:V], h_t[:, :-1] @ W_t[:V].T + b_t[:V], y[:, 1:])`` with "mean" over
    the non-ignored tokens of the whole gradient-accumulation step (``num_items_in_batch``), so the
    accumulated gradient equals the gradient of one large batch. With a ``TeacherCache`` the teacher
    term is the cached sparse teacher of each row (``tail`` picks how the rest of the vocabulary is
    treated, see :func:`fastkd.sparse_kd_loss`). Evaluation reports the student's plain
    cross-entropy (the model's own loss), so ``eval_loss`` is the held-out language-model loss.

    Args:
        teacher: a causal-LM teacher (kept frozen and in eval mode), a :class:`fastkd.TeacherCache`
            (targets read from it; every sample must already be stored), or None (plain CE: the
            model's own loss).
        teacher_cache: with a model ``teacher``: a :class:`fastkd.TeacherCache` filled on the fly
            (the teacher runs only for samples not yet stored, e.g. during the first epoch).
        temperature, soft_weight, hard_weight, divergence, beta, skew, label_smoothing, t2_scale, softcap,
            backend: passed to the fastkd loss (see :func:`fastkd.kd_loss`).
        tail: for a cached teacher: ``"bucket"`` (top-k cache), ``"sampled"`` (sampled cache) or
            ``"renorm"``; None picks ``"sampled"`` for a sampled cache and ``"bucket"`` otherwise.
        vocab_size: the vocabulary ``V`` when the LM heads have more rows than the tokenizer has
            tokens (padded heads, e.g. 152064 rows for a 151936- or 151665-token vocabulary): only the
            first ``V`` rows of each model's head count, so the softmaxes run over ``V`` entries and the
            padding rows get zero gradient. Student and teacher heads may differ in size; None requires
            them to be equal. With a ``TeacherCache`` it must equal the cache's ``vocab_size``.
        chunk_size: token rows per chunk of the fused linear loss (None: from a memory budget).
        sample_id_key: the batch key holding each sequence's integer sample index (cache key); it
            is removed from the batch before the model sees it.
        All other arguments are those of ``transformers.Trainer``.
    """

    def __init__(self, *args, teacher=None, teacher_cache=None, temperature: float = 1.0,
                 soft_weight: float = 1.0, hard_weight: float = 0.0, divergence: str = "forward_kl",
                 beta: float = 0.5, skew: float = 0.1, label_smoothing: float = 0.0, t2_scale: bool = True,
                 softcap: Optional[float] = None, backend: str = "auto", tail: Optional[str] = None,
                 chunk_size: Optional[int] = None, sample_id_key: str = "sample_id",
                 vocab_size: Optional[int] = None, **kwargs):
        cache_cls = getattr(fastkd, "TeacherCache", None)
        if cache_cls is not None and isinstance(teacher, cache_cls):
            if teacher_cache is not None:
                raise ValueError("give the cache once: teacher=<TeacherCache> or teacher_cache=, not both")
            teacher, teacher_cache = None, teacher
        if teacher is not None and not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"teacher must be a causal-LM nn.Module, a fastkd.TeacherCache or None, "
                            f"got {type(teacher).__name__}")
        if teacher_cache is not None and (cache_cls is None or not isinstance(teacher_cache, cache_cls)):
            raise TypeError(f"teacher_cache must be a fastkd.TeacherCache, got {type(teacher_cache).__name__}")
        if tail is not None:
            check("tail", tail)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        # Validate the loss settings now rather than at the first step.
        kd_settings(temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
                    divergence=divergence, beta=beta, skew=skew, label_smoothing=label_smoothing, t2_scale=t2_scale,
                    softcap=softcap, backend=backend)
        super().__init__(*args, **kwargs)
        self.kd_settings = dict(temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
                                divergence=divergence, beta=beta, skew=skew, label_smoothing=label_smoothing,
                                t2_scale=t2_scale, softcap=softcap, backend=backend)
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        self.tail = tail
        self.chunk_size = chunk_size
        self.sample_id_key = sample_id_key
        self.vocab_size = _check_vocab_size(vocab_size, self.model, teacher, teacher_cache)
        # Sampled captures draw from their own generator (seeded from args.seed): drawing from the
        # global RNG would shift the data order of later epochs (the sampler seeds itself from it),
        # so a cached run would no longer see the batches of the runs it is compared with.
        self._capture_generator: Optional[torch.Generator] = None
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            if self.place_model_on_device:
                teacher.to(self.args.device)
        self._model_takes_loss_kwargs = self.model_accepts_loss_kwargs
        # Every loss here is a causal-LM loss (position i predicts label i+1), so the tokens of an
        # accumulation step are counted over labels[..., 1:]. The Trainer infers this from
        # config.loss_type, which many configs leave unset (it then counts position 0 as well).
        self._loss_shifts_labels = True
        if self.distilling:
            # The Trainer counts the tokens of a whole accumulation step (num_items_in_batch) only for
            # losses that consume it; ours does, whatever the model's forward signature says.
            self.model_accepts_loss_kwargs = True

    # ------------------------------------------------------------------ helpers
    @property
    def distilling(self) -> bool:
        return self.teacher is not None or self.teacher_cache is not None

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and self.sample_id_key not in self._signature_columns:
            self._signature_columns.append(self.sample_id_key)  # keep the cache key in the batch

    def _resolved_tail(self) -> str:
        if self.tail is not None:
            return self.tail
        manifest = getattr(self.teacher_cache, "manifest", None) or {}
        return "sampled" if manifest.get("mode") == "sample" else "bucket"

    def _sparse_teacher(self, sample_ids: Optional[torch.Tensor], inputs: Dict[str, Any]):
        if self.teacher is not None and self._capture_generator is None:
            dev = inputs["input_ids"].device
            self._capture_generator = torch.Generator(device=dev).manual_seed(int(self.args.seed) + 7919)
        return cached_teacher(self.teacher_cache, self.teacher, inputs, sample_ids, vocab_size=self.vocab_size,
                              device=self.args.device, generator=self._capture_generator,
                              sample_id_key=self.sample_id_key)

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        sample_ids = inputs.pop(self.sample_id_key, None)
        if not self.distilling or not model.training:
            # Plain CE (no teacher), and evaluation: the model's own loss, i.e. held-out CE.
            accepts, self.model_accepts_loss_kwargs = self.model_accepts_loss_kwargs, self._model_takes_loss_kwargs
            try:
                self.loss_is_scaled_for_ga = accepts and num_items_in_batch is not None
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self.model_accepts_loss_kwargs = accepts
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("KDTrainer needs `labels` in each batch (use -100 for ignored tokens)")
        unwrapped = self.accelerator.unwrap_model(model)
        h_s, w_s, b_s = _forward_to_head(model, unwrapped, inputs)
        target = labels[:, 1:]
        kd = dict(self.kd_settings)
        if self.teacher_cache is not None:
            teacher_side = (self._sparse_teacher(sample_ids, inputs), None)
            teacher_kw = {"tail": self._resolved_tail()}
        else:
            with torch.no_grad():
                h_t, w_t, b_t = _forward_to_head(self.teacher, self.teacher, inputs)
            teacher_side = (h_t[:, :-1], w_t)
            teacher_kw = {"teacher_bias": b_t}
        loss = fastkd.fused_linear_kd_loss(
            h_s[:, :-1], w_s, teacher_side[0], teacher_side[1], target, student_bias=b_s,
            chunk_size=self.chunk_size, vocab_size=self.vocab_size, num_items=num_items_in_batch, reduction="mean", **teacher_kw, **kd)
        # With num_items_in_batch the loss is already divided by the whole accumulation step's token
        # count; otherwise it is this micro-batch's mean and the Trainer divides by the step count.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens while DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss


def __getattr__(name: str):
    # The trainer's former name: importing it still works, with a DeprecationWarning.
    if name == "DistillationTrainer":
        warnings.warn("fastkd.integrations.transformers.DistillationTrainer is now KDTrainer (the old name "
                      "is the same class, kept for compatibility); fastkd's trainers on top of TRL's "
                      "are in fastkd.integrations.trl", DeprecationWarning, stacklevel=2)
        return KDTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
