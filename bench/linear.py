"""Benchmark of fastkd.fused_linear_kd_loss against the unfused idiom, its torch.compile, and
liger-kernel's fused linear JSD (when importable), plus the bare GEMMs as the speed-of-light line.

Each (provider, size, mode) runs in a fresh subprocess. After one warm-up call (which also compiles),
the peak is reset and the next call is measured: on CPU the growth of the peak resident set (VmHWM
after /proc/self/clear_refs, or ru_maxrss where that is unavailable), on CUDA
torch.cuda.max_memory_allocated minus the memory allocated before the call. "peak" is memory beyond the inputs: logits, buffers, and the
gradients autograd writes (hidden and weight gradients included, reported separately as grad_bytes).

    python bench/linear.py                       # CPU target: float32, N=4096, H=512, V=32000
    python bench/linear.py --device cuda --dtype bfloat16 --n 8192 --h 2048 4096 --v 32000 128256

Results are appended as JSON lines to bench/results/linear.jsonl.
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

PROVIDERS = ("fastkd", "fastkd_torch", "unfused", "compiled", "liger", "gemms")


def _inputs(n, h, v, dtype, device, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    hs = r(n, h).requires_grad_()
    ws = r(v, h, s=h ** -0.5).requires_grad_()
    ht = r(n, h)
    wt = r(v, h, s=h ** -0.5)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    y[::17] = -100
    return hs, ws, ht, wt, y


def _make_step(provider, kd):
    """A function (hs, ws, ht, wt, y) -> loss for the provider; kd: temperature, hard_weight, beta."""
    import torch

    import fastkd

    T, hw, beta = kd["temperature"], kd["hard_weight"], kd["beta"]

    def idiom(hs, ws, ht, wt, y):
        import torch.nn.functional as F

        zs = (hs @ ws.T).float()
        with torch.no_grad():
            zt = (ht @ wt.T).float()
        ls = F.log_softmax(zs / T, -1)
        lt = F.log_softmax(zt / T, -1)
        if beta == 0.0:  # forward KL, as in the classic idiom
            soft = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
        else:  # generalized JSD, TRL's formula
            import math

            lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log1p(-beta)]), 0)
            soft = beta * F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1) \
                + (1 - beta) * F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
        keep = y != -100
        ce = F.cross_entropy(zs, y, ignore_index=-100, reduction="none")
        rows = (T * T * soft + hw * ce) * keep
        return rows.sum() / keep.sum().clamp_min(1)

    if provider in ("fastkd", "fastkd_torch"):
        backend = "auto" if provider == "fastkd" else "torch"
        div = "forward_kl" if beta == 0.0 else "jsd"

        def step(hs, ws, ht, wt, y):
            return fastkd.fused_linear_kd_loss(hs, ws, ht, wt, y, temperature=T, hard_weight=hw,
                                               divergence=div, beta=beta, backend=backend)
        return step
    if provider == "unfused":
        return idiom
    if provider == "compiled":
        return torch.compile(idiom)
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD  # noqa: needs CUDA + triton

        mod = LigerFusedLinearJSD(jsd_beta=beta if beta > 0 else 0.5, temperature=T)

        def step(hs, ws, ht, wt, y):
            return mod(hs, ws, ht, wt, y)
        return step
    if provider == "gemms":
        # The matmuls any exact method must do: 2 student + 1 teacher forward-size GEMMs... here the
        # 2 logit GEMMs, then dH = dZ @ W_s and dW = dZᵀ @ H_s with dZ standing in for the gradient.
        def step(hs, ws, ht, wt, y):
            with torch.no_grad():
                zs = hs @ ws.T
                zt = ht @ wt.T
                dh = zs @ ws
                dw = zs.T @ hs
            return (dh.sum() + dw.sum() + zt.sum()) * 0
        return step
    raise ValueError(f"unknown provider {provider!r}")


def _proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _cpu_peak_reset():
    """Resets the process's peak RSS (Linux clear_refs 5); returns the baseline to subtract."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return ("hwm", _proc_status("VmRSS"))
    except OSError:  # no clear_refs: ru_maxrss is a high-water mark since process start
        return ("maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _cpu_peak(base):
    kind, value = base
    if kind == "hwm":
        return _proc_status("VmHWM") - value
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - value


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_one(provider, n, h, v, dtype_name, device, mode, repeat, kd):
    """Runs in the measuring process; returns a result dict."""
    import torch

    dtype = getattr(torch, dtype_name)
    hs, ws, ht, wt, y = _inputs(n, h, v, dtype, device)
    step = _make_step(provider, kd)
    backward = mode == "fwd_bwd" and provider != "gemms"

    def once():
        hs.grad = ws.grad = None
        if backward:
            step(hs, ws, ht, wt, y).backward()
        else:
            with torch.no_grad():
                step(hs, ws, ht, wt, y)

    once()  # warm-up (and compilation), outside the measurement, on the same shapes
    if device == "cuda":
        torch.cuda.synchronize()
        hs.grad = ws.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        hs.grad = ws.grad = None
        base = _cpu_peak_reset()
    t0 = time.perf_counter()
    once()
    _sync(device)
    first = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _cpu_peak(base)
    grad_bytes = sum(x.grad.numel() * x.grad.element_size() for x in (hs, ws) if x.grad is not None)
    times = [first]
    for _ in range(max(0, repeat - 1)):
        t0 = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return dict(provider=provider, mode=mode, n=n, h=h, v=v, dtype=dtype_name, median_ms=1e3 * statistics.median(times),
                min_ms=1e3 * min(times), repeats=len(times), peak_bytes=int(peak), grad_bytes=int(grad_bytes),
                loadavg_1m=os.getloadavg()[0])  # a shared CPU machine's timings mean little under load


def _env_info(device):
    import torch

    import fastkd

    info = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, fastkd=fastkd.__version__, python=platform.python_version(),
                threads=torch.get_num_threads())
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["device_name"] = f"{name} ({os.cpu_count()} cpus)"
    from fastkd import _ops

    info["backend"] = _ops.resolve_backend("auto", torch.device(device))
    return info


def _available(provider, device):
    if provider == "liger":
        if device != "cuda":
            return False
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            return False
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--n", type=int, nargs="+", default=None)
    ap.add_argument("--h", type=int, nargs="+", default=None)
    ap.add_argument("--v", type=int, nargs="+", default=None)
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--modes", nargs="+", default=["fwd_bwd"], choices=("fwd", "fwd_bwd"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--beta", type=float, default=0.0, help="0: forward KL; else generalized JSD (as liger)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--hard-weight", type=float, default=0.5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "linear.jsonl"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    kd = dict(temperature=args.temperature, hard_weight=args.hard_weight, beta=args.beta)

    if args.child:  # measuring subprocess: one configuration, one JSON line on stdout
        spec = json.loads(args.child)
        res = run_one(**spec, kd=kd)
        print("RESULT " + json.dumps(res), flush=True)
        return

    cuda = args.device == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    ns = args.n or ([8192] if cuda else [4096])
    hs = args.h or ([2048, 4096] if cuda else [512])
    vs = args.v or ([32000, 128256] if cuda else [32000])
    env = _env_info(args.device)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    print(f"# {env}")
    print(f"{'provider':>13} {'mode':>7} {'N':>6} {'H':>5} {'V':>7} {'median ms':>10} {'peak MB':>9}")
    for n in ns:
        for h in hs:
            for v in vs:
                for mode in args.modes:
                    for prov in args.providers:
                        if not _available(prov, args.device):
                            continue
                        spec = dict(provider=prov, n=n, h=h, v=v, dtype_name=dtype, device=args.device,
                                    mode=mode, repeat=args.repeat)
                        cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec),
                               "--beta", str(args.beta), "--temperature", str(args.temperature),
                               "--hard-weight", str(args.hard_weight)]
                        # every allocation >= 128 KiB mmapped and unmapped on free: the resident
                        # set then follows live memory instead of glibc's retained heap
                        env_c = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
                        out = subprocess.run(cmd, capture_output=True, text=True, env=env_c)
                        if out.returncode != 0 or "RESULT " not in out.stdout:
                            err = (out.stderr or out.stdout).strip().splitlines()
                            res = dict(provider=prov, mode=mode, n=n, h=h, v=v, dtype=dtype,
                                       error=err[-1] if err else f"exit {out.returncode}")
                            print(f"{prov:>13} {mode:>7} {n:>6} {h:>5} {v:>7}  failed: {res['error']}")
                        else:
                            res = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
                            print(f"{prov:>13} {mode:>7} {n:>6} {h:>5} {v:>7} {res['median_ms']:>10.1f} "
                                  f"{res['peak_bytes'] / 2**20:>9.1f}")
                        res.update(env, bench="linear", kd=kd)
                        with open(args.out, "a") as f:
                            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
