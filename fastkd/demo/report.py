"""The demo's report: how the runs compare, a Markdown table, the findings in words, a PNG plot."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

CACHED_RUNS = ("cache_topk", "cache_sample", "served_top20")


def _fmt(v: Optional[float], spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def comparisons(runs: Dict[str, Dict]) -> Dict[str, Dict]:
    """Every distilled run's gain over CE (nats/token of held-out loss) and, for the cached runs when
    full KD gained anything, the share of full KD's gain it kept (``gap_to_full_kd`` = 1 − share)."""
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
        if name in CACHED_RUNS and full_gain is not None and full_gain > 0:
            entry.update(share_of_full_kd_gain=gain / full_gain, gap_to_full_kd=(full_gain - gain) / full_gain)
        out[name] = entry
    return out


def findings(runs: Dict[str, Dict], comps: Dict[str, Dict]) -> List[str]:
    """What the runs measured, one plain sentence each, for the end of the demo's output."""
    lines: List[str] = []
    ce, kd = runs.get("ce"), runs.get("kd")
    if ce is None:
        return ["no CE run: the gains of distillation are measured against it, so none are reported"]
    for name, c in comps.items():
        r = runs[name]
        gain = c["gain_over_ce"]
        if name == "kd":
            if gain > 0:
                lines.append(f"{r['label']} lowered the held-out loss by {gain:.4f} nats/token against CE alone "
                             f"at the same budget (perplexity {ce['heldout_ppl']:.0f} -> {r['heldout_ppl']:.0f}).")
            else:
                lines.append(f"{r['label']} did not improve on CE alone at this budget (held-out loss "
                             f"{-gain:+.4f} nats/token); the cached runs' share of its gain is not defined.")
            continue
        stored = r.get("cache_bytes_per_token")
        disk = f", storing {stored:.1f} bytes per token on disk" if stored else ""
        if "share_of_full_kd_gain" in c:
            lines.append(f"{r['label']} kept {100 * c['share_of_full_kd_gain']:.0f}% of full KD's gain over CE "
                         f"({gain:+.4f} of {ce['heldout_loss'] - kd['heldout_loss']:+.4f} nats/token){disk}.")
        elif gain > 0:
            lines.append(f"{r['label']} lowered the held-out loss by {gain:.4f} nats/token against CE alone{disk}.")
        else:
            lines.append(f"{r['label']} did not improve on CE alone (held-out loss {-gain:+.4f} nats/token){disk}.")
    return lines


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


def _save(fig, ax, path: str) -> str:
    """A plot's grid, legend and layout, written to ``path`` (PNG) and closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
    return _save(fig, ax, path)


# ---- the cross-tokenizer runs (held-out bits per character) -------------------------------------
def cross_comparisons(xt: Dict) -> Dict[str, float]:
    """Each cross-tokenizer term's gain over the students' CE run, in held-out bits per character."""
    runs = xt["runs"]
    if "xt_ce" not in runs:
        return {}
    base = runs["xt_ce"]["heldout_bpc"]
    return {name: base - r["heldout_bpc"] for name, r in runs.items() if name != "xt_ce"}


def cross_table(xt: Dict) -> str:
    gains = cross_comparisons(xt)
    rows = [f"Teacher BPE {xt['teacher_vocab']} → student BPE {xt['student_vocab']} ({xt['num_matched']} student "
            f"tokens also in the teacher's vocabulary); teacher held-out {xt['teacher_bpc']:.4f} bits/char.", "",
            "| run | held-out bits/char | gain over CE (bits/char) | tokens/s |", "|---|---:|---:|---:|"]
    for name, r in xt["runs"].items():
        gain = gains.get(name)
        rows.append(f"| {r['label']} | {r['heldout_bpc']:.4f} | {'—' if gain is None else format(gain, '+.4f')} | "
                    f"{r['tokens_per_s']:.0f} |")
    return "\n".join(rows)


def cross_findings(xt: Dict) -> List[str]:
    runs, gains = xt["runs"], cross_comparisons(xt)
    lines = []
    for name, gain in gains.items():
        verb = "lowered" if gain > 0 else "raised"
        lines.append(f"Across tokenizers, {runs[name]['label']} {verb} the held-out loss by {abs(gain):.4f} "
                     f"bits/char against the students' CE alone (one seed; docs/cross_tokenizer.md has 5).")
    return lines


def plot_bits_per_char(xt: Dict, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in xt["runs"].values():
        hist = r["history"][1:] or r["history"]  # the step-0 point (random init) would flatten the curves
        ax.plot([h["step"] for h in hist], [h["bpc"] for h in hist], marker=".", label=r["label"])
    ax.axhline(xt["teacher_bpc"], color="grey", ls="--", lw=1, label=f"teacher (BPE {xt['teacher_vocab']})")
    ax.set_xlabel("optimizer step (same budget for every run)")
    ax.set_ylabel("held-out bits per character")
    ax.set_title(title)
    return _save(fig, ax, path)
