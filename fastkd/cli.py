"""The ``fastkd`` console command.

* ``fastkd demo [--preset default|tiny|gpu]`` runs the end-to-end vocabulary-distillation demo
  (see ``fastkd.demo``).
* ``fastkd bench {kd,cache,linear,distributed,kd_gpu} [options]`` runs a kernel benchmark (see
  ``fastkd.bench``); ``fastkd-bench`` is the same command.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_demo(sub) -> None:
    from .demo.presets import ALL_RUNS, PRESETS

    demo = sub.add_parser(
        "demo", help="distil a small GPT on text shipped with Python: CE vs KD vs cached KD",
        description="End-to-end LLM vocabulary distillation on Python's own documentation and "
                    "standard-library sources; no network, everything cached under --cache-dir.")
    demo.add_argument("--preset", choices=sorted(PRESETS), default="default",
                      help="default: a few minutes on 2 CPU cores; tiny: smoke test; gpu: larger, on a GPU")
    demo.add_argument("--cache-dir", default=None, help="cache directory (default $FASTKD_CACHE_DIR or ./.fastkd_cache)")
    demo.add_argument("--out", default=None, help="output directory (default <cache-dir>/demo-<preset>)")
    demo.add_argument("--runs", nargs="+", choices=ALL_RUNS, default=None, help="subset of the student runs")
    demo.add_argument("--vocab-size", type=_positive_int, default=None, help="BPE vocabulary (e.g. 32000)")
    demo.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps of every student run")
    demo.add_argument("--teacher-steps", type=_positive_int, default=None, help="teacher training steps")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=None, help="override the preset's device")
    demo.add_argument("--threads", type=_positive_int, default=None,
                      help="CPU threads for torch (default: torch's choice, usually one per core)")
    demo.add_argument("--force", action="store_true", help="rerun student runs even if cached")
    demo.add_argument("--quiet", action="store_true", help="no progress bars or tables on stdout")


def _add_bench(sub) -> None:
    from . import bench

    parser = sub.add_parser(
        "bench", help="kernel benchmarks: kd, cache, linear, distributed, kd_gpu",
        description="Kernel benchmarks of fastkd. Each prints a table; --out FILE.jsonl appends the "
                    "measurements as JSON lines, --plot FILE.png draws time and GB/s per provider.",
        epilog="fastkd bench NAME --help lists a benchmark's options.")
    names = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in bench.BENCHMARKS:
        mod = bench.load(name)
        p = names.add_parser(name, help=mod.SUMMARY, description=mod.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p, default_out=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd", description="fastkd command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_bench(sub)
    return parser


def _demo(args) -> int:
    from .demo import run_demo

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        run_demo(args.preset, cache_dir=args.cache_dir, out_dir=args.out, runs=args.runs, force=args.force,
                 progress=not args.quiet, device=args.device, vocab_size=args.vocab_size,
                 student_steps=args.steps, teacher_steps=args.teacher_steps)
    except (ValueError, TypeError) as exc:
        print(f"fastkd demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "bench":
        from . import bench
        from .bench.common import run_module

        return run_module(bench.load(args.benchmark), args, f"fastkd bench {args.benchmark}")
    return 1  # pragma: no cover - argparse rejects unknown commands


def bench_main(argv: Optional[List[str]] = None) -> int:
    """``fastkd-bench [BENCHMARK] [options]``: ``fastkd bench``, with ``kd`` when no benchmark is named."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "kd")
    return main(["bench"] + argv)


if __name__ == "__main__":
    sys.exit(main())
