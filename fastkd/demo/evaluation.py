"""Held-out metrics of a causal LM: next-token loss, perplexity, top-1 accuracy, calibration error."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch


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


def heldout_evaluator(heldout: torch.Tensor, device: torch.device, autocast_dtype: Optional[torch.dtype]):
    """``model -> metrics`` on ``heldout``, in batches of 8 sequences (what every demo stage uses)."""

    def eval_fn(model):
        return evaluate(model, heldout, batch_size=8, device=device, autocast_dtype=autocast_dtype)

    return eval_fn
