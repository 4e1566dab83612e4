"""The end-to-end demo (fastkd.demo, `fastkd demo`) on its tiny preset, and its building blocks."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

import fastkd  # noqa: E402
from fastkd.cli import main  # noqa: E402
from fastkd.demo import data, report, run_demo, tokenizer  # noqa: E402
from fastkd.demo import cross_tokenizer as xt_demo  # noqa: E402
from fastkd.demo.evaluation import evaluate  # noqa: E402
from fastkd.demo.presets import CROSS_RUNS, get_preset  # noqa: E402
from fastkd.demo.runs import run_key  # noqa: E402
from fastkd.demo.memory import PeakMemory  # noqa: E402

HAS_CACHE = all(hasattr(fastkd, n) for n in ("TeacherCache", "capture", "sparse_kd_loss"))


def test_corpus_split_is_deterministic_disjoint_and_real_text():
    docs = data.load_documents(300_000)
    assert sum(len(d.text) for d in docs) >= 300_000
    assert any(d.name.startswith("stdlib:") for d in docs)
    train, held = data.split_documents(docs, heldout_fraction=0.2)
    train2, held2 = data.split_documents(list(reversed(docs)), heldout_fraction=0.2)
    assert {d.name for d in held} == {d.name for d in held2}  # independent of order
    assert not {d.name for d in train} & {d.name for d in held}
    assert len(train) + len(held) == len(docs) and held and train
    assert data.fingerprint(docs) != data.fingerprint(docs[1:])


def test_tokenizer_vocab_size_and_round_trip(tmp_path):
    docs = data.load_documents(200_000)
    tok = tokenizer.train_tokenizer(docs, 700, str(tmp_path / "tok.json"))
    assert tok.get_vocab_size() == 700
    text = "def f(x):\n    return x ** 2  # squares"
    assert tok.decode(tok.encode(text).ids) == text
    ids = tokenizer.encode_documents(tok, docs[:3], str(tmp_path / "ids.npy"))
    assert ids.dtype == np.uint16 and ids.max() < 700
    again = tokenizer.encode_documents(tok, docs[:3], str(tmp_path / "ids.npy"))  # from the cache
    np.testing.assert_array_equal(ids, again)
    b = tokenizer.blocks(ids, 17)
    assert b.shape == (len(ids) // 17, 17) and b.dtype == np.int64
    np.testing.assert_array_equal(b.reshape(-1), ids[: b.size])
    with pytest.raises(ValueError, match="shorter than one block"):
        tokenizer.blocks(ids[:5], 17)


def test_evaluate_matches_a_direct_computation():
    from fastkd.demo.models import ModelSpec, build_model

    model = build_model(ModelSpec(1, 16, 2), 61, 9, seed=3)
    x = torch.randint(0, 61, (5, 9), generator=torch.Generator().manual_seed(0))
    got = evaluate(model, x, batch_size=2, device=torch.device("cpu"), n_bins=10)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), -1).reshape(-1, 61)
    y = x[:, 1:].reshape(-1)
    assert got["loss"] == pytest.approx(-logp[torch.arange(len(y)), y].mean().item(), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]), rel=1e-9)
    conf, pred = logp.exp().max(-1)
    ece = 0.0
    for b in range(10):  # the textbook loop: equal-width bins (lo, hi], first bin closed
        sel = (conf > b / 10) & (conf <= (b + 1) / 10) if b else conf <= 0.1
        if sel.any():
            ece += sel.sum().item() / len(y) * abs((pred[sel] == y[sel]).double().mean().item()
                                                   - conf[sel].mean().item())
    assert got["ece"] == pytest.approx(ece, rel=1e-4, abs=1e-6)
    assert got["top1"] == pytest.approx((pred == y).double().mean().item())


def test_peak_memory_sees_a_large_allocation_but_not_a_paused_one():
    mem = PeakMemory(torch.device("cpu"))
    mem.start()
    if mem.kind == "unavailable":
        pytest.skip("/proc/self/clear_refs is not writable here")
    big = torch.ones(48 * 2 ** 20)  # 192 MiB, touched
    del big
    assert mem.peak_mib() >= 150  # freed again, but the peak remembers it

    paused = PeakMemory(torch.device("cpu"))
    paused.start()
    paused.pause()
    eval_like = torch.ones(48 * 2 ** 20)  # e.g. the held-out evaluation: must not count
    del eval_like
    paused.resume()
    small = torch.ones(2 ** 20)  # 4 MiB
    assert paused.peak_mib() < 100
    del small


def test_demo_package_exports_only_the_public_api():
    import fastkd.demo as demo

    assert set(demo.__all__) == {"run_demo", "PRESETS", "Preset", "get_preset", "ALL_RUNS", "default_cache_dir"}
    for name in demo.__all__:
        assert getattr(demo, name) is not None


def _run(label, loss, ppl, bytes_per_token=None):
    return {"label": label, "heldout_loss": loss, "heldout_ppl": ppl, "cache_bytes_per_token": bytes_per_token}


def test_report_says_what_was_measured():
    runs = {"ce": _run("CE only", 7.0, 1096.6), "kd": _run("full KD", 6.5, 665.1),
            "cache_topk": _run("top-k", 6.85, 943.9, 236.3), "cache_sample": _run("sampled", 6.51, 671.8, 97.5)}
    comps = report.comparisons(runs)
    assert comps["kd"] == {"gain_over_ce": pytest.approx(0.5), "beats_ce": True}
    assert comps["cache_sample"]["share_of_full_kd_gain"] == pytest.approx(0.98)
    assert comps["cache_topk"]["gap_to_full_kd"] == pytest.approx(0.7)
    text = "\n".join(report.findings(runs, comps))
    assert "full KD lowered the held-out loss by 0.5000 nats/token against CE alone" in text
    assert "sampled kept 98% of full KD's gain over CE (+0.4900 of +0.5000 nats/token)" in text
    assert "top-k kept 30% of full KD's gain" in text and "97.5 bytes per token" in text
    assert not re.search(r"target|missed|\bmet\b|issue", text, re.I)
    # no gain from full KD: no share of it is claimed
    runs["kd"] = _run("full KD", 7.1, 1212.0)
    comps = report.comparisons(runs)
    assert "share_of_full_kd_gain" not in comps["cache_sample"]
    text = "\n".join(report.findings(runs, comps))
    assert "did not improve on CE alone" in text and "% of full KD" not in text


def test_bits_per_char_matches_a_direct_computation():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 1, 2, 7], [3, 3, 4, 0]])
    lengths = torch.tensor([4, 3])
    # row 0: "ab", "c", "de", "f"; row 1: "x", "yz", "w" (then padding)
    offsets = torch.tensor([[[0, 2], [2, 3], [3, 5], [5, 6]], [[0, 1], [1, 3], [3, 4], [4, 4]]])
    table = torch.randn(8, 8)

    def logits_fn(x):
        return table[x]
    got = xt_demo.bits_per_char(logits_fn, ids, offsets, lengths, batch_size=1)
    logp = torch.log_softmax(table, -1)
    nats = sum(-logp[ids[0, i], ids[0, i + 1]] for i in range(3)) + sum(-logp[ids[1, i], ids[1, i + 1]] for i in range(2))
    chars = (6 - 2) + (4 - 1)  # each row from the end of its first token to the end of its last
    assert got == pytest.approx(float(nats) / math.log(2) / chars, rel=1e-6)
    assert xt_demo.next_token_targets(ids, lengths).tolist() == [[1, 2, 7], [3, 4, -100]]


def test_run_keys_follow_the_settings_each_run_reads():
    p = get_preset("tiny")
    q = get_preset("tiny", cross_topk=32)
    hot = get_preset("tiny", temperature=2.0)
    assert run_key(p, "kd", "t", torch.device("cpu")) == run_key(q, "kd", "t", torch.device("cpu"))
    assert run_key(p, "xt_ce", "t", torch.device("cpu")) == run_key(hot, "xt_ce", "t", torch.device("cpu"))
    assert run_key(p, "xt_uld", "t", torch.device("cpu")) != run_key(q, "xt_uld", "t", torch.device("cpu"))
    assert run_key(p, "xt_uld", "t", torch.device("cpu")) != run_key(hot, "xt_uld", "t", torch.device("cpu"))
    with pytest.raises(ValueError, match="cross_vocab_size"):
        get_preset("tiny", cross_vocab_size=100)


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--preset", "nope"])
    assert main(["demo", "--preset", "tiny", "--vocab-size", "100", "--quiet"]) == 2
    assert "vocab_size" in capsys.readouterr().err


def test_demo_tiny_end_to_end_and_cached_second_run(tmp_path, capsys):
    assert main(["demo", "--preset", "tiny", "--cache-dir", str(tmp_path), "--quiet"]) == 0
    out = tmp_path / "demo-tiny"
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "heldout_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()

    expected = ["ce", "kd"] + (["cache_topk", "cache_sample", "served_top20"] if HAS_CACHE else [])
    assert list(summary["runs"]) == expected
    if not HAS_CACHE:
        assert set(summary["skipped"]) == {"cache_topk", "cache_sample", "served_top20"}
    preset = summary["preset"]
    assert summary["vocab_size"] == preset["vocab_size"]
    for name, r in summary["runs"].items():
        steps = [h["step"] for h in r["history"]]
        assert steps[0] == 0 and steps[-1] == preset["student_steps"]
        assert all(math.isfinite(h["loss"]) for h in r["history"])
        assert r["history"][-1]["loss"] < r["history"][0]["loss"]  # every run learns
        assert r["tokens_per_s"] > 0 and 0 <= r["ece"] <= 1
        assert r["label"] in table
        if name.startswith("cache_") or name == "served_top20":
            assert r["cache_bytes_per_token"] and r["cache_bytes_per_token"] > 0
    # The demo's claim, on its smallest preset: distillation beats CE alone at the same budget.
    for name, c in summary["comparisons"].items():
        assert c["beats_ce"], (name, c)
    assert summary["teacher"]["heldout"]["loss"] < summary["runs"]["ce"]["heldout_loss"]

    # The cross-tokenizer runs: students on a second BPE, held-out bits per character.
    xt = summary["cross_tokenizer"]
    assert list(xt["runs"]) == list(CROSS_RUNS)
    assert xt["student_vocab"] == preset["cross_vocab_size"] and xt["teacher_vocab"] == summary["vocab_size"]
    assert 0 < xt["num_matched"] <= xt["student_vocab"]
    assert (out / "cross_tokenizer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name, r in xt["runs"].items():
        bpc = [h["bpc"] for h in r["history"]]
        assert all(math.isfinite(b) for b in bpc) and bpc[-1] < bpc[0], name  # every run learns
        assert [h["step"] for h in r["history"]][-1] == preset["student_steps"]
        assert r["label"] in table
    assert xt["teacher_bpc"] < xt["runs"]["xt_ce"]["heldout_bpc"]

    # A second invocation reuses the tokenizer, teacher and run results instead of recomputing them.
    capsys.readouterr()
    again = run_demo("tiny", cache_dir=str(tmp_path), progress=True)
    assert again["teacher"] == summary["teacher"]
    for name in expected:
        assert again["runs"][name] == summary["runs"][name]
    assert again["cross_tokenizer"]["runs"] == xt["runs"]
    printed = capsys.readouterr().out
    assert printed.count("cached result") == len(expected) + len(CROSS_RUNS)
    assert "training the teacher" not in printed and "bits/char against the students' CE alone" in printed
    assert "lowered the held-out loss" in printed
    if HAS_CACHE:
        assert "of full KD's gain over CE" in printed
    assert not re.search(r"target|missed|\bmet\b", printed, re.I)
