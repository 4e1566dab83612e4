"""The demo's outputs: a Markdown table, a PNG plot of held-out loss against steps, a JSON summary."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

# Quality targets of the cache issue: a cached run keeps this much of full KD's gain over CE.
CACHE_GAP_TARGETS = {"cache_sample": 0.02, "cache_topk": 0.05}


def _fmt(v: Optional[float], spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def comparisons(runs: Dict[str, Dict]) -> Dict[str, Dict]:
    """KD gain over CE of every distilled run and, for cached runs, the gap to full KD's gain."""
    out: Dict[str, Dict] = {}
    ce = runs.get("ce")
    kd = runs.get("kd")
    if ce is None:
        return out
    full_gain = None if kd is None else ce["heldout_loss"] - kd["heldout_loss"]
    for name, r in runs.items():
        if name == "ce":
            continue
        gain = ce["heldout_loss"] - r["heldout_loss"]
        entry = {"gain_over_ce": gain, "beats_ce": gain > 0}
        if name in CACHE_GAP_TARGETS and full_gain is not None and full_gain > 0:
            gap = (full_gain - gain) / full_gain
            entry.update(gap_to_full_kd=gap, gap_target=CACHE_GAP_TARGETS[name],
                         within_target=gap <= CACHE_GAP_TARGETS[name])
        out[name] = entry
    return out


def markdown_table(runs: Dict[str, Dict], comps: Dict[str, Dict]) -> str:
    head = ("| run | held-out loss | perplexity | ECE | gain over CE | tokens/s | peak memory (MiB) | "
            "cache bytes/token |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    rows: List[str] = [head]
    for name, r in runs.items():
        c = comps.get(name, {})
        gain = c.get("gain_over_ce")
        gain_s = "—" if gain is None else f"{gain:+.4f}"
        if "gap_to_full_kd" in c and gain > 0:
            gain_s += f" ({100 * (1 - c['gap_to_full_kd']):.0f}% of KD's)"
        rows.append(f"| {r['label']} | {r['heldout_loss']:.4f} | {r['heldout_ppl']:.2f} | {r['ece']:.4f} | "
                    f"{gain_s} | {r['tokens_per_s']:.0f} | {_fmt(r['peak_mem_mib'], '.0f')} | "
                    f"{_fmt(r['cache_bytes_per_token'], '.1f')} |")
    return "\n".join(rows)


def plot_losses(runs: Dict[str, Dict], path: str, title: str, teacher_loss: Optional[float] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in runs.values():
        steps = [h["step"] for h in r["history"]]
        ax.plot(steps, [h["loss"] for h in r["history"]], marker=".", label=r["label"])
    if teacher_loss is not None:
        ax.axhline(teacher_loss, color="grey", ls="--", lw=1, label="teacher")
    ax.set_xlabel("optimizer step (same budget for every run)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    finals = [r["history"][-1]["loss"] for r in runs.values()]
    starts = [r["history"][min(1, len(r["history"]) - 1)]["loss"] for r in runs.values()]
    lo = min(finals + ([teacher_loss] if teacher_loss is not None else []))
    ax.set_ylim(lo - 0.1, max(starts) + 0.1)  # the step-0 point (log V) would flatten the curves
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
