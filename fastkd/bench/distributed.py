"""Benchmark of fastkd.distributed.kd_loss (vocab-parallel KD) against gathering the logits.

Two parts:

1. Communication volume per token (analytic, no processes): what one rank sends per row in forward
   for the vocab-parallel loss (all-gather of the 11-float row statistics; JSD adds an all-reduce of
   2 floats) versus gathering the student's and the teacher's logit shards into full rows.
2. A CPU timing with ``--world`` gloo processes (default 2): forward+backward of

   * ``vocab_parallel``       fastkd.distributed.kd_loss, fused C++ shard kernels (backend "cpu")
   * ``vocab_parallel_torch`` the same with the vectorised PyTorch shard phases (backend "torch")
   * ``gather_logits``        all-gather both logit shards, fastkd.kd_loss on the full rows,
                              keep this rank's slice of the gradient
   * ``single_device``        fastkd.kd_loss on the full rows in one process (no communication)

   The bytes each rank hands to collectives are measured by wrapping torch.distributed's
   collectives, so the table shows measured, not assumed, volume. GB/s is over the minimal traffic
   of one rank's part (read its student and teacher shards, write its gradient shard).

    fastkd bench distributed                     # rows 512, V in {32000, 128256}, world 2
    fastkd bench distributed --rows 256 --vocab 32000 --divergence jsd --reps 3

Rank 0 collects the records.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from . import common

MODULE = "fastkd.bench.distributed"
SUMMARY = "vocab-parallel kd loss over gloo processes vs gathering the logits (ms, bytes/token)"
STATS_WIDTH = 11
PROVIDERS = ("vocab_parallel", "vocab_parallel_torch", "gather_logits", "single_device")


def add_arguments(ap: argparse.ArgumentParser, default_out=None) -> None:
    ap.add_argument("--world", type=int, default=2, help="gloo processes")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    common.add_output_arguments(ap, default_out)


def comm_bytes_per_token(vocab, world, divergence, logit_bytes):
    """Bytes one rank receives per row in forward: an all-gather delivers the W−1 other ranks'
    blocks; a ring all-reduce of b bytes moves 2·(W−1)/W·b per rank."""
    shard = vocab / world
    ours = (world - 1) * STATS_WIDTH * 4
    if divergence == "jsd":
        ours += 2 * (world - 1) / world * 2 * 4  # ring all-reduce of 2 float32 values
    gather = (world - 1) * shard * logit_bytes * 2  # student and teacher shards of every other rank
    return ours, gather


def _min_traffic(n, columns, elt):
    """Read the student and teacher logits of ``columns`` columns, write their gradient."""
    return 3 * n * columns * elt


def _device_info():
    import torch

    import fastkd

    return {"device_name": common.device_name("cpu"), "torch": torch.__version__,
            "fastkd": fastkd.__version__, "python": common.versions()["python"], "date": common.utc_now(),
            # other work on the machine inflates CPU timings: keep the load next to the numbers
            "loadavg_1m": os.getloadavg()[0]}


def _instrument(record):
    """Wrap the collectives so every call records the bytes of the tensor this rank contributes."""
    import torch.distributed as dist

    def wrap(name, pick):
        orig = getattr(dist, name, None)
        if orig is None:
            return

        def wrapper(*args, **kwargs):
            t = pick(args, kwargs)
            record.append((name, t.numel() * t.element_size()))
            return orig(*args, **kwargs)

        setattr(dist, name, wrapper)

    wrap("all_gather_single", lambda a, k: a[1])
    wrap("all_gather_into_tensor", lambda a, k: a[1])
    wrap("all_reduce", lambda a, k: a[0])
    wrap("all_gather", lambda a, k: a[1])


def _worker(rank, world, init_file, cfg, out_path):
    """One gloo rank: times every multi-process provider; rank 0 writes the records to ``out_path``."""
    import torch
    import torch.distributed as dist

    import fastkd
    import fastkd.distributed as fkd

    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    record = []
    _instrument(record)
    dtype = getattr(torch, cfg["dtype"])
    kw = dict(temperature=2.0, hard_weight=0.5, divergence=cfg["divergence"])
    lines = []
    for vocab in cfg["vocab"]:
        n = cfg["rows"]
        shard = vocab // world
        vocab_eff = shard * world
        g = torch.Generator().manual_seed(0)
        s_full = (torch.randn(n, vocab_eff, generator=g) * 3).to(dtype)
        t_full = (torch.randn(n, vocab_eff, generator=g) * 3).to(dtype)
        y = torch.randint(0, vocab_eff, (n,), generator=g)
        y[::17] = -100
        a, b = rank * shard, (rank + 1) * shard
        s_sh, t_sh = s_full[:, a:b].contiguous(), t_full[:, a:b].contiguous()
        del s_full, t_full

        def vocab_parallel(backend):
            def step():
                s = s_sh.detach().requires_grad_()
                fkd.kd_loss(s, t_sh, y, backend=backend, **kw).backward()
                return s.grad
            return step

        def gather_logits():
            s = s_sh.detach().requires_grad_()
            full_s = torch.empty(world * n, shard, dtype=dtype)
            full_t = torch.empty(world * n, shard, dtype=dtype)
            dist.all_gather_single(full_s, s.detach().contiguous())
            dist.all_gather_single(full_t, t_sh)
            zs = full_s.view(world, n, shard).permute(1, 0, 2).reshape(n, vocab_eff).requires_grad_()
            zt = full_t.view(world, n, shard).permute(1, 0, 2).reshape(n, vocab_eff)
            fastkd.kd_loss(zs, zt, y, **kw).backward()
            return zs.grad[:, a:b]

        providers = {"vocab_parallel": vocab_parallel("cpu"),
                     "vocab_parallel_torch": vocab_parallel("torch"),
                     "gather_logits": gather_logits}
        for name in cfg["providers"]:
            if name not in providers:
                continue
            fn = providers[name]
            fn()  # warm-up
            dist.barrier()
            times = []
            record.clear()
            for _ in range(cfg["reps"]):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            sent = sum(nbytes for _, nbytes in record) / cfg["reps"]
            calls = len(record) / cfg["reps"]
            ours, gather = comm_bytes_per_token(vocab_eff, world, cfg["divergence"], dtype.itemsize)
            ms = statistics.median(times)
            traffic = _min_traffic(n, shard, dtype.itemsize)
            lines.append(dict(
                bench="distributed", provider=name, mode="fwd_bwd", world=world, n=n, v=vocab_eff,
                dtype=cfg["dtype"], divergence=cfg["divergence"], median_ms=ms,
                min_ms=min(times), repeats=cfg["reps"], collectives_per_step=calls,
                contributed_bytes_per_token=sent / n,
                model_bytes_per_token_vocab_parallel=ours, model_bytes_per_token_gather=gather,
                min_traffic_bytes=traffic, gbps=traffic / (ms * 1e-3) / 1e9,
                backend="gloo", threads=cfg["threads"]))
    dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(lines, f)
    dist.destroy_process_group()


def _single_device(cfg):
    import torch

    import fastkd

    torch.set_num_threads(cfg["threads"])
    dtype = getattr(torch, cfg["dtype"])
    kw = dict(temperature=2.0, hard_weight=0.5, divergence=cfg["divergence"])
    lines = []
    for vocab in cfg["vocab"]:
        vocab_eff = (vocab // cfg["world"]) * cfg["world"]
        g = torch.Generator().manual_seed(0)
        s = (torch.randn(cfg["rows"], vocab_eff, generator=g) * 3).to(dtype)
        t = (torch.randn(cfg["rows"], vocab_eff, generator=g) * 3).to(dtype)
        y = torch.randint(0, vocab_eff, (cfg["rows"],), generator=g)
        y[::17] = -100
        times = []
        for i in range(cfg["reps"] + 1):
            z = s.detach().requires_grad_()
            t0 = time.perf_counter()
            fastkd.kd_loss(z, t, y, **kw).backward()
            if i:
                times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times)
        traffic = _min_traffic(cfg["rows"], vocab_eff, dtype.itemsize)
        lines.append(dict(bench="distributed", provider="single_device", mode="fwd_bwd", world=1,
                          n=cfg["rows"], v=vocab_eff, dtype=cfg["dtype"], divergence=cfg["divergence"],
                          median_ms=ms, min_ms=min(times), repeats=cfg["reps"],
                          collectives_per_step=0, contributed_bytes_per_token=0.0,
                          min_traffic_bytes=traffic, gbps=traffic / (ms * 1e-3) / 1e9,
                          threads=cfg["threads"]))
    return lines


def plot_points(records):
    return [common.Point(r["provider"], r["n"], r["v"], r["median_ms"], r["gbps"], f"world {r['world']}")
            for r in records if "median_ms" in r and "gbps" in r]


def run(args) -> int:
    common.check_plot_available(args)
    import torch
    import torch.multiprocessing as mp

    cfg = dict(world=args.world, rows=args.rows, vocab=list(args.vocab), dtype=args.dtype,
               divergence=args.divergence, reps=args.reps, threads=args.threads, providers=list(args.providers))
    print("communication per token and rank (forward), bytes:")
    print(f"{'V':>8} {'world':>5} {'dtype':>9} {'vocab-parallel':>15} {'gather logits':>14} {'ratio':>8}")
    for v in args.vocab:
        for w in sorted({2, 4, 8, args.world}):
            for dt in ("bfloat16", "float32"):
                ours, gather = comm_bytes_per_token(v, w, args.divergence, getattr(torch, dt).itemsize)
                print(f"{v:>8} {w:>5} {dt:>9} {ours:>15.0f} {gather:>14.0f} {gather / ours:>7.0f}x")

    lines = []
    if any(p != "single_device" for p in args.providers):
        with tempfile.TemporaryDirectory(prefix="fastkd_bench_dist_") as tmp:
            out_path = os.path.join(tmp, "rank0.json")
            mp.start_processes(_worker, args=(args.world, os.path.join(tmp, "init"), cfg, out_path),
                               nprocs=args.world, start_method="spawn")
            with open(out_path) as f:
                lines = json.load(f)
    if "single_device" in args.providers:
        lines += _single_device(cfg)
    info = _device_info()
    records = [{**line, **info} for line in lines]
    print(f"\nforward+backward, median of {args.reps} (ms), {info['device_name']}, world={args.world}, "
          f"rows={args.rows}, {args.dtype}, {args.divergence}:")
    print(f"{'provider':>22} {'V':>8} {'median ms':>10} {'GB/s':>7} {'collectives':>12} {'bytes/token/rank':>17}")
    for line in records:
        print(f"{line['provider']:>22} {line['v']:>8} {line['median_ms']:>10.1f} {line['gbps']:>7.2f} "
              f"{line['collectives_per_step']:>12.0f} {line['contributed_bytes_per_token']:>17.1f}")
    common.finish(args, records, plot_points, f"fastkd bench distributed: world {args.world}, rows {args.rows}, "
                                              f"{args.dtype}, {args.divergence}, {info['device_name']}")
    return 0


def main(argv=None, default_out=None, prog=None) -> int:
    return common.standalone_main(sys.modules[__name__], argv, default_out, prog)


if __name__ == "__main__":
    sys.exit(main())
