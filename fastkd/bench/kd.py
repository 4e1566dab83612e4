"""Benchmark of the fused kd loss (``fastkd.kd_loss``) against the hand-written PyTorch idiom.

Providers × modes × sizes, measured in one of two ways:

* fresh process (the default): each measurement runs in its own subprocess, so that peak memory is
  the process's own high-water mark (CPU: ru_maxrss; GPU: torch.cuda.max_memory_allocated), not
  polluted by earlier runs. Each run of an unfused provider then also pays the first touch of its
  temporaries (page faults on gigabytes of fresh memory). Reports median ms, extra peak memory over
  the inputs, and achieved GB/s over the minimal traffic — read z and t once, write ∂z once
  (forward-only: the two reads) — with its fraction of the device's copy bandwidth.
* ``--in-process``: the way a training loop calls the loss. The inputs are made once, every
  provider is warmed up, then the providers run in turn (the order rotating each round) for
  ``--reps`` rounds (at least 9) in one process; reports the minimum and the median, and two
  floors beside them: the bandwidth floor (the minimal traffic at the measured copy bandwidth) and
  the exp floor (two exponentials per logit, one per softmax, at the measured throughput of the
  fused kernel's own exp on CPU, of ``torch.exp`` on a GPU). No peak memory (one process cannot reset it).

    fastkd bench kd                                        # CPU: float32, N=2048, V=32000
    fastkd bench kd --in-process --reps 15                 # the same, as a training loop sees it
    fastkd bench kd --device cuda --dtype bfloat16 --n 4096 16384 --v 32000 128256 256000
    fastkd bench kd --n 512 --v 8192 32000 128256 --out kd.jsonl --plot kd.png
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

from . import common

MODULE = "fastkd.bench.kd"  # the measuring subprocesses run python -m MODULE
SUMMARY = "fused kd loss vs the PyTorch idiom, torch.compile and liger (ms, peak memory, GB/s)"
PROVIDERS = ("torch_eager", "torch_compile", "fastkd_cpu", "fastkd_cuda", "fastkd_triton", "fastkd_torch",
             "liger")
DEFAULT_PROVIDERS = {"cpu": ["torch_eager", "torch_compile", "fastkd_cpu"],
                     "cuda": ["torch_eager", "torch_compile", "liger", "fastkd_triton", "fastkd_cuda"]}


def add_arguments(ap: argparse.ArgumentParser, default_out=None) -> None:
    from .._settings import DIVERGENCES

    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS, metavar="PROVIDER",
                    help=f"default on cpu: {' '.join(DEFAULT_PROVIDERS['cpu'])}; on cuda: "
                         f"{' '.join(DEFAULT_PROVIDERS['cuda'])}; any of {', '.join(PROVIDERS)}")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=("fwd", "fwd+bwd"))
    ap.add_argument("--n", nargs="+", type=int, default=[2048], help="rows (tokens)")
    ap.add_argument("--v", nargs="+", type=int, default=[32000], help="vocabulary sizes")
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--divergence", default="forward_kl", choices=DIVERGENCES)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--soft-weight", type=float, default=0.5)
    ap.add_argument("--hard-weight", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=0.5, help="β of the JSD")
    ap.add_argument("--skew", type=float, default=0.1, help="α of skew KL")
    ap.add_argument("--reps", type=int, default=10, help="runs per measurement (--in-process: rounds, >= 9)")
    ap.add_argument("--in-process", action="store_true",
                    help="providers alternated in one process on inputs made once (see above)")
    ap.add_argument("--budget-s", type=float, default=20.0, help="stop repeating after this long (>= 3 reps)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one measuring process may take")
    ap.add_argument("--copy-mib", type=int, default=256, help="buffer size of the copy-bandwidth reference")
    common.add_output_arguments(ap, default_out)
    ap.add_argument("--child", help=argparse.SUPPRESS)


def _make_fn(provider, kw):
    """A function (student, teacher, target) -> loss for the provider, or None if unavailable."""
    import torch
    import torch.nn.functional as F

    import fastkd

    T, sw, hw, div = kw["temperature"], kw["soft_weight"], kw["hard_weight"], kw["divergence"]

    def idiom(s, t, y):
        # the usual eager code: both log-softmaxes materialised, then KL and CE
        ls, lt = F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1)
        if div == "forward_kl":
            soft = F.kl_div(ls, lt, reduction="batchmean", log_target=True)
        elif div == "reverse_kl":
            soft = F.kl_div(lt, ls, reduction="batchmean", log_target=True)
        elif div == "jsd":
            b = kw["beta"]
            m = torch.logsumexp(torch.stack([ls + torch.log1p(torch.tensor(-b)), lt + torch.log(torch.tensor(b))]), 0)
            soft = b * F.kl_div(m, lt, reduction="batchmean", log_target=True) + \
                (1 - b) * F.kl_div(m, ls, reduction="batchmean", log_target=True)
        elif div == "tvd":
            soft = 0.5 * (lt.exp() - ls.exp()).abs().sum() / s.shape[0]
        else:  # skew KL: KL(a‖αa + (1−α)b)
            a, lb = (ls, lt) if div == "skew_reverse_kl" else (lt, ls)
            w = kw["skew"]
            m = torch.log(w * a.exp() + (1 - w) * lb.exp())
            soft = F.kl_div(m, a, reduction="batchmean", log_target=True)
        loss = sw * T * T * soft
        if hw:
            loss = loss + hw * F.cross_entropy(s.float(), y)
        return loss

    if provider == "torch_eager":
        return idiom
    if provider == "torch_compile":
        return torch.compile(idiom)
    if provider.startswith("fastkd_"):
        backend = provider.split("_", 1)[1]
        return lambda s, t, y: fastkd.kd_loss(s, t, y, temperature=T, soft_weight=sw, hard_weight=hw,
                                              divergence=div, beta=kw["beta"], skew=kw["skew"],
                                              backend=backend)
    if provider == "liger":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss, LigerJSD, LigerKLDIVLoss
        except Exception:
            return None
        if div == "forward_kl":
            kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
            soft_fn = lambda ls, lt: kl(ls, lt)  # noqa: E731
        elif div == "jsd":
            jsd = LigerJSD(beta=kw["beta"])
            soft_fn = lambda ls, lt: jsd(ls, lt)  # noqa: E731
        else:
            return None
        ce = LigerCrossEntropyLoss()

        def liger(s, t, y):
            ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
            loss = sw * T * T * soft_fn(ls, lt)
            return loss + hw * ce(s, y) if hw else loss

        return liger
    raise ValueError(provider)


def measure(cfg: dict) -> dict:
    """One (provider, size, mode) measurement, in this process (a fresh one: see the module doc)."""
    import torch

    device, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    n, v = cfg["n"], cfg["v"]
    fn = _make_fn(cfg["provider"], cfg["kw"])
    if fn is None:
        return {"skipped": "provider not importable or not applicable"}
    s0, t, y = _inputs(device, dtype, n, v)
    backward = cfg["mode"] == "fwd+bwd"
    s = s0.clone().requires_grad_(backward)
    step = _stepper(fn, s, t, y, backward)

    # Baseline with the inputs allocated. On CPU the high-water mark cannot be reset, so it is taken
    # before the warm-up: torch_compile's figure then includes what compilation itself used.
    common.sync(device)
    if device == "cuda":
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        step()  # warm-up (compilation, autotuning)
        common.sync(device)
    except Exception as exc:  # a provider that cannot run this configuration
        return {"skipped": f"{type(exc).__name__}: {exc}"[:300]}
    s.grad = None
    common.sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    deadline = time.perf_counter() + cfg["budget_s"]
    while len(times) < cfg["reps"] and (len(times) < 3 or time.perf_counter() < deadline):
        common.sync(device)
        t0 = time.perf_counter()
        step()
        common.sync(device)
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    ms = statistics.median(times) * 1e3
    esize = torch.empty((), dtype=dtype).element_size()
    traffic = n * v * esize * (3 if backward else 2)
    return {"ms": ms, "ms_min": min(times) * 1e3, "reps": len(times), "peak_extra_bytes": int(peak),
            "gbps": traffic / (ms * 1e-3) / 1e9, "min_traffic_bytes": traffic,
            "threads": torch.get_num_threads()}


def _inputs(device, dtype, n, v):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    s0 = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)
    t = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    return s0, t, y


def _stepper(fn, s, t, y, backward):
    import torch

    def step():
        if backward:
            s.grad = None
            fn(s, t, y).backward()
        else:
            with torch.no_grad():
                fn(s, t, y)
    return step


def exp_ns(device: str, numel: int = 1 << 16, reps: int = 200) -> tuple:
    """(nanoseconds per exponential, all threads together; whose exp). On CPU the exp the fused
    kernels use (``fastkd._C.kd_exp_ns_cpu``, over an L1-resident buffer); elsewhere ``torch.exp``
    over an L2-resident float32 buffer (256 KB), so that memory does not bind."""
    import torch

    from .. import _ext

    if device == "cpu" and _ext.C is not None:
        return _ext.C.kd_exp_ns_cpu(num_threads=torch.get_num_threads()), "fastkd's exp"

    x = -torch.rand(numel, device=device) * 20
    y = torch.empty_like(x)
    for _ in range(10):
        torch.exp(x, out=y)
    ts = []
    for _ in range(5):
        common.sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.exp(x, out=y)
        common.sync(device)
        ts.append(time.perf_counter() - t0)
    return min(ts) / (reps * numel) * 1e9, "torch.exp"


def run_in_process(args, providers, kw, meta, bw) -> list:
    """The ``--in-process`` measurements (module doc): one process, providers alternated."""
    import torch

    device = args.device
    reps = max(args.reps, 9)
    ns_exp, whose = exp_ns(device)
    meta = dict(meta, process="in_process", exp_ns=round(ns_exp, 4))
    print(f"# in one process, providers alternated over {reps} rounds; {whose}: {ns_exp:.3f} ns/element "
          f"({torch.get_num_threads()} threads together); exp floor: 2 exps per logit")
    header = (f"{'provider':<14} {'dtype':<9} {'N':>6} {'V':>7} {'mode':<8} {'min ms':>8} {'median':>8} "
              f"{'bw floor':>8} {'exp floor':>9} {'vs eager':>8} {'vs compile':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    cases = [(dt, n, v, mode) for dt in args.dtype for n in args.n for v in args.v for mode in args.modes]
    bar = common.Progress(len(cases) * len(providers) * (reps + 1), "bench kd (in process)")
    for dt, n, v, mode in cases:
        dtype = getattr(torch, dt)
        backward = mode == "fwd+bwd"
        s0, t, y = _inputs(device, dtype, n, v)
        steps, skipped = {}, {}
        for p in providers:
            fn = _make_fn(p, kw)
            s = s0.clone().requires_grad_(backward)
            if fn is None:
                skipped[p] = "provider not importable or not applicable"
                continue
            step = _stepper(fn, s, t, y, backward)
            try:
                step()  # warm-up (compilation, autotuning, first touch of the gradient)
                step()
                common.sync(device)
            except Exception as exc:
                skipped[p] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            steps[p] = step
            bar.update()
        times = {p: [] for p in steps}
        order = list(steps)
        for r in range(reps):
            for p in order[r % len(order):] + order[:r % len(order)]:
                common.sync(device)
                t0 = time.perf_counter()
                steps[p]()
                common.sync(device)
                times[p].append((time.perf_counter() - t0) * 1e3)
                bar.update()
        del steps
        esize = torch.empty((), dtype=dtype).element_size()
        traffic = n * v * esize * (3 if backward else 2)
        floors = dict(bw_floor_ms=traffic / (bw * 1e9) * 1e3, exp_floor_ms=2 * n * v * ns_exp * 1e-6)
        best = {p: min(ts) for p, ts in times.items()}
        for p in providers:
            rec = {**meta, "provider": p, "dtype": dt, "n": n, "v": v, "mode": mode}
            if p in skipped:
                rows.append(dict(rec, skipped=skipped[p]))
                bar.write(f"{p:<14} {dt:<9} {n:>6} {v:>7} {mode:<8} skipped: {skipped[p]}")
                continue
            ms = statistics.median(times[p])
            rec.update(ms=ms, ms_min=best[p], reps=reps, gbps=traffic / (ms * 1e-3) / 1e9,
                       min_traffic_bytes=traffic, threads=torch.get_num_threads(), **floors)
            ratios = {}
            for ref, name in (("torch_eager", "speedup_vs_eager"), ("torch_compile", "speedup_vs_compile")):
                if ref in best:
                    rec[name] = ratios[ref] = best[ref] / best[p]  # best runs compared
            cells = [f"{ratios[ref]:.2f}x" if ref in ratios else "-" for ref in ("torch_eager", "torch_compile")]
            bar.write(f"{p:<14} {dt:<9} {n:>6} {v:>7} {mode:<8} {best[p]:>8.1f} {ms:>8.1f} "
                      f"{floors['bw_floor_ms']:>8.1f} {floors['exp_floor_ms']:>9.1f} {cells[0]:>8} {cells[1]:>10}")
            rows.append(rec)
    bar.close()
    return rows


def plot_points(records):
    return [common.Point(r["provider"], r["n"], r["v"], r["ms"], r["gbps"], f"{r['mode']}, {r['dtype']}")
            for r in records if "ms" in r]


def run(args) -> int:
    if args.child:
        common.child_reply(measure(json.loads(args.child)))
        return 0
    common.check_plot_available(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise common.BenchError("no CUDA device: nothing to benchmark on cuda")
    providers = args.providers or DEFAULT_PROVIDERS[args.device]
    kw = dict(temperature=args.temperature, soft_weight=args.soft_weight, hard_weight=args.hard_weight,
              divergence=args.divergence, beta=args.beta, skew=args.skew)
    device_name = common.device_name(args.device)
    bw = common.copy_bandwidth(args.device, args.copy_mib << 20)
    meta = {"date": common.utc_now(), "device": device_name, "copy_gbps": round(bw, 2),
            "versions": common.versions("triton", "liger_kernel"), "bench": "kd", **kw}
    print(f"# {device_name}; copy bandwidth {bw:.1f} GB/s; {meta['versions']}")
    print(f"# {args.divergence}, T={args.temperature}, soft={args.soft_weight}, hard={args.hard_weight}")
    if args.in_process:
        rows = run_in_process(args, providers, kw, meta, bw)
        common.finish(args, rows, plot_points, f"fastkd bench kd (in process): {args.divergence}, {device_name}",
                      copy_gbps=bw)
        return 0
    header = f"{'provider':<14} {'dtype':<9} {'N':>6} {'V':>7} {'mode':<8} {'ms':>9} {'peak MB':>9} " \
             f"{'GB/s':>7} {'%copy':>6} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    jobs = [(dt, n, v, mode, p) for dt in args.dtype for n in args.n for v in args.v for mode in args.modes
            for p in providers]
    bar = common.Progress(len(jobs), "bench kd")
    baseline = {}
    for dt, n, v, mode, p in jobs:
        cfg = dict(provider=p, device=args.device, dtype=dt, n=n, v=v, mode=mode, kw=kw, reps=args.reps,
                   budget_s=args.budget_s, threads=args.threads)
        res = common.run_child(MODULE, cfg, timeout=args.timeout)
        bar.update()
        rec = {**meta, "provider": p, "dtype": dt, "n": n, "v": v, "mode": mode, **res}
        key = (dt, n, v, mode)
        if "ms" in res:
            rec["frac_copy_bw"] = res["gbps"] / bw
            if p == "torch_eager":
                baseline[key] = res["ms"]
            if key in baseline:
                rec["speedup_vs_eager"] = baseline[key] / res["ms"]
            speedup = f"{rec['speedup_vs_eager']:>7.2f}x" if "speedup_vs_eager" in rec else f"{'-':>8}"
            line = (f"{p:<14} {dt:<9} {n:>6} {v:>7} {mode:<8} {res['ms']:>9.2f} "
                    f"{res['peak_extra_bytes'] / 2**20:>9.1f} {res['gbps']:>7.1f} {100 * rec['frac_copy_bw']:>5.0f}% "
                    f"{speedup}")
        else:
            line = f"{p:<14} {dt:<9} {n:>6} {v:>7} {mode:<8} skipped: {res['skipped']}"
        bar.write(line)
        rows.append(rec)
    bar.close()
    common.finish(args, rows, plot_points, f"fastkd bench kd: {args.divergence}, {device_name}", copy_gbps=bw)
    return 0


def main(argv=None, default_out=None, prog=None) -> int:
    return common.standalone_main(sys.modules[__name__], argv, default_out, prog)


if __name__ == "__main__":
    sys.exit(main())
