"""Teacher data from outside a training loop: inference-server log-probabilities
(``SparseTeacher.from_logprobs``, ``logprobs_from_vllm``), the row checks that guard the raw
``SparseTeacher`` constructor and ``TeacherCache.write``, ragged rows and samples of different
lengths through the cache, the sampling default, and padded vocabularies (``vocab_size=``) on every
backend."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CPU_TENSOR_BACKENDS, assert_close, teacher_logits

import fastkd
from fastkd import SparseTeacher, TeacherCache, capture, sparse_kd_loss
from fastkd._reference import sparse_kd as sref
from fastkd.cache.teacher import LOGPROB_ROUNDING, PAD_ID, logprobs_from_vllm


def _served(n, v, k, seed=0, scale=3.0):
    """What a server returns for n tokens: the top-k ids and their full-vocabulary log-probs."""
    t = teacher_logits(n, v, torch.float64, scale, seed=seed)
    lp = torch.log_softmax(t, -1)
    vals, ids = lp.topk(k, -1)
    return t, ids, vals


# ------------------------------------------------------------------------------------------------
# from_logprobs
# ------------------------------------------------------------------------------------------------
def test_from_logprobs_equals_capture_and_tail_is_exact():
    t, ids, vals = _served(6, 50, 8)
    st = SparseTeacher.from_logprobs(ids, vals.float(), vocab_size=50)
    ref = capture(t.float(), k=8)
    assert st.mode == "topk" and st.k == 8 and st.vocab_size == 50 and st.temperature == 1.0
    assert torch.equal(st.ids, ref.ids)
    torch.testing.assert_close(st.values, ref.values, rtol=0, atol=1e-5)
    z = teacher_logits(6, 50, seed=3)
    torch.testing.assert_close(sparse_kd_loss(z, st), sparse_kd_loss(z, ref), rtol=1e-5, atol=1e-6)
    # Σp within 1e-12 of 1: the tail is −expm1(logsumexp), not 1 − Σp by subtraction
    lp = torch.tensor([[math.log(0.5), math.log(0.5 - 1e-12)]], dtype=torch.float64)
    st = SparseTeacher.from_logprobs(torch.tensor([[3, 4]]), lp, vocab_size=10)
    assert st.values.dtype == torch.float64
    assert abs(st.tail_mass().item() - 1e-12) < 1e-15  # float64 rounding of the inputs, ~1e-16


def test_from_logprobs_ragged_rows_by_mask_and_padding_id():
    t, ids, vals = _served(4, 30, 5, seed=1)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, :] = False
    ids_junk = ids.clone()
    ids_junk[~mask] = 7           # ignored where the mask is False (even a repeated id)
    vals_junk = vals.clone()
    vals_junk[~mask] = float("nan")
    a = SparseTeacher.from_logprobs(ids_junk, vals_junk, vocab_size=30, mask=mask)
    ids_pad = torch.where(mask, ids, torch.full_like(ids, PAD_ID))
    b = SparseTeacher.from_logprobs(ids_pad, vals, vocab_size=30)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)
    assert (a.ids[~mask] == PAD_ID).all() and torch.isinf(a.values[~mask]).all()
    # the loss equals the reference on the present entries only
    z = teacher_logits(4, 30, torch.float64, seed=5)
    got = sparse_kd_loss(z, a.to("cpu"), reduction="none", backend="cpu")
    want = sref.sparse_kd_rows(z, a.ids, a.values.double().exp(), None, tail="bucket", temperature=1.0,
                               soft_scale=1.0, hard_weight=0.0, ignore_index=-100, label_smoothing=0.0)
    assert torch.isfinite(got).all()
    assert_close(got, want, rtol=1e-9, what="ragged rows")
    assert got[2] == 0  # a row with nothing stored: all teacher mass in the tail, as the student's


def test_from_logprobs_rounding_is_clamped():
    lp = torch.tensor([[LOGPROB_ROUNDING / 2, -30.0], [math.log(0.6), math.log(0.4) + LOGPROB_ROUNDING / 2]])
    st = SparseTeacher.from_logprobs(torch.tensor([[1, 2], [1, 2]]), lp, vocab_size=5)
    assert (st.values <= 0).all()
    assert torch.allclose(st.tail_mass(), torch.zeros(2, dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize("case, match", [
    ("positive", r"log-probability is > 0.*first at row \(1, 2\).*log p = 0.5 for id 9"),
    ("sum", r"sum to more than 1.*first at row \(0, 1\).*sum p = 1.2"),
    ("range", r"ids must lie in \[0, 12\).*first at row \(1, 0\).*id 12"),
    ("negative", r"ids must lie in \[0, 12\).*first at row \(0, 3\).*id -2"),
    ("repeat", r"an id appears twice.*first at row \(1, 1\).*id 4 repeated"),
    ("nan", r"NaN.*first at row \(0, 2\)"),
])
def test_from_logprobs_bad_input_names_problem_and_row(case, match):
    ids = torch.tensor([[[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 1], [2, 3], [8, 9], [10, 11]]])
    lp = torch.full((2, 4, 2), math.log(0.3))
    if case == "positive":
        lp[1, 2, 1] = 0.5
    elif case == "sum":
        lp[0, 1] = math.log(0.6)
    elif case == "range":
        ids[1, 0, 0] = 12
    elif case == "negative":
        ids[0, 3, 1] = -2
    elif case == "repeat":
        ids[1, 1] = 4
    elif case == "nan":
        lp[0, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=match):
        SparseTeacher.from_logprobs(ids, lp, vocab_size=12)
    # the raw constructor and TeacherCache.write apply the same checks
    with pytest.raises(ValueError, match=match.split(".*")[0]):
        SparseTeacher("topk", ids.long(), torch.zeros(2, 4), values=lp, temperature=1.0, vocab_size=12)


def test_from_logprobs_shapes_and_types():
    with pytest.raises(ValueError, match=r"one shape.*\(2, 3\) and \(2, 4\)"):
        SparseTeacher.from_logprobs(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), vocab_size=9)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        SparseTeacher.from_logprobs(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), vocab_size=9,
                                    mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="token_ids must be integers"):
        SparseTeacher.from_logprobs(torch.zeros(2, 3), torch.zeros(2, 3), vocab_size=9)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        SparseTeacher.from_logprobs([[0]], [[0.0]], vocab_size=0)
    # nested lists are fine
    st = SparseTeacher.from_logprobs([[0, 1]], [[-0.1, -3.0]], vocab_size=4, temperature=0.7)
    assert st.shape == (1,) and st.temperature == 0.7


class _Logprob:  # vLLM's Logprob: a .logprob, a rank, a decoded token
    def __init__(self, logprob, rank):
        self.logprob, self.rank, self.decoded_token = logprob, rank, "x"


def test_logprobs_from_vllm_objects_and_floats():
    pl = [None,
          {5: _Logprob(-0.5, 1), 2: _Logprob(-1.5, 2), 9: _Logprob(-7.0, 30)},   # top-2 + the prompt token
          {3: -0.1, 4: -2.5}]
    ids, lps, mask = logprobs_from_vllm(pl)
    assert ids.tolist() == [[5, 2, 9], [3, 4, PAD_ID]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(lps[0], torch.tensor([-0.5, -1.5, -7.0]))
    st = SparseTeacher.from_logprobs(ids, lps, mask=mask, vocab_size=10)
    assert st.shape == (2,)  # T = 3 prompt tokens, T − 1 = 2 teacher rows
    ids2, _, _ = logprobs_from_vllm(pl, k=2)
    assert ids2.tolist() == [[5, 2], [3, 4]]
    ids4, _, mask4 = logprobs_from_vllm(pl, k=4)   # padded to the width of a k = 4 cache
    assert ids4.tolist() == [[5, 2, 9, PAD_ID], [3, 4, PAD_ID, PAD_ID]] and mask4.sum() == 5
    with pytest.raises(ValueError, match=r"prompt_logprobs\[1\] is None"):
        logprobs_from_vllm([None, None, {1: -0.1}])


# ------------------------------------------------------------------------------------------------
# the raw constructor
# ------------------------------------------------------------------------------------------------
def test_constructor_checks_sampled_rows():
    ids = torch.tensor([[1, 4, -1], [0, 2, 3]])
    ok = torch.tensor([[3, 2, 0], [1, 1, 3]], dtype=torch.int32)
    SparseTeacher("sample", ids, torch.zeros(2), counts=ok, temperature=1.0, vocab_size=5, num_samples=5)
    for counts, match in (([[3, 1, 0], [1, 1, 3]], r"sum to num_samples = 5; first at row 0: sum 4"),
                          ([[3, 2, 1], [1, 1, 3]], "padding entry has a count other than 0"),
                          ([[5, 0, 0], [1, 1, 3]], "count below 1")):
        with pytest.raises(ValueError, match=match):
            SparseTeacher("sample", ids, torch.zeros(2), counts=torch.tensor(counts, dtype=torch.int32),
                          temperature=1.0, vocab_size=5, num_samples=5)
    with pytest.raises(ValueError, match="appears twice"):
        SparseTeacher("sample", torch.tensor([[1, 1, -1]]), torch.zeros(1), counts=torch.tensor([[2, 3, 0]]),
                      temperature=1.0, vocab_size=5, num_samples=5)
    # validate=False leaves a known-good (or deliberately bad) row as it is
    SparseTeacher("sample", torch.tensor([[1, 1, -1]]), torch.zeros(1), counts=torch.tensor([[2, 3, 0]]),
                  temperature=1.0, vocab_size=5, num_samples=5, validate=False)


# ------------------------------------------------------------------------------------------------
# the cache: ragged rows, write checks, different lengths, sampling default
# ------------------------------------------------------------------------------------------------
def test_ragged_rows_survive_the_cache_exactly(tmp_path):
    _, ids, vals = _served(2 * 5, 40, 6, seed=2)
    mask = torch.rand(10, 6, generator=torch.Generator().manual_seed(0)) < 0.7
    mask[:, 0] = True
    mask[3] = False
    st = SparseTeacher.from_logprobs(ids.reshape(2, 5, 6), vals.float().reshape(2, 5, 6), mask=mask.reshape(2, 5, 6),
                                     vocab_size=40)
    with TeacherCache(tmp_path / "c", values_dtype="float32", sync=False) as c:
        c.write([0, 1], st)
        back = c.read([0, 1])
    assert torch.equal(back.ids, st.ids)
    assert torch.equal(back.values, st.values)
    z = teacher_logits(10, 40, seed=9).reshape(2, 5, 40)
    loss = sparse_kd_loss(z, back)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, sparse_kd_loss(z, st))


def test_write_refuses_rows_it_could_not_read_back(tmp_path):
    st = capture(teacher_logits(3, 20), k=4).reshape(1, 3)
    dup = SparseTeacher("topk", st.ids.clone(), st.lse, values=st.values, temperature=1.0, vocab_size=20,
                        validate=False)
    dup.ids[0, 2, 1] = dup.ids[0, 2, 0]
    with TeacherCache(tmp_path / "c", sync=False) as c:
        with pytest.raises(ValueError, match=r"TeacherCache.write: an id appears twice.*row \(0, 2\)"):
            c.write([0], dup)
        assert len(c) == 0
        c.write([0], st)
        assert torch.equal(c.read([0]).ids, st.ids)


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_read_samples_of_different_lengths(tmp_path, mode):
    t = teacher_logits(9, 30, seed=4)
    kw = dict(k=5) if mode == "topk" else dict(num_samples=7)
    with TeacherCache(tmp_path / mode, mode=mode, sync=False, **kw) as c:
        c.write([0], capture(t[:4].unsqueeze(0), mode=mode, **kw))
        c.write([1], capture(t[4:].unsqueeze(0), mode=mode, **kw))
        with pytest.raises(ValueError, match="return_mask=True"):
            c.read([0, 1])
        st, mask = c.read([1, 0], return_mask=True)
        assert st.shape == (2, 5) and mask.tolist() == [[True] * 5, [True] * 4 + [False]]
        alone = c.read([0])
        assert torch.equal(st[1, :4].ids, alone[0].ids)
        assert (st.ids[1, 4] == PAD_ID).all()
        z = teacher_logits(10, 30, seed=5).reshape(2, 5, 30)
        y = torch.randint(0, 30, (2, 5)).masked_fill(~mask, -100)
        loss = sparse_kd_loss(z, st, y, hard_weight=0.5)
        parts = [sparse_kd_loss(z[b, :int(mask[b].sum())], st[b, :int(mask[b].sum())], y[b, :int(mask[b].sum())],
                                hard_weight=0.5, reduction="sum") for b in range(2)]
        torch.testing.assert_close(loss, sum(parts) / 9)


def test_sampling_default_is_systematic_and_old_manifests_keep_theirs(tmp_path):
    t = teacher_logits(4, 25, seed=6)
    g = torch.Generator().manual_seed(1)
    a = capture(t, mode="sample", num_samples=10, generator=g)
    b = capture(t, mode="sample", num_samples=10, generator=torch.Generator().manual_seed(1), sampling="systematic")
    assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts)
    with TeacherCache(tmp_path / "new", mode="sample", num_samples=10, sync=False) as c:
        c.get_or_capture([0], lambda: t.unsqueeze(0), generator=torch.Generator().manual_seed(1))
        assert c.manifest["sampling"] == "systematic"
    # a cache created with i.i.d. draws keeps them when reopened without a sampling setting
    with TeacherCache(tmp_path / "old", mode="sample", num_samples=10, sampling="iid", vocab_size=25, sync=False):
        pass
    man = json.loads((tmp_path / "old" / "manifest.json").read_text())
    assert man["sampling"] == "iid"
    with TeacherCache(tmp_path / "old", sync=False) as c:
        got = c.get_or_capture([0], lambda: t.unsqueeze(0), generator=torch.Generator().manual_seed(1))
    want = capture(t, mode="sample", num_samples=10, sampling="iid", generator=torch.Generator().manual_seed(1))
    assert torch.equal(got[0].ids, want.ids) and torch.equal(got[0].counts, want.counts)
    assert "sampling='iid'" in repr(TeacherCache(tmp_path / "old", readonly=True))


# ------------------------------------------------------------------------------------------------
# padded vocabularies
# ------------------------------------------------------------------------------------------------
def _padded(x, width, fill):
    """``x`` (n, v) placed in the first v columns of an (n, width) tensor whose other columns hold
    ``fill`` (what a padded head emits there: anything)."""
    out = torch.full((x.shape[0], width), fill, dtype=x.dtype)
    out[:, : x.shape[1]] = x
    return out


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
def test_kd_loss_vocab_size_on_every_backend(use_backend, backend):
    use_backend(backend)
    v = 37
    z = teacher_logits(6, v, seed=10)
    t = teacher_logits(6, v, seed=11)
    y = torch.tensor([1, 2, -100, 4, 36, 0])
    zp = _padded(z, v + 5, 9.0).requires_grad_()   # padded columns with large logits: never any mass
    tp = _padded(t, v + 11, 20.0).requires_grad_()
    kw = dict(temperature=2.0, hard_weight=0.5, backend=backend)
    loss = fastkd.kd_loss(zp, tp, y, vocab_size=v, **kw)
    loss.backward()
    zz, tt = z.clone().requires_grad_(), t.clone().requires_grad_()
    want = fastkd.kd_loss(zz, tt, y, **kw)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zp.grad[:, :v], zz.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tp.grad[:, :v], tt.grad, rtol=1e-5, atol=1e-7)
    assert (zp.grad[:, v:] == 0).all() and (tp.grad[:, v:] == 0).all()
    assert fastkd.KDLoss(vocab_size=v, **kw)(zp, tp, y).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
def test_capture_and_sparse_loss_vocab_size_on_every_backend(use_backend, backend):
    use_backend(backend)
    v = 41
    t = teacher_logits(5, v, scale=2.0, seed=12)
    tp = _padded(t, 48, 30.0)
    st = capture(tp, k=6, vocab_size=v, backend=backend)
    ref = capture(t, k=6, backend=backend)
    assert st.vocab_size == v and torch.equal(st.ids, ref.ids)
    torch.testing.assert_close(st.values, ref.values)
    ss = capture(tp, mode="sample", num_samples=9, vocab_size=v, backend=backend,
                 generator=torch.Generator().manual_seed(2))
    assert (ss.ids < v).all()
    z = teacher_logits(5, v, seed=13)
    zp = _padded(z, 44, 5.0).requires_grad_()
    loss = sparse_kd_loss(zp, st, vocab_size=v, hard_weight=0.5, target=torch.arange(5), backend=backend)
    loss.backward()
    zz = z.clone().requires_grad_()
    want = sparse_kd_loss(zz, st, hard_weight=0.5, target=torch.arange(5), backend=backend)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(zp.grad[:, :v], zz.grad)
    assert (zp.grad[:, v:] == 0).all()


def test_vocab_size_errors():
    z, t = torch.zeros(2, 10), torch.zeros(2, 12)
    with pytest.raises(ValueError, match=r"student_logits has 10 vocabulary columns but teacher_logits has 12.*"
                                         r"vocab_size="):
        fastkd.kd_loss(z, t)
    with pytest.raises(ValueError, match="fewer than vocab_size=11"):
        fastkd.kd_loss(z, t, vocab_size=11)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        fastkd.kd_loss(z, t, vocab_size=0)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        fastkd.KDLoss(vocab_size=0)
    st = capture(t, k=3)
    with pytest.raises(ValueError, match="pass vocab_size="):
        sparse_kd_loss(torch.zeros(2, 14), st)
    with pytest.raises(ValueError, match="fewer than vocab_size=13"):
        capture(t, k=3, vocab_size=13)


def test_fused_linear_vocab_size_pads_both_heads():
    v, h = 29, 6
    g = torch.Generator().manual_seed(4)
    hs, ht = torch.randn(7, h, generator=g), torch.randn(7, h + 2, generator=g)
    ws = torch.randn(v + 3, h, generator=g).requires_grad_()
    wt = torch.randn(v + 9, h + 2, generator=g)
    y = torch.randint(0, v, (7,), generator=g)
    loss = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, y, vocab_size=v, hard_weight=0.5, temperature=2.0)
    loss.backward()
    w_ref = ws.detach()[:v].clone().requires_grad_()
    ref = fastkd.kd_loss(hs @ w_ref.T, ht @ wt[:v].T, y, hard_weight=0.5, temperature=2.0)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ws.grad[:v], w_ref.grad, rtol=1e-4, atol=1e-6)
    assert (ws.grad[v:] == 0).all()
    with pytest.raises(ValueError, match=r"student_weight has 32 rows.*teacher_weight has 38.*vocab_size="):
        fastkd.fused_linear_kd_loss(hs, ws, ht, wt, y)


# ------------------------------------------------------------------------------------------------
# TeacherCache <-> datasets
# ------------------------------------------------------------------------------------------------
def _filled_cache(path, mode, lengths, v=60):
    kw = dict(k=7) if mode == "topk" else dict(num_samples=9)
    c = TeacherCache(path, mode=mode, temperature=1.5, teacher="t", dataset="d", sync=False, **kw)
    for sid, n in enumerate(lengths):
        t = teacher_logits(n, v, seed=20 + sid).unsqueeze(0)
        st = capture(t, mode=mode, temperature=1.5, generator=torch.Generator().manual_seed(sid), **kw)
        if mode == "topk" and sid == 1:  # a ragged row: padding in the middle
            st.ids[0, 0, 2] = PAD_ID
            st.values[0, 0, 2] = float("-inf")
        c.write([10 + sid], st)
    return c


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_dataset_round_trip_is_exact(tmp_path, mode):
    pytest.importorskip("datasets")
    lengths = [5, 3, 5, 1]
    src = _filled_cache(tmp_path / "src", mode, lengths)
    ds = src.to_dataset(str(tmp_path / "export.arrow"), batch_size=3, progress=False)
    assert len(ds) == 4 and ds["sample_id"] == [10, 11, 12, 13]
    assert [len(x) for x in ds["token_ids"]] == lengths
    info = json.loads(ds.info.description)["fastkd_teacher_cache"]
    assert info["mode"] == mode and info["temperature"] == 1.5 and info["teacher"] == "t"
    assert info["cache_id"] == src.manifest["cache_id"]
    dst = TeacherCache.from_dataset(ds, tmp_path / "dst", batch_size=2, progress=False, sync=False)
    for key in ("mode", "k", "num_samples", "sampling", "temperature", "vocab_size", "teacher", "dataset",
                "values_dtype"):
        assert dst.manifest[key] == src.manifest[key], key
    for sid in range(10, 14):
        a, b = src.read([sid]), dst.read([sid])
        assert torch.equal(a.ids, b.ids) and torch.equal(a.lse, b.lse)
        if mode == "topk":
            assert torch.equal(a.values, b.values)
        else:
            assert torch.equal(a.counts, b.counts)
    # and back: the second export equals the first
    again = dst.to_dataset(str(tmp_path / "again.arrow"), progress=False)
    for col in ds.column_names:
        assert again[col] == ds[col], col
    src.close()
    dst.close()


def test_dataset_import_of_other_tools_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    _, ids, vals = _served(5, 40, 4, seed=8)
    ids, vals = ids.tolist(), vals.float().tolist()
    mask = [[True] * 4 for _ in range(5)]
    mask[2][3] = False
    ids[2][3] = 0       # masked out: ignored
    ds = datasets.Dataset.from_dict({
        "target_token_ids": [ids[:3], ids[3:]], "target_logprobs": [vals[:3], vals[3:]],
        "target_mask": [mask[:3], mask[3:]]})
    c = TeacherCache.from_dataset(ds, tmp_path / "c", vocab_size=40, progress=False, sync=False)
    assert c.manifest["k"] == 4 and len(c) == 2
    st = c.read([0])
    assert st.shape == (1, 3) and st.ids[0, 2, 3] == PAD_ID
    want = SparseTeacher.from_logprobs(torch.tensor(ids[:3]), torch.tensor(vals[:3]), vocab_size=40,
                                       mask=torch.tensor(mask[:3]))
    assert torch.equal(st.ids[0], want.ids)
    torch.testing.assert_close(st.values[0], want.values, rtol=0, atol=2e-3)   # float16 storage
    bad = datasets.Dataset.from_dict({"target_token_ids": [[[1, 1]]], "target_logprobs": [[[-1.0, -2.0]]]})
    with pytest.raises(ValueError, match="appears twice"):
        TeacherCache.from_dataset(bad, tmp_path / "bad", vocab_size=40, progress=False, sync=False)
    with pytest.raises(ValueError, match="vocab_size is required"):
        TeacherCache.from_dataset(ds, tmp_path / "x", progress=False)


def test_datasets_is_imported_lazily():
    import subprocess
    import sys

    code = ("import sys, fastkd, torch; from fastkd import TeacherCache, SparseTeacher; "
            "fastkd.capture(torch.randn(2, 9), k=2); assert 'datasets' not in sys.modules, 'datasets imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
