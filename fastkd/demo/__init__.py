"""End-to-end vocabulary-distillation demo: ``fastkd demo`` (or ``python -m fastkd.cli demo``).

Pipeline, every stage cached under ``cache_dir`` so a second invocation skips what is done:
text shipped with Python → byte-level BPE (``tokenizers``) → a GPT-2-style teacher trained here →
student runs at one common budget (CE only; full KD through ``fastkd.fused_linear_kd_loss``; from a
``fastkd.TeacherCache`` filled on the fly in the first epoch, top-k with a bucket tail and sampled)
→ table, PNG plot and JSON summary.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import time
import warnings
from typing import Dict, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never downloads anything
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from .presets import ALL_RUNS, KD_ONLY_FIELDS, PRESETS, Preset, get_preset  # noqa: E402

__all__ = ["run_demo", "PRESETS", "Preset", "get_preset", "ALL_RUNS", "default_cache_dir"]


def default_cache_dir() -> str:
    return os.environ.get("FASTKD_CACHE_DIR", os.path.join(os.getcwd(), ".fastkd_cache"))


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _versions() -> Dict[str, str]:
    import torch

    import fastkd

    out = {"python": platform.python_version(), "torch": torch.__version__, "fastkd": fastkd.__version__}
    for mod in ("transformers", "tokenizers", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, flush=True)


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
        runs: subset of ("ce", "kd", "cache_topk", "cache_sample").
        force: redo the student runs even if their results are cached.
        device: "cpu" or "cuda" (default: the preset's, falling back to CPU without a GPU).
        **overrides: any Preset field (e.g. vocab_size=32000, student_steps=200).
    """
    import numpy as np
    import torch

    import fastkd

    from . import data, models, report, tokenizer
    from .runs import RUN_LABELS, evaluate, run_student, save_json

    p = preset if isinstance(preset, Preset) else get_preset(preset, runs=runs, **overrides)
    if isinstance(preset, Preset) and (runs or overrides):
        p = dataclasses.replace(p, **({"runs": tuple(runs)} if runs else {}), **overrides)
    dev_name = device or p.device
    if dev_name == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"preset {p.name!r} asks for a GPU but none is available: running on CPU (slow)")
        dev_name = "cpu"
    dev = torch.device(dev_name)
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    out_dir = os.path.abspath(out_dir or os.path.join(cache_dir, f"demo-{p.name}"))
    os.makedirs(out_dir, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    timings: Dict[str, float] = {}

    # 1. text and tokenizer ------------------------------------------------------------------
    t0 = time.perf_counter()
    docs = data.load_documents(p.max_chars, subpackages=p.subpackages)
    train_docs, held_docs = data.split_documents(docs)
    fp = data.fingerprint(docs)
    tok_dir = os.path.join(cache_dir, f"data-{fp}-v{p.vocab_size}")
    os.makedirs(tok_dir, exist_ok=True)
    _say(f"[fastkd demo] preset {p.name}: {len(train_docs)} train / {len(held_docs)} held-out documents "
         f"({sum(len(d.text) for d in docs) / 1e6:.1f} M characters), device {dev}", progress)
    tok = tokenizer.train_tokenizer(train_docs, p.vocab_size, os.path.join(tok_dir, "tokenizer.json"))
    train_ids = tokenizer.encode_documents(tok, train_docs, os.path.join(tok_dir, "train.npy"))
    held_ids = tokenizer.encode_documents(tok, held_docs, os.path.join(tok_dir, "heldout.npy"))
    vocab = tok.get_vocab_size()
    if vocab != p.vocab_size:  # a small corpus can end BPE training early: size the models to match
        _say(f"[fastkd demo] note: BPE training stopped at {vocab} entries, not the {p.vocab_size} asked for "
             f"(this corpus has no more merges occurring twice); the models use V={vocab}", progress)
        p = dataclasses.replace(p, vocab_size=vocab)
    timings["tokenizer_s"] = time.perf_counter() - t0
    train_blocks = tokenizer.blocks(train_ids, p.seq_len)
    held_all = tokenizer.blocks(held_ids, p.seq_len)
    # Evenly spaced held-out blocks cover every held-out document, not just the first one.
    pick = np.linspace(0, len(held_all) - 1, num=min(p.heldout_blocks, len(held_all))).round().astype(int)
    heldout = torch.from_numpy(held_all[np.unique(pick)])
    rng = np.random.default_rng(p.seed)
    transfer = train_blocks[np.sort(rng.permutation(len(train_blocks))[: p.transfer_blocks])]
    _say(f"[fastkd demo] BPE vocabulary {vocab}, {len(train_ids):,} train tokens, {len(held_ids):,} held-out "
         f"tokens; students train on {len(transfer)} x {p.seq_len} tokens for {p.epochs:.1f} epochs", progress)

    autocast = torch.bfloat16 if p.autocast_bf16 and dev.type == "cuda" else None

    def eval_fn(model):
        return evaluate(model, heldout, batch_size=8, device=dev, autocast_dtype=autocast)

    # 2. teacher ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    tkey = _key(dataclasses.asdict(p.teacher), p.teacher_steps, p.teacher_lr, p.batch_size, p.seq_len, vocab,
                fp, p.seed, p.autocast_bf16)
    teacher_path = os.path.join(cache_dir, f"teacher-{tkey}")
    if not os.path.exists(os.path.join(teacher_path, "fastkd_teacher.json")):
        _say(f"[fastkd demo] training the teacher ({p.teacher_steps} steps, cached at {teacher_path})", progress)
    teacher, tinfo = models.train_teacher(
        p.teacher, train_blocks, vocab_size=vocab, seq_len=p.seq_len, steps=p.teacher_steps,
        batch_size=p.batch_size, lr=p.teacher_lr, seed=p.seed, device=dev, path=teacher_path,
        evaluate=eval_fn, autocast_dtype=autocast, progress=progress)
    teacher.requires_grad_(False)
    timings["teacher_s"] = time.perf_counter() - t0
    _say(f"[fastkd demo] teacher: {tinfo['params'] / 1e6:.2f} M parameters, held-out loss "
         f"{tinfo['heldout']['loss']:.4f}", progress)

    # 3. student runs -------------------------------------------------------------------------
    has_cache = all(hasattr(fastkd, n) for n in ("TeacherCache", "capture", "sparse_kd_loss"))
    results: Dict[str, Dict] = {}
    skipped: Dict[str, str] = {}
    run_dir = os.path.join(out_dir, "runs")
    os.makedirs(run_dir, exist_ok=True)
    for name in p.runs:
        if name.startswith("cache_") and not has_cache:
            skipped[name] = "fastkd.TeacherCache / capture / sparse_kd_loss are not available in this build"
            _say(f"[fastkd demo] skipping {name}: {skipped[name]}", progress)
            continue
        settings = dataclasses.asdict(p)
        settings.pop("runs")
        if name == "ce":
            for field in KD_ONLY_FIELDS:
                settings.pop(field, None)
        rkey = _key(settings, name, tkey, fastkd.__version__, str(dev))
        rpath = os.path.join(run_dir, f"{name}-{rkey}.json")
        if os.path.exists(rpath) and not force:
            with open(rpath) as fh:
                results[name] = json.load(fh)
            _say(f"[fastkd demo] {RUN_LABELS[name]}: cached result (use --force to rerun)", progress)
            continue
        _say(f"[fastkd demo] student run: {RUN_LABELS[name]}", progress)
        t0 = time.perf_counter()
        results[name] = run_student(name, p, train_blocks=transfer, heldout=heldout, teacher=teacher,
                                    teacher_name=f"demo-teacher-{tkey}", dataset_fp=fp, work_dir=out_dir,
                                    device=dev, progress=progress)
        results[name]["wall_seconds"] = time.perf_counter() - t0
        save_json(results[name], rpath)

    # 4. report -------------------------------------------------------------------------------
    comps = report.comparisons(results)
    table = report.markdown_table(results, comps)
    plot = report.plot_losses(results, os.path.join(out_dir, "heldout_loss.png"),
                              f"fastkd demo ({p.name}): V={vocab}, student {p.student.n_layer}L/"
                              f"{p.student.n_embd}d, teacher {p.teacher.n_layer}L/{p.teacher.n_embd}d",
                              teacher_loss=tinfo["heldout"]["loss"])
    timings["total_s"] = time.perf_counter() - t_start
    timings["total_cpu_s"] = time.process_time() - cpu_start  # CPU time of this process, all threads
    summary = {
        "preset": dataclasses.asdict(p), "vocab_size": vocab, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "cpu_threads": torch.get_num_threads(), "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "corpus": {"fingerprint": fp, "train_docs": len(train_docs), "heldout_docs": len(held_docs),
                   "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids)),
                   "transfer_tokens": int(transfer.size), "heldout_eval_tokens": int(heldout[:, 1:].numel())},
        "teacher": tinfo, "runs": results, "skipped": skipped, "comparisons": comps, "timings": timings,
        "table": table, "plot": plot,
    }
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(table + "\n")
    save_json(summary, os.path.join(out_dir, "summary.json"))
    if progress:
        print("\n" + table)
        for name, c in comps.items():
            if "gap_to_full_kd" in c:
                print(f"  {name}: keeps {100 * (1 - c['gap_to_full_kd']):.1f}% of full KD's gain over CE "
                      f"(target: within {100 * c['gap_target']:.0f}%) -> {'ok' if c['within_target'] else 'MISSED'}")
        print(f"\nteacher held-out loss {tinfo['heldout']['loss']:.4f}; total {timings['total_s']:.0f} s")
        print(f"plot: {plot}\nsummary: {os.path.join(out_dir, 'summary.json')}")
    return summary
