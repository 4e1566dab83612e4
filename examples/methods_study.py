"""Study: the classical distillation methods of ``fastkd.methods`` on real data (scikit-learn digits).

Protocol (limited labels + capacity gap, the regime where the KD literature says distillation helps):

* data: the 1,797 8×8 handwritten digits that ship with scikit-learn; a fixed stratified test split of
  597 images; the remaining 1,200 form the pool.
* teachers: three wide CNNs (about 100k parameters) trained on the whole labelled pool, once per
  study run, with three different seeds; the first one is "the teacher", all three "the ensemble".
* student: a small CNN (about 6k parameters), the same architecture and optimiser for every method,
  trained on only ``--per-class`` labelled images per class (a different draw for every seed).
  Methods that use a teacher see the teacher's outputs on those same images (and, for function
  matching, on mixtures of them): the teacher knows more than the labels, which is the point of KD.
* every method vs the student trained from scratch, ``--seeds`` seeds, mean ± std of test accuracy.
  Hyperparameters are the papers' defaults, fixed in the code below; none were tuned on the test split.

Run ``python examples/methods_study.py`` (full study; writes docs/methods_table_<per-class>pc.md,
docs/methods_accuracy_<per-class>pc.png and appends to bench/results/methods_study.jsonl) or ``--quick`` (a smoke run of a few seconds per method, writes
to a temporary directory unless --out is given). Needs scikit-learn, tqdm and matplotlib.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastkd  # noqa: E402
from fastkd import methods as M  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it=None, **_):
        return it


# ------------------------------------------------------------------------------------------------ data
def load_digits_split(seed: int = 0, test_size: int = 597):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y))
    tr, te = train_test_split(idx.numpy(), test_size=test_size, stratify=y.numpy(), random_state=seed)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return x[tr], y[tr], x[te], y[te]


def labelled_subset(y_pool: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    picks = []
    for c in range(10):
        ids = (y_pool == c).nonzero().flatten()
        picks.append(ids[torch.randperm(len(ids), generator=g)[:per_class]])
    return torch.cat(picks)


# ---------------------------------------------------------------------------------------------- models
class CNN(nn.Module):
    """conv(1→w) → conv(w→2w, /2) → conv(2w→4w, /2) → global pool → fc; block names are what the
    methods hook into (nothing in the class knows about distillation)."""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                    nn.ReLU())
        self.block3 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
                                    nn.BatchNorm2d(4 * width), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x):
        return self.fc(self.pool(self.block3(self.block2(self.block1(x)))))


STUDENT_WIDTH, TEACHER_WIDTH = 6, 32


def make_student(seed: int) -> CNN:
    torch.manual_seed(seed)
    return CNN(STUDENT_WIDTH)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def shift_augment(x: torch.Tensor) -> torch.Tensor:
    """Random translation by up to one pixel (for the teachers only)."""
    pad = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,)).tolist()
    return pad[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was)
    return acc


def fit(params, step_fn: Callable[[torch.Tensor], torch.Tensor], n: int, steps: int, batch: int, seed: int,
        lr: float = 3e-3, weight_decay: float = 5e-4, modules=()):
    """Adam + cosine decay over ``steps`` minibatch steps of a random reshuffle of ``range(n)``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    for m in modules:
        m.train()
    g = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        for idx in torch.randperm(n, generator=g).split(batch):
            if step >= steps:
                break
            loss = step_fn(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1


def train_teachers(x, y, n_teachers: int, steps: int) -> List[CNN]:
    teachers = []
    for k in range(n_teachers):
        torch.manual_seed(100 + k)
        t = CNN(TEACHER_WIDTH, dropout=0.2)
        fit(t.parameters(), lambda idx: F.cross_entropy(t(shift_augment(x[idx])), y[idx]), len(y), steps, 64,
            seed=100 + k, modules=[t])
        teachers.append(M.freeze(t))
    return teachers


# --------------------------------------------------------------------------------------------- methods
KD = dict(temperature=4.0, soft_weight=0.9, hard_weight=0.1)  # Hinton et al.'s usual mix


class Ctx:
    """What one (method, seed) run gets: the labelled subset, the test split, the teachers, budgets."""

    def __init__(self, x, y, x_test, y_test, teachers, steps, batch, seed):
        self.x, self.y, self.x_test, self.y_test = x, y, x_test, y_test
        self.teachers, self.steps, self.batch, self.seed = teachers, steps, batch, seed
        with torch.no_grad():
            self.t_logits = teachers[0](x)
            self.t_all = torch.stack([t(x) for t in teachers])

    def acc(self, model):
        return accuracy(model, self.x_test, self.y_test)


def m_scratch(c: Ctx):
    s = make_student(c.seed)
    fit(s.parameters(), lambda i: F.cross_entropy(s(c.x[i]), c.y[i]), len(c.y), c.steps, c.batch, c.seed, modules=[s])
    return {"acc": c.acc(s)}


def m_scratch_mixup_long(c: Ctx):
    """Control for function matching: same 4× schedule and mixup inputs, labels mixed, no teacher."""
    s = make_student(c.seed)

    def step(i):
        x, y = c.x[i], c.y[i]
        lam = torch.distributions.Beta(1.0, 1.0).sample((len(i),))
        perm = torch.randperm(len(i))
        xm = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm]
        logp = F.log_softmax(s(xm), -1)
        return -(lam * logp.gather(1, y[:, None])[:, 0] + (1 - lam) * logp.gather(1, y[perm][:, None])[:, 0]).mean()

    fit(s.parameters(), step, len(c.y), 4 * c.steps, c.batch, c.seed, modules=[s])
    return {"acc": c.acc(s)}


def m_label_smoothing(c: Ctx):
    s = make_student(c.seed)
    fit(s.parameters(), lambda i: M.label_smoothing_loss(s(c.x[i]), c.y[i], smoothing=0.1), len(c.y), c.steps,
        c.batch, c.seed, modules=[s])
    return {"acc": c.acc(s)}


def m_hinton(c: Ctx):
    s = make_student(c.seed)
    fit(s.parameters(), lambda i: fastkd.kd_loss(s(c.x[i]), c.t_logits[i], c.y[i], **KD), len(c.y), c.steps,
        c.batch, c.seed, modules=[s])
    return {"acc": c.acc(s)}


def m_hinton_long(c: Ctx):
    """Control for function matching: the teacher and the 4× schedule, but no mixup."""
    s = make_student(c.seed)
    fit(s.parameters(), lambda i: fastkd.kd_loss(s(c.x[i]), c.t_logits[i], c.y[i], **KD), len(c.y), 4 * c.steps,
        c.batch, c.seed, modules=[s])
    return {"acc": c.acc(s)}


def m_hinton_ensemble(c: Ctx):
    s = make_student(c.seed)
    fit(s.parameters(), lambda i: M.ensemble_kd_loss(s(c.x[i]), c.t_all[:, i], c.y[i], **KD), len(c.y), c.steps,
        c.batch, c.seed, modules=[s])
    return {"acc": c.acc(s)}


def m_fitnets(c: Ctx):
    """Stage 1 (a quarter of the budget, extra): student up to block2 + 1×1-conv regressor learn the
    teacher's block2 output. Stage 2 (the full budget): the whole student with KD."""
    s = make_student(c.seed)
    t = c.teachers[0]
    reg = M.HintRegressor(2 * STUDENT_WIDTH, 2 * TEACHER_WIDTH, kind="conv")
    guided = M.guided_parameters(s, "block2", c.x[:2])
    with torch.no_grad(), M.FeatureCapture(t, "block2") as tcap:
        t(c.x)
        hints = tcap["block2"]
    with M.FeatureCapture(s, "block2") as scap:
        def hint_step(i):
            s(c.x[i])
            return M.hint_loss(scap["block2"], hints[i], reg)
        fit(guided + list(reg.parameters()), hint_step, len(c.y), c.steps // 4, c.batch, c.seed, modules=[s, reg])
    fit(s.parameters(), lambda i: fastkd.kd_loss(s(c.x[i]), c.t_logits[i], c.y[i], **KD), len(c.y), c.steps,
        c.batch, c.seed + 1, modules=[s])
    return {"acc": c.acc(s)}


def m_self_distillation(c: Ctx):
    s = make_student(c.seed)
    emb = 4 * STUDENT_WIDTH
    heads = {"block1": M.AuxiliaryHead(STUDENT_WIDTH, 10, embed_dim=emb, kind="attention"),
             "block2": M.AuxiliaryHead(2 * STUDENT_WIDTH, 10, embed_dim=emb, kind="attention")}
    sd = M.SelfDistillation(s, heads, feature_layer="fc")
    fit(sd.parameters(), lambda i: M.self_distillation_loss(sd(c.x[i]), c.y[i]), len(c.y), c.steps, c.batch,
        c.seed, modules=[sd])
    sd.eval()
    with torch.no_grad():
        exits = sd(c.x_test).logits
    accs = [(z.argmax(-1) == c.y_test).float().mean().item() for z in exits]
    return {"acc": accs[-1], "exit1_acc": accs[0], "exit2_acc": accs[1]}


def m_born_again(c: Ctx):
    """Three generations; gen 0 from labels, gens 1-2 BAN (teacher loss only, τ = 1)."""
    gens, out = [], {}
    for k, s, teacher in M.generations(lambda: make_student(c.seed + 17 * len(gens)), 3):
        if teacher is None:
            fit(s.parameters(), lambda i: F.cross_entropy(s(c.x[i]), c.y[i]), len(c.y), c.steps, c.batch, c.seed,
                modules=[s])
        else:
            with torch.no_grad():
                t_logits = teacher(c.x)
            fit(s.parameters(), lambda i: M.born_again_loss(s(c.x[i]), t_logits[i]), len(c.y), c.steps, c.batch,
                c.seed + k, modules=[s])
        gens.append(copy.deepcopy(s).eval())
        out[f"gen{k}_acc"] = c.acc(s)
    out["acc"] = out["gen2_acc"]
    out["ensemble_acc"] = c.acc(M.BornAgainEnsemble(gens))
    return out


def m_function_matching(c: Ctx):
    """Teacher on the fly on the same mixup batch, τ = 1, no labels, 4× the schedule."""
    s = make_student(c.seed)
    t = c.teachers[0]
    fit(s.parameters(), lambda i: M.function_matching_loss(s, t, c.x[i], augment=M.mixup), len(c.y),
        4 * c.steps, c.batch, c.seed, modules=[s])
    return {"acc": c.acc(s)}


def m_contrastive(c: Ctx):
    """CE + 0.8 · InfoNCE on the penultimate embeddings (CRD's β = 0.8), queue of 64."""
    s = make_student(c.seed)
    t = c.teachers[0]
    with torch.no_grad(), M.FeatureCapture(t, "fc", capture="input") as tcap:
        t(c.x)
        t_emb = tcap["fc"]
    crd = M.ContrastiveDistiller(4 * STUDENT_WIDTH, 4 * TEACHER_WIDTH, embed_dim=32, queue_size=64, temperature=0.1)
    with M.FeatureCapture(s, "fc", capture="input") as scap:
        def step(i):
            z = s(c.x[i])
            return F.cross_entropy(z, c.y[i]) + 0.8 * crd(scap["fc"], t_emb[i], index=i)
        fit(list(s.parameters()) + list(crd.parameters()), step, len(c.y), c.steps, c.batch, c.seed,
            modules=[s, crd])
    return {"acc": c.acc(s)}


def m_cosine(c: Ctx):
    """DistilBERT's mix: KD + cosine loss between penultimate embeddings (through a linear map)."""
    s = make_student(c.seed)
    t = c.teachers[0]
    with torch.no_grad(), M.FeatureCapture(t, "fc", capture="input") as tcap:
        t(c.x)
        t_emb = tcap["fc"]
    reg = M.HintRegressor(4 * STUDENT_WIDTH, 4 * TEACHER_WIDTH, kind="linear")
    with M.FeatureCapture(s, "fc", capture="input") as scap:
        def step(i):
            z = s(c.x[i])
            return fastkd.kd_loss(z, c.t_logits[i], c.y[i], **KD) + M.cosine_embedding_loss(scap["fc"], t_emb[i],
                                                                                             regressor=reg)
        fit(list(s.parameters()) + list(reg.parameters()), step, len(c.y), c.steps, c.batch, c.seed,
            modules=[s, reg])
    return {"acc": c.acc(s)}


METHODS: Dict[str, tuple] = {
    # key: (label, function, uses the external teacher)
    "scratch": ("student from scratch (CE)", m_scratch, False),
    "label_smoothing": ("label smoothing ε=0.1 (Müller et al.)", m_label_smoothing, False),
    "self_distillation": ("self-distillation, deepest exit (BYOT)", m_self_distillation, False),
    "born_again": ("born-again, generation 2 (BAN)", m_born_again, False),
    "scratch_mixup_long": ("from scratch, mixup, 4× schedule (control)", m_scratch_mixup_long, False),
    "hinton": ("KD, one teacher (Hinton et al.)", m_hinton, True),
    "hinton_long": ("KD, one teacher, 4× schedule (control)", m_hinton_long, True),
    "hinton_ensemble": ("KD, ensemble of 3 teachers", m_hinton_ensemble, True),
    "fitnets": ("FitNets: hints, then KD", m_fitnets, True),
    "function_matching": ("function matching, mixup, 4× schedule", m_function_matching, True),
    "contrastive": ("contrastive (InfoNCE) + CE", m_contrastive, True),
    "cosine": ("KD + cosine on embeddings (DistilBERT)", m_cosine, True),
}


# -------------------------------------------------------------------------------------------- reporting
def mean_std(v):
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def write_report(results, timings, cpu_timings, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    base = [r["acc"] for r in results["scratch"]]
    bm, bs = mean_std(base)
    lines = [f"Test accuracy (%) of the student on digits, {meta['per_class']} labels per class "
             f"({10 * meta['per_class']} images), {meta['seeds']} seeds, mean ± std; Δ vs scratch is the mean of "
             "the per-seed differences (same subset and initialisation).", "",
             "| method | teacher | accuracy (%) | Δ vs scratch (pp) | wins / seeds | time (s): wall / CPU |",
             "|---|---|---|---|---|---|"]
    rows = []
    for key, (label, _, uses_teacher) in METHODS.items():
        if key not in results:
            continue
        accs = [r["acc"] for r in results[key]]
        m, s = mean_std(accs)
        diffs = [100 * (a - b) for a, b in zip(accs, base)]
        dm, ds = mean_std(diffs)
        wins = sum(d > 0 for d in diffs)
        delta = "—" if key == "scratch" else f"{dm:+.1f} ± {ds:.1f}"
        winstr = "—" if key == "scratch" else f"{wins}/{len(diffs)}"
        lines.append(f"| {label} | {'yes' if uses_teacher else 'no'} | {100 * m:.1f} ± {100 * s:.1f} | {delta} | "
                     f"{winstr} | {timings[key]:.0f} / {cpu_timings[key]:.0f} |")
        rows.append((label, 100 * m, 100 * s, uses_teacher))
        if key == "born_again":
            e = [r["ensemble_acc"] for r in results[key]]
            em, es = mean_std(e)
            ed = mean_std([100 * (a - b) for a, b in zip(e, base)])
            lines.append(f"| born-again, ensemble of gens 0–2 (3× inference) | no | {100 * em:.1f} ± {100 * es:.1f} | "
                         f"{ed[0]:+.1f} ± {ed[1]:.1f} | {sum(a > b for a, b in zip(e, base))}/{len(e)} | (same run) |")
            rows.append(("born-again ensemble (3× inference)", 100 * em, 100 * es, False))
        if key == "self_distillation":
            for ex in ("exit1_acc", "exit2_acc"):
                e = [r[ex] for r in results[key]]
                em, es = mean_std(e)
                lines.append(f"| self-distillation, {ex[:5]} (shallower, cheaper) | no | {100 * em:.1f} ± "
                             f"{100 * es:.1f} | — | — | (same run) |")
    t_accs = [100 * a for a in meta["teacher_acc"]]
    lines += ["", f"Teachers: {meta['teacher_params']:,} parameters each, trained on all {meta['pool']} pool images; "
              f"test accuracy {', '.join(f'{a:.1f}' for a in t_accs)} %. Student: {meta['student_params']:,} "
              f"parameters. {meta['steps']} Adam steps of batch {meta['batch']} per student "
              f"(4× for the mixup rows; FitNets adds a quarter for its hint stage).",
              f"Measured on {meta['device']}, torch {meta['torch']}, {meta['threads']} thread(s), "
              f"{meta['date']}; times are for all seeds of a method: wall-clock on a machine shared with "
              "other jobs, and this process's CPU time."]
    table = "\n".join(lines)
    with open(os.path.join(out_dir, f"methods_table_{meta['per_class']}pc.md"), "w") as f:
        f.write(table + "\n")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return table
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(rows) + 1.2))
    labels = [r[0] for r in rows][::-1]
    means = [r[1] for r in rows][::-1]
    stds = [r[2] for r in rows][::-1]
    colors = ["#c44e52" if r[3] else "#4c72b0" for r in rows][::-1]
    ax.barh(labels, means, xerr=stds, color=colors, capsize=3)
    ax.axvline(100 * bm, color="k", ls="--", lw=1, label=f"scratch {100 * bm:.1f}%")
    lo = min(m - s for m, s in zip(means, stds))
    ax.set_xlim(max(0, lo - 3), 100)
    ax.set_xlabel(f"test accuracy (%), mean ± std over {meta['seeds']} seeds")
    ax.set_title(f"digits, {meta['per_class']} labels/class; red: uses a teacher trained on all {meta['pool']} images",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"methods_accuracy_{meta['per_class']}pc.png"), dpi=110)
    plt.close(fig)
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, short schedules")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--per-class", type=int, default=10, help="labelled images per class for the student")
    ap.add_argument("--steps", type=int, default=400, help="Adam steps per student (mixup rows: 4×)")
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="all", help="comma-separated keys of METHODS (scratch is always run)")
    ap.add_argument("--out", default=None, help="directory for the table and plot (default docs/, or a temp dir "
                                                "with --quick)")
    ap.add_argument("--results", default=None, help="JSON-lines file to append to "
                                                    "(default bench/results/methods_study.jsonl; none with --quick)")
    args = ap.parse_args(argv)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    if args.quick:
        args.seeds, args.steps, args.teacher_steps = min(args.seeds, 1), 20, 30
    out_dir = args.out or (tempfile.mkdtemp(prefix="fastkd_methods_") if args.quick else os.path.join(root, "docs"))
    results_path = args.results or (None if args.quick else os.path.join(root, "bench", "results",
                                                                          "methods_study.jsonl"))
    torch.set_num_threads(args.threads)
    keys = list(METHODS) if args.methods == "all" else ["scratch"] + [k for k in args.methods.split(",")
                                                                      if k != "scratch"]
    for k in keys:
        if k not in METHODS:
            ap.error(f"unknown method {k!r}; choose from {', '.join(METHODS)}")

    t0 = time.time()
    x_pool, y_pool, x_test, y_test = load_digits_split()
    teachers = train_teachers(x_pool, y_pool, 3, args.teacher_steps)
    teacher_time = time.time() - t0
    results = {k: [] for k in keys}
    timings = {k: 0.0 for k in keys}
    cpu_timings = {k: 0.0 for k in keys}
    bar = tqdm(total=len(keys) * args.seeds, desc="methods × seeds", unit="run")
    for seed in range(args.seeds):
        sub = labelled_subset(y_pool, args.per_class, seed)
        ctx = Ctx(x_pool[sub], y_pool[sub], x_test, y_test, teachers, args.steps, 25, seed)
        for k in keys:
            bar.set_postfix_str(f"seed {seed}: {k}")
            ts, cs = time.time(), time.process_time()
            torch.manual_seed(10_000 + seed)
            results[k].append(METHODS[k][1](ctx))
            timings[k] += time.time() - ts
            cpu_timings[k] += time.process_time() - cs
            bar.update(1)
    bar.close()
    meta = dict(per_class=args.per_class, seeds=args.seeds, steps=args.steps, batch=25, pool=len(y_pool),
                teacher_acc=[accuracy(t, x_test, y_test) for t in teachers], teacher_params=n_params(teachers[0]),
                student_params=n_params(make_student(0)), device=f"CPU ({platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores)", torch=torch.__version__, threads=args.threads,
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), teacher_time_s=teacher_time)
    table = write_report(results, timings, cpu_timings, meta, out_dir)
    print(table)
    print(f"\nteachers trained in {teacher_time:.0f}s; wrote methods_table_{args.per_class}pc.md and "
          f"methods_accuracy_{args.per_class}pc.png to {out_dir}")
    if results_path:
        os.makedirs(os.path.dirname(results_path), exist_ok=True)
        with open(results_path, "a") as f:
            for k in keys:
                f.write(json.dumps({"bench": "methods_study", "method": k, "runs": results[k], "time_s": timings[k],
                                    "cpu_time_s": cpu_timings[k],
                                    **meta, "fastkd": fastkd.__version__, "python": platform.python_version()}) + "\n")
    return results


if __name__ == "__main__":
    main()
