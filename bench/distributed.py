"""Benchmark of the vocab-parallel kd loss over gloo processes against gathering the logits.

The benchmark is fastkd.bench.distributed (also ``fastkd bench distributed``); this script runs it with the
repository's published results file, bench/results/distributed.jsonl, as the default --out.

    python bench/distributed.py --help
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastkd.bench.distributed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "distributed.jsonl")))
