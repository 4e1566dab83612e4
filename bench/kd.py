"""Benchmark of the fused kd loss against the PyTorch idiom, torch.compile and liger.

The benchmark is fastkd.bench.kd (also ``fastkd bench kd``); this script runs it with the
repository's published results file, bench/results/kd.jsonl, as the default --out.

    python bench/kd.py --help
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastkd.bench.kd import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kd.jsonl")))
