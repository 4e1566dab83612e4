"""GPU benchmark of the fused kd loss against its pass floors, liger and torch.compile.

The benchmark is fastkd.bench.kd_gpu (also ``fastkd bench kd_gpu``); bench/gpu_round.sh runs this
script with --out in its output folder.

    python bench/kd_gpu.py --quick --out kd_gpu_quick.jsonl
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastkd.bench.kd_gpu import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
