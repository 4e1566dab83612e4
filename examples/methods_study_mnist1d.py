"""Study: the distillation methods of ``fastkd.methods`` on MNIST-1D, with paired seeds.

MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024) is a
procedurally generated 1-D analogue of MNIST: ten 12-point templates, padded, dilated, scaled,
translated, sheared and noised into 40-sample signals. Its point for this study: a small CNN
reaches ~94 % and an MLP ~68 %, so architecture matters and a teacher knows things a student
cannot learn from the labels alone, while one run takes seconds on a CPU.

Protocol (fixed before any run; the same for every method):

* data: generated locally by ``mnist1d.data.make_dataset`` from the templates that ship inside the
  package (``get_templates()``); nothing is downloaded. ``--data-seed`` (default 42, the package's)
  seeds the generator, ``--train`` / ``--test`` (default 4,000 / 1,000, the package's 80/20 split of
  5,000) set the sizes; a larger ``--train`` generates a larger set with the same generator
  arguments (``num_samples = train + test``, ``train_split = train / (train + test)``). Signals are
  stored as ``(N, 1, 1, 40)`` "images" of height 1, so the 2-D hooks of ``fastkd.methods``
  (``AuxiliaryHead``, ``HintRegressor(kind="conv")``) apply unchanged; every convolution is 1×k.
* teachers: three CNNs (different seeds) trained once per study on the 4,000 training signals;
  the first is "the teacher", all three "the ensemble". Every method sees the same 4,000 labelled
  signals: a teacher adds no labels, only what its architecture learnt from them.
* students, smaller so that a gap remains: the MLP of the MNIST-1D paper (40-100-100-10), a small
  CNN (width 8) and a deep-thin CNN (10 convolutions of width 6, no batch norm) for FitNets.
* each method against the same student trained from scratch on the labels: same initialisation,
  same minibatch order, same number of steps (``--steps``), unless the method prescribes a longer
  schedule (function matching: ``--long`` × the steps; reported at both budgets, with label and
  KD controls at the long budget). ``--seeds`` seeds (default 5); mean ± standard error, and the
  mean ± s.e. of the per-seed paired differences. Hyperparameters are the papers' defaults (KD
  soft 0.9 / hard 0.1, τ = 4 unless swept; BYOT τ = 3, 0.3 / 0.7 / 0.03; BAN τ = 1; function
  matching τ = 1, mixup Beta(1, 1); CRD weight 0.8, ν = 0.1; label smoothing 0.1); none were tuned
  on the test split.

``python examples/methods_study_mnist1d.py`` runs the study (about 11 minutes on 2 cores, two worker processes) and writes
docs/methods_mnist1d_table.md, docs/methods_mnist1d_*.png and one JSON line per (method, seed) to
bench/results/methods_mnist1d.jsonl; ``--quick`` is a smoke run of a few seconds per method (writes to
a temporary directory unless ``--out`` is given, no JSON lines unless ``--results`` is given).
Needs mnist1d (and scipy), tqdm and matplotlib.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime as _dt
import importlib
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import methods_study as base  # noqa: E402  (fit, accuracy, n_params, tqdm, fastkd on sys.path)
import fastkd  # noqa: E402
from fastkd import methods as M  # noqa: E402

fit, accuracy, n_params, tqdm = base.fit, base.accuracy, base.n_params, base.tqdm
LENGTH = 40


# ------------------------------------------------------------------------------------------------ data
def load_mnist1d(seed: int = 42, n_train: int = 4000, n_test: int = 1000):
    """MNIST-1D generated from the package's templates; returns x, y, x_test, y_test as tensors.

    ``make_dataset`` reseeds numpy's and Python's global generators; their states are restored after.
    """
    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    total = n_train + n_test
    if total % 10:
        raise ValueError("train + test must be a multiple of 10 (the generator makes equal classes)")
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = total, n_train / total, seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def cvt(a):
        return torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 1, LENGTH)

    return cvt(d["x"]), torch.tensor(d["y"], dtype=torch.long), cvt(d["x_test"]), torch.tensor(d["y_test"],
                                                                                              dtype=torch.long)


# ---------------------------------------------------------------------------------------------- models
class ConvNet(nn.Module):
    """1×k convolutions ``block1 .. blockK`` (conv, optional batch norm, ReLU), then a flatten or a
    global average pool and ``fc``. Block names are what the methods hook into."""

    def __init__(self, widths, strides, kernel: int = 5, bn: bool = True, pool: str = "flatten",
                 dropout: float = 0.0):
        super().__init__()
        c, length = 1, LENGTH
        for k, (w, s) in enumerate(zip(widths, strides), 1):
            layers = [nn.Conv2d(c, w, (1, kernel), stride=(1, s), padding=(0, kernel // 2))]
            layers += [nn.BatchNorm2d(w)] if bn else []
            setattr(self, f"block{k}", nn.Sequential(*layers, nn.ReLU()))
            c, length = w, (length + 2 * (kernel // 2) - kernel) // s + 1
        self.n_blocks = len(widths)
        if pool == "flatten":
            self.pool, feat = nn.Sequential(nn.Flatten(), nn.Dropout(dropout)), c * length
        else:
            self.pool, feat = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout)), c
        self.embed_dim = feat
        self.fc = nn.Linear(feat, 10)

    def forward(self, x):
        for k in range(1, self.n_blocks + 1):
            x = getattr(self, f"block{k}")(x)
        return self.fc(self.pool(x))


class MLP(nn.Module):
    """The MNIST-1D paper's MLP: 40 → 100 → 100 → 10, ReLU."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.hidden1 = nn.Sequential(nn.Flatten(), nn.Linear(LENGTH, hidden), nn.ReLU())
        self.hidden2 = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.embed_dim = hidden
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc(self.hidden2(self.hidden1(x)))


TEACHER = dict(widths=(32, 32, 32), strides=(1, 2, 2), dropout=0.1)
SMALL_CNN = dict(widths=(8, 8, 8), strides=(1, 2, 2))
DEEP_THIN = dict(widths=(6,) * 10, strides=(1,) * 5 + (2,) + (1,) * 4, bn=False)
HINT_LAYERS = ("block5", "block1")  # deep-thin student's middle (length 40) ← teacher's block1 (length 40)


def make_teacher(seed: int) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(**TEACHER)


def make_mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def make_small_cnn(seed: int) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(**SMALL_CNN)


def make_deep_thin(seed: int) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(**DEEP_THIN)


STUDENTS = {"mlp": make_mlp, "cnn": make_small_cnn, "deep_thin": make_deep_thin}
STUDENT_LABELS = {"mlp": "MLP", "cnn": "small CNN", "deep_thin": "deep-thin CNN"}


def shift_augment(x: torch.Tensor, max_shift: int = 3) -> torch.Tensor:
    """Random translation of the whole batch by up to ``max_shift`` samples, zero fill (teachers only)."""
    k = int(torch.randint(-max_shift, max_shift + 1, (1,)))
    if k > 0:
        return F.pad(x[..., :-k], (k, 0))
    return F.pad(x[..., -k:], (0, -k)) if k < 0 else x


def train_teacher(k: int, x, y, steps: int, batch: int, threads: int = 1) -> dict:
    """Teacher k (seed 100 + k), trained on the labelled signals with random shifts; its state dict."""
    torch.set_num_threads(threads)
    torch.manual_seed(100 + k)
    t = make_teacher(100 + k)
    fit(t.parameters(), lambda idx: F.cross_entropy(t(shift_augment(x[idx])), y[idx]), len(y), steps, batch,
        seed=100 + k, modules=[t])
    return t.state_dict()


def load_teacher(state: dict) -> ConvNet:
    t = make_teacher(0)
    t.load_state_dict(state)
    return M.freeze(t)


# --------------------------------------------------------------------------------------------- methods
KD = dict(soft_weight=0.9, hard_weight=0.1)  # Hinton et al.'s usual mix; τ per method
TAUS = (1.0, 2.0, 4.0, 8.0)
GENERATIONS = 5  # born-again / repeated self-distillation: gen 0 (labels) + 4 distilled generations


class Ctx:
    """What one (student, seed) group of runs gets: data, teachers, budgets, the seed."""

    def __init__(self, x, y, x_test, y_test, teachers, steps, long, batch, seed):
        self.x, self.y, self.x_test, self.y_test = x, y, x_test, y_test
        self.teachers, self.steps, self.long, self.batch, self.seed = teachers, steps, long, batch, seed
        with torch.no_grad():
            self.t_logits = teachers[0](x)
            self.t_all = torch.stack([t(x) for t in teachers])
        self.cache: Dict[str, nn.Module] = {}

    def evaluate(self, model) -> dict:
        return {"acc": accuracy(model, self.x_test, self.y_test), "train_acc": accuracy(model, self.x, self.y)}

    def train(self, model, loss_fn: Callable, steps=None, params=None, modules=None, seed_offset: int = 0):
        fit(list(model.parameters()) if params is None else params, loss_fn, len(self.y), steps or self.steps,
            self.batch, self.seed + seed_offset, modules=modules or [model])
        return model


def ce_student(c: Ctx, make, steps=None):
    s = make(c.seed)
    return c.train(s, lambda i: F.cross_entropy(s(c.x[i]), c.y[i]), steps)


def m_scratch(c, make):
    s = ce_student(c, make)
    c.cache["scratch"] = s
    return c.evaluate(s)


def m_scratch_long(c, make):
    return c.evaluate(ce_student(c, make, c.long * c.steps))


def m_label_smoothing(c, make):
    s = make(c.seed)
    c.train(s, lambda i: M.label_smoothing_loss(s(c.x[i]), c.y[i], smoothing=0.1))
    return c.evaluate(s)


def kd_student(c, make, tau, steps=None):
    s = make(c.seed)
    return c.train(s, lambda i: fastkd.kd_loss(s(c.x[i]), c.t_logits[i], c.y[i], temperature=tau, **KD), steps)


def m_kd(tau):
    def run(c, make):
        return c.evaluate(kd_student(c, make, tau))
    run.__doc__ = f"Hinton KD, τ = {tau:g}"
    return run


def m_kd_long(c, make):
    return c.evaluate(kd_student(c, make, 4.0, c.long * c.steps))


def m_kd_ensemble(c, make):
    s = make(c.seed)
    c.train(s, lambda i: M.ensemble_kd_loss(s(c.x[i]), c.t_all[:, i], c.y[i], temperature=4.0, **KD))
    return c.evaluate(s)


def _mix(x):
    lam = torch.distributions.Beta(1.0, 1.0).sample((len(x),))
    perm = torch.randperm(len(x))
    return lam, perm, lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm]


def m_mixup_long(c, make):
    """Control: labels only, mixup inputs and mixed labels, the long schedule."""
    s = make(c.seed)

    def step(i):
        lam, perm, xm = _mix(c.x[i])
        logp = F.log_softmax(s(xm), -1)
        y = c.y[i]
        return -(lam * logp.gather(1, y[:, None])[:, 0] + (1 - lam) * logp.gather(1, y[perm][:, None])[:, 0]).mean()

    c.train(s, step, c.long * c.steps)
    return c.evaluate(s)


def m_function_matching(long: bool):
    def run(c, make):
        s, t = make(c.seed), c.teachers[0]
        c.train(s, lambda i: M.function_matching_loss(s, t, c.x[i], augment=M.mixup), c.long * c.steps if long
                else c.steps)
        return c.evaluate(s)
    return run


def m_fixed_teacher_long(c, make):
    """Ablation of function matching: the same mixup inputs for the student, but the teacher's outputs
    are precomputed on the clean signals and mixed with the same λ (an inconsistent teacher)."""
    s = make(c.seed)
    p_t = c.t_logits.softmax(-1)

    def step(i):
        lam, perm, xm = _mix(c.x[i])
        p = lam[:, None] * p_t[i] + (1 - lam[:, None]) * p_t[i][perm]
        return fastkd.kd_loss(s(xm), p.clamp_min(1e-12).log(), temperature=1.0)

    c.train(s, step, c.long * c.steps)
    return c.evaluate(s)


def m_contrastive(c, make):
    s, t = make(c.seed), c.teachers[0]
    with torch.no_grad(), M.FeatureCapture(t, "fc", capture="input") as tcap:
        t(c.x)
        t_emb = tcap["fc"]
    crd = M.ContrastiveDistiller(s.embed_dim, t.embed_dim, embed_dim=64, queue_size=512, temperature=0.1)
    with M.FeatureCapture(s, "fc", capture="input") as scap:
        def step(i):
            z = s(c.x[i])
            return F.cross_entropy(z, c.y[i]) + 0.8 * crd(scap["fc"], t_emb[i], index=i)
        c.train(s, step, params=list(s.parameters()) + list(crd.parameters()), modules=[s, crd])
    return c.evaluate(s)


def m_cosine(c, make):
    s, t = make(c.seed), c.teachers[0]
    with torch.no_grad(), M.FeatureCapture(t, "fc", capture="input") as tcap:
        t(c.x)
        t_emb = tcap["fc"]
    reg = M.HintRegressor(s.embed_dim, t.embed_dim, kind="linear")
    with M.FeatureCapture(s, "fc", capture="input") as scap:
        def step(i):
            z = s(c.x[i])
            return (fastkd.kd_loss(z, c.t_logits[i], c.y[i], temperature=4.0, **KD)
                    + M.cosine_embedding_loss(scap["fc"], t_emb[i], regressor=reg))
        c.train(s, step, params=list(s.parameters()) + list(reg.parameters()), modules=[s, reg])
    return c.evaluate(s)


def m_fitnets(c, make):
    """Stage 1 (a quarter of the budget, extra): the student up to its middle block + a 1×1 regressor
    learn the teacher's first block. Stage 2 (the full budget): the whole student with KD (τ = 4)."""
    s, t = make(c.seed), c.teachers[0]
    s_layer, t_layer = HINT_LAYERS
    with torch.no_grad(), M.FeatureCapture(t, t_layer) as tcap:
        t(c.x)
        hints = tcap[t_layer]
    reg = M.HintRegressor(getattr(s, s_layer)[0].out_channels, hints.shape[1], kind="conv")
    guided = M.guided_parameters(s, s_layer, c.x[:2])
    with M.FeatureCapture(s, s_layer) as scap:
        def hint_step(i):
            s(c.x[i])
            return M.hint_loss(scap[s_layer], hints[i], reg)
        c.train(s, hint_step, c.steps // 4, params=guided + list(reg.parameters()), modules=[s, reg])
    c.train(s, lambda i: fastkd.kd_loss(s(c.x[i]), c.t_logits[i], c.y[i], temperature=4.0, **KD), seed_offset=1)
    return c.evaluate(s)


def _exits(c, make, loss_fn):
    s = make(c.seed)
    heads = {"block1": M.AuxiliaryHead(s.block1[0].out_channels, 10, embed_dim=s.embed_dim, kind="attention",
                                     hidden=16),
             "block2": M.AuxiliaryHead(s.block2[0].out_channels, 10, embed_dim=s.embed_dim, kind="attention",
                                       hidden=16)}
    sd = M.SelfDistillation(s, heads, feature_layer="fc")
    c.train(sd, lambda i: loss_fn(sd(c.x[i]), c.y[i]))
    sd.eval()
    with torch.no_grad():
        exits = sd(c.x_test).logits
    accs = [(z.argmax(-1) == c.y_test).float().mean().item() for z in exits]
    return {"acc": accs[-1], "exit1_acc": accs[0], "exit2_acc": accs[1], "train_acc": accuracy(s, c.x, c.y)}


def m_self_distillation(c, make):
    return _exits(c, make, M.self_distillation_loss)


def m_exits_ce(c, make):
    """Ablation of BYOT: the same network and heads, every exit trained on the labels only."""
    return _exits(c, make, lambda out, y: M.self_distillation_loss(out, y, soft_weight=0.0, hard_weight=1.0,
                                                                   hint_weight=0.0))


def m_born_again(c, make):
    """Generation 0 is the scratch student of this seed; generations 1.. learn from the previous one
    only (BAN, τ = 1, no labels), each from a fresh initialisation."""
    gens = [c.cache["scratch"]]
    out = {"gen0_acc": c.evaluate(gens[0])["acc"], "gen0_train_acc": c.evaluate(gens[0])["train_acc"]}
    for k in range(1, GENERATIONS):
        teacher = M.freeze(copy.deepcopy(gens[-1]))
        with torch.no_grad():
            t_logits = teacher(c.x)
        s = make(c.seed + 17 * k)
        c.train(s, lambda i: M.born_again_loss(s(c.x[i]), t_logits[i]), seed_offset=k)
        gens.append(copy.deepcopy(s).eval())
        ev = c.evaluate(s)
        out[f"gen{k}_acc"], out[f"gen{k}_train_acc"] = ev["acc"], ev["train_acc"]
        if k >= 2:
            out[f"ens{k}_acc"] = accuracy(M.BornAgainEnsemble(gens), c.x_test, c.y_test)
    out["acc"], out["train_acc"] = out["gen1_acc"], out["gen1_train_acc"]
    return out


# (key, student, label, function, uses the external teacher); scratch of each student first
METHODS = [
    ("scratch", "mlp", "from scratch (CE)", m_scratch, False),
    ("label_smoothing", "mlp", "label smoothing ε = 0.1", m_label_smoothing, False),
    *[(f"kd_t{int(t)}", "mlp", f"KD, τ = {t:g}", m_kd(t), True) for t in TAUS],
    ("kd_ensemble", "mlp", "KD, ensemble of 3 teachers, τ = 4", m_kd_ensemble, True),
    ("contrastive", "mlp", "CE + 0.8·InfoNCE (CRD)", m_contrastive, True),
    ("cosine", "mlp", "KD τ = 4 + cosine on embeddings (DistilBERT)", m_cosine, True),
    ("born_again", "mlp", "born-again generation 1 (BAN)", m_born_again, False),
    ("function_matching", "mlp", "function matching, 1× schedule", m_function_matching(False), True),
    ("mixup_long", "mlp", "mixup on labels, long schedule (control)", m_mixup_long, False),
    ("kd_long", "mlp", "KD τ = 4, long schedule (control)", m_kd_long, True),
    ("fixed_teacher_long", "mlp", "mixup + fixed teacher, long schedule (ablation)", m_fixed_teacher_long, True),
    ("function_matching_long", "mlp", "function matching, long schedule", m_function_matching(True), True),
    ("scratch", "cnn", "from scratch (CE)", m_scratch, False),
    ("label_smoothing", "cnn", "label smoothing ε = 0.1", m_label_smoothing, False),
    *[(f"kd_t{int(t)}", "cnn", f"KD, τ = {t:g}", m_kd(t), True) for t in TAUS],
    ("born_again", "cnn", "born-again generation 1 (BAN)", m_born_again, False),
    ("exits_ce", "cnn", "exits on labels only (no self-distillation)", m_exits_ce, False),
    ("self_distillation", "cnn", "self-distillation (BYOT)", m_self_distillation, False),
    ("scratch", "deep_thin", "from scratch (CE)", m_scratch, False),
    ("kd_t4", "deep_thin", "KD, τ = 4", m_kd(4.0), True),
    ("fitnets", "deep_thin", "FitNets: hints, then KD τ = 4", m_fitnets, True),
]
QUICK_METHODS = ["mlp/kd_t4", "mlp/function_matching", "mlp/fixed_teacher_long", "cnn/born_again",
                 "cnn/self_distillation", "cnn/exits_ce", "deep_thin/fitnets"]


FUNCS = {(st, key): fn for key, st, _, fn, _ in METHODS}


def run_group(seed, st, keys, data, teacher_states, steps, long, batch, threads=1):
    """The runs of one (seed, student) pair, scratch first (born-again starts from it); in a worker."""
    torch.set_num_threads(threads)
    ctx = Ctx(*data, [load_teacher(s) for s in teacher_states], steps, long, batch, seed)
    out = []
    for key in keys:
        ts = time.time()
        torch.manual_seed(10_000 + seed)
        out.append((key, FUNCS[(st, key)](ctx, STUDENTS[st]), time.time() - ts))
    return seed, st, out


class _inline:
    """``submit`` without a pool: runs at once; ``result()`` returns the value."""

    def __init__(self, fn, *a):
        self.value = fn(*a)

    def result(self):
        return self.value


# -------------------------------------------------------------------------------------------- statistics
_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13,
         20: 2.09, 30: 2.04}


def t975(df: int) -> float:
    """Two-sided 95 % quantile of Student's t (table lookup, the next smaller tabulated df)."""
    if df < 1:
        return float("inf")
    return _T975[max(k for k in _T975 if k <= df)]


def mean_se(v):
    v = list(v)
    return statistics.mean(v), (statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0)


def paired(a, b):
    """Per-seed differences a − b in percentage points: mean, s.e., wins, verdict at 95 % (paired t)."""
    d = [100 * (x - y) for x, y in zip(a, b)]
    m, se = mean_se(d)
    half = t975(len(d) - 1) * se
    verdict = "better" if m - half > 0 else "worse" if m + half < 0 else "n.s."
    return {"mean": m, "se": se, "wins": sum(x > 0 for x in d), "n": len(d), "verdict": verdict, "diffs": d}


def fmt_d(p):
    return f"{p['mean']:+.1f} ± {p['se']:.1f}"


# -------------------------------------------------------------------------------------------- reporting
def _col(results, student, key, field="acc"):
    return [r[field] for r in results[(student, key)]]


def claims(results) -> List[tuple]:
    """(claim, comparison, figure, verdict) rows; a comparison's figure is the mean ± s.e. of the paired
    per-seed difference (pp) and the seeds it wins; the verdict is a paired t-test at 95 %."""
    rows = []
    have = set(results)

    def cmp(claim, desc, sa, ka, sb, kb, fa="acc", fb="acc", want="better", ok_if_ns=False):
        if (sa, ka) not in have or (sb, kb) not in have:
            return None
        p = paired(_col(results, sa, ka, fa), _col(results, sb, kb, fb))
        if p["verdict"] == want:
            verdict = "confirmed"
        elif p["verdict"] == "n.s.":
            verdict = "confirmed (matches; no significant difference)" if ok_if_ns else "not shown (n.s.)"
        else:
            verdict = "refuted"
        rows.append((claim, desc, f"{fmt_d(p)} pp, {p['wins']}/{p['n']}", verdict))
        return p

    for st in ("mlp", "cnn", "deep_thin"):
        cmp("KD beats training on labels", f"{STUDENT_LABELS[st]}: KD τ=4 − scratch", st, "kd_t4", st, "scratch")
    for st in ("mlp", "cnn"):
        taus = [k for k in (f"kd_t{int(t)}" for t in TAUS) if (st, k) in have]
        if len(taus) > 1:
            means = {k: statistics.mean(_col(results, st, k)) for k in taus}
            hi, lo = max(means, key=means.get), min(means, key=means.get)
            cmp("temperature matters", f"{STUDENT_LABELS[st]}: best τ ({hi[4:]}) − worst τ ({lo[4:]})", st, hi, st,
                lo)
    for st in ("mlp", "cnn"):
        if (st, "born_again") not in have:
            continue
        cmp("born-again: gen 1 matches or beats its teacher (gen 0)", f"{STUDENT_LABELS[st]}: gen 1 − gen 0", st,
            "born_again", st, "born_again", "gen1_acc", "gen0_acc", ok_if_ns=True)
        runs = results[(st, "born_again")]
        last = max(int(k[3:-4]) for k in runs[0] if k.startswith("ens"))
        best = [max(r[f"gen{k}_acc"] for k in range(last + 1)) for r in runs]
        p = paired([r[f"ens{last}_acc"] for r in runs], best)
        rows.append(("born-again: the ensemble of generations beats each",
                     f"{STUDENT_LABELS[st]}: ensemble of gens 0–{last} − best single generation of the seed",
                     f"{fmt_d(p)} pp, {p['wins']}/{p['n']}", "confirmed" if p["verdict"] == "better" else
                     ("refuted" if p["verdict"] == "worse" else "not shown (n.s.)")))
        gens = sorted(int(k[3:-4]) for k in runs[0] if k.startswith("gen") and k.endswith("_acc")
                      and "train" not in k)
        means = [statistics.mean(r[f"gen{g}_acc"] for r in runs) for g in gens]
        tr = [statistics.mean(r[f"gen{g}_train_acc"] for r in runs) for g in gens]
        peak = max(range(len(gens)), key=lambda g: means[g])
        first = paired([r["gen1_acc"] for r in runs], [r["gen0_acc"] for r in runs])
        later = paired([r[f"gen{gens[-1]}_acc"] for r in runs], [r[f"gen{gens[peak]}_acc"] for r in runs])
        helps, underfits = first["verdict"] == "better", later["verdict"] == "worse" and tr[-1] < tr[peak]
        rows.append(("repeated self-distillation first helps, then under-fits (Mobahi et al.)",
                     f"{STUDENT_LABELS[st]}, gens 0–{gens[-1]}: test "
                     f"{' → '.join(f'{100 * m:.1f}' for m in means)} %, "
                     f"train {' → '.join(f'{100 * m:.1f}' for m in tr)} %",
                     f"gen 1 − gen 0 {fmt_d(first)}; gen {gens[-1]} − gen {gens[peak]} (peak) {fmt_d(later)} pp",
                     "confirmed" if helps and underfits else "partly (helps; no decline)" if helps else
                     "partly (declines only)" if underfits else "not shown"))
    cmp("BYOT: the shallow exits improve", "small CNN: exit 1, BYOT − labels-only exits", "cnn", "self_distillation",
        "cnn", "exits_ce", "exit1_acc", "exit1_acc")
    cmp("BYOT: the shallow exits improve", "small CNN: exit 2, BYOT − labels-only exits", "cnn", "self_distillation",
        "cnn", "exits_ce", "exit2_acc", "exit2_acc")
    cmp("BYOT: the deepest exit improves", "small CNN: deepest exit, BYOT − scratch", "cnn", "self_distillation",
        "cnn", "scratch")
    cmp("FitNets hints help a deep-thin student train", "deep-thin: FitNets − KD τ=4 (the hints alone), train acc",
        "deep_thin", "fitnets", "deep_thin", "kd_t4", "train_acc", "train_acc")
    cmp("FitNets hints help a deep-thin student train", "deep-thin: FitNets − KD τ=4 (the hints alone), test acc",
        "deep_thin", "fitnets", "deep_thin", "kd_t4")
    cmp("FitNets hints help a deep-thin student train", "deep-thin: FitNets − scratch, test acc", "deep_thin",
        "fitnets", "deep_thin", "scratch")
    cmp("function matching beats plain KD at the long schedule", "MLP: function matching − KD τ=4, both long",
        "mlp", "function_matching_long", "mlp", "kd_long")
    cmp("consistent teacher input beats a fixed one", "MLP: function matching − fixed teacher, both long", "mlp",
        "function_matching_long", "mlp", "fixed_teacher_long")
    cmp("function matching beats labels (long)", "MLP: function matching (long) − scratch (1×)", "mlp",
        "function_matching_long", "mlp", "scratch")
    cmp("function matching beats labels (same budget)", "MLP: function matching (1×) − scratch (1×)", "mlp",
        "function_matching", "mlp", "scratch")
    cmp("function matching beats mixup on labels (long)", "MLP: function matching − mixup on labels, both long",
        "mlp", "function_matching_long", "mlp", "mixup_long")
    for st in ("mlp", "cnn"):
        cmp("label smoothing regularises", f"{STUDENT_LABELS[st]}: label smoothing − scratch", st, "label_smoothing",
            st, "scratch")
        cmp("KD regularises more than label smoothing", f"{STUDENT_LABELS[st]}: KD τ=4 − label smoothing", st,
            "kd_t4", st, "label_smoothing")
    return rows


def write_report(results, timings, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    n = meta["seeds"]
    lines = [f"MNIST-1D ({meta['train']:,} training / {meta['test']:,} test signals, data seed {meta['data_seed']}), "
             f"{n} seeds; test accuracy mean ± s.e.; Δ is the mean ± s.e. of the per-seed paired difference to "
             "the same student from scratch (same initialisation and minibatch order); wins counts seeds with Δ > 0.",
             "", "| student | method | teacher | test acc (%) | train acc (%) | Δ vs scratch (pp) | wins | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, st, label, _, uses_teacher in METHODS:
        if (st, key) not in results:
            continue
        runs = results[(st, key)]
        m, se = mean_se(_col(results, st, key))
        tm, tse = mean_se(_col(results, st, key, "train_acc"))
        if key == "scratch":
            delta, wins = "—", "—"
        else:
            p = paired(_col(results, st, key), _col(results, st, "scratch"))
            delta, wins = fmt_d(p), f"{p['wins']}/{p['n']}"
        lines.append(f"| {STUDENT_LABELS[st]} | {label} | {'yes' if uses_teacher else 'no'} | {100 * m:.1f} ± "
                     f"{100 * se:.1f} | {100 * tm:.1f} ± {100 * tse:.1f} | {delta} | {wins} | "
                     f"{timings[(st, key)]:.0f} |")
        extra = []
        if key == "born_again":
            gens = sorted(int(k[3:-4]) for k in runs[0] if k.startswith("gen") and "train" not in k)
            extra += [(f"born-again generation {g}", f"gen{g}_acc") for g in gens[2:]]
            extra += [(f"born-again, ensemble of gens 0–{k[3:-4]} ({int(k[3:-4]) + 1}× inference)", k)
                      for k in sorted(runs[0]) if k.startswith("ens")]
        if key in ("self_distillation", "exits_ce"):
            extra += [(f"{label}: exit 1 (after block 1)", "exit1_acc"), (f"{label}: exit 2 (after block 2)",
                                                                           "exit2_acc")]
        for lab, field in extra:
            m, se = mean_se(_col(results, st, key, field))
            p = paired(_col(results, st, key, field), _col(results, st, "scratch"))
            lines.append(f"| {STUDENT_LABELS[st]} | {lab} | no | {100 * m:.1f} ± {100 * se:.1f} | | {fmt_d(p)} | "
                         f"{p['wins']}/{p['n']} | (same run) |")
    t_accs = ", ".join(f"{100 * a:.1f}" for a in meta["teacher_acc"])
    lines += ["", f"Teachers: CNN {TEACHER['widths']}, {meta['teacher_params']:,} parameters, "
              f"{meta['teacher_steps']} steps of batch 100 with random shifts of ±3 samples; test accuracy "
              f"{t_accs} %. Students: MLP {meta['params']['mlp']:,}, small CNN {meta['params']['cnn']:,}, deep-thin CNN "
              f"{meta['params']['deep_thin']:,} parameters; AdamW, cosine decay, batch {meta['batch']}; "
              f"{meta['steps']['mlp']} / {meta['steps']['cnn']} / {meta['steps']['deep_thin']} steps "
              f"(MLP / small CNN / deep-thin); long schedule {meta['long']}×; FitNets adds a quarter for its hint "
              "stage; each born-again generation has the full budget.",
              f"Measured on {meta['device']}, torch {meta['torch']}, {meta['jobs']} worker process(es) of "
              f"{meta['threads']} thread(s), {meta['date']}; "
              f"times are the sum over the seeds of a row of each run's wall-clock; the whole study took "
              f"{meta['total_s']:.0f} s wall-clock.",
              "", "| claim | comparison | paired Δ (pp), wins | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in claims(results)]
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "methods_mnist1d_table.md"), "w") as f:
        f.write(table + "\n")
    _plots(results, meta, out_dir)
    return table


def _plots(results, meta, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    rows = []
    for key, st, label, _, uses_teacher in METHODS:
        if key != "scratch" and (st, key) in results:
            p = paired(_col(results, st, key), _col(results, st, "scratch"))
            rows.append((f"{STUDENT_LABELS[st]}: {label}", p["mean"], t975(p["n"] - 1) * p["se"], uses_teacher))
    fig, ax = plt.subplots(figsize=(8, 0.34 * len(rows) + 1.3))
    ys = range(len(rows))[::-1]
    ax.barh(list(ys), [r[1] for r in rows], xerr=[r[2] for r in rows], capsize=3,
            color=["#c44e52" if r[3] else "#4c72b0" for r in rows])
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r[0] for r in rows], fontsize=7.5)
    ax.axvline(0, color="k", lw=1)
    ax.set_xlabel(f"paired Δ test accuracy vs the same student from scratch (pp); bars: 95 % t-interval, "
                  f"{meta['seeds']} seeds", fontsize=8)
    ax.set_title("MNIST-1D; red: uses the CNN teacher", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "methods_mnist1d_delta.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for st, color in (("mlp", "#4c72b0"), ("cnn", "#dd8452")):
        pts = [(t, mean_se(_col(results, st, f"kd_t{int(t)}"))) for t in TAUS if (st, f"kd_t{int(t)}") in results]
        if pts:
            axes[0].errorbar([p[0] for p in pts], [100 * p[1][0] for p in pts], [100 * p[1][1] for p in pts],
                             marker="o", color=color, capsize=3, label=f"{STUDENT_LABELS[st]}, KD")
            axes[0].axhline(100 * statistics.mean(_col(results, st, "scratch")), color=color, ls="--", lw=1,
                            label=f"{STUDENT_LABELS[st]}, scratch")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("temperature τ")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("Hinton KD: temperature sweep", fontsize=9)
    for st, color in (("mlp", "#4c72b0"), ("cnn", "#dd8452")):
        if (st, "born_again") not in results:
            continue
        runs = results[(st, "born_again")]
        gens = sorted(int(k[3:-4]) for k in runs[0] if k.startswith("gen") and "train" not in k)
        for field, lab, mk, ls in (("acc", "test", "o", "-"), ("train_acc", "train", "s", ":")):
            ms = [mean_se([r[f"gen{g}_{field}"] for r in runs]) for g in gens]
            axes[1].errorbar(gens, [100 * m for m, _ in ms], [100 * e for _, e in ms], marker=mk, ls=ls, capsize=3,
                             color=color, label=f"{STUDENT_LABELS[st]}, generation k, {lab}")
        ens = sorted((int(k[3:-4]), k) for k in runs[0] if k.startswith("ens"))
        ms = [mean_se([r[k] for r in runs]) for _, k in ens]
        axes[1].errorbar([g for g, _ in ens], [100 * m for m, _ in ms], [100 * e for _, e in ms], marker="^",
                         ls="--", capsize=3, color=color, label=f"{STUDENT_LABELS[st]}, ensemble of gens 0..k")
        axes[1].set_xticks(gens)
    axes[1].set_xlabel("generation (0: labels; k: taught by k − 1 only)")
    axes[1].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=6)
    axes[1].set_title("born-again / repeated self-distillation", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "methods_mnist1d_tau_generations.png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main
DEFAULT_STEPS = {"mlp": 800, "cnn": 500, "deep_thin": 500}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 2,000 signals, a few dozen steps, "
                                                         "a subset of the methods")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--data-seed", type=int, default=42, help="seed of the MNIST-1D generator (the package's: 42)")
    ap.add_argument("--train", type=int, default=4000, help="training signals generated")
    ap.add_argument("--test", type=int, default=1000, help="test signals generated")
    ap.add_argument("--steps", type=float, default=1.0, help="multiplier of the per-student step counts "
                                                              f"{DEFAULT_STEPS}")
    ap.add_argument("--long", type=int, default=3, help="function matching's long schedule, × the steps")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (runs in parallel; 1: in this process)")
    ap.add_argument("--methods", default="all", help="comma-separated student/key pairs (e.g. mlp/kd_t4); the "
                                                     "scratch run of each student used is always included")
    ap.add_argument("--out", default=None, help="directory for the table and plots (default docs/, or a temp dir "
                                                "with --quick)")
    ap.add_argument("--results", default=None, help="JSON-lines file to append to (default "
                                                    "bench/results/methods_mnist1d.jsonl; none with --quick)")
    args = ap.parse_args(argv)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    steps = {k: max(1, round(v * args.steps)) for k, v in DEFAULT_STEPS.items()}
    if args.quick:
        args.seeds = min(args.seeds, 2)
        args.train, args.test, args.teacher_steps = min(args.train, 1500), min(args.test, 500), 150
        steps = {k: 30 for k in steps}
        if args.methods == "all":
            args.methods = ",".join(QUICK_METHODS)
    out_dir = args.out or (tempfile.mkdtemp(prefix="fastkd_mnist1d_") if args.quick else os.path.join(root, "docs"))
    results_path = args.results or (None if args.quick else os.path.join(root, "bench", "results",
                                                                          "methods_mnist1d.jsonl"))
    torch.set_num_threads(args.threads)
    known = {f"{st}/{key}" for key, st, *_ in METHODS}
    wanted = known if args.methods == "all" else set(args.methods.split(","))
    for w in wanted - known:
        ap.error(f"unknown method {w!r}; choose from {', '.join(sorted(known))}")
    wanted |= {f"{w.split('/')[0]}/scratch" for w in wanted}
    plan = [(key, st, fn) for key, st, _, fn, _ in METHODS if f"{st}/{key}" in wanted]

    t_start = time.time()
    x, y, x_test, y_test = load_mnist1d(args.data_seed, args.train, args.test)
    # Work is spread over --jobs processes (one torch thread each by default); every run seeds its own
    # initialisation, minibatch order and mixup draws, so the numbers do not depend on the split.
    worker = importlib.import_module("methods_study_mnist1d")  # importable by name in a spawned process
    pool = (concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
            if args.jobs > 1 else None)
    submit = pool.submit if pool else _inline
    try:
        states = [f.result() for f in [submit(worker.train_teacher, k, x, y, args.teacher_steps, 100, args.threads)
                                       for k in range(3)]]
        teachers = [load_teacher(st) for st in states]
        teacher_time = time.time() - t_start
        results = {(st, key): {} for key, st, _ in plan}
        timings = {(st, key): 0.0 for key, st, _ in plan}
        groups = [(seed, st, [key for key, s2, _ in plan if s2 == st]) for st in STUDENTS for seed in range(args.seeds)]
        groups = [g for g in groups if g[2]]
        bar = tqdm(total=len(plan) * args.seeds, desc="MNIST-1D methods × seeds", unit="run")
        futures = [submit(worker.run_group, seed, st, keys, (x, y, x_test, y_test), states, steps[st], args.long,
                          args.batch, args.threads) for seed, st, keys in groups]
        for fut in concurrent.futures.as_completed(futures) if pool else futures:
            seed, st, out = fut.result()
            for key, r, secs in out:
                results[(st, key)][seed] = r
                timings[(st, key)] += secs
            bar.set_postfix_str(f"seed {seed}: {st} done")
            bar.update(len(out))
        bar.close()
    finally:
        if pool:
            pool.shutdown()
    results = {k: [v[s] for s in sorted(v)] for k, v in results.items()}
    meta = dict(seeds=args.seeds, data_seed=args.data_seed, train=len(y), test=len(y_test), steps=steps,
                long=args.long, batch=args.batch, teacher_steps=args.teacher_steps,
                teacher_acc=[accuracy(t, x_test, y_test) for t in teachers], teacher_params=n_params(teachers[0]),
                params={k: n_params(f(0)) for k, f in STUDENTS.items()},
                device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                torch=torch.__version__, threads=args.threads, jobs=args.jobs, teacher_time_s=teacher_time,
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                total_s=time.time() - t_start)
    table = write_report(results, timings, meta, out_dir)
    print(table)
    print(f"\ndata and teachers in {teacher_time:.0f}s; total {meta['total_s']:.0f}s; wrote methods_mnist1d_table.md, "
          f"methods_mnist1d_delta.png and methods_mnist1d_tau_generations.png to {out_dir}")
    if results_path:
        os.makedirs(os.path.dirname(results_path) or ".", exist_ok=True)
        with open(results_path, "a") as f:
            for (st, key), runs in results.items():
                for seed, r in enumerate(runs):
                    f.write(json.dumps({"bench": "methods_mnist1d", "student": st, "method": key, "seed": seed, **r,
                                        "time_s": timings[(st, key)] / len(runs), **meta,
                                        "fastkd": fastkd.__version__, "python": platform.python_version()}) + "\n")
    return results, meta


if __name__ == "__main__":
    main()
