"""The demo's cross-tokenizer arm: the demo's teacher, which reads text through the demo's BPE, teaches
students that read the same text through a second, smaller BPE (``Preset.cross_vocab_size``).

The students' transfer set is the text of the main students' transfer blocks (each block decoded by
the teacher's tokenizer, then encoded by both). Three runs at the main runs' budget, with the same
initialisation, data order and optimizer:

* ``xt_ce``: next-token cross-entropy on the student's own tokens (the baseline);
* ``xt_uld``: CE + ``cross_weight`` · :func:`fastkd.uld_loss`;
* ``xt_hybrid``: CE + ``cross_weight`` · :func:`fastkd.hybrid_uld_loss`.

The cross-tokenizer terms compare, on the spans of :func:`fastkd.align_tokens`, the student's
prediction of a span's first student token with the teacher's prediction of its first teacher token
(``index(shift=1)``). The teacher runs once over the transfer set; its top-``cross_topk`` rows
(exact full-vocabulary tail) are captured then and reused every epoch. Held-out loss is measured in
bits per character, the unit two tokenizations share.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import fastkd

from .models import build_model, n_params
from .presets import Preset

XT_RUNS = ("xt_ce", "xt_uld", "xt_hybrid")
XT_LABELS = {
    "xt_ce": "CE only (student BPE)",
    "xt_uld": "CE + ULD (uld_loss)",
    "xt_hybrid": "CE + hybrid (hybrid_uld_loss)",
}


def encode_with_offsets(tok, texts: Sequence[str], max_len: Optional[int] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``texts`` through a ``tokenizers.Tokenizer``: padded ids ``(B, L)``, character offsets
    ``(B, L, 2)`` and lengths ``(B,)``; ``max_len`` truncates. Padding repeats the last end offset (it
    is never read: the lengths say where each row ends)."""
    encs = tok.encode_batch(list(texts))
    lens = [len(e.ids) if max_len is None else min(len(e.ids), max_len) for e in encs]
    if min(lens) < 2:
        raise ValueError("every text must encode to at least two tokens")
    n = max(lens)
    ids = torch.zeros(len(encs), n, dtype=torch.long)
    off = torch.zeros(len(encs), n, 2, dtype=torch.long)
    for i, (e, m) in enumerate(zip(encs, lens)):
        ids[i, :m] = torch.tensor(e.ids[:m])
        off[i, :m] = torch.tensor(e.offsets[:m], dtype=torch.long).reshape(-1, 2)
        off[i, m:] = off[i, m - 1, 1]
    return ids, off, torch.tensor(lens)


def next_token_targets(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``ids[:, 1:]`` with −100 past each row's length (the labels of a causal LM's logits[:, :-1])."""
    y = ids[:, 1:].clone()
    y[torch.arange(y.shape[1]).unsqueeze(0) >= (lengths.unsqueeze(1) - 1)] = -100
    return y


def predicted_characters(offsets: torch.Tensor, lengths: torch.Tensor) -> int:
    """Characters covered by the predicted tokens (all but each row's first): from the end of the
    first token to the end of the last one. Held-out nats / ln 2 / this = bits per character."""
    last = offsets[torch.arange(len(lengths)), lengths - 1, 1]
    return int((last - offsets[:, 0, 1]).sum())


@torch.no_grad()
def bits_per_char(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor,
                  lengths: torch.Tensor, batch_size: int = 8) -> float:
    """Held-out bits per character of a causal LM (``logits_fn(ids) -> (B, L, V)``) on encoded texts."""
    nats = 0.0
    for s in range(0, ids.shape[0], batch_size):
        x, ln = ids[s:s + batch_size], lengths[s:s + batch_size]
        logits = logits_fn(x)[:, :-1].float()
        y = next_token_targets(x, ln)
        nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                                reduction="sum").item()
    return nats / math.log(2) / predicted_characters(offsets, lengths)


def _lr(step: int, total: int, peak: float) -> float:
    """The main student runs' schedule: linear warm-up over 5 % of the steps, then cosine to zero."""
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def prepare(p: Preset, *, teacher, teacher_tokenizer, student_tokenizer, transfer: np.ndarray,
            heldout: torch.Tensor, device: torch.device) -> Dict:
    """Texts, both encodings, the teacher's top-k rows over the transfer set, the vocabulary map and
    the teacher's held-out bits per character."""
    decode = teacher_tokenizer.decode_batch
    train_texts = decode([row.tolist() for row in transfer])
    held_texts = decode([row.tolist() for row in heldout])
    t_ids, t_off, t_len = encode_with_offsets(teacher_tokenizer, train_texts, max_len=p.seq_len)
    s_ids, s_off, s_len = encode_with_offsets(student_tokenizer, train_texts)
    h_ids, h_off, h_len = encode_with_offsets(student_tokenizer, held_texts)
    ht_ids, ht_off, ht_len = encode_with_offsets(teacher_tokenizer, held_texts, max_len=p.seq_len)
    k = min(p.cross_topk, teacher.config.vocab_size)

    def teacher_logits(x):
        return teacher(input_ids=x.to(device)).logits.float().cpu()

    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        rows = fastkd.SparseTeacher.cat([fastkd.capture(teacher_logits(t_ids[s:s + 8]), k=k,
                                                        temperature=p.temperature)
                                         for s in range(0, t_ids.shape[0], 8)])
        teacher_bpc = bits_per_char(teacher_logits, ht_ids, ht_off, ht_len)
    teacher.train(was_training)
    return {
        "student": (s_ids, s_off, s_len), "teacher_offsets": (t_off, t_len), "heldout": (h_ids, h_off, h_len),
        "teacher_rows": rows, "vocab_map": fastkd.VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer),
        "teacher_bpc": teacher_bpc, "student_vocab": student_tokenizer.get_vocab_size(),
        "positions": max(s_ids.shape[1], h_ids.shape[1]),
    }


def run(name: str, p: Preset, prep: Dict, *, device: torch.device, eval_every: int,
        progress: bool = True) -> Dict:
    """One cross-tokenizer student run; returns its result (final and per-eval held-out bits/char)."""
    from tqdm.auto import tqdm

    s_ids, s_off, s_len = prep["student"]
    t_off, t_len = prep["teacher_offsets"]
    h_ids, h_off, h_len = prep["heldout"]
    vs = prep["student_vocab"]
    student = build_model(p.student, vs, prep["positions"], p.seed).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=p.student_lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(p.seed)
    n = s_ids.shape[0]
    order: List[int] = []

    def logits_fn(x):
        return student(input_ids=x.to(device)).logits.cpu()

    def evaluate() -> float:
        student.eval()
        bpc = bits_per_char(logits_fn, h_ids, h_off, h_len)
        student.train()
        return bpc

    history = [{"step": 0, "bpc": evaluate()}]
    train_seconds, eval_seconds = 0.0, 0.0
    bar = tqdm(range(p.student_steps), desc=f"{name:9s}", disable=not progress, leave=False)
    for step in bar:
        t0 = time.perf_counter()
        while len(order) < p.batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        pick, order = torch.tensor(order[:p.batch_size]), order[p.batch_size:]
        ids, ln = s_ids[pick], s_len[pick]
        width = int(ln.max())
        ids = ids[:, :width]
        for g in opt.param_groups:
            g["lr"] = _lr(step, p.student_steps, p.student_lr)
        logits = student(input_ids=ids.to(device)).logits
        y = next_token_targets(ids, ln).to(device)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vs), y.reshape(-1), ignore_index=-100)
        if name != "xt_ce":
            al = fastkd.align_tokens(s_off[pick][:, :width], t_off[pick], student_lengths=ln,
                                     teacher_lengths=t_len[pick])
            b, ps, pt = al.index(shift=1)
            st = prep["teacher_rows"][pick[b], pt].to(device)
            rows_s = logits[b.to(device), ps.to(device)]
            kd = (fastkd.uld_loss(rows_s, st, k=p.cross_topk, temperature=p.temperature) if name == "xt_uld"
                  else fastkd.hybrid_uld_loss(rows_s, st, prep["vocab_map"], k=p.cross_topk,
                                              temperature=p.temperature))
            loss = loss + p.cross_weight * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        train_seconds += time.perf_counter() - t0
        if (step + 1) % eval_every == 0 or step + 1 == p.student_steps:
            t0 = time.perf_counter()
            history.append({"step": step + 1, "bpc": evaluate()})
            eval_seconds += time.perf_counter() - t0
            bar.set_postfix(bpc=f"{history[-1]['bpc']:.4f}")
    bar.close()
    tokens = int(sum(min(int(s_len[i]), s_ids.shape[1]) for i in range(n)) * p.student_steps * p.batch_size / n)
    return {"run": name, "label": XT_LABELS[name], "student_params": n_params(student),
            "heldout_bpc": history[-1]["bpc"], "history": history, "train_seconds": train_seconds,
            "tokens_per_s": tokens / max(train_seconds, 1e-9), "threads": torch.get_num_threads()}


def run_cross_runs(p: Preset, data, *, teacher, teacher_key: str, cache_dir: str, out_dir: str,
                   device: torch.device, force: bool, progress: bool, say: Callable[[str], None]) -> Optional[Dict]:
    """Every cross-tokenizer run of ``p.runs`` (results cached like the main runs'), or None if there
    is none. Returns ``{"student_vocab", "num_matched", "teacher_bpc", "runs": {name: result}}``."""
    from .dataset import data_dir
    from .runs import cached_run
    from .tokenizer import train_tokenizer

    names = [r for r in p.runs if r in XT_RUNS]
    if not names:
        return None
    s_tok = train_tokenizer(data.train_documents, p.cross_vocab_size,
                            os.path.join(data_dir(cache_dir, data.fingerprint, p.cross_vocab_size), "tokenizer.json"))
    say(f"[fastkd demo] cross-tokenizer runs: students read a {s_tok.get_vocab_size()}-entry BPE, the teacher "
        f"its {data.vocab_size}-entry one")
    prep = prepare(p, teacher=teacher, teacher_tokenizer=data.tokenizer, student_tokenizer=s_tok,
                   transfer=data.transfer, heldout=data.heldout, device=device)
    results = {name: cached_run(p, name, XT_LABELS[name], teacher_key=teacher_key, device=device, out_dir=out_dir,
                                force=force, say=say,
                                train=lambda name=name: run(name, p, prep, device=device, eval_every=p.eval_every,
                                                            progress=progress))
               for name in names}
    return {"student_vocab": prep["student_vocab"], "teacher_vocab": data.vocab_size,
            "num_matched": prep["vocab_map"].num_matched, "teacher_bpc": prep["teacher_bpc"], "runs": results}
