"""The kernel benchmarks of fastkd.bench through the `fastkd bench` command, at tiny sizes: the JSON
lines they write, the plot, the help, and that they run from the package alone."""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from fastkd import _ext
from fastkd.bench import BENCHMARKS, common
from fastkd.bench import cache as bench_cache
from fastkd.bench import kd as bench_kd
from fastkd.cli import bench_main, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG


def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("kd", "cache", "linear", "distributed", "kd_gpu"):
        assert name in out
    assert set(BENCHMARKS) == {"kd", "cache", "linear", "distributed", "kd_gpu"}
    with pytest.raises(SystemExit) as exc:
        bench_main(["linear", "--help"])  # the fastkd-bench alias
    assert exc.value.code == 0
    assert "--plot" in capsys.readouterr().out


def test_bench_kd_in_process_alternates_providers_and_reports_floors(tmp_path, capsys):
    out = tmp_path / "kd.jsonl"
    rc = main(["bench", "kd", "--in-process", "--n", "16", "--v", "300", "--providers", "torch_eager", "fastkd_cpu",
               "--modes", "fwd+bwd", "--reps", "2", "--copy-mib", "4", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fastkd's exp" in printed and "bw floor" in printed
    recs = _records(out)
    assert [r["provider"] for r in recs] == ["torch_eager", "fastkd_cpu"]
    for r in recs:
        assert r["process"] == "in_process" and r["reps"] == 9  # at least 9 rounds
        assert _finite_positive(r["ms_min"]) and r["ms_min"] <= r["ms"]
        assert r["bw_floor_ms"] == pytest.approx(3 * 16 * 300 * 4 / (r["copy_gbps"] * 1e9) * 1e3, rel=1e-2)
        assert r["exp_floor_ms"] == pytest.approx(2 * 16 * 300 * r["exp_ns"] * 1e-6, rel=1e-2)
    assert recs[1]["speedup_vs_eager"] == pytest.approx(recs[0]["ms_min"] / recs[1]["ms_min"])
    ns = _ext.C.kd_exp_ns_cpu(num_threads=1)
    assert 0.01 < ns < 100  # nanoseconds per exponential of the kernels' own exp


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_bench_kd_records_and_plot(tmp_path):
    out, png = tmp_path / "res" / "kd.jsonl", tmp_path / "kd.png"
    # One fresh process per measurement (torch import included): two providers, one mode.
    rc = main(["bench", "kd", "--n", "32", "--v", "256", "--providers", "torch_eager", "fastkd_torch",
               "--modes", "fwd", "--reps", "1", "--budget-s", "0", "--copy-mib", "4",
               "--out", str(out), "--plot", str(png)])
    assert rc == 0
    recs = _records(out)
    assert [r["provider"] for r in recs] == ["torch_eager", "fastkd_torch"]
    for r in recs:
        assert "skipped" not in r, r
        assert r["bench"] == "kd" and (r["n"], r["v"], r["mode"], r["dtype"]) == (32, 256, "fwd", "float32")
        assert _finite_positive(r["ms"]) and _finite_positive(r["gbps"]) and _finite_positive(r["copy_gbps"])
        assert r["min_traffic_bytes"] == 2 * 32 * 256 * 4 and r["reps"] == 1
        assert isinstance(r["peak_extra_bytes"], int)
    assert recs[1]["speedup_vs_eager"] == pytest.approx(recs[0]["ms"] / recs[1]["ms"])
    assert [p.provider for p in bench_kd.plot_points(recs)] == ["torch_eager", "fastkd_torch"]
    _check_png(png)


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_bench_cache_records_and_plot(tmp_path, capsys):
    out, png = tmp_path / "cache.jsonl", tmp_path / "cache.png"
    rc = main(["bench", "cache", "--n", "16", "--v", "512", "1024", "--k", "8", "--num-samples", "8",
               "--reps", "1", "--dtype", "float32", "--out", str(out), "--plot", str(png)])
    assert rc == 0
    recs = _records(out)
    kinds = [r["bench"] for r in recs]
    assert kinds.count("capture") == 2 and kinds.count("loss_fwd_bwd") == 2 and kinds.count("bytes_per_token") == 4
    for r in recs:
        assert r["backend"] == "cpu"
        if r["bench"] == "capture":
            for key in ("read_once_ms", "topk_logsumexp_fp32_ms", "topk_logsumexp_native_ms", "fastkd_topk_ms",
                        "fastkd_sample_ms", "fastkd_sample_systematic_ms", "speedup_vs_eager", "topk_over_read"):
                assert _finite_positive(r[key]), key
            assert r["bytes_read"] == 16 * r["v"] * 4
        elif r["bench"] == "loss_fwd_bwd":
            for key in ("dense_kd_loss_ms", "sparse_topk_ms", "sparse_sampled_ms", "speedup_topk"):
                assert _finite_positive(r[key]), key
        else:
            assert _finite_positive(r["bytes_per_token"]) and r["tokens"] == 16
    points = bench_cache.plot_points(recs)
    assert {p.v for p in points} == {512, 1024}
    assert all(_finite_positive(p.ms) and _finite_positive(p.gbps) for p in points)
    assert "capture: fastkd capture top-k" in {p.provider for p in points}
    _check_png(png)
    printed = capsys.readouterr().out
    assert "fastkd top-k" in printed and "bytes/token" in printed


def test_bench_linear_records(tmp_path):
    out = tmp_path / "linear.jsonl"
    rc = main(["bench", "linear", "--n", "16", "--h", "8", "--v", "128", "--providers", "fastkd",
               "--repeat", "1", "--out", str(out)])
    assert rc == 0
    (r,) = _records(out)
    assert "error" not in r, r
    assert r["bench"] == "linear" and r["provider"] == "fastkd" and r["backend"] == "cpu"
    assert (r["n"], r["h"], r["v"], r["mode"]) == (16, 8, 128, "fwd_bwd")
    assert _finite_positive(r["median_ms"]) and _finite_positive(r["gbps"])
    assert r["grad_bytes"] == (16 * 8 + 128 * 8) * 4  # dH_s and dW_s
    assert r["kd"] == {"temperature": 2.0, "hard_weight": 0.5, "beta": 0.0}


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_bench_linear_trl_provider_is_trls_loss_and_fastkds_without_t2(beta):
    """The trl provider (TRL's chunked divergence) and the fastkd provider compute the same loss up
    to fastkd's τ² (TRL has none) at hard_weight 0, with the same student gradients."""
    pytest.importorskip("trl")
    import torch

    from fastkd.bench import linear as bench_linear

    kd = dict(temperature=2.0, hard_weight=0.0, beta=beta)
    got = {}
    for prov in ("trl", "fastkd"):
        hs, ws, ht, wt, y = bench_linear._inputs(48, 16, 300, torch.float32, "cpu", seed=3)
        loss = bench_linear._make_step(prov, kd)(hs, ws, ht, wt, y)
        loss.backward()
        got[prov] = (loss.detach(), hs.grad, ws.grad)
    for a, b in zip(got["trl"], got["fastkd"]):
        torch.testing.assert_close(a * 4.0, b, rtol=2e-5, atol=1e-7)  # τ² = 4
    assert got["trl"][0] > 1e-3


def test_bench_linear_skips_trl_cleanly_without_it(tmp_path, monkeypatch, capsys):
    import importlib.util

    from fastkd.bench import linear as bench_linear

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    assert not bench_linear._available("trl", "cpu") and bench_linear._available("fastkd", "cpu")
    out = tmp_path / "l.jsonl"
    rc = main(["bench", "linear", "--n", "16", "--h", "8", "--v", "64", "--providers", "trl", "--repeat", "1",
               "--out", str(out)])
    assert rc == 0
    assert "trl: not measured (needs trl)" in capsys.readouterr().out
    assert not out.exists() or out.read_text() == ""


def test_no_out_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "cache", "--n", "8", "--v", "256", "--k", "4", "--num-samples", "4", "--reps", "1",
               "--dtype", "float32", "--skip", "loss", "bytes"])
    assert rc == 0
    assert os.listdir(tmp_path) == []
    assert "capture" in capsys.readouterr().out


def test_plot_without_matplotlib_fails_before_measuring(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    rc = main(["bench", "kd", "--providers", "torch_eager", "--out", str(tmp_path / "kd.jsonl"),
               "--plot", str(tmp_path / "kd.png")])
    assert rc == 2
    assert "matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "kd.jsonl").exists()


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plot_picks_the_varying_size(tmp_path):
    pts = [common.Point(p, n, 1000, ms, 1.0 + ms, "fwd") for p in ("a", "b") for n, ms in ((8, 1.0), (64, 3.0))]
    _check_png(pathlib.Path(common.plot(pts, str(tmp_path / "n.png"), "rows vary", copy_gbps=10.0)))
    with pytest.raises(common.BenchError, match="nothing to plot"):
        common.plot([common.Point("a", 1, 1, float("nan"), 0.0)], str(tmp_path / "x.png"), "none")


def test_bench_modules_import_from_the_package_alone(tmp_path):
    code = ("import sys, os\n"
            "import fastkd.bench, fastkd.bench.common\n"
            "from fastkd.bench import BENCHMARKS, load\n"
            "mods = [load(n) for n in BENCHMARKS]\n"
            "bench_dir = os.path.join(sys.argv[1], 'bench')\n"
            "assert all(os.path.abspath(p) != bench_dir for p in sys.path), sys.path\n"
            "for m in mods:\n"
            "    assert os.path.dirname(m.__file__) == os.path.dirname(fastkd.bench.__file__), m.__file__\n"
            "    assert callable(m.main) and callable(m.run) and callable(m.add_arguments)\n"
            "assert 'matplotlib' not in sys.modules\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-I", "-c", code, ROOT], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
