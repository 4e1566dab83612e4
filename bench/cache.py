"""Benchmark of the teacher cache: capture and sparse-loss speed, bytes per token.

The benchmark is fastkd.bench.cache (also ``fastkd bench cache``); this script runs it with the
repository's published results file, bench/results/cache.jsonl, as the default --out.

    python bench/cache.py --help
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastkd.bench.cache import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cache.jsonl")))
