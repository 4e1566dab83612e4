"""``run_demo``: the demo's stages in order, each cached under ``cache_dir``.

text shipped with Python → byte-level BPE → a GPT-2-style teacher trained here → student runs at
one common budget → cross-tokenizer student runs (a second BPE) → table, findings, PNG plots and
JSON summary. A second invocation with the same
settings reuses the tokenizer, the token arrays, the teacher and the finished runs.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, Optional, Sequence

from . import environment, provenance, report
from .dataset import prepare_data
from .evaluation import heldout_evaluator
from .presets import Preset, get_preset
from .cross_tokenizer import run_cross_runs
from .runs import run_students
from .storage import save_json
from .teacher import load_or_train


def _resolve_preset(preset, runs, overrides) -> Preset:
    p = preset if isinstance(preset, Preset) else get_preset(preset, runs=runs, **overrides)
    if isinstance(preset, Preset) and (runs or overrides):
        p = dataclasses.replace(p, **({"runs": tuple(runs)} if runs else {}), **overrides)
    return p


def run_demo(preset: str | Preset = "default", *, cache_dir: Optional[str] = None, out_dir: Optional[str] = None,
             runs: Optional[Sequence[str]] = None, force: bool = False, progress: bool = True,
             device: Optional[str] = None, **overrides) -> Dict:
    """Runs the demo and returns its JSON summary (also written to ``<out_dir>/summary.json``).

    Args:
        preset: "default" (≈ 5 minutes on 2 CPU cores), "tiny" (CI smoke test), "gpu", or a Preset.
        cache_dir: where the tokenizer, token arrays, teacher, run results and outputs live
            (default ``$FASTKD_CACHE_DIR`` or ``./.fastkd_cache``).
        out_dir: where table.md, heldout_loss.png and summary.json go (default
            ``<cache_dir>/demo-<preset>``).
        runs: subset of ``ALL_RUNS``: "ce", "kd", "cache_topk", "cache_sample", "served_top20"
            (students on the teacher's BPE) and "xt_ce", "xt_uld", "xt_hybrid" (students on a second
            BPE of ``cross_vocab_size`` entries, taught across tokenizers; see
            ``fastkd.demo.cross_tokenizer``).
        force: redo the student runs even if their results are cached.
        device: "cpu" or "cuda" (default: the preset's, falling back to CPU without a GPU).
        **overrides: any Preset field (e.g. vocab_size=32000, student_steps=200).
    """
    import torch

    def say(msg: str) -> None:
        if progress:
            print(msg, flush=True)

    p = _resolve_preset(preset, runs, overrides)
    dev = environment.pick_device(device, p.device, p.name)
    cache_dir = os.path.abspath(cache_dir or environment.default_cache_dir())
    out_dir = os.path.abspath(out_dir or os.path.join(cache_dir, f"demo-{p.name}"))
    os.makedirs(out_dir, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    timings: Dict[str, float] = {}

    # 1. text, tokenizer, token blocks
    t0 = time.perf_counter()
    data, p = prepare_data(p, cache_dir, say, device_label=str(dev))
    timings["tokenizer_s"] = time.perf_counter() - t0
    autocast = environment.autocast_dtype(p.autocast_bf16, dev)
    eval_fn = heldout_evaluator(data.heldout, dev, autocast)

    # 2. teacher
    t0 = time.perf_counter()
    teacher, tinfo, tkey = load_or_train(p, data.train_blocks, vocab_size=data.vocab_size,
                                         fingerprint=data.fingerprint, cache_dir=cache_dir, device=dev,
                                         evaluate=eval_fn, autocast_dtype=autocast, say=say, progress=progress)
    timings["teacher_s"] = time.perf_counter() - t0

    # 3. student runs
    results, skipped = run_students(p, train_blocks=data.transfer, heldout=data.heldout, teacher=teacher,
                                    teacher_key=tkey, dataset_fp=data.fingerprint, out_dir=out_dir, device=dev,
                                    force=force, progress=progress, say=say)

    # 4. students that read another BPE, taught across tokenizers
    t0 = time.perf_counter()
    xt = run_cross_runs(p, data, teacher=teacher, teacher_key=tkey, cache_dir=cache_dir, out_dir=out_dir,
                        device=dev, force=force, progress=progress, say=say)
    timings["cross_tokenizer_s"] = time.perf_counter() - t0

    # 5. report
    vocab = data.vocab_size
    comps = report.comparisons(results)
    tables = []
    plot = None
    if results:
        tables.append(report.markdown_table(results, comps))
        plot = report.plot_losses(results, os.path.join(out_dir, "heldout_loss.png"),
                                  f"fastkd demo ({p.name}): V={vocab}, student {p.student.n_layer}L/"
                                  f"{p.student.n_embd}d, teacher {p.teacher.n_layer}L/{p.teacher.n_embd}d",
                                  teacher_loss=tinfo["heldout"]["loss"])
    if xt is not None:
        tables.append(report.cross_table(xt))
        xt["plot"] = report.plot_bits_per_char(
            xt, os.path.join(out_dir, "cross_tokenizer.png"),
            f"fastkd demo ({p.name}): teacher BPE {xt['teacher_vocab']}, students BPE {xt['student_vocab']}")
    table = "\n\n".join(tables)
    timings["total_s"] = time.perf_counter() - t_start
    timings["total_cpu_s"] = time.process_time() - cpu_start  # CPU time of this process, all threads
    summary = {
        "preset": dataclasses.asdict(p), "vocab_size": vocab, "device": str(dev),
        "device_name": provenance.device_name(dev), "cpu_threads": torch.get_num_threads(),
        "versions": provenance.versions(), "date": provenance.utc_now(), "corpus": data.corpus_summary(),
        "teacher": tinfo, "runs": results, "cross_tokenizer": xt, "skipped": skipped, "comparisons": comps,
        "timings": timings, "table": table, "plot": plot,
    }
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(table + "\n")
    save_json(summary, os.path.join(out_dir, "summary.json"))
    if progress:
        print("\n" + table + "\n")
        lines = (report.findings(results, comps) if results else []) + (report.cross_findings(xt) if xt else [])
        for line in lines:
            print(f"  {line}")
        if p.name == "tiny":
            print("  (the tiny preset is a smoke test: a few steps on a few thousand tokens, so its gains are "
                  "noisy; the default preset is the measurement)")
        print(f"\nteacher held-out loss {tinfo['heldout']['loss']:.4f}; total {timings['total_s']:.0f} s")
        plots = [path for path in (plot, xt and xt["plot"]) if path]
        print(f"plot: {', '.join(plots)}\nsummary: {os.path.join(out_dir, 'summary.json')}")
    return summary
