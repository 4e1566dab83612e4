"""The GPU kernels as the compiler builds them for sm_90, read without a GPU.

``bench/kernel_resources.py`` compiles ``csrc/cuda/{kd,capture,sparse_kd}.cu`` with nvcc
(``-Xptxas -v``) and reads the SASS; it also builds every autotune config of the Triton kd kernel
with ``triton.compile``. These tests fail when a kernel spills registers, when the dense kd loops
stop keeping four 16-byte loads in flight per thread, or when a Triton config loses its 16-byte
loads on rows of an odd byte length (V = 50257).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "bench", "kernel_resources.py")


def _needs_nvcc():
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc (the CUDA toolkit) to compile the CUDA kernels")


@pytest.mark.slow
def test_cuda_kernels_compile_for_sm90_without_spills(tmp_path):
    _needs_nvcc()
    out = tmp_path / "resources.json"
    r = subprocess.run([sys.executable, SCRIPT, "--check", "--json", str(out)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["cuda"]
    kinds = {name: [row for row in rows if f"{name}<" in row["kernel"]]
             for name in ("kd_rows_kernel", "scale_rows_kernel", "topk_kernel", "sample_kernel", "sparse_kernel")}
    assert len(kinds["kd_rows_kernel"]) == 3 * 7 and all(len(v) == 3 for k, v in kinds.items() if k != "kd_rows_kernel")
    for row in rows:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row["kernel"]
        assert row["registers"] and row["registers"] <= 255
    for row in kinds["kd_rows_kernel"]:  # two vectors of z and t per iteration, loaded before any use
        assert row["bytes_in_flight_per_thread"] >= 64, row["kernel"]
    # the table a person reads
    assert "kd_rows_kernel<__nv_bfloat16, 0>" in r.stdout and "in flight" in r.stdout


@pytest.mark.slow
def test_triton_kd_configs_spill_nothing_and_keep_16_byte_loads():
    """Every autotune candidate of the Triton kd kernel, in its worst cases (JSD and skew reverse KL
    with the teacher's gradient, the divergences with the most live values, without and with softcap,
    whose candidates differ), built for sm_90 in a fresh process (Triton's interpreter is on in this
    one)."""
    pytest.importorskip("triton")
    from test_capture import _triton_ptxas

    if _triton_ptxas() is None:
        pytest.skip("this Triton has no ptxas to build cubins with")

    def build(div):
        code = (
            "import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('kr', {SCRIPT!r})\n"
            "kr = importlib.util.module_from_spec(spec); spec.loader.exec_module(kr)\n"
            "out = []\n"
            "for dtype, vocab, cap in (('bf16', 50257, False), ('fp32', 128256, False), ('bf16', 50257, True),\n"
            "                          ('fp32', 50257, True)):\n"
            f"    for row in kr.triton_kd_configs('90', dtype, vocab, {div}, True, cap):\n"
            f"        out.append(dict(row, case=f'{{dtype}} V={{vocab}} softcap={{cap}}', div={div}))\n"
            "print(json.dumps(out))\n")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)

    # One process per divergence, side by side: each builds its candidates on one core.
    procs = [build(div) for div in (2, 5)]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        rows += json.loads(out.strip().splitlines()[-1])
    assert {row["case"] for row in rows} == {"bf16 V=50257 softcap=False", "fp32 V=128256 softcap=False",
                                              "bf16 V=50257 softcap=True", "fp32 V=50257 softcap=True"}
    assert len(rows) >= 20 and {row["div"] for row in rows} == {2, 5}
    for row in rows:
        assert row["spill_instructions"] == 0, row
        assert row["v4_loads"] > 0, row  # the row body is read with 16-byte loads, odd V included
    for div in (2, 5):  # no two configs build the same code
        mine = [row["cubin"] for row in rows if row["div"] == div]
        assert len(set(mine)) == len(mine)
