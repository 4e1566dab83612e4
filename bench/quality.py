"""Quality study of the teacher cache: does a student distilled from cached targets learn as well
as one distilled from the full teacher distribution?

Real text: the Python documentation shipped with CPython (``pydoc_data.topics``, ~0.7 MB of English
prose), word-level vocabulary. A GRU language model is trained as the teacher; then identical
students (same initialisation, same batches) are trained with

    ce           plain cross-entropy on the labels (the baseline)
    full         fastkd.kd_loss against the teacher's full logits
    topk_bucket  fastkd.sparse_kd_loss, top-k capture, tail="bucket"
    topk_renorm  same capture, tail="renorm" (teacher renormalised over the top-k: biased)
    sampled      fastkd.sparse_kd_loss on a sampled capture (N draws, unbiased)

The sparse targets go through a ``fastkd.TeacherCache`` (``get_or_capture``): the teacher runs once
per training sequence, later epochs read the stored rows. Reported on the held-out split: mean
cross-entropy (nats/token), expected calibration error (ECE, 15 bins of top-1 confidence), and each
method's share of full KD's gain over plain CE.

    python bench/quality.py                   # ~10 minutes on 2 CPU cores
    python bench/quality.py --smoke           # seconds: a wiring check, numbers meaningless

Results are appended as JSON lines to bench/results/quality.jsonl.
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import math
import os
import re
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fastkd  # noqa: E402


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
    """Fixed list of (sample_ids, x, y): sample id = start position index, so the cache can key on it."""
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


def train(model, data, loss_fn, lr, epochs):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for sid, x, y in data:
            loss = loss_fn(model(x), sid, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--student-steps", type=int, default=150, help="distinct batches per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="student epochs over the same batches")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=50)
    ap.add_argument("--hard-weight", type=float, default=0.5)
    ap.add_argument("--methods", nargs="+", default=["ce", "full", "topk_bucket", "topk_renorm", "sampled"])
    ap.add_argument("--teacher-ckpt", default=None, help="load the teacher from / save it to this file")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quality.jsonl"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.vocab, args.teacher_steps, args.student_steps, args.epochs, args.seq = 500, 5, 3, 1, 16
    torch.manual_seed(0)
    t0 = time.time()
    ids, _ = load_corpus(args.vocab)
    split = int(ids.numel() * 0.9)
    train_ids, test_ids = ids[:split], ids[split:]
    v = args.vocab

    teacher = LM(v, 128, 384)
    ckpt = args.teacher_ckpt
    if ckpt and os.path.exists(ckpt):
        teacher.load_state_dict(torch.load(ckpt))
    else:
        train(teacher, batches(train_ids, args.seq, args.batch, args.teacher_steps, seed=1),
              lambda out, sid, x, y: F.cross_entropy(out.reshape(-1, v), y.reshape(-1)), 3e-3, 1)
        if ckpt:
            torch.save(teacher.state_dict(), ckpt)
    teacher.eval()
    t_ce, t_ece, t_acc = evaluate(teacher, test_ids, args.seq)
    print(f"teacher: held-out CE {t_ce:.4f}  ECE {t_ece:.4f}  ({time.time() - t0:.0f}s)", flush=True)

    data = batches(train_ids, args.seq, args.batch, args.student_steps, seed=2)
    hw, sw = args.hard_weight, 1.0 - args.hard_weight
    tmp = tempfile.mkdtemp(prefix="fastkd-quality-")
    caches = {
        "topk": fastkd.TeacherCache(os.path.join(tmp, "topk"), mode="topk", k=args.k, teacher="gru384",
                                    dataset="pydoc_data.topics", sync=False),
        "sample": fastkd.TeacherCache(os.path.join(tmp, "sample"), mode="sample", num_samples=args.num_samples,
                                      teacher="gru384", dataset="pydoc_data.topics", sync=False),
    }
    gen = torch.Generator().manual_seed(3)

    def teacher_logits(x):
        with torch.no_grad():
            return teacher(x)

    def make_loss(method):
        def ce(out, sid, x, y):
            return F.cross_entropy(out.reshape(-1, v), y.reshape(-1))

        def full(out, sid, x, y):
            return fastkd.kd_loss(out, teacher_logits(x), y, soft_weight=sw, hard_weight=hw)

        def sparse(cache, tail):
            def f(out, sid, x, y):
                st = caches[cache].get_or_capture(sid, lambda: teacher_logits(x), generator=gen)
                return fastkd.sparse_kd_loss(out, st, y, tail=tail, soft_weight=sw, hard_weight=hw)
            return f
        return {"ce": ce, "full": full, "topk_bucket": sparse("topk", "bucket"),
                "topk_renorm": sparse("topk", "renorm"), "sampled": sparse("sample", "sampled")}[method]

    results = {}
    for method in args.methods:
        torch.manual_seed(4)  # same student initialisation for every method
        student = LM(v, 64, 128)
        t1 = time.time()
        train(student, data, make_loss(method), 3e-3, args.epochs)
        ce, ece, acc = evaluate(student, test_ids, args.seq)
        results[method] = dict(ce=ce, ece=ece, acc=acc, seconds=time.time() - t1)
        print(f"{method:12s} held-out CE {ce:.4f}  ECE {ece:.4f}  acc {acc:.4f}  ({time.time() - t1:.0f}s)",
              flush=True)

    base = results.get("ce", {}).get("ce")
    full_gain = None if base is None or "full" not in results else base - results["full"]["ce"]
    meta = dict(bench="quality", date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, fastkd=fastkd.__version__, corpus="pydoc_data.topics (CPython docs)",
                vocab=v, seq=args.seq, batch=args.batch, teacher_steps=args.teacher_steps,
                student_steps=args.student_steps, epochs=args.epochs, k=args.k, num_samples=args.num_samples,
                hard_weight=hw, teacher_ce=t_ce, teacher_ece=t_ece, smoke=args.smoke,
                bytes_per_token={n: c.bytes_per_token for n, c in caches.items() if c.num_tokens})
    rows = []
    for method, r in results.items():
        share = None
        if full_gain and base is not None and method != "ce":
            share = (base - r["ce"]) / full_gain
        rows.append({**meta, "method": method, **r, "share_of_full_kd_gain": share})
    print("\nmethod        held-out CE    ECE     share of full-KD gain")
    for r in rows:
        share = "" if r["share_of_full_kd_gain"] is None else f"{100 * r['share_of_full_kd_gain']:.1f}%"
        print(f"{r['method']:12s}  {r['ce']:.4f}       {r['ece']:.4f}  {share}")
    print("bytes/token:", {n: round(b, 1) for n, b in meta["bytes_per_token"].items()})
    if not args.smoke:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
