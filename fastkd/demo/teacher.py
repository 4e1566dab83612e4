"""The teacher: trained by the demo itself on the whole train part, once, and cached on disk.

The cache entry ``<cache_dir>/teacher-<key>`` is named by everything the trained weights depend on
(architecture, steps, learning rate, batch, sequence length, vocabulary, corpus, seed, autocast);
``fastkd_teacher.json`` inside it is written last and marks a complete entry.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import asdict
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .models import ModelSpec, build_model, n_params
from .presets import Preset
from .storage import cache_key


def teacher_key(p: Preset, vocab_size: int, fingerprint: str) -> str:
    """The cache key of the teacher a preset trains on a corpus (also part of every run's key)."""
    return cache_key(dataclasses.asdict(p.teacher), p.teacher_steps, p.teacher_lr, p.batch_size, p.seq_len,
                     vocab_size, fingerprint, p.seed, p.autocast_bf16)


def teacher_dir(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"teacher-{key}")


def is_cached(path: str) -> bool:
    return os.path.exists(os.path.join(path, "fastkd_teacher.json"))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def train_teacher(spec: ModelSpec, train_blocks: np.ndarray, *, vocab_size: int, seq_len: int, steps: int,
                  batch_size: int, lr: float, seed: int, device: torch.device, path: str,
                  evaluate: Optional[Callable] = None, autocast_dtype: Optional[torch.dtype] = None,
                  progress: bool = True):
    """Trains the teacher with AdamW on ``train_blocks`` (or loads it from ``path``). Returns
    ``(model, info)``; info holds the held-out metrics (from ``evaluate``) and the training time."""
    from transformers import GPT2LMHeadModel
    from tqdm.auto import tqdm

    info_path = os.path.join(path, "fastkd_teacher.json")
    if os.path.exists(info_path):
        model = GPT2LMHeadModel.from_pretrained(path).to(device).eval()
        with open(info_path) as fh:
            return model, json.load(fh)

    model = build_model(spec, vocab_size, seq_len, seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    data = torch.from_numpy(train_blocks)
    order = torch.randperm(len(data), generator=gen)
    pos = 0
    warmup = max(1, steps // 20)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="teacher", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        x = data[order[pos:pos + batch_size]].to(device)
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.detach().float().item():.3f}")  # host sync: logging only
    bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    info = {"spec": asdict(spec), "params": n_params(model), "steps": steps, "batch_size": batch_size,
            "tokens_seen": steps * batch_size * seq_len, "train_seconds": round(seconds, 2)}
    if evaluate is not None:
        info["heldout"] = evaluate(model)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    with open(info_path + ".tmp", "w") as fh:
        json.dump(info, fh, indent=1)
    os.replace(info_path + ".tmp", info_path)  # written last: its presence marks a complete teacher
    return model, info


def load_or_train(p: Preset, train_blocks: np.ndarray, *, vocab_size: int, fingerprint: str, cache_dir: str,
                  device: torch.device, evaluate: Callable, autocast_dtype: Optional[torch.dtype],
                  say: Callable[[str], None], progress: bool) -> Tuple[torch.nn.Module, dict, str]:
    """The preset's teacher, frozen, with its info (parameters, held-out metrics, training time) and
    its cache key: loaded when cached, trained (and cached) otherwise."""
    key = teacher_key(p, vocab_size, fingerprint)
    path = teacher_dir(cache_dir, key)
    if not is_cached(path):
        say(f"[fastkd demo] training the teacher ({p.teacher_steps} steps, cached at {path})")
    model, info = train_teacher(
        p.teacher, train_blocks, vocab_size=vocab_size, seq_len=p.seq_len, steps=p.teacher_steps,
        batch_size=p.batch_size, lr=p.teacher_lr, seed=p.seed, device=device, path=path,
        evaluate=evaluate, autocast_dtype=autocast_dtype, progress=progress)
    model.requires_grad_(False)
    say(f"[fastkd demo] teacher: {info['params'] / 1e6:.2f} M parameters, held-out loss "
        f"{info['heldout']['loss']:.4f}")
    return model, info, key
