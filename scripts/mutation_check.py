#!/usr/bin/env python3
"""Does the test suite fail when the code is wrong? One-line mutations, each tried on a scratch copy.

Each mutation below replaces one expression in one file (a gradient's sign, τ², the "mean"
divisor, ignore_index, the tail bucket, a checksum check, ...). The script copies the working tree
to a scratch directory, builds the C++ extension there (CPU kernels only), checks that the selected
tests pass on the unmutated copy, then for every mutation: applies it, rebuilds if it touched C++,
runs the tests that should catch it (``pytest -x``), and restores the file. A mutation is *caught*
when those tests fail; one that still passes *survived* (a hole in the tests). The CUDA kernels'
mutations are caught through the emulation (``cuda_emu``), which compiles ``csrc/cuda/*.cu`` from
the scratch copy's sources; the Triton ones through the interpreter.

    python scripts/mutation_check.py                 # every mutation (~20 minutes on 2 cores)
    python scripts/mutation_check.py --only divisor  # those whose name contains "divisor"
    python scripts/mutation_check.py --list

Run it with the project's virtual environment (``.venv/bin/python``); it never touches the working
tree. Not part of CI (it rebuilds the extension once per C++ mutation).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple  # pytest arguments: the tests that must catch it

    @property
    def cxx(self) -> bool:
        return self.path.startswith(("csrc/cpu/", "csrc/common/", "csrc/bind/"))


KD = ("tests/test_kd.py",)
MUTATIONS = [
    Mutation("cpu kd: forward-KL gradient sign", "csrc/cpu/kd.cpp",
             "gs = soft * (q - p);", "gs = soft * (p - q);", KD + ("-k", "cpu")),
    Mutation("cpu kd: reverse-KL gradient sign", "csrc/cpu/kd.cpp",
             "gs = q > Acc(0) ? soft * q * ((lq - lp) - f.kl_qp) : zero;",
             "gs = q > Acc(0) ? soft * q * ((lp - lq) - f.kl_qp) : zero;", KD + ("-k", "cpu")),
    Mutation("cpu kd: label smoothing dropped from the hard gradient", "csrc/cpu/kd.cpp",
             "gs += hard * (sm - eps_v);", "gs += hard * sm;", KD + ("-k", "cpu")),
    Mutation("cpu kd: ignore_index read as -100", "csrc/cpu/kd.cpp",
             "ignored = (y == a.ignore_index);", "ignored = (y == -100);", KD + ("-k", "cpu")),
    Mutation("merge rule: shift of the log-ratio sums", "csrc/common/kd_math.h",
             "a_t = ft * (a_t - d_t * (dmt - dmz));", "a_t = ft * (a_t + d_t * (dmt - dmz));",
             KD + ("-k", "cpu")),
    Mutation("cpu sparse: tail bucket dropped from the loss", "csrc/cpu/sparse_kd.cpp",
             "soft += tail_p * (std::log(tail_p) - log_tail_q);", "soft += 0 * tail_p;",
             ("tests/test_sparse_kd.py", "-k", "cpu")),
    Mutation("settings: tau^2 dropped", "fastkd/_settings.py",
             "return float(self.soft_weight * (t * t if self.t2_scale else 1.0))",
             "return float(self.soft_weight * (t if self.t2_scale else 1.0))", KD + ("-k", "cpu")),
    Mutation("settings: TRL's beta = 0 / 1 cases swapped", "fastkd/_settings.py",
             'return "forward_kl" if beta == 0.0 else "reverse_kl"',
             'return "reverse_kl" if beta == 0.0 else "forward_kl"', KD + ("-k", "jsd")),
    Mutation("divisor: counts target != -100 instead of != ignore_index", "fastkd/_inputs.py",
             "count = (target != ignore_index).sum()", "count = (target != -100).sum()",
             KD + ("tests/test_sparse_kd.py", "tests/test_linear.py", "-k", "ignore_index")),
    Mutation("divisor: num_items ignored", "fastkd/_inputs.py",
             "return torch.tensor(float(num_items), dtype=dtype, device=device)",
             "return torch.tensor(float(max(n_rows, 1)), dtype=dtype, device=device)",
             KD + ("tests/test_sparse_kd.py", "-k", "num_items")),
    Mutation("backward: grad_output not applied on CPU", "fastkd/_ops/kd.py",
             "if bool(torch.all(g == 1)):", "if True:", KD + ("-k", "cpu")),
    Mutation("reference shard merge: shift sign", "fastkd/_reference/kd_shard.py",
             "out[:, A_T] = (ft * (a_t - d_t * (dmt - dmz))).sum(0)",
             "out[:, A_T] = (ft * (a_t + d_t * (dmt - dmz))).sum(0)", ("tests/test_kd_shard.py",)),
    Mutation("reference sparse shard: tail ratio", "fastkd/_reference/sparse_kd_shard.py",
             "grad = torch.where(in_set, grad, q * (1.0 - ratio).unsqueeze(1))",
             "grad = torch.where(in_set, grad, q * (1.0 + ratio).unsqueeze(1))",
             ("tests/test_distributed.py", "-k", "world2 and sparse")),
    Mutation("store: payload checksum not verified", "fastkd/cache/store.py",
             "if buf.shape[0] != nbytes or _crc(buf) != crc:", "if buf.shape[0] != nbytes:",
             ("tests/test_store.py",)),
    Mutation("cuda kd (emulated): forward-KL gradient sign", "csrc/cuda/kd.cu",
             "gi = c.soft * (q - p);", "gi = c.soft * (p - q);", KD + ("-k", "cuda_emu")),
    Mutation("cuda kd (emulated): z at the target read after the merge", "csrc/cuda/kd.cu",
             "if (have_y && threadIdx.x == 0) s.z_y = softcap(to_f(z[y_local]), c);\n      s = block_merge(s, sbuf);",
             "s = block_merge(s, sbuf);\n      if (have_y) s.z_y = softcap(to_f(z[y_local]), c);",
             KD + ("-k", "inplace_grad_equals and cuda_emu")),
    Mutation("cuda sparse (emulated): tail bucket dropped", "csrc/cuda/sparse_kd.cu",
             "soft += tail_p * (logf(tail_p) - log_tail_q);", "soft += 0.f * tail_p;",
             ("tests/test_sparse_kd.py", "-k", "cuda_emu")),
    Mutation("triton kd (interpreted): forward-KL gradient sign", "fastkd/_backends/triton/kd.py",
             "g = soft * (q - p)", "g = soft * (p - q)", KD + ("-k", "triton")),
]


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "build", ".fastkd_cache", "__pycache__", "*.so", ".pytest_cache")
    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)


def _build(scratch: Path, build_dir: Path) -> None:
    """The CPU extension of the scratch copy, placed next to its package."""
    if not (build_dir / "build.ninja").exists():
        import pybind11

        subprocess.run(["cmake", "-S", str(scratch), "-B", str(build_dir), "-G", "Ninja", "-DFASTKD_CUDA=OFF",
                        f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
                       check=True, capture_output=True)
    r = subprocess.run(["ninja", "-C", str(build_dir)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stdout[-3000:] + r.stderr[-3000:])
    for so in build_dir.glob("_C*.so"):
        shutil.copy2(so, scratch / "fastkd" / so.name)


def _environment(scratch: Path, site: Path) -> dict:
    """Python in the scratch copy (and in its subprocesses) imports the scratch package: a
    sitecustomize drops the editable-install import hook and puts the copy first on sys.path."""
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]\n"
        f"sys.path.insert(0, {str(scratch)!r})\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(scratch)]), FASTKD_REQUIRE_EXTENSION="1")
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py decides
    return env


def _pytest(scratch: Path, env: dict, args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="run the mutations whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only is None or args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:60s} {m.path}")
        return 0
    for m in chosen:
        text = (ROOT / m.path).read_text()
        if text.count(m.old) != 1:
            print(f"stale mutation {m.name!r}: its text occurs {text.count(m.old)} times in {m.path}", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="fastkd-mutation-"))
    scratch, build_dir = work / "tree", work / "build"
    print(f"scratch copy: {scratch}")
    try:
        _copy_tree(scratch)
        _build(scratch, build_dir)
        env = _environment(scratch, work / "site")
        # every selected test must pass before anything is mutated
        selections = sorted({m.tests for m in chosen})
        for sel in selections:
            r = _pytest(scratch, env, sel)
            if r.returncode != 0:
                print(f"the unmutated tests fail ({' '.join(sel)}):\n{r.stdout[-3000:]}", file=sys.stderr)
                return 2
        rows = []
        for m in chosen:
            t0 = time.time()
            target = scratch / m.path
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new))
            try:
                if m.cxx:
                    _build(scratch, build_dir)
                r = _pytest(scratch, env, m.tests)
                tail = [line for line in r.stdout.splitlines() if "passed" in line or "failed" in line]
                outcome = "caught" if r.returncode != 0 else "SURVIVED"
                rows.append((m.name, outcome, tail[-1] if tail else r.stdout[-200:], time.time() - t0))
            finally:
                target.write_text(original)
                if m.cxx:
                    _build(scratch, build_dir)
            print(f"{rows[-1][1]:9s} {m.name}  ({rows[-1][2]}, {rows[-1][3]:.0f} s)", flush=True)
        print("\n| mutation | file | outcome | tests |\n| --- | --- | --- | --- |")
        for (name, outcome, tail, _), m in zip(rows, chosen):
            print(f"| {name} | `{m.path}` | {outcome} | {tail} |")
        survived = [r for r in rows if r[1] != "caught"]
        print(f"\n{len(rows) - len(survived)} of {len(rows)} mutations caught")
        return 1 if survived else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
