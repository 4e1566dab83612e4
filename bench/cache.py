"""Benchmark of the teacher cache: capture speed, sparse-loss speed, and bytes/token of each mode.

* capture: ``fastkd.capture`` (top-k and sampled) against the eager idiom it replaces,
  ``torch.topk`` + ``torch.logsumexp`` run separately, and against reading the teacher logits once
  (``t.amax(-1)``: the speed-of-light line on a GPU).
* sparse loss (forward + backward): ``fastkd.sparse_kd_loss`` against dense ``fastkd.kd_loss`` on the
  same backend.
* bytes/token: a ``TeacherCache`` filled with each mode; logits are LM-like (Zipf-shaped, peaked
  rows), or those of ``bench/quality.py``'s trained teacher when ``--teacher-logits FILE`` is given.

    python bench/cache.py                        # CPU: bf16 + f32, N=256, V=128256, k=64, N_s=50
    python bench/cache.py --device cuda --n 16384 --dtype bfloat16

On a GPU every backend with teacher-cache kernels ("cuda", "triton") is a provider: one capture and
one loss record each (``provider`` field), the baselines measured once per dtype. The goals there:
capture within 1.3x of one read of the logits (``topk_over_read``), the sparse loss 1.6x faster than
the dense kd_loss of the same backend (``speedup_topk``).

Results are appended as JSON lines to bench/results/cache.jsonl (device, versions, date).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fastkd  # noqa: E402
from fastkd import _sparse_ops  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lm_like_logits(n, v, dtype, device, seed=0):
    """Rows shaped like a language model's: a Zipf-like log-probability profile over a random
    permutation of the vocabulary, a random sharpness per row, plus noise."""
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def gpu_providers(device):
    """The GPU backends that have teacher-cache kernels here, in dispatch order."""
    out = []
    for b in ("cuda", "triton"):
        try:
            if _sparse_ops.pick_backend(b, device, _sparse_ops._SPARSE_KD_IMPLS) == b:
                out.append(b)
        except ValueError:
            pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--teacher-logits", default=None, help="a .pt file of (N, V) teacher logits for bytes/token")
    ap.add_argument("--skip", nargs="*", default=[], choices=["capture", "loss", "bytes"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cache.jsonl"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    meta = dict(device=device_name(device), torch=torch.__version__, fastkd=fastkd.__version__,
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                backend=_sparse_ops.pick_backend("auto", device, _sparse_ops._SPARSE_KD_IMPLS))
    records = []
    # CPU: one unnamed provider ("auto"), records as they always were
    providers = gpu_providers(device) if device.type == "cuda" else [None]
    if not providers:
        raise SystemExit(f"no teacher-cache kernel for {device}: build fastkd._C with nvcc or install triton")

    def emit(rec):
        rec = {**meta, **rec}
        records.append(rec)
        print(json.dumps(rec), flush=True)

    for dname in args.dtype:
        dtype = DTYPES[dname]
        t = lm_like_logits(args.n, args.v, dtype, device)
        shape = dict(n=args.n, v=args.v, k=args.k, num_samples=args.num_samples, dtype=dname)
        if "capture" not in args.skip:
            read_ms = timeit(lambda: t.amax(-1), device, args.reps)
            eager_ms = timeit(lambda: (torch.topk(t.float(), args.k, -1), torch.logsumexp(t.float(), -1)),
                              device, args.reps)
            eager_native_ms = timeit(lambda: (torch.topk(t, args.k, -1), torch.logsumexp(t, -1)), device, args.reps)
            for prov in providers:
                be = prov or "auto"
                topk_ms = timeit(lambda: fastkd.capture(t, k=args.k, backend=be), device, args.reps)
                g = torch.Generator(device=device).manual_seed(0)
                sample_ms = timeit(lambda: fastkd.capture(t, mode="sample", num_samples=args.num_samples,
                                                          generator=g, backend=be), device, args.reps)
                emit(dict(bench="capture", **shape, **({"provider": prov} if prov else {}),
                          read_once_ms=read_ms, topk_logsumexp_fp32_ms=eager_ms,
                          topk_logsumexp_native_ms=eager_native_ms, fastkd_topk_ms=topk_ms,
                          fastkd_sample_ms=sample_ms, speedup_vs_eager=eager_ms / topk_ms,
                          speedup_vs_eager_native=eager_native_ms / topk_ms, topk_over_read=topk_ms / read_ms,
                          **({"sample_over_read": sample_ms / read_ms} if prov else {}),
                          bytes_read=t.numel() * t.element_size()))
        if "loss" not in args.skip:
            z = lm_like_logits(args.n, args.v, dtype, device, seed=1)
            y = torch.randint(0, args.v, (args.n,), device=device)

            def step(fn):
                zz = z.detach().requires_grad_()
                fn(zz).backward()
            for prov in providers:
                be = prov or "auto"
                st = fastkd.capture(t, k=args.k, backend=be)
                ss = fastkd.capture(t, mode="sample", num_samples=args.num_samples, backend=be)
                dense_ms = timeit(lambda: step(lambda zz: fastkd.kd_loss(zz, t, y, hard_weight=0.5, backend=be)),
                                  device, args.reps)
                sparse_ms = timeit(lambda: step(lambda zz: fastkd.sparse_kd_loss(zz, st, y, hard_weight=0.5,
                                                                                 backend=be)), device, args.reps)
                sampled_ms = timeit(lambda: step(lambda zz: fastkd.sparse_kd_loss(zz, ss, y, hard_weight=0.5,
                                                                                  backend=be)), device, args.reps)
                emit(dict(bench="loss_fwd_bwd", **shape, **({"provider": prov} if prov else {}),
                          dense_kd_loss_ms=dense_ms, sparse_topk_ms=sparse_ms, sparse_sampled_ms=sampled_ms,
                          speedup_topk=dense_ms / sparse_ms, speedup_sampled=dense_ms / sampled_ms))
                del st, ss
        del t

    if "bytes" not in args.skip:
        if args.teacher_logits:
            logits = torch.load(args.teacher_logits).float()
            source = args.teacher_logits
        else:
            logits = lm_like_logits(min(args.n, 512), args.v, torch.float32, torch.device("cpu"), seed=2)
            source = "lm_like_logits (synthetic Zipf-shaped rows)"
        v = logits.shape[-1]
        rows = logits.shape[0] // 8 * 8
        logits = logits[:rows].reshape(8, rows // 8, v)
        with tempfile.TemporaryDirectory() as d:
            for mode in ("topk", "sample"):
                with fastkd.TeacherCache(os.path.join(d, mode), mode=mode, k=args.k, num_samples=args.num_samples,
                                         sync=False) as c:
                    st = c.get_or_capture(list(range(8)), lambda: logits)
                    extra = {}
                    if mode == "sample":
                        extra["mean_unique_ids"] = float((st.counts > 0).sum(-1).float().mean())
                    emit(dict(bench="bytes_per_token", mode=mode, k=args.k, num_samples=args.num_samples, v=v,
                              tokens=c.num_tokens, bytes_per_token=c.bytes_per_token, logits=source, **extra))

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
