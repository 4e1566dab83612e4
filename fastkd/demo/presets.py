"""Demo presets: sizes and budgets. ``default`` fits in a few minutes on 2 CPU cores, ``tiny`` is the
CI smoke test, ``gpu`` is a larger vocabulary and model for one GPU."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

from .models import ModelSpec

STUDENT_RUNS = ("ce", "kd", "cache_topk", "cache_sample", "served_top20")  # students on the teacher's BPE
CROSS_RUNS = ("xt_ce", "xt_uld", "xt_hybrid")  # students that read a second BPE (fastkd.demo.cross_tokenizer)
ALL_RUNS = STUDENT_RUNS + CROSS_RUNS
# Fields that only the distilled runs read: a CE run's cached result stays valid when they change.
KD_ONLY_FIELDS = ("temperature", "soft_weight", "hard_weight", "kd_chunk_size", "topk", "num_samples", "sampling",
                  "served_k", "runs", "cross_topk", "cross_weight")
# Fields that only the cross-tokenizer runs read.
CROSS_FIELDS = ("cross_vocab_size", "cross_topk", "cross_weight")


@dataclass(frozen=True)
class Preset:
    name: str
    max_chars: int            # corpus size (characters of pydoc topics + stdlib sources)
    vocab_size: int
    seq_len: int
    teacher: ModelSpec
    student: ModelSpec
    teacher_steps: int
    teacher_lr: float
    batch_size: int           # sequences per optimizer step (all runs)
    student_steps: int        # the common budget of every student run
    student_lr: float
    transfer_blocks: int      # sequences the students train on (epochs = steps * batch / this)
    heldout_blocks: int       # held-out sequences for loss / perplexity / ECE
    eval_every: int
    grad_accum: int = 1
    temperature: float = 1.0
    # KD runs: soft_weight * KL(teacher || student) + hard_weight * CE. The hard term matters for the
    # top-k cache: without it nothing ranks the tokens outside the stored k (the bucket tail only
    # fixes their total mass), and with a high-entropy teacher most held-out targets lie there.
    soft_weight: float = 0.5
    hard_weight: float = 0.5
    kd_chunk_size: Optional[int] = None  # token rows per chunk of fused_linear_kd_loss (None: auto)
    topk: int = 64
    num_samples: int = 50
    sampling: str = "systematic"  # sampled cache draws (fastkd.capture): "systematic" or "iid"
    served_k: int = 20  # served_top20: log-probabilities per token an inference server returns (at τ = 1)
    device: str = "cpu"
    autocast_bf16: bool = False
    seed: int = 1234
    runs: Tuple[str, ...] = field(default=ALL_RUNS)
    subpackages: bool = False  # corpus: also the stdlib's packages, not only its top-level modules
    # Cross-tokenizer runs: the students' BPE size, the teacher's top-k kept per aligned row, and the
    # weight of the cross-tokenizer term next to the students' CE (loss = CE + cross_weight * term).
    cross_vocab_size: int = 4096
    cross_topk: int = 256
    cross_weight: float = 1.0

    @property
    def epochs(self) -> float:
        return self.student_steps * self.batch_size / self.transfer_blocks


PRESETS = {
    "default": Preset(
        name="default", max_chars=5_200_000, vocab_size=8192, seq_len=128,
        teacher=ModelSpec(4, 256, 4), student=ModelSpec(2, 128, 4),
        teacher_steps=250, teacher_lr=3e-3, batch_size=16, student_steps=90, student_lr=3e-3,
        transfer_blocks=120, heldout_blocks=48, eval_every=10, kd_chunk_size=256),
    "tiny": Preset(
        name="tiny", max_chars=400_000, vocab_size=1024, seq_len=32,
        teacher=ModelSpec(2, 64, 2), student=ModelSpec(1, 32, 2),
        teacher_steps=40, teacher_lr=5e-3, batch_size=8, student_steps=12, student_lr=5e-3,
        transfer_blocks=32, heldout_blocks=8, eval_every=4, grad_accum=2, topk=16, num_samples=20,
        cross_vocab_size=512, cross_topk=64),
    "gpu": Preset(
        name="gpu", max_chars=40_000_000, subpackages=True, vocab_size=32000, seq_len=256,
        teacher=ModelSpec(8, 512, 8), student=ModelSpec(4, 256, 4),
        teacher_steps=1500, teacher_lr=1.5e-3, batch_size=32, student_steps=600, student_lr=2e-3,
        transfer_blocks=4800, heldout_blocks=256, eval_every=50, device="cuda", autocast_bf16=True,
        cross_vocab_size=16000),
}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "runs" in overrides:
        bad = [r for r in overrides["runs"] if r not in ALL_RUNS]
        if bad:
            raise ValueError(f"runs must be drawn from {ALL_RUNS}, got {bad}")
        overrides["runs"] = tuple(overrides["runs"])
    for name in ("vocab_size", "cross_vocab_size"):
        if overrides.get(name, getattr(preset, name)) < 256 + 1:
            raise ValueError(f"{name} must be at least 257 (256 bytes + end-of-text)")
    return replace(preset, **overrides)
