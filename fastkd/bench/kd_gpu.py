"""GPU benchmark of the fused kd loss against the bandwidth floor and its peers.

Providers: torch eager idiom, torch.compile of the same idiom, liger-kernel (its KL-div + cross-
entropy, and its JSD, when importable), fastkd-triton, fastkd-cuda. Modes (the student's gradient
via torch.autograd.grad, so no .grad accumulation is timed):

* "fwd": the forward of a training step (the fused backends write the gradient here);
* "fwd_nograd": an eval forward under torch.no_grad (the fused backends write no gradient);
* "fwd_inplace_grad": fastkd only, ``inplace_grad=True``: the gradient written over the logits;
* "fwd_bwd": forward + backward with grad_output 1 (``loss.backward()``; fastkd on a GPU: the
  in-place scaling kernel skips every row);
* "fwd_bwd_scaled": the same with grad_output 0.5 (the in-place scaling pass over the gradient);
* "fwd_bwd_retained": the same under ``retain_graph=True`` (the gradient is scaled out of place,
  keeping the saved one for the next backward).

Reported per run: median ms (CUDA events, in this process), peak memory over the inputs, achieved
GB/s over the minimal traffic (read z, read t, write dz: 3 x element size per logit) and its fraction
of the device's copy bandwidth (measured in the same run, 2 x bytes per copy), and the time over the
pass floors: two-pass (forward/reverse KL + CE: read z, t twice, write dz = 5 x element size, i.e.
10 bytes for bf16), three-pass (JSD: 7 x element size) and one-pass (3 x element size).

    fastkd bench kd_gpu --quick --out kd_gpu.jsonl    # bf16, N=16384, V=128256, every divergence
    fastkd bench kd_gpu --modes fwd fwd_nograd fwd_inplace_grad fwd_bwd fwd_bwd_scaled fwd_bwd_retained
    fastkd bench kd_gpu --out kd_gpu.jsonl            # bf16/fp32 x N {4096,16384} x V {32000,128256,256000}

One JSON object per line, with device name, versions and date; each line is written as soon as it
is measured.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import traceback

from . import common

MODULE = "fastkd.bench.kd_gpu"
SUMMARY = "fused kd loss on a GPU against its pass floors, liger and torch.compile (CUDA events)"
DTYPES = ("bf16", "fp32", "fp16")
PROVIDERS = ("fastkd-cuda", "fastkd-triton", "liger", "torch-compile", "torch-eager")
MODES = ("fwd", "fwd_nograd", "fwd_inplace_grad", "fwd_bwd", "fwd_bwd_scaled", "fwd_bwd_retained")
TEMPERATURE, HARD_WEIGHT, BETA = 2.0, 0.5, 0.5


def add_arguments(ap: argparse.ArgumentParser, default_out=None) -> None:
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=DTYPES)
    ap.add_argument("--ns", nargs="+", type=int, default=[4096, 16384])
    ap.add_argument("--vs", nargs="+", type=int, default=[32000, 128256, 256000])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=MODES)
    ap.add_argument("--divergences", nargs="+", default=["forward_kl"],
                    choices=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true",
                    help="one point only: bf16, N=16384, V=128256, every divergence")
    common.add_output_arguments(ap, default_out)


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def _time_ms(fn, reps: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth_gbps(nbytes: int = 4 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth: (read + write) bytes / median time."""
    import torch

    a = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = _time_ms(lambda: b.copy_(a), reps)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# The loss each provider computes: soft_weight · τ² · D(p, q) (batchmean) + hard_weight · CE
# ------------------------------------------------------------------------------------------------
def eager_loss(z, t, y, divergence):
    """The idiom users write by hand, in the logits' dtype."""
    import torch
    import torch.nn.functional as F

    T = TEMPERATURE
    lq = F.log_softmax(z / T, dim=-1)
    lp = F.log_softmax(t / T, dim=-1)
    if divergence == "forward_kl":
        soft = F.kl_div(lq, lp, reduction="batchmean", log_target=True)
    elif divergence == "reverse_kl":
        soft = F.kl_div(lp, lq, reduction="batchmean", log_target=True)
    else:
        lm = torch.logaddexp(lp + math.log(BETA), lq + math.log1p(-BETA))
        soft = BETA * F.kl_div(lm, lp, reduction="batchmean", log_target=True) \
            + (1 - BETA) * F.kl_div(lm, lq, reduction="batchmean", log_target=True)
    return T * T * soft + HARD_WEIGHT * F.cross_entropy(z, y)


_compiled = None


def compiled_loss(z, t, y, divergence):
    import torch

    global _compiled
    if _compiled is None:
        _compiled = torch.compile(eager_loss, dynamic=True)
    return _compiled(z, t, y, divergence)


def _liger():
    import torch.nn.functional as F
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerJSD, LigerKLDIVLoss

    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    ce = LigerCrossEntropyLoss()
    jsd = LigerJSD(beta=BETA)

    def loss(z, t, y, divergence):
        T = TEMPERATURE
        lq = F.log_softmax(z / T, dim=-1)
        lp = F.log_softmax(t / T, dim=-1)
        if divergence == "forward_kl":
            soft = kl(lq, lp)
        elif divergence == "reverse_kl":
            soft = kl(lp, lq)
        else:
            soft = jsd(lq, lp)
        return T * T * soft + HARD_WEIGHT * ce(z, y)

    return loss


def fastkd_loss(backend):
    import fastkd

    def loss(z, t, y, divergence, inplace_grad=False):
        return fastkd.kd_loss(z, t, y, temperature=TEMPERATURE, hard_weight=HARD_WEIGHT,
                              divergence=divergence, beta=BETA, backend=backend, inplace_grad=inplace_grad)

    loss.fastkd = True
    return loss


def provider_fn(name):
    if name == "fastkd-cuda":
        return fastkd_loss("cuda")
    if name == "fastkd-triton":
        return fastkd_loss("triton")
    if name == "torch-eager":
        return eager_loss
    if name == "torch-compile":
        return compiled_loss
    if name == "liger":
        return _liger()
    raise ValueError(name)


def run_one(name, fn, dtype, n, v, mode, divergence, reps, common_fields):
    import torch

    rec = dict(common_fields, provider=name, dtype=str(dtype).replace("torch.", ""), n=n, v=v, mode=mode,
               divergence=divergence, temperature=TEMPERATURE, hard_weight=HARD_WEIGHT,
               beta=BETA if divergence == "jsd" else None)
    elt = torch.tensor([], dtype=dtype).element_size()
    nv = n * v
    z = t = y = zz = step = None
    try:
        torch.cuda.empty_cache()
        g = torch.Generator(device="cuda").manual_seed(0)
        z = (torch.randn(n, v, device="cuda", generator=g) * 2).to(dtype)
        t = (torch.randn(n, v, device="cuda", generator=g) * 2).to(dtype)
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        if mode == "fwd_inplace_grad" and not getattr(fn, "fastkd", False):
            rec["status"] = "n/a: no in-place gradient"
            return rec
        zz = z.detach().requires_grad_()
        if mode == "fwd":
            def step():
                return fn(zz, t, y, divergence)
        elif mode == "fwd_nograd":
            def step():
                with torch.no_grad():
                    return fn(z, t, y, divergence)
        elif mode == "fwd_inplace_grad":
            # the student logits take the gradient; later calls run on those values (same work)
            def step():
                return fn(z, t, y, divergence, inplace_grad=True)
        else:
            go = 0.5 if mode == "fwd_bwd_scaled" else None
            keep = mode == "fwd_bwd_retained"

            def step():
                loss = fn(zz, t, y, divergence)
                g = None if go is None else torch.full_like(loss, go)
                return torch.autograd.grad(loss, zz, g, retain_graph=keep)[0]
        step()  # compile / autotune outside the measurements
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = step()
        torch.cuda.synchronize()
        rec["peak_mem_over_inputs_bytes"] = torch.cuda.max_memory_allocated() - base
        rec["grad_buffer_bytes"] = nv * elt
        del out
        ms = _time_ms(step, reps)
        bw = common_fields["copy_bw_gbps"] * 1e9
        nograd = mode == "fwd_nograd"
        # a loss without its gradient reads z and t once (JSD: twice) and writes nothing N×V
        min_bytes = (2 if nograd else 3) * elt * nv
        rec.update(
            status="ok", median_ms=ms, min_traffic_bytes=min_bytes,
            achieved_gbps=min_bytes / (ms * 1e-3) / 1e9,
            frac_copy_bw=(min_bytes / (ms * 1e-3)) / bw,
            floor_one_pass_ms=3 * elt * nv / bw * 1e3,
            floor_two_pass_ms=5 * elt * nv / bw * 1e3,
            floor_three_pass_ms=7 * elt * nv / bw * 1e3,
            floor_loss_only_ms=(4 if divergence == "jsd" else 2) * elt * nv / bw * 1e3,
        )
        if nograd:
            floor = rec["floor_loss_only_ms"]
        else:
            floor = rec["floor_three_pass_ms"] if divergence == "jsd" else rec["floor_two_pass_ms"]
        rec["time_over_pass_floor"] = ms / floor
    except torch.cuda.OutOfMemoryError:
        rec["status"] = "oom"
    except Exception as exc:  # a provider that cannot run a case is recorded, not fatal
        rec["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        traceback.print_exc()
    finally:
        z = t = y = zz = step = None  # noqa: F841
        torch.cuda.empty_cache()
    return rec


def plot_points(records):
    return [common.Point(r["provider"], r["n"], r["v"], r["median_ms"], r["achieved_gbps"],
                         f"{r['mode']}, {r['dtype']}, {r['divergence']}")
            for r in records if r.get("status") == "ok"]


def run(args) -> int:
    common.check_plot_available(args)
    import torch

    if not torch.cuda.is_available():
        raise common.BenchError("kd_gpu needs a CUDA device")
    if args.quick:
        args.dtypes, args.ns, args.vs = ["bf16"], [16384], [128256]
        args.divergences = ["forward_kl", "reverse_kl", "jsd"]

    found = common.versions("triton", "liger_kernel")
    versions = {"torch": found["torch"], "cuda": torch.version.cuda, "fastkd": found["fastkd"],
                "python": found["python"], "triton": found.get("triton"), "liger_kernel": found.get("liger_kernel")}
    fields = dict(bench="kd_gpu", device=torch.cuda.get_device_name(), date=common.utc_now(), versions=versions)
    fields["copy_bw_gbps"] = copy_bandwidth_gbps()
    print(f"# {fields['device']}: copy bandwidth {fields['copy_bw_gbps']:.0f} GB/s", flush=True)

    fns = {}
    for name in args.providers:
        try:
            fns[name] = provider_fn(name)
        except Exception as exc:
            print(f"# provider {name} unavailable: {exc}", flush=True)
    out = common.out_path(args)
    records = []
    for dt in args.dtypes:
        for n in args.ns:
            for v in args.vs:
                for div in args.divergences:
                    for mode in args.modes:
                        for name, fn in fns.items():
                            rec = run_one(name, fn, _torch_dtype(dt), n, v, mode, div, args.reps, fields)
                            records.append(rec)
                            common.append_jsonl(out, [rec])
                            ms = rec.get("median_ms")
                            print(f"{name:14s} {dt:4s} N={n:<6d} V={v:<7d} {div:10s} {mode:16s} "
                                  + (f"{ms:9.3f} ms  {rec['achieved_gbps']:7.0f} GB/s  "
                                     f"{rec['time_over_pass_floor']:.2f}x floor  "
                                     f"peak+{rec['peak_mem_over_inputs_bytes'] / 2**30:.2f} GiB"
                                     if ms is not None else rec["status"]), flush=True)
    common.finish(args, records, plot_points, f"fastkd bench kd_gpu: {fields['device']}",
                  copy_gbps=fields["copy_bw_gbps"], already_written=True)
    return 0


def main(argv=None, default_out=None, prog=None) -> int:
    return common.standalone_main(sys.modules[__name__], argv, default_out, prog)


if __name__ == "__main__":
    sys.exit(main())
