"""Benchmark of fastkd.fused_linear_kd_loss against the unfused idiom, its torch.compile,
liger-kernel's fused linear JSD and TRL's chunked divergence (each when importable), plus the bare
GEMMs as the speed-of-light line.

Each (provider, size, mode) runs in a fresh subprocess. After one warm-up call (which also compiles),
the peak is reset and the next call is measured: on CPU the growth of the peak resident set (VmHWM
after /proc/self/clear_refs, or ru_maxrss where that is unavailable), on CUDA
torch.cuda.max_memory_allocated minus the memory allocated before the call. "peak" is memory beyond
the inputs: logits, buffers, and the gradients autograd writes (hidden and weight gradients
included, reported separately as grad_bytes). GB/s is over the minimal traffic — the four inputs
read once, the two gradients written once — and stays far below the copy bandwidth: this loss is
bound by its GEMMs, not by memory.

    fastkd bench linear                          # CPU: float32, N=4096, H=512, V=32000
    fastkd bench linear --device cuda --dtype bfloat16 --n 8192 --h 2048 4096 --v 32000 128256
    fastkd bench linear --providers fastkd trl --beta 0.5 --hard-weight 0   # against TRL's loss
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from . import common

MODULE = "fastkd.bench.linear"
SUMMARY = "fused linear kd loss vs the unfused idiom, torch.compile, liger, TRL and the bare GEMMs"
PROVIDERS = ("fastkd", "fastkd_torch", "unfused", "compiled", "liger", "trl", "gemms")


def add_arguments(ap: argparse.ArgumentParser, default_out=None) -> None:
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="rows (default: 4096 on CPU, 8192 on CUDA)")
    ap.add_argument("--h", type=int, nargs="+", default=None, help="hidden sizes (default: 512; 2048 4096)")
    ap.add_argument("--v", type=int, nargs="+", default=None, help="vocabulary sizes (default: 32000; 32000 128256)")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--modes", nargs="+", default=["fwd_bwd"], choices=("fwd", "fwd_bwd"))
    ap.add_argument("--repeat", type=int, default=3, help="measured calls per configuration (median)")
    ap.add_argument("--beta", type=float, default=0.0, help="0: forward KL; else generalized JSD (as liger)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--hard-weight", type=float, default=0.5)
    common.add_output_arguments(ap, default_out)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)


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
    if provider == "trl":
        # TRL's chunked generalized JSD (trl.DistillationTrainer's loss): β = 0 forward KL, else JSD,
        # at temperature T without τ² and without a hard-label term (compare with --hard-weight 0);
        # the mean over the counted rows, masked as TRL does where it projects every position.
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def step(hs, ws, ht, wt, y):
            keep = y != -100
            div, _entropy = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, beta, T, 1.0, None, 1.0,
                                                            None)
            return div.masked_fill(~keep, 0).sum() / keep.sum().clamp_min(1)
        return step
    if provider == "gemms":
        # The matmuls any exact method must do: the 2 logit GEMMs, then dH = dZ @ W_s and
        # dW = dZᵀ @ H_s with the student logits standing in for the gradient dZ.
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


def min_traffic_bytes(n, h, v, dtype_name, mode):
    """Bytes any implementation must move: read H_s, W_s, H_t, W_t once; with the backward pass
    also write dH_s and dW_s once."""
    elt = common.ELEMENT_BYTES.get(dtype_name, 4)
    reads = 2 * (n * h + v * h) * elt
    return reads + ((n * h + v * h) * elt if mode == "fwd_bwd" else 0)


def measure(provider, n, h, v, dtype_name, device, mode, repeat, kd):
    """One configuration, in this (fresh) process; returns a result dict."""
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
    common.sync(device)
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
        common.sync(device)
        times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    traffic = min_traffic_bytes(n, h, v, dtype_name, mode)
    return dict(provider=provider, mode=mode, n=n, h=h, v=v, dtype=dtype_name, median_ms=ms,
                min_ms=1e3 * min(times), repeats=len(times), peak_bytes=int(peak), grad_bytes=int(grad_bytes),
                min_traffic_bytes=traffic, gbps=traffic / (ms * 1e-3) / 1e9,
                loadavg_1m=os.getloadavg()[0])  # a shared CPU machine's timings mean little under load


def _env_info(device):
    import torch

    import fastkd
    from fastkd._backends import registry

    return dict(date=common.utc_now(), torch=torch.__version__, fastkd=fastkd.__version__,
                python=common.versions()["python"], threads=torch.get_num_threads(),
                device_name=common.device_name(device), backend=registry.resolve("kd", "auto", torch.device(device)))


def _available(provider, device):
    import importlib.util

    if provider == "liger":
        return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if provider == "trl":
        return importlib.util.find_spec("trl") is not None
    return True


def plot_points(records):
    pts = []
    for r in records:
        if "median_ms" not in r:
            continue
        variant = f"{r['mode']}, H={r['h']}"
        pts.append(common.Point(r["provider"], r["n"], r["v"], r["median_ms"],
                                r.get("gbps", min_traffic_bytes(r["n"], r["h"], r["v"], r["dtype"], r["mode"])
                                      / (r["median_ms"] * 1e-3) / 1e9), variant))
    return pts


def run(args) -> int:
    if args.child:  # measuring subprocess: one configuration
        common.child_reply(measure(**json.loads(args.child)))
        return 0
    kd = dict(temperature=args.temperature, hard_weight=args.hard_weight, beta=args.beta)
    common.check_plot_available(args)
    cuda = args.device == "cuda"
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise common.BenchError("no CUDA device: nothing to benchmark on cuda")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    ns = args.n or ([8192] if cuda else [4096])
    hs = args.h or ([2048, 4096] if cuda else [512])
    vs = args.v or ([32000, 128256] if cuda else [32000])
    env = _env_info(args.device)
    out = common.out_path(args)
    print(f"# {env}")
    jobs = [(n, h, v, mode, prov) for n in ns for h in hs for v in vs for mode in args.modes
            for prov in args.providers if _available(prov, args.device)]
    bar = common.Progress(len(jobs), "bench linear")
    for prov in args.providers:
        if not _available(prov, args.device):
            bar.write(f"{prov}: not measured (needs {'trl' if prov == 'trl' else 'liger-kernel and CUDA'})")
    bar.write(f"{'provider':>13} {'mode':>7} {'N':>6} {'H':>5} {'V':>7} {'median ms':>10} {'peak MB':>9} {'GB/s':>7}")
    records = []
    for n, h, v, mode, prov in jobs:
        spec = dict(provider=prov, n=n, h=h, v=v, dtype_name=dtype, device=args.device, mode=mode,
                    repeat=args.repeat, kd=kd)
        # every allocation >= 128 KiB mmapped and unmapped on free: the resident set then follows
        # live memory instead of glibc's retained heap
        res = common.run_child(MODULE, spec, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
        bar.update()
        if "skipped" in res:
            res = dict(provider=prov, mode=mode, n=n, h=h, v=v, dtype=dtype, error=res["skipped"])
            bar.write(f"{prov:>13} {mode:>7} {n:>6} {h:>5} {v:>7}  failed: {res['error']}")
        else:
            bar.write(f"{prov:>13} {mode:>7} {n:>6} {h:>5} {v:>7} {res['median_ms']:>10.1f} "
                      f"{res['peak_bytes'] / 2**20:>9.1f} {res['gbps']:>7.2f}")
        res.update(env, bench="linear", kd=kd)
        records.append(res)
        common.append_jsonl(out, [res])  # as they come: a long sweep cut short keeps what it measured
    bar.close()
    common.finish(args, records, plot_points, f"fastkd bench linear: {dtype}, {env['device_name']}",
                  already_written=True)
    return 0


def main(argv=None, default_out=None, prog=None) -> int:
    return common.standalone_main(sys.modules[__name__], argv, default_out, prog)


if __name__ == "__main__":
    sys.exit(main())
