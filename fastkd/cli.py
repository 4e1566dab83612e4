"""The ``fastkd`` console command. ``fastkd demo [--preset default|tiny|gpu]`` runs the end-to-end
vocabulary-distillation demo (see ``fastkd.demo``)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .demo.presets import ALL_RUNS, PRESETS

    parser = argparse.ArgumentParser(prog="fastkd", description="fastkd command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
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
    return 1  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
