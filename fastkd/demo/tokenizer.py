"""Byte-level BPE tokenizer trained on the demo corpus, and the corpus encoded once, both cached."""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

from .data import Document

EOT = "<|endoftext|>"


def train_tokenizer(docs: List[Document], vocab_size: int, path: str):
    """Train (or load from ``path``) a byte-level BPE with exactly ``vocab_size`` entries at most."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if os.path.exists(path):
        return Tokenizer.from_file(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a half-written tokenizer behind
    return tok


def encode_documents(tok, docs: List[Document], path: str) -> np.ndarray:
    """One token stream (documents joined by the end-of-text id), cached as ``.npy``."""
    if os.path.exists(path):
        return np.load(path)
    eot = tok.token_to_id(EOT)
    ids: List[int] = []
    for enc in tok.encode_batch([d.text for d in docs]):
        ids.extend(enc.ids)
        ids.append(eot)
    dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.int32
    arr = np.asarray(ids, dtype=dtype)
    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


def blocks(stream: np.ndarray, seq_len: int, max_blocks: int = 0) -> np.ndarray:
    """Non-overlapping ``(n, seq_len)`` int64 blocks; the ragged tail is dropped."""
    n = len(stream) // seq_len
    if max_blocks:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"token stream of {len(stream)} tokens is shorter than one block of {seq_len}")
    return stream[: n * seq_len].astype(np.int64).reshape(n, seq_len)


def token_stats(stream: np.ndarray, docs: List[Document]) -> Tuple[int, float]:
    chars = sum(len(d.text) for d in docs)
    return len(stream), chars / max(len(stream), 1)
