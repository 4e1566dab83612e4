"""bench/quality.py: the seed-paired gain arithmetic, and a smoke run of the whole study (wiring only)."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("fastkd_bench_quality", os.path.join(ROOT, "bench", "quality.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(values):
    return {s: {m: {"ce": v, "ece": 0.01} for m, v in row.items()} for s, row in enumerate(values)}


def test_summarise_pairs_gains_by_seed(quality):
    per_seed = _runs([
        {"ce": 3.00, "full": 2.80, "sampled": 2.81, "topk_bucket": 2.90},
        {"ce": 3.10, "full": 2.80, "sampled": 2.83, "topk_bucket": 2.95},
    ])
    s = quality.summarise(per_seed, ["ce", "full", "sampled", "topk_bucket"])
    assert s["ce"]["ce_mean"] == pytest.approx(3.05)
    assert s["full"]["gain_mean"] == pytest.approx(0.25)
    # share = mean gain / mean full gain = ((0.19 + 0.27) / 2) / 0.25
    assert s["sampled"]["share_of_full_kd_gain"] == pytest.approx(0.23 / 0.25)
    ratios = [0.19 / 0.20, 0.27 / 0.30]
    sem = abs(ratios[0] - ratios[1]) / 2  # stdev of two values / sqrt(2)
    assert s["sampled"]["share_sem"] == pytest.approx(sem)
    assert s["sampled"]["gap_to_full_mean"] == pytest.approx(0.02)
    assert "meets_target" not in s["sampled"]  # the study reports shares, not pass/fail
    assert s["topk_bucket"]["share_of_full_kd_gain"] == pytest.approx(0.125 / 0.25)
    assert "share_of_full_kd_gain" not in s["full"]


def test_summarise_share_and_paired_gap(quality):
    per_seed = _runs([{"ce": 3.0, "full": 2.0, "sampled": 2.01}, {"ce": 3.0, "full": 2.1, "sampled": 2.1}])
    s = quality.summarise(per_seed, ["ce", "full", "sampled"])
    assert s["sampled"]["share_of_full_kd_gain"] == pytest.approx(1.89 / 1.9)
    assert s["sampled"]["gap_to_full_mean"] == pytest.approx(0.005)  # (0.01 + 0.0) / 2, paired per seed
    assert math.isfinite(s["sampled"]["share_sem"])


def test_smoke_run(quality, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "q.jsonl"
    summary = quality.main(["--smoke", "--out", str(out), "--plot", str(tmp_path / "q.png")])
    assert set(summary) == {"ce", "full", "topk_bucket", "topk_renorm", "sampled", "sampled_sys", "served_top20"}
    for m in ("full", "topk_bucket", "topk_renorm", "sampled", "sampled_sys", "served_top20"):
        assert math.isfinite(summary[m]["gain_mean"])
    assert not out.exists()  # smoke numbers are never recorded


def test_replot_reads_the_newest_study(quality, tmp_path):
    import json

    meta = dict(bench="quality", vocab=50, teacher="GRU-8", teacher_ce=3.0, student="GRU-4", student_steps=2,
                batch=2, seq=4, epochs=2, seeds=2, k=4, num_samples=5)
    rows = []
    for date, shift in (("2026-01-01T00:00:00+00:00", 9.0), ("2026-02-01T00:00:00+00:00", 0.0)):
        per_seed = _runs([{"ce": 3.0 + shift, "full": 2.8 + shift, "sampled": 2.82 + shift},
                          {"ce": 3.1 + shift, "full": 2.9 + shift, "sampled": 2.9 + shift}])
        for s, res in per_seed.items():
            for m, r in res.items():
                rows.append({**meta, "date": date, "kind": "run", "seed": s, "method": m, **r,
                             "curve": [r["ce"] + 0.5, r["ce"]]})
        for m, r in quality.summarise(per_seed, ["ce", "full", "sampled"]).items():
            rows.append({**meta, "date": date, "kind": "summary", **r})
    out = tmp_path / "q.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = quality.main(["--replot", "--out", str(out), "--plot", str(tmp_path / "q.png")])
    assert summary["ce"]["ce_mean"] == pytest.approx(3.05)  # the newer study, not the older one
    assert summary["sampled"]["share_of_full_kd_gain"] == pytest.approx(0.19 / 0.2)
    assert (tmp_path / "q.png").stat().st_size > 10_000


def test_cross_tokenizer_smoke_run(quality, tmp_path, monkeypatch):
    """The cross-tokenizer arm end to end on tiny settings: two BPEs, the alignment, both losses."""
    pytest.importorskip("tokenizers")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "xt.jsonl"
    rows = quality.cross_tokenizer_main(["--cross-tokenizer", "--smoke", "--out", str(out)])
    assert {r["method"] for r in rows} == {"ce", "uld", "hybrid"}
    assert all(math.isfinite(r["bpc"]) and 0 < r["bpc"] < 10 for r in rows)
    assert not out.exists()  # smoke numbers are never recorded
