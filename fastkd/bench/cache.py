"""Benchmark of the teacher cache: capture speed, sparse-loss speed, and bytes/token of each mode.

* capture: ``fastkd.capture`` (top-k and sampled) against the eager idiom it replaces,
  ``torch.topk`` + ``torch.logsumexp`` run separately, and against reading the teacher logits once
  (``t.amax(-1)``: the speed-of-light line on a GPU).
* sparse loss (forward + backward): ``fastkd.sparse_kd_loss`` against dense ``fastkd.kd_loss`` on the
  same backend.
* bytes/token: a ``TeacherCache`` filled with each mode; logits are LM-like (Zipf-shaped, peaked
  rows), or given ones (``--teacher-logits FILE.pt``, e.g. the logits of a trained teacher).

    fastkd bench cache                           # CPU: bf16 + f32, N=256, V=128256, k=64, N_s=50
    fastkd bench cache --device cuda --n 16384 --dtype bfloat16

On a GPU every backend with teacher-cache kernels ("cuda", "triton") is a provider: one capture and
one loss record each (``provider`` field), the baselines measured once per dtype. What to read
there: capture time over one read of the logits (``topk_over_read``, 1 would be the read itself) and
the sparse loss's speed-up over the dense kd_loss of the same backend (``speedup_topk``).

Times are medians of ``--reps`` calls after one warm-up call, in this process.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from . import common

MODULE = "fastkd.bench.cache"
SUMMARY = "teacher cache: capture and sparse-loss speed against their dense idioms, bytes/token"
DTYPES = ("bfloat16", "float32", "float16")
CACHE_OPS = ("capture_topk", "capture_sample", "sparse_kd", "kd")


def add_arguments(ap: argparse.ArgumentParser, default_out=None) -> None:
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=DTYPES)
    ap.add_argument("--n", type=int, nargs="+", default=[256], help="rows (tokens)")
    ap.add_argument("--v", type=int, nargs="+", default=[128256], help="vocabulary sizes")
    ap.add_argument("--k", type=int, default=64, help="top-k entries kept per row")
    ap.add_argument("--num-samples", type=int, default=50, help="draws per row of the sampled mode")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--teacher-logits", default=None, help="a .pt file of (N, V) teacher logits for bytes/token")
    ap.add_argument("--skip", nargs="*", default=[], choices=["capture", "loss", "bytes"])
    common.add_output_arguments(ap, default_out)


def lm_like_logits(n, v, dtype, device, seed=0):
    """Rows shaped like a language model's: a Zipf-like log-probability profile over a random
    permutation of the vocabulary, a random sharpness per row, plus noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, v + 1, dtype=torch.float32)
    out = torch.empty(n, v, dtype=dtype, device=device)
    for i0 in range(0, n, 256):
        m = min(256, n - i0)
        sharp = 0.8 + 1.2 * torch.rand(m, 1, generator=g)
        base = -sharp * ranks.log()[None, :] + 0.5 * torch.randn(m, v, generator=g)
        perm = torch.argsort(torch.rand(m, v, generator=g), dim=1)
        out[i0:i0 + m] = base.gather(1, perm).to(device=device, dtype=dtype)
    return out


def gpu_providers(device):
    """The GPU backends that implement capture, the sparse loss and the dense loss here, in
    dispatch order."""
    from fastkd._backends import registry

    usable = [set(registry.available(op, device)) for op in CACHE_OPS]
    return [b for b in ("cuda", "triton") if all(b in u for u in usable)]


def _capture_line(rec, label):
    return (f"capture  {rec['dtype']:<9} N={rec['n']} V={rec['v']} k={rec['k']}{label}: "
          f"read once {rec['read_once_ms']:.2f} ms | topk+logsumexp fp32 {rec['topk_logsumexp_fp32_ms']:.2f} ms, "
          f"native {rec['topk_logsumexp_native_ms']:.2f} ms | fastkd top-k {rec['fastkd_topk_ms']:.2f} ms "
          f"({rec['speedup_vs_eager']:.2f}x the fp32 idiom, {rec['topk_over_read']:.2f}x one read) | "
          f"fastkd sampled {rec['fastkd_sample_ms']:.2f} ms, systematic {rec['fastkd_sample_systematic_ms']:.2f} ms")


def _loss_line(rec, label):
    return (f"loss     {rec['dtype']:<9} N={rec['n']} V={rec['v']} k={rec['k']}{label}: "
          f"dense kd_loss {rec['dense_kd_loss_ms']:.2f} ms | sparse top-k {rec['sparse_topk_ms']:.2f} ms "
          f"({rec['speedup_topk']:.2f}x) | sparse sampled {rec['sparse_sampled_ms']:.2f} ms "
          f"({rec['speedup_sampled']:.2f}x)   [forward + backward]")


def plot_points(records):
    """Capture: every way of reading the teacher rows, GB/s over one read of them. Loss: dense and
    sparse, GB/s over the minimal traffic (dense: read z and t, write dz; sparse: read z, write dz)."""
    pts = []
    for r in records:
        elt = common.ELEMENT_BYTES.get(r.get("dtype"), 4)
        suffix = f" [{r['provider']}]" if r.get("provider") else ""
        if r.get("bench") == "capture":
            nbytes = r["bytes_read"]
            for label, key in (("read once (amax)", "read_once_ms"),
                               ("topk+logsumexp fp32", "topk_logsumexp_fp32_ms"),
                               ("topk+logsumexp native", "topk_logsumexp_native_ms"),
                               ("fastkd capture top-k" + suffix, "fastkd_topk_ms"),
                               ("fastkd capture sampled" + suffix, "fastkd_sample_ms"),
                               ("fastkd capture systematic" + suffix, "fastkd_sample_systematic_ms")):
                if key not in r:  # records written before this measurement existed
                    continue
                pts.append(common.Point(f"capture: {label}", r["n"], r["v"], r[key],
                                        nbytes / (r[key] * 1e-3) / 1e9, r["dtype"]))
        elif r.get("bench") == "loss_fwd_bwd":
            nv = r["n"] * r["v"] * elt
            for label, key, traffic in (("dense kd_loss" + suffix, "dense_kd_loss_ms", 3 * nv),
                                        ("sparse top-k" + suffix, "sparse_topk_ms", 2 * nv),
                                        ("sparse sampled" + suffix, "sparse_sampled_ms", 2 * nv)):
                pts.append(common.Point(f"loss: {label}", r["n"], r["v"], r[key],
                                        traffic / (r[key] * 1e-3) / 1e9, r["dtype"]))
    return pts


def _capture(t, shape, providers, device, reps):
    """Capture records: the baselines once, then ``fastkd.capture`` per provider (``None``: auto)."""
    import torch

    import fastkd

    k, num_samples = shape["k"], shape["num_samples"]
    read_ms = common.median_ms(lambda: t.amax(-1), device, reps)
    eager_ms = common.median_ms(lambda: (torch.topk(t.float(), k, -1), torch.logsumexp(t.float(), -1)), device, reps)
    eager_native_ms = common.median_ms(lambda: (torch.topk(t, k, -1), torch.logsumexp(t, -1)), device, reps)
    for prov in providers:
        be = prov or "auto"
        topk_ms = common.median_ms(lambda: fastkd.capture(t, k=k, backend=be), device, reps)
        g = torch.Generator(device=device).manual_seed(0)
        sample_ms = common.median_ms(lambda: fastkd.capture(t, mode="sample", num_samples=num_samples, generator=g,
                                                            backend=be), device, reps)
        systematic_ms = common.median_ms(lambda: fastkd.capture(t, mode="sample", num_samples=num_samples,
                                                                sampling="systematic", generator=g, backend=be),
                                         device, reps)
        yield dict(bench="capture", **shape, **({"provider": prov} if prov else {}),
                   read_once_ms=read_ms, topk_logsumexp_fp32_ms=eager_ms,
                   topk_logsumexp_native_ms=eager_native_ms, fastkd_topk_ms=topk_ms,
                   fastkd_sample_ms=sample_ms, fastkd_sample_systematic_ms=systematic_ms,
                   speedup_vs_eager=eager_ms / topk_ms,
                   speedup_vs_eager_native=eager_native_ms / topk_ms, topk_over_read=topk_ms / read_ms,
                   **({"sample_over_read": sample_ms / read_ms} if prov else {}),
                   bytes_read=t.numel() * t.element_size())


def _loss(t, shape, providers, device, reps):
    """Loss records (forward + backward): dense kd_loss, sparse loss on top-k and sampled captures."""
    import torch

    import fastkd

    n, v = shape["n"], shape["v"]
    z = lm_like_logits(n, v, t.dtype, device, seed=1)
    y = torch.randint(0, v, (n,), device=device)

    def step(fn):
        zz = z.detach().requires_grad_()
        fn(zz).backward()

    for prov in providers:
        be = prov or "auto"
        st = fastkd.capture(t, k=shape["k"], backend=be)
        ss = fastkd.capture(t, mode="sample", num_samples=shape["num_samples"], backend=be)
        dense_ms = common.median_ms(lambda: step(lambda zz: fastkd.kd_loss(zz, t, y, hard_weight=0.5, backend=be)),
                                    device, reps)
        sparse_ms = common.median_ms(
            lambda: step(lambda zz: fastkd.sparse_kd_loss(zz, st, y, hard_weight=0.5, backend=be)), device, reps)
        sampled_ms = common.median_ms(
            lambda: step(lambda zz: fastkd.sparse_kd_loss(zz, ss, y, hard_weight=0.5, backend=be)), device, reps)
        del st, ss
        yield dict(bench="loss_fwd_bwd", **shape, **({"provider": prov} if prov else {}),
                   dense_kd_loss_ms=dense_ms, sparse_topk_ms=sparse_ms, sparse_sampled_ms=sampled_ms,
                   speedup_topk=dense_ms / sparse_ms, speedup_sampled=dense_ms / sampled_ms)


def _bytes_per_token(args, v):
    """Bytes/token records of a TeacherCache filled in each mode, from ``--teacher-logits`` or from
    LM-like rows of vocabulary ``v`` (at most 512 rows)."""
    import torch

    import fastkd

    if args.teacher_logits:
        logits = torch.load(args.teacher_logits).float()
        source = args.teacher_logits
    else:
        logits = lm_like_logits(min(max(args.n), 512), v, torch.float32, torch.device("cpu"), seed=2)
        source = "lm_like_logits (synthetic Zipf-shaped rows)"
    v = logits.shape[-1]
    rows = logits.shape[0] // 8 * 8
    if rows == 0:
        raise common.BenchError("bytes/token needs at least 8 rows of logits (--n 8 or more)")
    logits = logits[:rows].reshape(8, rows // 8, v)
    with tempfile.TemporaryDirectory() as d:
        for mode in ("topk", "sample"):
            with fastkd.TeacherCache(os.path.join(d, mode), mode=mode, k=args.k, num_samples=args.num_samples,
                                     sync=False) as c:
                st = c.get_or_capture(list(range(8)), lambda: logits)
                extra = {}
                if mode == "sample":
                    extra["mean_unique_ids"] = float((st.counts > 0).sum(-1).float().mean())
                yield dict(bench="bytes_per_token", mode=mode, k=args.k, num_samples=args.num_samples, v=v,
                           tokens=c.num_tokens, bytes_per_token=c.bytes_per_token, logits=source, **extra)


def run(args) -> int:
    common.check_plot_available(args)
    import torch

    import fastkd
    from fastkd._backends import registry

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise common.BenchError("no CUDA device: nothing to benchmark on cuda")
    # CPU: one unnamed provider ("auto"), records as they always were
    providers = gpu_providers(device) if device.type == "cuda" else [None]
    if not providers:
        raise common.BenchError(f"no teacher-cache kernel for {device}: build fastkd._C with nvcc or install triton")
    meta = dict(device=common.device_name(device.type), torch=torch.__version__, fastkd=fastkd.__version__,
                date=common.utc_now(), backend=registry.resolve("sparse_kd", "auto", device),
                threads=torch.get_num_threads())
    print(f"# {meta['device']}, {meta['threads']} torch threads; torch {meta['torch']}, fastkd {meta['fastkd']}; "
          f"providers: {', '.join(p or meta['backend'] for p in providers)}")
    records = []

    def emit(rec):
        rec = {**meta, **rec}
        records.append(rec)
        return rec

    sizes = [(dname, n, v) for dname in args.dtype for n in args.n for v in args.v]
    steps = len(sizes) * (("capture" not in args.skip) + ("loss" not in args.skip)) * len(providers)
    bar = common.Progress(steps, "bench cache")
    for dname, n, v in sizes:
        t = lm_like_logits(n, v, getattr(torch, dname), device)
        shape = dict(n=n, v=v, k=args.k, num_samples=args.num_samples, dtype=dname)
        if "capture" not in args.skip:
            for rec in _capture(t, shape, providers, device, args.reps):
                bar.update()
                bar.write(_capture_line(emit(rec), f" [{rec['provider']}]" if "provider" in rec else ""))
        if "loss" not in args.skip:
            for rec in _loss(t, shape, providers, device, args.reps):
                bar.update()
                bar.write(_loss_line(emit(rec), f" [{rec['provider']}]" if "provider" in rec else ""))
        del t
    bar.close()
    if "bytes" not in args.skip:
        for v in ([None] if args.teacher_logits else args.v):
            for rec in _bytes_per_token(args, v):
                emit(rec)
                extra = f" ({rec['mean_unique_ids']:.1f} distinct ids per token)" if "mean_unique_ids" in rec else ""
                print(f"bytes    {rec['mode']:<9} V={rec['v']}: {rec['bytes_per_token']:.1f} bytes/token on disk "
                      f"over {rec['tokens']} tokens{extra}", flush=True)

    common.finish(args, records, plot_points, f"fastkd bench cache: k={args.k}, {args.num_samples} draws, "
                                              f"{meta['device']}")
    return 0


def main(argv=None, default_out=None, prog=None) -> int:
    return common.standalone_main(sys.modules[__name__], argv, default_out, prog)


if __name__ == "__main__":
    sys.exit(main())
