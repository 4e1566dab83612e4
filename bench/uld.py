"""CPU timing of ``fastkd.uld_loss``: the fused kernel against the same loss in PyTorch (softmax +
top-k, ``backend="torch"``) and against the exact closed form (full sort of both rows, as TRL's
ULDLoss computes it), forward + backward, best of a few repetitions.

    python bench/uld.py                      # N=1024 rows, V_s=32000, V_t=50000, k=256
    python bench/uld.py --rows 256 --k 64
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fastkd  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--student-vocab", type=int, default=32000)
    ap.add_argument("--teacher-vocab", type=int, default=50000)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    n, vs, vt, k = args.rows, args.student_vocab, args.teacher_vocab, args.k
    z = torch.randn(n, vs) * 3
    t = torch.randn(n, vt) * 3
    st = fastkd.capture(t, k=k)

    def run(backend):
        x = z.clone().requires_grad_()
        fastkd.uld_loss(x, st, k=k, backend=backend).backward()

    def full_sort():
        x = z.clone().requires_grad_()
        p = x.softmax(-1).sort(-1, descending=True).values
        q = t.softmax(-1).sort(-1, descending=True).values
        w = max(vs, vt)
        (F.pad(p, (0, w - vs)) - F.pad(q, (0, w - vt))).abs().sum(-1).mean().backward()

    def best(f):
        f()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    print(f"threads {torch.get_num_threads()}; N={n} V_s={vs} V_t={vt} k={k}; forward + backward, best of {args.reps}")
    print("| implementation | ms |\n| --- | --- |")
    for name, f in (("uld_loss, backend=\"cpu\" (fused kernel)", lambda: run("cpu")),
                    ("uld_loss, backend=\"torch\" (softmax + top-k)", lambda: run("torch")),
                    ("full sort in PyTorch (exact closed form)", full_sort)):
        print(f"| {name} | {best(f):.1f} |")


if __name__ == "__main__":
    main()
