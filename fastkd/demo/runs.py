"""Student runs at one common budget, each measured (held-out loss, perplexity, ECE, tokens/s, peak
memory, cache bytes/token) and its result cached under ``<out_dir>/runs/<run>-<key>.json``. Every run
trains through :class:`fastkd.integrations.transformers.KDTrainer`."""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

import fastkd
from fastkd._backends import registry

from .environment import autocast_dtype
from .evaluation import heldout_evaluator
from .memory import PeakMemory
from .presets import CROSS_FIELDS, CROSS_RUNS, KD_ONLY_FIELDS, STUDENT_RUNS, Preset
from .storage import cache_key, load_json, save_json

RUN_LABELS = {
    "ce": "CE only",
    "kd": "full KD (fused_linear_kd_loss)",
    "cache_topk": "TeacherCache top-k, bucket tail",
    "cache_sample": "TeacherCache sampled",
    "served_top20": "served top-20 log-probs (from_logprobs)",
}


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks; each item carries its index, the key of the teacher cache."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = torch.from_numpy(np.ascontiguousarray(blocks))

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        x = self.blocks[i]
        return {"input_ids": x, "labels": x, "sample_id": torch.tensor(i, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------
# one student run
# ---------------------------------------------------------------------------------------------
def _callback_class():
    from transformers import TrainerCallback

    class HeldoutCallback(TrainerCallback):
        """Held-out metrics every ``every`` steps; its own time is kept out of tokens/s."""

        def __init__(self, eval_fn, every: int, label: str, memory: "PeakMemory", verbose: bool):
            self.eval_fn, self.every, self.label, self.memory = eval_fn, every, label, memory
            self.verbose = verbose
            self.history: List[Dict[str, float]] = []
            self.eval_seconds = 0.0
            self.t_begin = self.t_end = 0.0

        def _record(self, step: int, model) -> None:
            self.memory.pause()
            t0 = time.perf_counter()
            m = self.eval_fn(model)
            self.eval_seconds += time.perf_counter() - t0
            self.memory.resume()
            self.history.append({"step": step, **{k: m[k] for k in ("loss", "ppl", "ece", "top1")}})

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.t_begin = time.perf_counter()
            self._record(0, model)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 1:
                # Memory is measured from the end of the first step: one-time costs (lazily loaded
                # code, first allocations) are the same for every run and would blur the comparison.
                self.memory.start()
            if state.global_step % self.every == 0 or state.global_step == state.max_steps:
                self._record(state.global_step, model)
                if not self.verbose:
                    return
                try:
                    from tqdm.auto import tqdm

                    tqdm.write(f"  [{self.label}] step {state.global_step:4d}  held-out loss "
                               f"{self.history[-1]['loss']:.4f}")
                except ImportError:  # pragma: no cover
                    pass

        def on_train_end(self, args, state, control, **kw):
            self.t_end = time.perf_counter()

    return HeldoutCallback


def make_teacher_cache(path: str, preset: Preset, mode: str, teacher_name: str, dataset_fp: str):
    """A fresh ``fastkd.TeacherCache`` for one cached run (the run fills it on the fly)."""
    if os.path.exists(path):
        shutil.rmtree(path)  # the run measures capture-on-the-fly, so it always starts empty
    kw = dict(mode=mode, vocab_size=preset.vocab_size, temperature=preset.temperature,
              teacher=teacher_name, dataset=dataset_fp)
    if mode == "topk":
        kw["k"] = preset.topk
    else:
        kw["num_samples"] = preset.num_samples
        kw["sampling"] = preset.sampling
    return fastkd.TeacherCache(path, **kw)


def fill_served_cache(path: str, preset: Preset, train_blocks: np.ndarray, teacher, teacher_name: str,
                      dataset_fp: str, device: torch.device):
    """A top-``served_k`` cache filled as from an inference server before training: per token of
    every transfer sequence, the teacher's ``served_k`` most probable ids and their log-probabilities
    at τ = 1 (what vLLM's ``prompt_logprobs`` returns), converted by ``SparseTeacher.from_logprobs``.
    Rows are those of ``logits[:, :-1]``: a sequence of T tokens has T − 1 teacher rows."""
    if os.path.exists(path):
        shutil.rmtree(path)
    cache = fastkd.TeacherCache(path, mode="topk", k=preset.served_k, vocab_size=preset.vocab_size, temperature=1.0,
                                teacher=f"{teacher_name} (served)", dataset=dataset_fp)
    blocks = torch.from_numpy(np.ascontiguousarray(train_blocks))
    teacher.eval()
    with torch.no_grad():
        for i in range(0, blocks.shape[0], preset.batch_size):
            x = blocks[i: i + preset.batch_size].to(device)
            logprobs = torch.log_softmax(teacher(input_ids=x).logits[:, :-1].float(), -1)
            vals, ids = logprobs.topk(preset.served_k, -1)
            st = fastkd.SparseTeacher.from_logprobs(ids.cpu(), vals.cpu(), vocab_size=preset.vocab_size)
            cache.write(range(i, i + x.shape[0]), st)
    return cache


def cache_bytes_per_token(cache) -> Optional[float]:
    for attr in ("bytes_per_token", "bytes_per_row"):
        v = getattr(cache, attr, None)
        if v is not None:
            v = v() if callable(v) else v
            return float(v)
    return None


def run_student(name: str, preset: Preset, *, train_blocks: np.ndarray, heldout: torch.Tensor,
                teacher, teacher_name: str, dataset_fp: str, work_dir: str, device: torch.device,
                progress: bool = True) -> Dict:
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    from ..integrations.transformers import KDTrainer
    from .models import build_model, n_params

    hf_logging.set_verbosity_error()
    autocast = autocast_dtype(preset.autocast_bf16, device)
    student = build_model(preset.student, preset.vocab_size, preset.seq_len, preset.seed).to(device)
    eval_fn = heldout_evaluator(heldout, device, autocast)

    mem = PeakMemory(device)
    cb = _callback_class()(eval_fn, preset.eval_every, name, mem, progress)
    micro = preset.batch_size // preset.grad_accum
    args = TrainingArguments(
        output_dir=os.path.join(work_dir, "trainer", name), per_device_train_batch_size=micro,
        gradient_accumulation_steps=preset.grad_accum, max_steps=preset.student_steps,
        learning_rate=preset.student_lr, lr_scheduler_type="cosine", warmup_steps=max(1, preset.student_steps // 20),
        weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, seed=preset.seed, data_seed=preset.seed,
        logging_strategy="no", save_strategy="no", report_to="none", use_cpu=device.type != "cuda",
        bf16=autocast is not None, dataloader_num_workers=0, disable_tqdm=not progress)
    kd = dict(temperature=preset.temperature, soft_weight=preset.soft_weight, hard_weight=preset.hard_weight)
    cache = None
    if name == "ce":
        trainer_kw = {}
    elif name == "kd":
        trainer_kw = dict(teacher=teacher, chunk_size=preset.kd_chunk_size, **kd)
    elif name in ("cache_topk", "cache_sample"):
        mode = "topk" if name == "cache_topk" else "sample"
        cache = make_teacher_cache(os.path.join(work_dir, "teacher_cache", name), preset, mode,
                                   teacher_name, dataset_fp)
        trainer_kw = dict(teacher=teacher, teacher_cache=cache, tail="bucket" if mode == "topk" else "sampled",
                          chunk_size=preset.kd_chunk_size, **kd)
    elif name == "served_top20":
        t_fill = time.perf_counter()
        cache = fill_served_cache(os.path.join(work_dir, "teacher_cache", name), preset, train_blocks, teacher,
                                  teacher_name, dataset_fp, device)
        fill_seconds = time.perf_counter() - t_fill
        # the served log-probabilities are at τ = 1, the server's temperature
        trainer_kw = dict(teacher=cache, tail="bucket", chunk_size=preset.kd_chunk_size,
                          **dict(kd, temperature=1.0))
    else:
        raise ValueError(f"unknown run {name!r}")
    trainer = KDTrainer(model=student, args=args, train_dataset=BlockDataset(train_blocks),
                                  callbacks=[cb], **trainer_kw)
    cpu0 = time.process_time()
    trainer.train()
    cpu_seconds = time.process_time() - cpu0
    peak = mem.peak_mib()
    train_seconds = (cb.t_end - cb.t_begin) - cb.eval_seconds
    tokens = preset.student_steps * preset.batch_size * preset.seq_len
    final = cb.history[-1]
    result = {
        "run": name, "label": RUN_LABELS[name], "student_params": n_params(student),
        "heldout_loss": final["loss"], "heldout_ppl": final["ppl"], "ece": final["ece"], "top1": final["top1"],
        "tokens_per_s": tokens / max(train_seconds, 1e-9), "train_seconds": train_seconds,
        "cpu_seconds": cpu_seconds, "threads": torch.get_num_threads(),
        "peak_mem_mib": peak, "peak_mem_kind": mem.kind, "history": cb.history,
        "cache_bytes_per_token": None, "cache_rows": None,
        "loss_path": "model's own CE (full logits)" if name == "ce" else "fastkd.fused_linear_kd_loss",
        "backend": None if name == "ce" else registry.resolve("kd" if name == "kd" else "sparse_kd", "auto", device),
    }
    if name == "served_top20":
        result["served_fill_seconds"] = fill_seconds  # the teacher's (server's) time, outside training
    if cache is not None:
        result["cache_bytes_per_token"] = cache_bytes_per_token(cache)
        result["cache_repr"] = repr(cache)
        close = getattr(cache, "close", None)
        if callable(close):
            close()
    del trainer, student
    return result



def run_key(p: Preset, name: str, teacher_key: str, device: torch.device) -> str:
    """The cache key of one run's result: every preset field it reads (the CE runs ignore the KD
    settings, the teacher-BPE runs the cross-tokenizer ones), the teacher, the fastkd version and the
    device."""
    settings = dataclasses.asdict(p)
    settings.pop("runs")
    unread = (KD_ONLY_FIELDS if name in ("ce", "xt_ce") else ()) + (() if name in CROSS_RUNS else CROSS_FIELDS)
    for field in unread:
        settings.pop(field, None)
    return cache_key(settings, name, teacher_key, fastkd.__version__, str(device))


def cached_run(p: Preset, name: str, label: str, *, teacher_key: str, device: torch.device, out_dir: str,
               force: bool, say: Callable[[str], None], train: Callable[[], Dict]) -> Dict:
    """One run's result: read from ``<out_dir>/runs/<name>-<key>.json`` unless ``force``, otherwise
    ``train()``'s, with its wall time added, saved there."""
    run_dir = os.path.join(out_dir, "runs")
    os.makedirs(run_dir, exist_ok=True)
    rpath = os.path.join(run_dir, f"{name}-{run_key(p, name, teacher_key, device)}.json")
    if os.path.exists(rpath) and not force:
        say(f"[fastkd demo] {label}: cached result (use --force to rerun)")
        return load_json(rpath)
    say(f"[fastkd demo] student run: {label}")
    t0 = time.perf_counter()
    result = train()
    result["wall_seconds"] = time.perf_counter() - t0
    save_json(result, rpath)
    return result


def has_teacher_cache() -> bool:
    """Whether this build of fastkd has what the cached runs need."""
    return all(hasattr(fastkd, n) for n in ("TeacherCache", "capture", "sparse_kd_loss"))


def run_students(p: Preset, *, train_blocks: np.ndarray, heldout: torch.Tensor, teacher, teacher_key: str,
                 dataset_fp: str, out_dir: str, device: torch.device, force: bool, progress: bool,
                 say: Callable[[str], None]) -> Tuple[Dict[str, Dict], Dict[str, str]]:
    """Every run of ``p.runs``, a cached result reused unless ``force``. Returns ``(results, skipped)``:
    results by run name, and why a run was skipped (a build without the teacher cache)."""
    has_cache = has_teacher_cache()
    results: Dict[str, Dict] = {}
    skipped: Dict[str, str] = {}
    for name in (r for r in p.runs if r in STUDENT_RUNS):
        if (name.startswith("cache_") or name == "served_top20") and not has_cache:
            skipped[name] = "fastkd.TeacherCache / capture / sparse_kd_loss are not available in this build"
            say(f"[fastkd demo] skipping {name}: {skipped[name]}")
            continue
        results[name] = cached_run(
            p, name, RUN_LABELS[name], teacher_key=teacher_key, device=device, out_dir=out_dir, force=force,
            say=say, train=lambda name=name: run_student(
                name, p, train_blocks=train_blocks, heldout=heldout, teacher=teacher,
                teacher_name=f"demo-teacher-{teacher_key}", dataset_fp=dataset_fp, work_dir=out_dir,
                device=device, progress=progress))
    return results, skipped
