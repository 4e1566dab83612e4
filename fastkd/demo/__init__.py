"""End-to-end vocabulary-distillation demo: ``fastkd demo`` (or ``python -m fastkd.cli demo``).

A GPT-2-style teacher, trained here on text that ships with Python, is distilled into a smaller
student four ways at one common budget: CE only; full KD through ``fastkd.fused_linear_kd_loss``;
from a ``fastkd.TeacherCache`` filled on the fly in the first epoch, top-k with a bucket tail and
sampled. Three more students read the same text through a second, smaller BPE and learn from the
same teacher across tokenizers (CE only, CE + ULD, CE + the hybrid loss; ``cross_tokenizer``). The
output is tables, the findings in words, PNG plots and a JSON summary.

Modules, one stage each: ``data`` (the corpus), ``tokenizer`` (BPE, token blocks), ``dataset``
(the blocks every stage reads), ``models`` (architecture), ``teacher`` (its training and cache),
``runs`` (the student runs; ``evaluation`` and ``memory`` measure them), ``cross_tokenizer`` (the
students on a second BPE), ``report`` (tables, findings, plots), ``pipeline`` (``run_demo``: the
stages in order), ``presets`` (sizes and budgets),
``environment`` / ``provenance`` / ``storage`` (offline settings and device; what the summary records;
cache keys and files).
"""
from .environment import default_cache_dir
from .pipeline import run_demo
from .presets import ALL_RUNS, PRESETS, Preset, get_preset

__all__ = ["run_demo", "PRESETS", "Preset", "get_preset", "ALL_RUNS", "default_cache_dir"]
