"""GPT-style teacher and student built from a ``transformers`` config (no weights downloaded), and the
teacher's own training, cached so that only the first demo run pays for it."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class ModelSpec:
    n_layer: int
    n_embd: int
    n_head: int


def build_model(spec: ModelSpec, vocab_size: int, seq_len: int, seed: int):
    """A randomly initialised GPT-2-style causal LM (tied embeddings, no dropout: tiny data, short runs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=spec.n_embd, n_layer=spec.n_layer,
                     n_head=spec.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


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
