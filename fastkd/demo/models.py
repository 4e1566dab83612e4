"""The demo's models: GPT-2-style causal LMs built from a ``transformers`` config (nothing downloaded)."""
from __future__ import annotations

import os
from dataclasses import dataclass

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
