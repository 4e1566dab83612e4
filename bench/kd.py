"""Benchmark of the fused kd loss against the hand-written PyTorch idiom (DESIGN §5).

Providers × modes × sizes. Each measurement runs in a fresh subprocess so that peak memory is the
process's own high-water mark (CPU: ru_maxrss; GPU: torch.cuda.max_memory_allocated), not polluted
by earlier runs. Reports median ms, extra peak memory over the inputs, and achieved GB/s over the
minimal traffic — read z and t once, write ∂z once (forward-only: the two reads) — with its fraction
of the device's copy bandwidth measured in the same run. Appends JSON lines to bench/results/.

    python bench/kd.py                                     # the CPU target of the foundation issue
    python bench/kd.py --device cuda --dtype bfloat16 --n 4096 16384 --v 32000 128256 256000
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROVIDERS = ("torch_eager", "torch_compile", "fastkd_cpu", "fastkd_cuda", "fastkd_triton", "fastkd_torch",
             "liger")


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _versions() -> dict:
    import torch

    import fastkd

    out = {"torch": torch.__version__, "fastkd": fastkd.__version__, "python": platform.python_version()}
    for mod in ("triton", "liger_kernel"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


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
        else:
            b = kw["beta"]
            m = torch.logsumexp(torch.stack([ls + torch.log1p(torch.tensor(-b)), lt + torch.log(torch.tensor(b))]), 0)
            soft = b * F.kl_div(m, lt, reduction="batchmean", log_target=True) + \
                (1 - b) * F.kl_div(m, ls, reduction="batchmean", log_target=True)
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
                                              divergence=div, beta=kw["beta"], backend=backend)
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


def _child(cfg: dict) -> dict:
    """Runs one (provider, size, mode) measurement in this process; returns a result dict."""
    import torch

    device, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    n, v = cfg["n"], cfg["v"]
    fn = _make_fn(cfg["provider"], cfg["kw"])
    if fn is None:
        return {"skipped": "provider not importable or not applicable"}
    g = torch.Generator(device="cpu").manual_seed(0)
    s0 = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)
    t = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    backward = cfg["mode"] == "fwd+bwd"
    s = s0.clone().requires_grad_(backward)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        if backward:
            s.grad = None
            fn(s, t, y).backward()
        else:
            with torch.no_grad():
                fn(s, t, y)

    # Baseline with the inputs allocated. On CPU the high-water mark cannot be reset, so it is taken
    # before the warm-up: torch_compile's figure then includes what compilation itself used.
    sync()
    if device == "cuda":
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        step()  # warm-up (compilation, autotuning)
        sync()
    except Exception as exc:  # a provider that cannot run this configuration
        return {"skipped": f"{type(exc).__name__}: {exc}"[:300]}
    s.grad = None
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    deadline = time.perf_counter() + cfg["budget_s"]
    while len(times) < cfg["reps"] and (len(times) < 3 or time.perf_counter() < deadline):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
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


def copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Device copy bandwidth in GB/s (read + write counted), median of a few clones."""
    import torch

    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ts = []
    for _ in range(7):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y.copy_(x)
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(ts[1:]) / 1e9


def _run_child(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f}s"}
    if out.returncode != 0:
        return {"skipped": f"child failed: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--providers", nargs="+", default=None,
                    help=f"default: the ones that apply to the device, from {PROVIDERS}")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=("fwd", "fwd+bwd"))
    ap.add_argument("--n", nargs="+", type=int, default=[2048])
    ap.add_argument("--v", nargs="+", type=int, default=[32000])
    ap.add_argument("--dtype", nargs="+", default=["float32"])
    ap.add_argument("--divergence", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--soft-weight", type=float, default=0.5)
    ap.add_argument("--hard-weight", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=20.0, help="stop repeating after this long (>= 3 reps)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=str(RESULTS / "kd.jsonl"))
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark on cuda", file=sys.stderr)
        return 1
    providers = args.providers or (
        ["torch_eager", "torch_compile", "fastkd_cpu"] if args.device == "cpu"
        else ["torch_eager", "torch_compile", "liger", "fastkd_triton", "fastkd_cuda"])
    kw = dict(temperature=args.temperature, soft_weight=args.soft_weight, hard_weight=args.hard_weight,
              divergence=args.divergence, beta=args.beta)
    device_name = _device_name(args.device)
    bw = copy_bandwidth(args.device)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": device_name,
            "copy_gbps": round(bw, 2), "versions": _versions(), "bench": "kd", **kw}
    print(f"# {device_name}; copy bandwidth {bw:.1f} GB/s; {meta['versions']}")
    print(f"# {args.divergence}, T={args.temperature}, soft={args.soft_weight}, hard={args.hard_weight}")
    header = f"{'provider':<14} {'dtype':<9} {'N':>6} {'V':>7} {'mode':<8} {'ms':>9} {'peak MB':>9} " \
             f"{'GB/s':>7} {'%copy':>6} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = [(dt, n, v, mode, p) for dt in args.dtype for n in args.n for v in args.v for mode in args.modes
            for p in providers]
    bar = tqdm(total=len(jobs), desc="bench kd", file=sys.stderr, leave=False) if tqdm else None
    baseline = {}
    for dt, n, v, mode, p in jobs:
        cfg = dict(provider=p, device=args.device, dtype=dt, n=n, v=v, mode=mode, kw=kw, reps=args.reps,
                   budget_s=args.budget_s, threads=args.threads)
        res = _run_child(cfg, args.timeout)
        if bar:
            bar.update(1)
        rec = {**meta, "provider": p, "dtype": dt, "n": n, "v": v, "mode": mode, **res}
        key = (dt, n, v, mode)
        if "ms" in res:
            rec["frac_copy_bw"] = res["gbps"] / bw
            if p == "torch_eager":
                baseline[key] = res["ms"]
            if key in baseline:
                rec["speedup_vs_eager"] = baseline[key] / res["ms"]
            line = (f"{p:<14} {dt:<9} {n:>6} {v:>7} {mode:<8} {res['ms']:>9.2f} "
                    f"{res['peak_extra_bytes'] / 2**20:>9.1f} {res['gbps']:>7.1f} {100 * rec['frac_copy_bw']:>5.0f}% "
                    f"{rec.get('speedup_vs_eager', float('nan')):>7.2f}x")
        else:
            line = f"{p:<14} {dt:<9} {n:>6} {v:>7} {mode:<8} skipped: {res['skipped']}"
        (bar.write if bar else print)(line)
        rows.append(rec)
    if bar:
        bar.close()
    if not args.no_save:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"# appended {len(rows)} results to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
