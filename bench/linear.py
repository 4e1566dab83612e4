"""Benchmark of the fused linear kd loss against the unfused idiom, torch.compile, liger and the bare GEMMs.

The benchmark is fastkd.bench.linear (also ``fastkd bench linear``); this script runs it with the
repository's published results file, bench/results/linear.jsonl, as the default --out.

    python bench/linear.py --help
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastkd.bench.linear import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "linear.jsonl")))
