"""Student runs at one common budget, held-out evaluation (loss, perplexity, ECE) and measurement
(tokens/s, peak memory, cache bytes/token). Every run trains through
:class:`fastkd.integrations.transformers.DistillationTrainer`."""
from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import time
from typing import Dict, List, Optional

import numpy as np
import torch

import fastkd

from .presets import Preset

RUN_LABELS = {
    "ce": "CE only",
    "kd": "full KD (fused_linear_kd_loss)",
    "cache_topk": "TeacherCache top-k, bucket tail",
    "cache_sample": "TeacherCache sampled",
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
# held-out metrics
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, heldout: torch.Tensor, *, batch_size: int, device: torch.device, n_bins: int = 15,
             autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Next-token held-out loss (nats/token), perplexity, top-1 accuracy and expected calibration
    error (top-1 confidence in ``n_bins`` equal-width bins, |accuracy − confidence| weighted by the
    bin's share of tokens)."""
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64)
    conf_b = torch.zeros(n_bins, dtype=torch.float64)
    acc_b = torch.zeros(n_bins, dtype=torch.float64)
    cnt_b = torch.zeros(n_bins, dtype=torch.float64)
    for s in range(0, heldout.shape[0], batch_size):
        x = heldout[s:s + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=x).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).flatten(0, 1)
        y = x[:, 1:].reshape(-1)
        nll_sum += -logp.gather(1, y[:, None]).sum().double().cpu()
        conf, pred = logp.max(dim=-1)
        conf = conf.exp()
        b = (conf * n_bins).long().clamp_(max=n_bins - 1)
        conf_b += torch.bincount(b, weights=conf, minlength=n_bins).double().cpu()
        acc_b += torch.bincount(b, weights=(pred == y).float(), minlength=n_bins).double().cpu()
        cnt_b += torch.bincount(b, minlength=n_bins).double().cpu()
    n = cnt_b.sum().item()
    loss = nll_sum.item() / n
    model.train(was_training)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "top1": acc_b.sum().item() / n,
            "ece": (acc_b - conf_b).abs().sum().item() / n, "tokens": int(n)}


# ---------------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of the training steps of one run, above the memory held when measuring starts.

    CUDA: the allocator's peak. CPU: the process's peak resident set (Linux VmHWM, reset through
    /proc/self/clear_refs), after returning freed heap pages to the OS (malloc_trim) so that memory
    an earlier run or an evaluation freed does not count. ``pause()``/``resume()`` bracket work that
    must not count (the held-out evaluation)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_hwm"
        self.base = 0
        self.best = 0
        self.started = False

    @staticmethod
    def _status(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.kind = "unavailable"

    def _current_peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM") or 0

    def start(self) -> None:
        self._reset()
        self.base = (torch.cuda.memory_allocated(self.device) if self.device.type == "cuda"
                     else self._status("VmRSS") or 0)
        self.best = self.base
        self.started = True

    def pause(self) -> None:
        if self.started:
            self.best = max(self.best, self._current_peak())

    def resume(self) -> None:
        if self.started:
            self._reset()

    def peak_mib(self) -> Optional[float]:
        if not self.started or self.kind == "unavailable":
            return None
        return (max(self.best, self._current_peak()) - self.base) / 2 ** 20


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

    from ..integrations.transformers import DistillationTrainer
    from .models import build_model, n_params

    hf_logging.set_verbosity_error()
    autocast = torch.bfloat16 if preset.autocast_bf16 and device.type == "cuda" else None
    student = build_model(preset.student, preset.vocab_size, preset.seq_len, preset.seed).to(device)

    def eval_fn(model):
        return evaluate(model, heldout, batch_size=8, device=device, autocast_dtype=autocast)

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
    else:
        raise ValueError(f"unknown run {name!r}")
    trainer = DistillationTrainer(model=student, args=args, train_dataset=BlockDataset(train_blocks),
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
        "backend": fastkd._ops.resolve_backend("auto", device) if name != "ce" else None,
    }
    if cache is not None:
        result["cache_bytes_per_token"] = cache_bytes_per_token(cache)
        result["cache_repr"] = repr(cache)
        close = getattr(cache, "close", None)
        if callable(close):
            close()
    del trainer, student
    return result


def save_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)
