"""Quality study of the teacher cache: does a student distilled from cached targets learn as well
as one distilled from the full teacher distribution?

Real text: the Python documentation shipped with CPython (``pydoc_data.topics``, ~0.7 MB of English
prose), word-level vocabulary, 90 % / 10 % train / held-out split. A GRU language model is trained on
the whole training split as the teacher. Each student then sees only a small transfer set (``--student-steps``
fixed batches) for several epochs — the regime where a cache pays: the teacher's targets are reused
epoch after epoch, and plain cross-entropy over-fits. Students with the same initialisation and
batches are trained with

    ce           plain cross-entropy on the labels (the baseline)
    full         fastkd.kd_loss against the teacher's full logits
    topk_bucket  fastkd.sparse_kd_loss, top-k capture, tail="bucket"
    topk_renorm  same capture, tail="renorm" (teacher renormalised over the top-k: biased)
    sampled      fastkd.sparse_kd_loss on a sampled capture (N i.i.d. draws, unbiased)
    sampled_sys  same with sampling="systematic" (one stratified comb of N draws: unbiased, less noisy)
    served_top20 a served teacher: what an inference server returns per token (its top-20 ids and
                 log-probabilities at τ = 1, as vLLM's prompt_logprobs), fed through
                 fastkd.SparseTeacher.from_logprobs into a top-20 cache, tail="bucket"

The sparse targets go through a ``fastkd.TeacherCache`` (``get_or_capture``): the teacher runs once
per training sequence, later epochs read the stored rows. Every method is repeated over ``--seeds``
seeds (student initialisation, transfer set, sampling generator); the gain of a method is the held-out
loss of plain CE minus its own, paired by seed. Reported on the held-out split: mean cross-entropy
(nats/token), expected calibration error (ECE, 15 bins of top-1 confidence), and each method's share
of full KD's gain (ratio of the seed-mean gains, ± the standard error of the per-seed ratios).

    python bench/quality.py                   # ~25 minutes on 2 CPU cores (3 seeds)
    python bench/quality.py --methods ce full topk_bucket sampled_sys served_top20 --seeds 4
    python bench/quality.py --smoke           # seconds: a wiring check, numbers meaningless

Results are appended as JSON lines to bench/results/quality.jsonl; the plot (held-out loss per epoch,
share of full KD's gain) goes to bench/results/quality.png.

The cross-tokenizer arm (``--cross-tokenizer``): the teacher reads the text through an 8192-token
byte-level BPE, the students through a 4096-token one (both trained here on the training split), so
the teacher's logits cannot be compared id by id. Students with the same initialisation, batches
and step budget are trained with plain CE, CE + ``fastkd.uld_loss`` and CE + ``fastkd.hybrid_uld_loss``
on the spans of ``fastkd.align_tokens`` (teacher top-k captured once per batch and reused across
epochs as ``SparseTeacher`` rows). Held-out loss is reported in bits per character, which does not
depend on the tokenization; the gain over CE is paired by seed (mean ± s.e.).

    python bench/quality.py --cross-tokenizer --seeds 5      # one seed per --seed-offset run is fine too
    python bench/quality.py --cross-tokenizer --summary      # the table of every recorded seed
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import hashlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fastkd  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = {"ce": "plain CE", "full": "full KD (kd_loss)", "topk_bucket": "top-k, bucket tail",
          "topk_renorm": "top-k, renormalised", "sampled": "sampled (i.i.d.)",
          "sampled_sys": "sampled (systematic)", "served_top20": "served top-20 log-probs"}


def load_corpus(vocab_size):
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    words = re.findall(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]", text.lower())
    counts = collections.Counter(words)
    itos = ["<unk>"] + [w for w, _ in counts.most_common(vocab_size - 1)]
    stoi = {w: i for i, w in enumerate(itos)}
    ids = torch.tensor([stoi.get(w, 0) for w in words], dtype=torch.long)
    return ids, itos


class LM(torch.nn.Module):
    def __init__(self, vocab, emb, hidden, layers=1):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, emb)
        self.rnn = torch.nn.GRU(emb, hidden, num_layers=layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.head(h)


def batches(ids, seq, batch, steps, seed):
    """Fixed list of (sample_ids, x, y): sample id = window index, so the cache can key on it."""
    g = torch.Generator().manual_seed(seed)
    n_windows = (ids.numel() - 1) // seq
    out = []
    for _ in range(steps):
        w = torch.randint(0, n_windows, (batch,), generator=g)
        starts = w * seq
        x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
        y = torch.stack([ids[s + 1:s + seq + 1] for s in starts.tolist()])
        out.append((w, x, y))
    return out


@torch.no_grad()
def evaluate(model, ids, seq):
    model.eval()
    n = (ids.numel() - 1) // seq
    x = ids[: n * seq].reshape(n, seq)
    y = ids[1: n * seq + 1].reshape(n, seq)
    logits = torch.cat([model(x[i:i + 64]) for i in range(0, n, 64)]).reshape(-1, model.head.out_features)
    y = y.reshape(-1)
    ce = F.cross_entropy(logits, y).item()
    prob = logits.softmax(-1)
    conf, pred = prob.max(-1)
    correct = (pred == y).float()
    bins = torch.clamp((conf * 15).long(), max=14)
    ece = 0.0
    for b in range(15):
        m = bins == b
        if m.any():
            ece += m.float().mean().item() * abs(conf[m].mean().item() - correct[m].mean().item())
    model.train()
    return ce, ece, correct.mean().item()


def train(model, data, loss_fn, lr, epochs, on_epoch=None, progress=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for sid, x, y in data:
            loss = loss_fn(model(x), sid, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if progress is not None:
                progress.update(1)
        if on_epoch is not None:
            on_epoch(epoch, model)
    return model


def served_rows(cache, sid, x, k, teacher_logits):
    """The rows of one batch from a served teacher, through ``cache``: for the samples not stored
    yet, what an inference server returns per token (its top-``k`` ids and log-probabilities at
    τ = 1, normalised over the full vocabulary), converted by ``SparseTeacher.from_logprobs``."""
    sids = sid.tolist()
    todo = {}
    for i, s in enumerate(sids):
        if s not in cache and s not in todo:
            todo[s] = i
    if todo:
        pos = torch.tensor(list(todo.values()))
        logprobs = torch.log_softmax(teacher_logits(x[pos]).float(), -1)
        vals, ids = logprobs.topk(k, -1)
        cache.write(list(todo), fastkd.SparseTeacher.from_logprobs(ids, vals, vocab_size=logprobs.shape[-1]))
    return cache.read(sids)


def _bar(total, desc):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm is a bench dependency
        return None


def summarise(per_seed, methods):
    """Per-method seed statistics; gains and shares are paired with the same seed's CE run."""
    out = {}
    seeds = sorted(per_seed)
    for m in methods:
        ces = [per_seed[s][m]["ce"] for s in seeds if m in per_seed[s]]
        row = {"method": m, "seeds": len(ces), "ce_mean": statistics.fmean(ces),
               "ce_std": statistics.stdev(ces) if len(ces) > 1 else 0.0,
               "ece_mean": statistics.fmean(per_seed[s][m]["ece"] for s in seeds if m in per_seed[s])}
        if m != "ce" and all("ce" in per_seed[s] for s in seeds):
            gains = [per_seed[s]["ce"]["ce"] - per_seed[s][m]["ce"] for s in seeds]
            row["gain_mean"] = statistics.fmean(gains)
            row["gain_sem"] = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else None
            if "full" in methods and m != "full":
                full = [per_seed[s]["ce"]["ce"] - per_seed[s]["full"]["ce"] for s in seeds]
                row["share_of_full_kd_gain"] = row["gain_mean"] / statistics.fmean(full)
                ratios = [g / f for g, f in zip(gains, full)]
                row["share_sem"] = statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else None
                # gap to full KD, paired: (full − method) gain per seed
                gaps = [f - g for g, f in zip(gains, full)]
                row["gap_to_full_mean"] = statistics.fmean(gaps)
                row["gap_to_full_sem"] = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else None
        out[m] = row
    return out


def plot(curves, summary, methods, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for m in methods:
        per_seed = [c for (s, mm), c in curves.items() if mm == m]
        if not per_seed:
            continue
        epochs = range(1, len(per_seed[0]) + 1)
        mean = [statistics.fmean(c[e] for c in per_seed) for e in range(len(per_seed[0]))]
        lo = [min(c[e] for c in per_seed) for e in range(len(per_seed[0]))]
        hi = [max(c[e] for c in per_seed) for e in range(len(per_seed[0]))]
        (line,) = ax1.plot(epochs, mean, marker="o", ms=3, label=LABELS.get(m, m))
        ax1.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.15)
    ax1.set_xlabel("epoch over the transfer set")
    ax1.set_ylabel("held-out cross-entropy (nats/token)")
    ax1.set_title("held-out loss (mean over seeds, band = min–max)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    bars = [m for m in methods if "share_of_full_kd_gain" in summary.get(m, {})]
    if bars:
        vals = [100 * summary[m]["share_of_full_kd_gain"] for m in bars]
        errs = [100 * (summary[m].get("share_sem") or 0.0) for m in bars]
        names = [LABELS.get(m, m).replace(", ", ",\n").replace(" (", "\n(") for m in bars]
        ax2.bar(names, vals, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
        ax2.axhline(100, color="k", lw=1, ls="--", label="full KD")
        ax2.set_ylabel("% of full KD's held-out gain over CE")
        ax2.set_title("share of full KD's gain (± s.e. over seeds)")
        ax2.grid(axis="y", alpha=0.3)
        ax2.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(meta):
    return (f"word-level LM on the CPython docs, V={meta['vocab']}: {meta['teacher']} teacher (held-out CE "
            f"{meta['teacher_ce']:.3f}) → {meta['student']} students, {meta['student_steps']}×{meta['batch']}×"
            f"{meta['seq']} tokens × {meta['epochs']} epochs, {meta['seeds']} seeds, k={meta['k']}, "
            f"N={meta['num_samples']}")


def replot(out, path):
    """Redraws the plot of the newest study in the JSON-lines file ``out``."""
    with open(out) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get("kind") in ("run", "summary")]
    if not rows:
        raise SystemExit(f"{out}: no multi-seed study recorded")
    date = max(r["date"] for r in rows)
    runs = [r for r in rows if r["date"] == date and r["kind"] == "run"]
    summary = {r["method"]: r for r in rows if r["date"] == date and r["kind"] == "summary"}
    methods = list(dict.fromkeys(r["method"] for r in runs))
    curves = {(r["seed"], r["method"]): r["curve"] for r in runs}
    plot(curves, summary, methods, path, _title(runs[0]))
    print("plot:", path)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--teacher-hidden", type=int, default=384)
    ap.add_argument("--student-hidden", type=int, default=128)
    ap.add_argument("--student-steps", type=int, default=40, help="distinct batches (the transfer set)")
    ap.add_argument("--epochs", type=int, default=8, help="student epochs over the same batches")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-offset", type=int, default=0, help="first seed (seeds are offset .. offset + seeds − 1)")
    ap.add_argument("--served-k", type=int, default=20, help="log-probabilities per token of the served teacher")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--hard-weight", type=float, default=0.5)
    ap.add_argument("--soft-weight", type=float, default=None, help="default: 1 − hard weight")
    ap.add_argument("--methods", nargs="+", default=["ce", "full", "topk_bucket", "topk_renorm", "sampled", "sampled_sys",
                                                     "served_top20"],
                    choices=list(LABELS))
    ap.add_argument("--teacher-ckpt", default=None,
                    help="teacher weights file (default: ./.fastkd_cache/quality-teacher-<settings>.pt, "
                         "reused when present)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw --plot from the newest study recorded in --out (no training)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quality.jsonl"))
    ap.add_argument("--plot", default=os.path.join(HERE, "results", "quality.png"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.vocab, args.teacher_steps, args.student_steps, args.epochs, args.seq = 500, 5, 3, 2, 16
        args.seeds, args.teacher_hidden = 2, 64
    if args.replot:
        return replot(args.out, args.plot)
    if "ce" not in args.methods:
        args.methods.insert(0, "ce")  # every gain is measured against it
    torch.manual_seed(0)
    t0 = time.time()
    ids, _ = load_corpus(args.vocab)
    split = int(ids.numel() * 0.9)
    train_ids, test_ids = ids[:split], ids[split:]
    v = args.vocab
    hw = args.hard_weight
    sw = 1.0 - hw if args.soft_weight is None else args.soft_weight

    teacher = LM(v, 128, args.teacher_hidden)
    tkey = hashlib.sha1(json.dumps([v, args.seq, args.batch, args.teacher_steps, args.teacher_hidden,
                                    args.lr]).encode()).hexdigest()[:12]
    ckpt = args.teacher_ckpt or (None if args.smoke else os.path.join(".fastkd_cache", f"quality-teacher-{tkey}.pt"))
    if ckpt and os.path.exists(ckpt):
        teacher.load_state_dict(torch.load(ckpt))
        print(f"teacher: loaded {ckpt}", flush=True)
    else:
        bar = _bar(args.teacher_steps, "teacher")
        train(teacher, batches(train_ids, args.seq, args.batch, args.teacher_steps, seed=1),
              lambda out, sid, x, y: F.cross_entropy(out.reshape(-1, v), y.reshape(-1)), args.lr, 1,
              progress=bar)
        if bar is not None:
            bar.close()
        if ckpt:
            os.makedirs(os.path.dirname(ckpt) or ".", exist_ok=True)
            torch.save(teacher.state_dict(), ckpt)
    teacher.eval()
    t_ce, t_ece, t_acc = evaluate(teacher, test_ids, args.seq)
    print(f"teacher: held-out CE {t_ce:.4f}  ECE {t_ece:.4f}  ({time.time() - t0:.0f}s)", flush=True)

    def teacher_logits(x):
        with torch.no_grad():
            return teacher(x)

    per_seed, curves, bytes_per_token = {}, {}, collections.defaultdict(list)
    tmp = tempfile.mkdtemp(prefix="fastkd-quality-")
    total = args.seeds * len(args.methods) * args.student_steps * args.epochs
    bar = _bar(total, "students")
    for seed in range(args.seed_offset, args.seed_offset + args.seeds):
        data = batches(train_ids, args.seq, args.batch, args.student_steps, seed=100 + seed)
        caches = {
            "topk": fastkd.TeacherCache(os.path.join(tmp, f"topk{seed}"), mode="topk", k=args.k,
                                        temperature=args.temperature, teacher=f"gru{args.teacher_hidden}",
                                        dataset="pydoc_data.topics", sync=False),
            "sample": fastkd.TeacherCache(os.path.join(tmp, f"sample{seed}"), mode="sample", sampling="iid",
                                          num_samples=args.num_samples, temperature=args.temperature,
                                          teacher=f"gru{args.teacher_hidden}", dataset="pydoc_data.topics",
                                          sync=False),
            "sample_sys": fastkd.TeacherCache(os.path.join(tmp, f"sys{seed}"), mode="sample", sampling="systematic",
                                              num_samples=args.num_samples, temperature=args.temperature,
                                              teacher=f"gru{args.teacher_hidden}", dataset="pydoc_data.topics",
                                              sync=False),
            "served": fastkd.TeacherCache(os.path.join(tmp, f"served{seed}"), mode="topk", k=args.served_k,
                                          temperature=1.0, teacher=f"gru{args.teacher_hidden} (served)",
                                          dataset="pydoc_data.topics", sync=False),
        }
        gen = torch.Generator().manual_seed(300 + seed)
        kw = dict(temperature=args.temperature, soft_weight=sw, hard_weight=hw)

        def make_loss(method):
            def ce(out, sid, x, y):
                return F.cross_entropy(out.reshape(-1, v), y.reshape(-1))

            def full(out, sid, x, y):
                return fastkd.kd_loss(out, teacher_logits(x), y, **kw)

            def sparse(cache, tail):
                def f(out, sid, x, y):
                    st = caches[cache].get_or_capture(sid, lambda: teacher_logits(x), generator=gen)
                    return fastkd.sparse_kd_loss(out, st, y, tail=tail, **kw)
                return f

            def served(out, sid, x, y):
                st = served_rows(caches["served"], sid, x, args.served_k, teacher_logits)
                return fastkd.sparse_kd_loss(out, st, y, tail="bucket", soft_weight=sw, hard_weight=hw)
            return {"served_top20": served, "ce": ce, "full": full, "topk_bucket": sparse("topk", "bucket"),
                    "topk_renorm": sparse("topk", "renorm"), "sampled": sparse("sample", "sampled"),
                    "sampled_sys": sparse("sample_sys", "sampled")}[method]

        per_seed[seed] = {}
        for method in args.methods:
            torch.manual_seed(1000 + seed)  # same student initialisation for every method of a seed
            student = LM(v, 64, args.student_hidden)
            curve = []
            t1 = time.time()
            train(student, data, make_loss(method), args.lr, args.epochs,
                  on_epoch=lambda e, m: curve.append(evaluate(m, test_ids, args.seq)[0]), progress=bar)
            ce, ece, acc = evaluate(student, test_ids, args.seq)
            per_seed[seed][method] = dict(ce=ce, ece=ece, acc=acc, seconds=time.time() - t1,
                                          best_epoch_ce=min(curve))
            curves[(seed, method)] = curve
            msg = f"seed {seed} {method:12s} held-out CE {ce:.4f}  ECE {ece:.4f}  acc {acc:.4f}  ({time.time() - t1:.0f}s)"
            if bar is not None:
                bar.write(msg)
            else:
                print(msg, flush=True)
        for name, c in caches.items():
            if c.num_tokens:
                bytes_per_token[name].append(c.bytes_per_token)
            c.close()
    if bar is not None:
        bar.close()

    summary = summarise(per_seed, args.methods)
    meta = dict(bench="quality", date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, fastkd=fastkd.__version__, corpus="pydoc_data.topics (CPython docs)",
                vocab=v, seq=args.seq, batch=args.batch, teacher_steps=args.teacher_steps,
                teacher=f"GRU-{args.teacher_hidden}", student=f"GRU-{args.student_hidden}",
                student_steps=args.student_steps, epochs=args.epochs, seeds=args.seeds, k=args.k,
                num_samples=args.num_samples, temperature=args.temperature, hard_weight=hw, soft_weight=sw,
                seed_offset=args.seed_offset, served_k=args.served_k,
                teacher_ce=t_ce, teacher_ece=t_ece, smoke=args.smoke,
                bytes_per_token={n: statistics.fmean(b) for n, b in bytes_per_token.items()},
                seconds=time.time() - t0)
    print(f"\n{args.seeds} seeds; teacher held-out CE {t_ce:.4f}; gains are paired with the same seed's CE run")
    print("method        held-out CE (± sd)    ECE     gain over CE (± se)   share of full-KD gain (± se)")
    for m in args.methods:
        r = summary[m]
        gain = "" if "gain_mean" not in r else f"{r['gain_mean']:+.4f} ± {r['gain_sem'] or 0:.4f}"
        share = "" if "share_of_full_kd_gain" not in r else \
            f"{100 * r['share_of_full_kd_gain']:.1f}% ± {100 * (r['share_sem'] or 0):.1f}"
        print(f"{m:12s}  {r['ce_mean']:.4f} ± {r['ce_std']:.4f}     {r['ece_mean']:.4f}  {gain:22s} {share}")
    print("bytes/token:", {n: round(b, 1) for n, b in meta["bytes_per_token"].items()})
    if not args.smoke:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "a") as f:
            for seed, res in per_seed.items():
                for method, r in res.items():
                    f.write(json.dumps({**meta, "kind": "run", "seed": seed, "method": method, **r,
                                        "curve": curves[(seed, method)]}) + "\n")
            for m, r in summary.items():
                f.write(json.dumps({**meta, "kind": "summary", **r}) + "\n")
    if args.plot:
        path = args.plot if not args.smoke else os.path.join(tmp, "quality.png")
        plot(curves, summary, args.methods, path, _title(meta))
        print("plot:", path)
    return summary


# ------------------------------------------------------------------------------------------------
# The cross-tokenizer arm
# ------------------------------------------------------------------------------------------------
XT_METHODS = ("ce", "uld", "hybrid")
XT_LABELS = {"ce": "plain CE", "uld": "CE + ULD (uld_loss)", "hybrid": "CE + hybrid (hybrid_uld_loss)"}


def _bpe(text_docs, vocab, path):
    from fastkd.demo.tokenizer import train_tokenizer

    class _Doc:
        def __init__(self, text):
            self.text = text
    return train_tokenizer([_Doc(t) for t in text_docs], vocab, path)


def _lm_ce(model, ids, lengths):
    """Summed next-token CE (nats) over the valid positions, their count, and the logits."""
    from fastkd.demo.cross_tokenizer import next_token_targets

    logits = model(ids)[:, :-1]
    y = next_token_targets(ids, lengths)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                           reduction="sum"), int((y != -100).sum()), logits


def _xt_bits_per_char(model, tok, chunks):
    """Held-out bits per character (fastkd.demo.cross_tokenizer.bits_per_char) of ``chunks``."""
    from fastkd.demo.cross_tokenizer import bits_per_char, encode_with_offsets

    model.eval()
    bpc = bits_per_char(model, *encode_with_offsets(tok, chunks), batch_size=64)
    model.train()
    return bpc


def cross_tokenizer_main(argv):
    ap = argparse.ArgumentParser(description="cross-tokenizer arm of bench/quality.py")
    ap.add_argument("--cross-tokenizer", action="store_true")
    ap.add_argument("--teacher-vocab", type=int, default=8192)
    ap.add_argument("--student-vocab", type=int, default=4096)
    ap.add_argument("--chars", type=int, default=256, help="characters per training sequence")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--teacher-hidden", type=int, default=384)
    ap.add_argument("--student-hidden", type=int, default=128)
    ap.add_argument("--student-steps", type=int, default=30, help="distinct batches (the transfer set)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed-offset", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--kd-weight", type=float, default=1.0, help="weight of the cross-tokenizer term next to CE")
    ap.add_argument("--methods", nargs="+", default=list(XT_METHODS), choices=XT_METHODS)
    ap.add_argument("--summary", action="store_true", help="only print the table of the recorded seeds")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quality_cross_tokenizer.jsonl"))
    args = ap.parse_args(argv)
    if args.summary:
        return xt_summary(args.out)
    if args.smoke:
        args.teacher_vocab, args.student_vocab, args.teacher_steps, args.student_steps = 600, 400, 5, 3
        args.epochs, args.seeds, args.teacher_hidden, args.batch = 1, 2, 64, 8
    from pydoc_data.topics import topics

    from fastkd.demo.cross_tokenizer import encode_with_offsets

    t0 = time.time()
    text = "\n".join(topics[k] for k in sorted(topics))
    split = int(len(text) * 0.9)
    train_text, test_text = text[:split], text[split:]
    docs = [train_text[i:i + 4000] for i in range(0, len(train_text), 4000)]
    cache_dir = tempfile.mkdtemp(prefix="fastkd-xt-") if args.smoke else ".fastkd_cache"
    os.makedirs(cache_dir, exist_ok=True)
    t_tok = _bpe(docs, args.teacher_vocab, os.path.join(cache_dir, f"xt-bpe-{args.teacher_vocab}.json"))
    s_tok = _bpe(docs, args.student_vocab, os.path.join(cache_dir, f"xt-bpe-{args.student_vocab}.json"))
    vt, vs = t_tok.get_vocab_size(), s_tok.get_vocab_size()
    vmap = fastkd.VocabMap.from_tokenizers(s_tok, t_tok)
    n_test = 60 if args.smoke else 400
    test_chunks = [test_text[i:i + 4 * args.chars] for i in range(0, len(test_text) - 4 * args.chars,
                                                                  4 * args.chars)][:n_test]

    def chunks_for(seed, steps):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(train_text) - args.chars, (steps, args.batch), generator=g)
        return [[train_text[s:s + args.chars] for s in row.tolist()] for row in starts]

    teacher = LM(vt, 128, args.teacher_hidden)
    tkey = hashlib.sha1(json.dumps([vt, args.chars, args.batch, args.teacher_steps, args.teacher_hidden,
                                    args.lr]).encode()).hexdigest()[:12]
    ckpt = os.path.join(cache_dir, f"xt-teacher-{tkey}.pt")
    if os.path.exists(ckpt):
        teacher.load_state_dict(torch.load(ckpt))
    else:
        opt = torch.optim.Adam(teacher.parameters(), lr=args.lr)
        for chunk in chunks_for(1, args.teacher_steps):
            ids, _, ln = encode_with_offsets(t_tok, chunk)
            ce, n, _ = _lm_ce(teacher, ids, ln)
            opt.zero_grad(set_to_none=True)
            (ce / n).backward()
            torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
            opt.step()
        torch.save(teacher.state_dict(), ckpt)
    teacher.eval()
    t_bpc = _xt_bits_per_char(teacher, t_tok, test_chunks)
    print(f"teacher (BPE {vt}): held-out {t_bpc:.4f} bits/char ({time.time() - t0:.0f}s); "
          f"{vmap.num_matched} of {vs} student tokens also in the teacher's vocabulary", flush=True)

    meta = dict(bench="quality_cross_tokenizer", date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, fastkd=fastkd.__version__, corpus="pydoc_data.topics (CPython docs)",
                teacher_vocab=vt, student_vocab=vs, num_matched=vmap.num_matched, chars=args.chars,
                batch=args.batch, teacher_steps=args.teacher_steps, teacher=f"GRU-{args.teacher_hidden}",
                student=f"GRU-{args.student_hidden}", student_steps=args.student_steps, epochs=args.epochs,
                k=args.k, kd_weight=args.kd_weight, teacher_bpc=t_bpc, smoke=args.smoke)
    rows = []
    for seed in range(args.seed_offset, args.seed_offset + args.seeds):
        data = []
        for chunk in chunks_for(100 + seed, args.student_steps):
            s_ids, s_off, s_ln = encode_with_offsets(s_tok, chunk)
            t_ids, t_off, t_ln = encode_with_offsets(t_tok, chunk)
            al = fastkd.align_tokens(s_off, t_off, student_lengths=s_ln, teacher_lengths=t_ln)
            b, ps, pt = al.index(shift=1)
            with torch.no_grad():  # the teacher runs once per batch; later epochs reuse its top-k rows
                st = fastkd.capture(teacher(t_ids)[b, pt], k=min(args.k, vt))
            data.append((s_ids, s_ln, (b, ps), st))
        for method in args.methods:
            torch.manual_seed(1000 + seed)
            student = LM(vs, 64, args.student_hidden)
            opt = torch.optim.Adam(student.parameters(), lr=args.lr)
            t1 = time.time()
            for _ in range(args.epochs):
                for s_ids, s_ln, (b, ps), st in data:
                    ce, n, logits = _lm_ce(student, s_ids, s_ln)
                    loss = ce / n
                    if method != "ce":
                        rows_s = logits[b, ps]
                        kd = (fastkd.uld_loss(rows_s, st, k=args.k) if method == "uld"
                              else fastkd.hybrid_uld_loss(rows_s, st, vmap, k=args.k))
                        loss = loss + args.kd_weight * kd
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                    opt.step()
            bpc = _xt_bits_per_char(student, s_tok, test_chunks)
            row = dict(meta, kind="run", seed=seed, method=method, bpc=bpc, seconds=time.time() - t1)
            rows.append(row)
            print(f"seed {seed} {method:7s} held-out {bpc:.4f} bits/char ({time.time() - t1:.0f}s)", flush=True)
    if not args.smoke:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return xt_summary(args.out)
    return rows


def xt_summary(out):
    """Mean held-out bits/char per method over every recorded seed of the newest settings, and the
    gain over CE paired by seed (mean ± s.e.)."""
    with open(out) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    runs = [r for r in runs if r.get("kind") == "run" and not r.get("smoke")]
    if not runs:
        raise SystemExit(f"{out}: no run recorded")
    keys = ("teacher_vocab", "student_vocab", "chars", "batch", "teacher_steps", "student_steps", "epochs", "k",
            "kd_weight", "student", "teacher")
    last = runs[-1]
    runs = [r for r in runs if all(r.get(k) == last.get(k) for k in keys)]
    by = collections.defaultdict(dict)
    for r in runs:
        by[r["seed"]][r["method"]] = r["bpc"]
    seeds = sorted(s for s in by if "ce" in by[s])
    print(f"teacher BPE {last['teacher_vocab']} ({last['teacher']}, held-out {last['teacher_bpc']:.4f} bits/char) -> "
          f"student BPE {last['student_vocab']} ({last['student']}); {len(seeds)} seeds; "
          f"{last['student_steps']} batches x {last['epochs']} epochs, k={last['k']}")
    print("| method | held-out bits/char (mean ± sd) | gain over CE (mean ± s.e.) | seeds |")
    print("| --- | --- | --- | --- |")
    table = {}
    for m in XT_METHODS:
        vals = [by[s][m] for s in seeds if m in by[s]]
        if not vals:
            continue
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        gain = ""
        if m != "ce":
            gains = [by[s]["ce"] - by[s][m] for s in seeds if m in by[s]]
            se = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else 0.0
            gain = f"{statistics.fmean(gains):+.4f} ± {se:.4f}"
            table[m] = (statistics.fmean(gains), se)
        print(f"| {XT_LABELS[m]} | {statistics.fmean(vals):.4f} ± {sd:.4f} | {gain} | {len(vals)} |")
    return table


if __name__ == "__main__":
    if "--cross-tokenizer" in sys.argv[1:]:
        cross_tokenizer_main(sys.argv[1:])
    else:
        main()
