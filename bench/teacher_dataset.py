"""Peak memory of ``TeacherCache.to_dataset`` / ``TeacherCache.from_dataset`` on a large cache.

Fills a top-k cache with ``--tokens`` tokens (``--seq`` tokens per sample, k = ``--k`` served
log-probabilities per token over a ``--vocab`` vocabulary, written through
``SparseTeacher.from_logprobs``), then runs the export and the import each in a fresh child process
and reports its peak resident memory (VmHWM) next to the resident memory after the imports (torch,
fastkd, datasets) and the time taken. Resident memory includes the pages of the memory-mapped
files read (the cache's shards, the Arrow file), which grow with their size and which the kernel
reclaims at will; the peak of the anonymous part (RssAnon, sampled every 5 ms) is what the process
itself holds. Both directions stream in batches of ``--batch-size`` samples, so that part should
not grow with the cache: ``--tokens`` can be varied to check.

    python bench/teacher_dataset.py                      # 1 M tokens, ~1-2 minutes on 2 cores
    python bench/teacher_dataset.py --tokens 250000      # the same at a quarter of the size

Results are appended as JSON lines to bench/results/teacher_dataset.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def _mem_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def fill(path: str, tokens: int, seq: int, k: int, vocab: int, batch: int) -> dict:
    import torch

    import fastkd

    t0 = time.time()
    g = torch.Generator().manual_seed(0)
    n_samples = tokens // seq
    stride = vocab // k
    with fastkd.TeacherCache(path, mode="topk", k=k, vocab_size=vocab, teacher="served", sync=False) as cache:
        for s0 in range(0, n_samples, batch):
            b = min(batch, n_samples - s0)
            # k distinct ids per token (one per stride), and log-probabilities of k + 1 buckets (the
            # last one is the tail a server does not return)
            ids = torch.arange(k) * stride + torch.randint(0, stride, (b, seq, k), generator=g)
            lp = torch.log_softmax(torch.randn(b, seq, k + 1, generator=g) * 2, -1)[..., :k]
            st = fastkd.SparseTeacher.from_logprobs(ids, lp, vocab_size=vocab)
            cache.write(range(s0, s0 + b), st)
        return dict(samples=len(cache), tokens=cache.num_tokens, cache_bytes=cache.nbytes, seconds=time.time() - t0)


def stage(which: str, cache_dir: str, arrow: str, batch: int) -> dict:
    import threading

    import datasets  # noqa: F401  (counted in the baseline)
    import torch  # noqa: F401

    import fastkd

    base = _mem_mib("VmRSS")
    base_anon = _mem_mib("RssAnon")
    peak_anon = [base_anon]
    done = threading.Event()

    def watch():
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], _mem_mib("RssAnon"))
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.time()
    if which == "export":
        with fastkd.TeacherCache(cache_dir, readonly=True) as cache:
            ds = cache.to_dataset(arrow, batch_size=batch, progress=False)
            rows = len(ds)
    else:
        import datasets as hf

        ds = hf.Dataset.from_file(arrow)
        with fastkd.TeacherCache.from_dataset(ds, cache_dir, batch_size=batch, progress=False,
                                              vocab_size=int(os.environ["FKD_BENCH_VOCAB"]), sync=False) as c:
            rows = len(c)
    seconds = time.time() - t0
    done.set()
    watcher.join()
    peak_anon[0] = max(peak_anon[0], _mem_mib("RssAnon"))
    return dict(stage=which, rows=rows, seconds=seconds, rss_after_imports_mib=base, peak_rss_mib=_mem_mib("VmHWM"),
                anon_after_imports_mib=base_anon, peak_anon_mib=peak_anon[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--seq", type=int, default=500)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch-size", type=int, default=64, help="samples per streamed batch")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "teacher_dataset.jsonl"))
    ap.add_argument("--stage", choices=["export", "import"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--arrow", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:  # a child: one direction, its memory reported on stdout
        print(json.dumps(stage(args.stage, args.cache, args.arrow, args.batch_size)))
        return None

    import torch

    import fastkd

    tmp = tempfile.mkdtemp(prefix="fastkd-dsbench-")
    src, dst, arrow = os.path.join(tmp, "src"), os.path.join(tmp, "dst"), os.path.join(tmp, "teacher.arrow")
    filled = fill(src, args.tokens, args.seq, args.k, args.vocab, args.batch_size)
    print(f"cache: {filled['samples']} samples, {filled['tokens']} tokens, {filled['cache_bytes'] / 2**20:.1f} MiB "
          f"({filled['seconds']:.0f}s to fill)", flush=True)
    env = dict(os.environ, FKD_BENCH_VOCAB=str(args.vocab))
    results = []
    for which, cache_dir in (("export", src), ("import", dst)):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--stage", which, "--cache", cache_dir,
                              "--arrow", arrow, "--batch-size", str(args.batch_size)],
                             check=True, capture_output=True, text=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{which:6s}: {r['rows']} samples in {r['seconds']:.1f}s, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(after imports {r['rss_after_imports_mib']:.0f} MiB: +{r['peak_rss_mib'] - r['rss_after_imports_mib']:.0f}"
              f" MiB); anonymous: peak {r['peak_anon_mib']:.0f} MiB (+{r['peak_anon_mib'] - r['anon_after_imports_mib']:.0f}"
              f" MiB)", flush=True)
    arrow_mib = os.path.getsize(arrow) / 2**20
    print(f"arrow file: {arrow_mib:.1f} MiB")
    meta = dict(bench="teacher_dataset", date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, fastkd=fastkd.__version__, tokens=filled["tokens"], seq=args.seq, k=args.k,
                vocab=args.vocab, batch_size=args.batch_size, cache_mib=filled["cache_bytes"] / 2**20,
                arrow_mib=arrow_mib)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        for r in results:
            f.write(json.dumps({**meta, **r}) + "\n")
    return results


if __name__ == "__main__":
    main()
