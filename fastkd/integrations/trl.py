"""TRL integration: TRL's distillation trainers with fastkd's fused linear loss as the loss engine.

:class:`FastKDDistillationTrainer` is ``trl.DistillationTrainer`` (on-policy distillation: the student
samples the completions, the loss compares its next-token distribution with the teacher's on them) and
``FastKDGKDTrainer`` is ``trl.experimental.gkd.GKDTrainer`` (mixed: a fraction ``lmbda`` of the steps on
the student's own samples, the rest on the dataset's sequences or, with ``seq_kd``, on the teacher's).
Each overrides one public method, ``compute_loss``: the loss goes through
:func:`fastkd.fused_linear_kd_loss` from the hidden states entering both LM heads, so neither model's
(tokens × vocabulary) logits are materialised. Everything else — generation, batching, the completion
masks, ``num_items_in_batch``, the logged metrics — is TRL's own.

With the defaults the loss is TRL's, term for term: the generalized JSD of TRL
(``β·KL(p‖m) + (1−β)·KL(q‖m)``, ``m = β·p + (1−β)·q``, p the teacher, q the student; β = 0 is the forward
KL(p‖q), β = 1 the reverse KL(q‖p)) of both softmaxes at temperature τ, **without** the τ² factor,
summed over the completion tokens and divided by ``num_items_in_batch`` (TRL's count for the whole
gradient-accumulation step) or, without it, by the micro-batch's token count. What TRL lacks comes as
keyword arguments: a hard-label cross-entropy term (``hard_weight``), ``t2_scale=True`` (Hinton's τ²),
any other fastkd divergence, padded heads (``vocab_size``) and, for the off-policy steps of
``FastKDGKDTrainer``, a :class:`fastkd.TeacherCache` in place of the live teacher.

``FastKDGKDTrainer`` is imported on first access (``from fastkd.integrations.trl import
FastKDGKDTrainer``), since importing ``trl.experimental`` prints TRL's notice about experimental APIs.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Optional

import torch

try:
    import trl
    from packaging.version import Version
    from trl import DistillationTrainer as _TRLDistillationTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("fastkd.integrations.trl needs the `trl` package (pip install \"fastkd[trl]\")") from exc

import fastkd
from fastkd._settings import check, kd_settings

from .transformers import _check_vocab_size, cached_teacher, head_input_capture

# ----------------------------------------------------------------------------------------------
# Compatibility with TRL's internals. Everything this module relies on that TRL does not document
# as public is listed here and nowhere else; check_trl_internals() verifies each at construction, so
# a TRL release that drops one fails loudly instead of training on a wrong loss.
# Checked against: trl 1.16.0.
# ----------------------------------------------------------------------------------------------
TRL_VERSIONS_CHECKED = ("1.16.0",)
TRL_SUPPORTED = (">=1.16", "<1.17")  # the fastkd[trl] extra of pyproject.toml

# Attributes of a constructed trainer. ``_metrics[mode][name]`` is the list of values TRL's ``log``
# averages; fastkd appends the student entropy there as TRL's own loss does.
TRL_INSTANCE_ATTRIBUTES = {
    "DistillationTrainer": ("_metrics", "teacher_model", "beta", "temperature", "model_kwarg_keys"),
    "GKDTrainer": ("teacher_model", "beta", "lmbda", "seq_kd", "generation_config"),
}
# Keys of the batches DistillationTrainer._generate_and_score_completions hands to compute_loss
# ("tool_mask" only in multi-turn tool use).
TRL_BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "num_items_in_batch")
# Multimodal keys DistillationTrainer passes on to the model's forward (only those present).
TRL_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                       "token_type_ids", "mm_token_type_ids", "image_position_ids")
# Class attributes: the methods that produce those batches, and GKD's public static generation hook.
TRL_CLASS_ATTRIBUTES = {
    "DistillationTrainer": ("_generate_and_score_completions", "_prepare_inputs", "compute_loss"),
    "GKDTrainer": ("generate_on_policy_outputs", "training_step", "compute_loss"),
}


def check_trl_internals(trainer=None, kind: str = "DistillationTrainer") -> None:
    """Raises ``RuntimeError`` naming every TRL internal of the lists above that the installed TRL
    lacks (class attributes of ``kind``; with ``trainer``, its instance attributes too)."""
    cls = _TRLDistillationTrainer if kind == "DistillationTrainer" else _gkd_trainer_class()
    missing = [f"{kind}.{a}" for a in TRL_CLASS_ATTRIBUTES[kind] if not hasattr(cls, a)]
    if trainer is not None:
        missing += [f"{kind}().{a}" for a in TRL_INSTANCE_ATTRIBUTES[kind] if not hasattr(trainer, a)]
    if missing:
        raise RuntimeError(f"trl {trl.__version__} lacks {', '.join(missing)}, which fastkd.integrations.trl "
                           f"relies on (checked against trl {', '.join(TRL_VERSIONS_CHECKED)}; supported "
                           f"{','.join(TRL_SUPPORTED)})")


def _gkd_trainer_class():
    return importlib.import_module("trl.experimental.gkd").GKDTrainer


def trl_version_supported(version: Optional[str] = None) -> bool:
    """Whether ``version`` (default: the installed trl) lies in :data:`TRL_SUPPORTED`."""
    v = Version(version or trl.__version__)
    return Version(TRL_SUPPORTED[0][2:]) <= v < Version(TRL_SUPPORTED[1][1:])


# ----------------------------------------------------------------------------------------------
# The loss, shared by both trainers
# ----------------------------------------------------------------------------------------------
def _hidden_states(model: torch.nn.Module, unwrapped: torch.nn.Module, inputs: Dict[str, Any]):
    """``(h, W, b)``: the hidden states entering ``unwrapped``'s LM head when ``model`` (it, or a
    DDP/accelerate wrapper of it) runs on ``inputs``, and the head's weight and bias."""
    with head_input_capture(unwrapped) as (head, store):
        model(**inputs)
    if len(store) != 1:
        raise RuntimeError(f"expected the LM head to be called once per forward, it was called {len(store)} times")
    return store[0], head.weight, getattr(head, "bias", None)


class _CacheOnlyTeacher(torch.nn.Module):
    """What TRL's GKDTrainer is given as its teacher when a TeacherCache serves every step: the
    student's config (TRL checks the vocabulary against it) and no weights; it is never run."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, *args, **kwargs):
        raise RuntimeError("a TeacherCache serves this trainer's teacher; there is no live teacher to run")


class _FastKDLoss:
    """The loss settings and the fused call both trainers share."""

    def _init_fastkd(self, *, temperature, soft_weight, hard_weight, divergence, beta, skew, label_smoothing,
                     t2_scale, backend, chunk_size, vocab_size, teacher_cache=None):
        # One check per setting, by the rules every fastkd entry point shares.
        kd_settings(temperature=1.0 if temperature is None else temperature, soft_weight=soft_weight,
                    hard_weight=hard_weight, divergence=divergence or "jsd", beta=0.5 if beta is None else beta,
                    skew=skew, label_smoothing=label_smoothing, t2_scale=t2_scale, backend=backend)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.fastkd_settings = dict(soft_weight=soft_weight, hard_weight=hard_weight, skew=skew,
                                    label_smoothing=label_smoothing, t2_scale=t2_scale, backend=backend)
        self._fastkd_temperature = temperature
        self._fastkd_divergence = divergence
        self._fastkd_beta = beta
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size

    def loss_settings(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`fastkd.fused_linear_kd_loss` this trainer passes: τ and β are
        TRL's (``args.temperature`` / the GKD loss's τ = 1, ``args.beta``) unless given explicitly."""
        return dict(self.fastkd_settings, temperature=self._loss_temperature(),
                    divergence=self._fastkd_divergence or "jsd",
                    beta=self.beta if self._fastkd_beta is None else self._fastkd_beta)

    def _sparse_loss_settings(self) -> Dict[str, Any]:
        """:meth:`loss_settings` against a cached teacher, which supports the forward KL only (TRL's
        β = 0); raises for any other divergence."""
        kw = self.loss_settings()
        if kw["divergence"] == "jsd" and kw["beta"] == 0.0:
            kw["divergence"] = "forward_kl"  # TRL's β = 0 is the forward KL(p‖q)
        if kw["divergence"] != "forward_kl":
            raise ValueError(f"a TeacherCache supports the forward KL only (TRL's beta=0.0, or "
                             f"divergence='forward_kl'); this trainer has divergence={kw['divergence']!r}, "
                             f"beta={kw['beta']}")
        kw.pop("beta")
        return kw

    def _fused(self, h_s, w_s, b_s, teacher, w_t, b_t, target, num_items, *, entropy: bool):
        sparse = w_t is None
        extra = {"tail": self._tail()} if sparse else {"teacher_bias": b_t}
        settings = self._sparse_loss_settings() if sparse else self.loss_settings()
        return fastkd.fused_linear_kd_loss(
            h_s, w_s, teacher, w_t, target, student_bias=b_s, chunk_size=self.chunk_size,
            vocab_size=self.vocab_size, num_items=num_items, reduction="mean", return_entropy=entropy,
            **extra, **settings)

    def _tail(self) -> str:
        manifest = getattr(getattr(self, "teacher_cache", None), "manifest", None) or {}
        return "sampled" if manifest.get("mode") == "sample" else "bucket"


class FastKDDistillationTrainer(_FastKDLoss, _TRLDistillationTrainer):
    r"""``trl.DistillationTrainer`` with :func:`fastkd.fused_linear_kd_loss` as its loss.

    For a micro-batch of prompts ``P`` and the student's sampled completions ``C`` with TRL's loss mask
    ``M`` (the completion mask, times the tool mask in multi-turn tool use), ``h_s`` / ``h_t`` the
    hidden states that enter the student's / teacher's LM head at the positions predicting the tokens
    of ``C`` and ``(W, b)`` the heads, the loss is::

        fastkd.fused_linear_kd_loss(h_s[M], W_s, h_t[M], W_t, C[M], student_bias=b_s, teacher_bias=b_t,
                                    num_items=num_items, temperature=τ, divergence="jsd", beta=β,
                                    t2_scale=False, hard_weight=0.0, vocab_size=vocab_size)

    with τ = ``args.temperature`` and β = ``args.beta`` (TRL's), ``num_items`` TRL's token count of the
    whole accumulation step divided by the number of processes (None in evaluation: the mean over the
    micro-batch's tokens). This is TRL's own loss (its chunked generalized JSD) to float32 rounding.
    The student's mean entropy over the counted tokens (at τ) is logged as ``entropy``, as TRL does.

    Args:
        temperature: τ of the loss; None: ``args.temperature`` (TRL samples and distils at the same τ).
        beta: β of the generalized JSD; None: ``args.beta``.
        hard_weight: weight of the cross-entropy (at τ = 1) of the student on the completion tokens
            (on-policy these are its own samples, so it sharpens the student's distribution).
        soft_weight, divergence, skew, label_smoothing, backend: as in :func:`fastkd.kd_loss`
            (``divergence`` default ``"jsd"``, TRL's generalized JSD).
        t2_scale: multiply the soft term by τ² (Hinton); False, TRL's convention, by default.
        vocab_size: count only the first ``vocab_size`` rows of each LM head (padded heads).
        chunk_size: token rows per chunk of the fused loss (None: from fastkd's memory budget).
        All other arguments are those of ``trl.DistillationTrainer``.

    A :class:`fastkd.TeacherCache` has no use here: every step distils on completions sampled at that
    step. Off-policy data with a cached teacher is ``FastKDGKDTrainer`` with ``lmbda < 1``.
    """

    def __init__(self, *args, temperature: Optional[float] = None, soft_weight: float = 1.0,
                 hard_weight: float = 0.0, divergence: Optional[str] = None, beta: Optional[float] = None,
                 skew: float = 0.1, label_smoothing: float = 0.0, t2_scale: bool = False, backend: str = "auto",
                 chunk_size: Optional[int] = None, vocab_size: Optional[int] = None, **kwargs):
        check_trl_internals(kind="DistillationTrainer")
        self._init_fastkd(temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
                          divergence=divergence, beta=beta, skew=skew, label_smoothing=label_smoothing,
                          t2_scale=t2_scale, backend=backend, chunk_size=chunk_size, vocab_size=vocab_size)
        super().__init__(*args, **kwargs)
        check_trl_internals(self, kind="DistillationTrainer")
        _check_vocab_size(vocab_size, self.model, self.accelerator.unwrap_model(self.teacher_model), None,
                          owner=type(self).__name__)

    def _loss_temperature(self) -> float:
        return self.temperature if self._fastkd_temperature is None else self._fastkd_temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's count: the completion tokens of the whole generation batch (the accumulation step, all
        # ranks), per process, since DDP averages the gradients over the processes.
        if self.model.training and inputs.get("num_items_in_batch") is not None:
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        completion_ids = inputs["completion_ids"]
        keep = completion_ids.size(1)
        model_inputs = {"input_ids": torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                        "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                        "use_cache": False}
        model_inputs.update({k: inputs[k] for k in TRL_MULTIMODAL_KEYS if k in inputs})
        if "logits_to_keep" in self.model_kwarg_keys:
            model_inputs["logits_to_keep"] = keep + 1  # the head then sees only the positions used
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        valid = mask.reshape(-1) != 0

        def rows(h):  # positions predicting the completion tokens, counted ones only
            h = h[:, :-1][:, -keep:]
            return h.reshape(-1, h.shape[-1])[valid]

        unwrapped = self.accelerator.unwrap_model(model)
        h_s, w_s, b_s = _hidden_states(model, unwrapped, model_inputs)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            h_t, w_t, b_t = _hidden_states(self.teacher_model, teacher, model_inputs)
        h_t = h_t.to(w_s.device)
        target = completion_ids.reshape(-1)[valid] if self.fastkd_settings["hard_weight"] else None
        loss, entropy = self._fused(rows(h_s.to(w_s.device)), w_s, b_s, rows(h_t), w_t, b_t, target,
                                    num_items_in_batch, entropy=True)
        # TRL's entropy metric: the mean over every process's counted tokens.
        mode = "train" if self.model.training else "eval"
        count = self.accelerator.gather_for_metrics(valid.sum().reshape(1)).sum()
        total = self.accelerator.gather_for_metrics(entropy.sum().reshape(1)).sum()
        self._metrics[mode]["entropy"].append((total / count).item() if count > 0 else 0.0)
        return (loss, None) if return_outputs else loss


def _make_gkd_trainer():
    GKDTrainer = _gkd_trainer_class()

    class FastKDGKDTrainer(_FastKDLoss, GKDTrainer):
        r"""``trl.experimental.gkd.GKDTrainer`` with :func:`fastkd.fused_linear_kd_loss` as its loss.

        Each step trains on the student's own completions with probability ``lmbda`` (TRL's
        on-policy steps), else, with ``seq_kd``, on the teacher's, else on the dataset's sequences. For
        the step's ``input_ids``, ``attention_mask`` and ``labels`` ``y`` (``-100`` on the prompt and
        padding), with ``h_s`` / ``h_t`` the hidden states entering the LM heads ``(W, b)``, the loss is::

            fastkd.fused_linear_kd_loss(h_s[:, :-1], W_s, h_t[:, :-1], W_t, y[:, 1:], student_bias=b_s,
                                        teacher_bias=b_t, num_items=num_items_in_batch, temperature=1.0,
                                        divergence="jsd", beta=β, t2_scale=False, hard_weight=0.0)

        which is TRL's ``GKDTrainer.generalized_jsd_loss`` as its ``compute_loss`` calls it: β =
        ``args.beta``, τ = 1 whatever ``args.temperature`` (TRL's GKD uses that one for sampling only),
        ``num_items_in_batch`` as the ``Trainer`` counts it from the dataset's labels.

        Args:
            teacher_cache: a :class:`fastkd.TeacherCache` serving the teacher on the steps that train on
                the dataset's sequences (off-policy): read where stored, else captured from the live
                teacher and stored, so later epochs run no teacher on those steps. Each batch must carry
                the sequences' integer sample indices under ``sample_id_key`` (the data collator keeps
                it; it is dropped when a step replaces the sequences by generated ones). The live teacher
                (``teacher_model``) still serves the generated sequences; ``teacher_model=None`` needs
                ``lmbda=0`` and ``seq_kd=False`` (every step off-policy, the cache filled beforehand).
            tail: how a cached teacher's missing mass is treated (:func:`fastkd.sparse_kd_loss`); None:
                ``"sampled"`` for a sampled cache, ``"bucket"`` otherwise.
            temperature: τ of the loss; None: 1.0 (TRL's GKD loss).
            Every other fastkd argument as for :class:`FastKDDistillationTrainer`; all others are
            those of ``GKDTrainer``.
        """

        def __init__(self, model=None, teacher_model=None, args=None, *more, teacher_cache=None,
                     tail: Optional[str] = None,
                     sample_id_key: str = "sample_id", temperature: Optional[float] = None,
                     soft_weight: float = 1.0, hard_weight: float = 0.0, divergence: Optional[str] = None,
                     beta: Optional[float] = None, skew: float = 0.1, label_smoothing: float = 0.0,
                     t2_scale: bool = False, backend: str = "auto", chunk_size: Optional[int] = None,
                     vocab_size: Optional[int] = None, **kwargs):
            check_trl_internals(kind="GKDTrainer")
            cache_cls = fastkd.TeacherCache
            if teacher_cache is not None and not isinstance(teacher_cache, cache_cls):
                raise TypeError(f"teacher_cache must be a fastkd.TeacherCache, got {type(teacher_cache).__name__}")
            if tail is not None:
                check("tail", tail)
            self._init_fastkd(temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
                              divergence=divergence, beta=beta, skew=skew, label_smoothing=label_smoothing,
                              t2_scale=t2_scale, backend=backend, chunk_size=chunk_size, vocab_size=vocab_size)
            self.teacher_cache = teacher_cache
            self.tail = tail
            self.sample_id_key = sample_id_key
            self._capture_generator: Optional[torch.Generator] = None
            cache_only = teacher_model is None and teacher_cache is not None
            if cache_only:
                if args is None or args.lmbda != 0 or args.seq_kd:
                    raise ValueError("without a teacher_model every step must train on the dataset's sequences: "
                                     "set lmbda=0.0 and seq_kd=False in the GKDConfig (generated sequences "
                                     "need a live teacher)")
                if not isinstance(model, torch.nn.Module):
                    raise TypeError("with a cache and no teacher_model, the student must be a model instance")
                teacher_model = _CacheOnlyTeacher(model.config)
            super().__init__(model, teacher_model, args, *more, **kwargs)
            check_trl_internals(self, kind="GKDTrainer")
            if teacher_cache is not None:
                self._sparse_loss_settings()  # the cache's divergence rule, checked now
            self._live_teacher = not cache_only
            _check_vocab_size(vocab_size, self.model,
                              self.accelerator.unwrap_model(self.teacher_model) if self._live_teacher else None,
                              teacher_cache, owner=type(self).__name__)

        def _loss_temperature(self) -> float:
            return 1.0 if self._fastkd_temperature is None else self._fastkd_temperature

        def _tail(self) -> str:
            return self.tail if self.tail is not None else super()._tail()

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            """TRL's generation (``GKDTrainer.generate_on_policy_outputs``); the batch's sample indices
            are dropped, since its sequences are about to be replaced by generated ones."""
            inputs.pop(self.sample_id_key, None)
            return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if self._signature_columns is not None and self.sample_id_key not in self._signature_columns:
                self._signature_columns.append(self.sample_id_key)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            sample_ids = inputs.pop(self.sample_id_key, None) if isinstance(inputs, dict) else None
            model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            unwrapped = self.accelerator.unwrap_model(model)
            h_s, w_s, b_s = _hidden_states(model, unwrapped, dict(model_inputs, use_cache=False))
            target = inputs["labels"][:, 1:]
            h_s = h_s[:, :-1]
            if self.teacher_cache is not None and sample_ids is not None:
                teacher = self.accelerator.unwrap_model(self.teacher_model) if self._live_teacher else None
                if teacher is not None and self._capture_generator is None:
                    dev = inputs["input_ids"].device
                    self._capture_generator = torch.Generator(device=dev).manual_seed(int(self.args.seed) + 7919)
                sparse = cached_teacher(self.teacher_cache, teacher, model_inputs, sample_ids,
                                        vocab_size=self.vocab_size, device=h_s.device,
                                        generator=self._capture_generator, sample_id_key=self.sample_id_key)
                loss = self._fused(h_s, w_s, b_s, sparse, None, None, target, num_items_in_batch, entropy=False)
            else:
                if not self._live_teacher:
                    raise ValueError(f"this batch has no `{self.sample_id_key}` to read the TeacherCache with, "
                                     "and there is no live teacher")
                self.teacher_model.eval()
                teacher = self.accelerator.unwrap_model(self.teacher_model)
                with torch.no_grad():
                    h_t, w_t, b_t = _hidden_states(self.teacher_model, teacher, dict(model_inputs, use_cache=False))
                valid = target.reshape(-1) != -100

                def rows(h):
                    return h.reshape(-1, h.shape[-1])[valid]

                y = target.reshape(-1)[valid]
                loss = self._fused(rows(h_s), w_s, b_s, rows(h_t[:, :-1].to(w_s.device)), w_t, b_t, y,
                                   num_items_in_batch, entropy=False)
            return (loss, None) if return_outputs else loss

    FastKDGKDTrainer.__module__ = __name__
    FastKDGKDTrainer.__qualname__ = "FastKDGKDTrainer"
    return FastKDGKDTrainer


_LAZY: Dict[str, Any] = {}


def __getattr__(name: str):
    # FastKDGKDTrainer subclasses a trl.experimental class: built on first access only.
    if name == "FastKDGKDTrainer":
        if name not in _LAZY:
            _LAZY[name] = _make_gkd_trainer()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
