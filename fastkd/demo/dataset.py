"""The token data every later stage reads: corpus → BPE → token blocks, the held-out evaluation
blocks and the students' transfer set. The tokenizer and the encoded streams are cached under
``<cache_dir>/data-<corpus fingerprint>-v<vocabulary>``."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, List

import numpy as np
import torch

from . import data, tokenizer
from .presets import Preset


@dataclass
class DemoData:
    fingerprint: str          # content hash of the corpus (part of every later cache key)
    vocab_size: int           # the BPE's actual size (can be below the preset's, see prepare_data)
    train_docs: int
    heldout_docs: int
    characters: int
    train_tokens: int
    heldout_tokens: int
    train_blocks: np.ndarray  # (n, seq_len) int64: the whole train part, the teacher's data
    transfer: np.ndarray      # (transfer_blocks, seq_len) int64: what the students train on
    heldout: torch.Tensor     # (heldout_blocks, seq_len) int64: evaluation
    tokenizer: object         # the trained tokenizers.Tokenizer (the teacher's and the main students')
    train_documents: List[data.Document]

    def corpus_summary(self) -> dict:
        return {"fingerprint": self.fingerprint, "train_docs": self.train_docs,
                "heldout_docs": self.heldout_docs, "train_tokens": self.train_tokens,
                "heldout_tokens": self.heldout_tokens, "transfer_tokens": int(self.transfer.size),
                "heldout_eval_tokens": int(self.heldout[:, 1:].numel())}


def data_dir(cache_dir: str, fingerprint: str, vocab_size: int) -> str:
    """Where the BPE of ``vocab_size`` entries trained on a corpus, and its encodings, are cached."""
    path = os.path.join(cache_dir, f"data-{fingerprint}-v{vocab_size}")
    os.makedirs(path, exist_ok=True)
    return path


def prepare_data(p: Preset, cache_dir: str, say: Callable[[str], None], device_label: str = "") -> tuple:
    """Loads the corpus, trains (or loads) the tokenizer, encodes both parts and cuts them into blocks.

    Returns ``(data, preset)``: a small corpus can end BPE training before ``p.vocab_size`` entries;
    the models are then sized to the vocabulary it reached and the returned preset says so.
    """
    docs = data.load_documents(p.max_chars, subpackages=p.subpackages)
    train_docs, held_docs = data.split_documents(docs)
    fp = data.fingerprint(docs)
    tok_dir = data_dir(cache_dir, fp, p.vocab_size)
    chars = sum(len(d.text) for d in docs)
    say(f"[fastkd demo] preset {p.name}: {len(train_docs)} train / {len(held_docs)} held-out documents "
        f"({chars / 1e6:.1f} M characters), device {device_label}")
    tok = tokenizer.train_tokenizer(train_docs, p.vocab_size, os.path.join(tok_dir, "tokenizer.json"))
    train_ids = tokenizer.encode_documents(tok, train_docs, os.path.join(tok_dir, "train.npy"))
    held_ids = tokenizer.encode_documents(tok, held_docs, os.path.join(tok_dir, "heldout.npy"))
    vocab = tok.get_vocab_size()
    if vocab != p.vocab_size:
        say(f"[fastkd demo] note: BPE training stopped at {vocab} entries, not the {p.vocab_size} asked for "
            f"(this corpus has no more merges occurring twice); the models use V={vocab}")
        p = dataclasses.replace(p, vocab_size=vocab)
    train_blocks = tokenizer.blocks(train_ids, p.seq_len)
    held_all = tokenizer.blocks(held_ids, p.seq_len)
    # Evenly spaced held-out blocks cover every held-out document, not just the first one.
    pick = np.linspace(0, len(held_all) - 1, num=min(p.heldout_blocks, len(held_all))).round().astype(int)
    heldout = torch.from_numpy(held_all[np.unique(pick)])
    rng = np.random.default_rng(p.seed)
    transfer = train_blocks[np.sort(rng.permutation(len(train_blocks))[: p.transfer_blocks])]
    say(f"[fastkd demo] BPE vocabulary {vocab}, {len(train_ids):,} train tokens, {len(held_ids):,} held-out "
        f"tokens; students train on {len(transfer)} x {p.seq_len} tokens for {p.epochs:.1f} epochs")
    out = DemoData(fingerprint=fp, vocab_size=vocab, train_docs=len(train_docs), heldout_docs=len(held_docs),
                   characters=chars, train_tokens=int(len(train_ids)), heldout_tokens=int(len(held_ids)),
                   train_blocks=train_blocks, transfer=transfer, heldout=heldout, tokenizer=tok,
                   train_documents=train_docs)
    return out, p
