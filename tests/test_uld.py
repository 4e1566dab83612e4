"""Cross-tokenizer distillation: the span alignment (hand-made cases and two byte-level BPEs trained
here), the ULD loss (CPU kernel and torch backend against the float64 reference and the closed
form, the tail bound, gradients, the custom op, agreement with TRL's ULDLoss), the hybrid loss and
teachers read from a SparseTeacher / TeacherCache."""
from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import SparseTeacher, TeacherCache, VocabMap, align_tokens, capture, hybrid_uld_loss, uld_loss
from fastkd._reference.uld import uld_dense, uld_rows

from conftest import assert_close, teacher_logits

BACKENDS = ("cpu", "torch")


# ------------------------------------------------------------------------------------------------
# Alignment: hand-made cases
# ------------------------------------------------------------------------------------------------
def _spans(al, b=0):
    """[(student count, teacher count, start, end, student first, teacher first)] of sequence b."""
    n = int(al.num_spans[b])
    return [(int(al.student_count[b, i]), int(al.teacher_count[b, i]), int(al.span_start[b, i]),
             int(al.span_end[b, i]), int(al.student_first[b, i]), int(al.teacher_first[b, i])) for i in range(n)]


def test_one_to_one():
    off = [[(0, 2), (2, 5), (5, 6)]]
    al = align_tokens(off, off)
    assert _spans(al) == [(1, 1, 0, 2, 0, 0), (1, 1, 2, 5, 1, 1), (1, 1, 5, 6, 2, 2)]
    assert al.one_to_one.all()


def test_one_to_many_and_a_token_split_three_ways():
    # "hello": student one token, teacher "hel" "lo"; then "abcdef": one token against "ab" "cd" "ef"
    al = align_tokens([[(0, 5), (5, 11)]], [[(0, 3), (3, 5), (5, 7), (7, 9), (9, 11)]])
    assert _spans(al) == [(1, 2, 0, 5, 0, 0), (1, 3, 5, 11, 1, 2)]
    assert al.student_span.tolist() == [[0, 1]] and al.teacher_span.tolist() == [[0, 0, 1, 1, 1]]
    # the mirror: many-to-one
    al = align_tokens([[(0, 3), (3, 5)]], [[(0, 5)]])
    assert _spans(al) == [(2, 1, 0, 5, 0, 0)]


def test_many_to_many():
    # "abc": student "ab" "c", teacher "a" "bc": no common boundary inside
    al = align_tokens([[(0, 2), (2, 3)]], [[(0, 1), (1, 3)]])
    assert _spans(al) == [(2, 2, 0, 3, 0, 0)]


def test_whitespace_goes_with_the_token_that_carries_it():
    # "hello world": student "hello" "Ġworld", teacher "hello" "Ġ" "world"
    al = align_tokens([[(0, 5), (5, 11)]], [[(0, 5), (5, 6), (6, 11)]])
    assert _spans(al) == [(1, 1, 0, 5, 0, 0), (1, 2, 5, 11, 1, 1)]
    # double spaces and a newline, each its own token on one side only
    al = align_tokens([[(0, 1), (1, 3), (3, 4)]], [[(0, 1), (1, 2), (2, 3), (3, 4)]])
    assert _spans(al) == [(1, 1, 0, 1, 0, 0), (1, 2, 1, 3, 1, 1), (1, 1, 3, 4, 2, 3)]


def test_multi_byte_characters():
    # "éab": the student splits é into two byte tokens with é's offsets; the teacher keeps it whole
    al = align_tokens([[(0, 1), (0, 1), (1, 3)]], [[(0, 1), (1, 2), (2, 3)]])
    assert _spans(al) == [(2, 1, 0, 1, 0, 0), (1, 2, 1, 3, 2, 1)]
    # a token that carries é's second byte and "a" overlaps the first byte's token: no boundary at 1
    al = align_tokens([[(0, 1), (0, 2), (2, 3)]], [[(0, 1), (1, 2), (2, 3)]])
    assert _spans(al) == [(2, 2, 0, 2, 0, 0), (1, 1, 2, 3, 2, 2)]
    # both split the same character into bytes, differently: one span for the character
    al = align_tokens([[(0, 1), (0, 1), (0, 1)]], [[(0, 1), (0, 1)]])
    assert _spans(al) == [(3, 2, 0, 1, 0, 0)]


def test_zero_width_tokens_and_truncated_tails():
    al = align_tokens([[(0, 3), (3, 3), (3, 5)]], [[(0, 3), (3, 5)]])
    assert _spans(al) == [(2, 1, 0, 3, 0, 0), (1, 1, 3, 5, 2, 1)]
    # the sides end at different places: the unfinished last span is dropped (span -1)
    al = align_tokens([[(0, 3), (3, 6)]], [[(0, 3), (3, 5)]])
    assert _spans(al) == [(1, 1, 0, 3, 0, 0)]
    assert al.student_span.tolist() == [[0, -1]] and al.teacher_span.tolist() == [[0, -1]]


def test_batched_with_padding_equals_one_sequence_at_a_time():
    seqs_s = [[(0, 5), (5, 11)], [(0, 1), (0, 1), (1, 3), (3, 4)], [(0, 2)]]
    seqs_t = [[(0, 3), (3, 5), (5, 6), (6, 11)], [(0, 1), (1, 2), (2, 4)], [(0, 1), (1, 2)]]
    al = align_tokens(seqs_s, seqs_t)
    for b in range(3):
        assert _spans(al, b) == _spans(align_tokens([seqs_s[b]], [seqs_t[b]]))
    # tensors with lengths: the same
    def pad(seqs, n):
        out = torch.full((len(seqs), n, 2), 99, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = torch.tensor(s)
        return out
    al2 = align_tokens(pad(seqs_s, 6), pad(seqs_t, 5), student_lengths=torch.tensor([len(s) for s in seqs_s]),
                       teacher_lengths=torch.tensor([len(s) for s in seqs_t]))
    for b in range(3):
        assert _spans(al2, b) == _spans(al, b)
    b_idx, ps, pt = al.index()
    assert b_idx.tolist() == [0, 0, 1, 1, 2] and ps.tolist() == [0, 1, 0, 2, 0] and pt.tolist() == [0, 2, 0, 1, 0]
    # causal logits over the inputs: one row earlier, spans starting a sequence left out
    b_idx, ps, pt = al.index(shift=1)
    assert b_idx.tolist() == [0, 1] and ps.tolist() == [0, 1] and pt.tolist() == [1, 0]
    with pytest.raises(ValueError, match="must not decrease"):
        align_tokens([[(0, 3), (0, 2)]], [[(0, 3)]])


# ------------------------------------------------------------------------------------------------
# Alignment: two byte-level BPEs trained here
# ------------------------------------------------------------------------------------------------
TEXTS = ["naïve café — 日本語 text, déjà vu", "def f(x):\n    return  x ** 2\t# squared",
         "The quick brown fox jumps over the lazy dog.", "ünïcödé  spaces   and\nnewlines\n\n end"]


@pytest.fixture(scope="module")
def tokenizers_pair():
    pytest.importorskip("tokenizers")
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "\n".join(topics[k] for k in sorted(topics))
    docs = [text[i:i + 2000] for i in range(0, 200_000, 2000)] + TEXTS

    def train(vocab, docs=docs):  # as fastkd/demo/tokenizer.py trains its BPE
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(docs, trainer=trainers.BpeTrainer(
            vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return tok
    # a third one trained on other text: its vocabulary is not a subset of the others'
    other = [text[i:i + 2000] for i in range(300_000, 400_000, 2000)]
    return train(300), train(700), train(400, other)


def test_real_tokenizers_spans_decode_to_the_same_text(tokenizers_pair):
    st_tok, te_tok, _ = tokenizers_pair
    es, et = st_tok.encode_batch(TEXTS), te_tok.encode_batch(TEXTS)
    al = align_tokens([e.offsets for e in es], [e.offsets for e in et])
    kinds = {"1:1": 0, "1:n": 0, "n:1": 0}
    for b, text in enumerate(TEXTS):
        ids_s, ids_t = es[b].ids, et[b].ids
        pieces = []
        for i in range(int(al.num_spans[b])):
            fs, cs = int(al.student_first[b, i]), int(al.student_count[b, i])
            ft, ct = int(al.teacher_first[b, i]), int(al.teacher_count[b, i])
            ds, dt = st_tok.decode(ids_s[fs:fs + cs]), te_tok.decode(ids_t[ft:ft + ct])
            assert ds == dt == text[int(al.span_start[b, i]):int(al.span_end[b, i])], (b, i, ds, dt)
            pieces.append(ds)
            if cs == 1 or ct == 1:
                kinds["1:1" if cs == ct else "1:n" if cs == 1 else "n:1"] += 1
        assert "".join(pieces) == text
        assert (al.student_span[b, :len(ids_s)] >= 0).all() and (al.teacher_span[b, :len(ids_t)] >= 0).all()
    # the smaller vocabulary splits more: many student tokens to one teacher token, and plenty of 1:1
    assert kinds["1:1"] > 0 and kinds["n:1"] > 0, kinds
    # the roles swapped: the same spans, counts swapped (one-to-many)
    sw = align_tokens([e.offsets for e in et], [e.offsets for e in es])
    assert torch.equal(sw.student_count, al.teacher_count) and torch.equal(sw.teacher_first, al.student_first)
    assert torch.equal(sw.span_end, al.span_end) and bool(((sw.student_count == 1) & (sw.teacher_count > 1)).any())


def test_alignment_agrees_with_trl_on_ascii_text(tokenizers_pair):
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    st_tok, te_tok, _ = tokenizers_pair
    text = TEXTS[2] + " " + TEXTS[1]
    s_off, t_off = st_tok.encode(text).offsets, te_tok.encode(text).offsets
    sg, tg = gold.ULDLoss._align_by_byte_offsets(s_off, t_off)  # ASCII: byte offsets = character offsets
    al = align_tokens([s_off], [t_off])
    assert [g[0] for g in sg] == al.student_first[0].tolist()
    assert [g[0] for g in tg] == al.teacher_first[0].tolist()
    assert [len(g) for g in sg] == al.student_count[0].tolist()
    assert [len(g) for g in tg] == al.teacher_count[0].tolist()


# ------------------------------------------------------------------------------------------------
# ULD: values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vs, vt", [(37, 53), (64, 20), (1, 9)])
def test_large_k_equals_the_dense_closed_form(backend, vs, vt):
    z = teacher_logits(7, vs, torch.float64, 2.0, seed=1)
    t = teacher_logits(7, vt, torch.float64, 3.0, seed=2)
    want = uld_dense(torch.softmax(z / 1.5, -1), torch.softmax(t / 0.7, -1))
    got = uld_loss(z, t, k=max(vs, vt), temperature=1.5, teacher_temperature=0.7, reduction="none", backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(uld_loss(z, t, k=max(vs, vt), temperature=1.5, teacher_temperature=0.7,
                                        backend=backend), want.mean(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(uld_loss(z, t, k=max(vs, vt), temperature=1.5, teacher_temperature=0.7,
                                        reduction="sum", backend=backend), want.sum(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_small_k_is_bounded_by_the_tails(k):
    z = teacher_logits(50, 120, torch.float64, 2.0, seed=3)
    t = teacher_logits(50, 90, torch.float64, 2.0, seed=4)
    p, q = torch.softmax(z, -1), torch.softmax(t, -1)
    exact = uld_dense(p, q)
    got = uld_loss(z, t, k=k, reduction="none", backend="cpu")
    ts = 1 - p.topk(k, -1).values.sum(-1)
    tt = 1 - q.topk(k, -1).values.sum(-1)
    assert (got <= exact + 1e-12).all()
    assert (exact <= got + 2 * torch.minimum(ts, tt) + 1e-12).all()
    assert (got < exact - 1e-6).any()  # the bound is not vacuous: small k does lose something here


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("k", [1, 7, 64, 500])
def test_cpu_kernel_matches_the_reference(dtype, tol, k):
    z = teacher_logits(33, 300, torch.float64, 3.0, seed=5, mask_cols=7).to(dtype).requires_grad_()
    t = teacher_logits(33, 410, torch.float64, 3.0, seed=6, mask_cols=3).to(dtype)
    st = capture(t.double(), k=min(k, 410), temperature=1.3)
    kk = min(k, 410)
    head = st.teacher_probs(torch.float64)
    tail = torch.zeros(33, dtype=torch.float64) if kk >= 410 else (1 - head.sum(-1)).clamp_min(0)
    g = torch.rand(33, dtype=torch.float64) + 0.5
    zd = z.detach().double().requires_grad_()
    want = uld_rows(zd, head, tail, None, temperature=0.8, scale=1.0)
    (want * g).sum().backward()
    got = uld_loss(z, t, k=k, temperature=0.8, teacher_temperature=1.3, reduction="none", backend="cpu")
    (got * g.to(got.dtype)).sum().backward()
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, want, rtol=tol, atol_frac=tol, what="loss")
    assert_close(z.grad, zd.grad, rtol=10 * tol, atol_frac=10 * tol, what="grad")


def test_nan_rows_and_threads():
    z = teacher_logits(9, 700, torch.float32, 3.0, seed=7)
    t = teacher_logits(9, 500, torch.float32, 3.0, seed=8)
    z[4, 123] = float("nan")
    got = uld_loss(z, t, k=32, reduction="none", backend="cpu")
    assert got.isnan().tolist() == [i == 4 for i in range(9)]
    keep = [i for i in range(9) if i != 4]
    want = uld_loss(z[keep].double(), t[keep].double(), k=32, reduction="none", backend="torch")
    assert_close(got[keep], want, rtol=2e-5, atol_frac=2e-5)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = uld_loss(z, t, k=32, reduction="none", backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one.isnan(), got.isnan()) and torch.equal(one[keep], got[keep])


# ------------------------------------------------------------------------------------------------
# ULD: gradients and the custom op
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 40])
def test_gradcheck_cpu(k):
    t = teacher_logits(4, 13, torch.float64, 2.0, seed=9)
    z = teacher_logits(4, 11, torch.float64, 2.0, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: uld_loss(x, t, k=k, temperature=1.7, reduction="none",
                                                       backend="cpu"), (z,))
    vm = VocabMap({str(i): i for i in range(11)}, {str(i): i for i in range(4, 17)},
                  student_vocab_size=11, teacher_vocab_size=13)
    assert torch.autograd.gradcheck(lambda x: hybrid_uld_loss(x, t, vm, k=k, temperature=1.7, reduction="none",
                                                              backend="cpu"), (z,))


def test_opcheck():
    z = teacher_logits(5, 37, torch.float32, 2.0, seed=11).requires_grad_()
    st = capture(teacher_logits(5, 29, torch.float32, 2.0, seed=12), k=6)
    head = st.teacher_probs()
    tail = (1 - head.sum(-1)).clamp_min(0)
    cols = torch.rand(37) < 0.5
    for c in (None, cols):
        torch.library.opcheck(torch.ops.fastkd.uld.default, (z, head, tail, c, torch.tensor(4.0)),
                              dict(temperature=1.5, scale=0.7, backend="cpu"))


def test_compile_fullgraph():
    z = teacher_logits(6, 40, torch.float32, 2.0, seed=13).requires_grad_()
    t = teacher_logits(6, 25, torch.float32, 2.0, seed=14)
    st = capture(t, k=8)
    f = torch.compile(lambda x: uld_loss(x, st, k=8), fullgraph=True, backend="eager")
    got = f(z)
    got.backward()
    g = z.grad.clone()
    z.grad = None
    want = uld_loss(z, st, k=8)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, z.grad)


# ------------------------------------------------------------------------------------------------
# Agreement with TRL's ULDLoss
# ------------------------------------------------------------------------------------------------
def _gold_config(**kw):
    gold = pytest.importorskip("trl.experimental.gold")
    return gold.GOLDConfig(output_dir="/tmp/fastkd-gold-test", report_to=[], use_cpu=True, use_uld_loss=True,
                           uld_crossentropy_weight=0.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                           **kw)


@pytest.mark.parametrize("st_t, te_t", [(1.0, 1.0), (2.0, 0.5)])
def test_uld_equals_trl(st_t, te_t):
    from trl.experimental.gold.gold_trainer import ULDLoss

    cfg = _gold_config(use_extended_uld=False, uld_student_temperature=st_t, uld_teacher_temperature=te_t)
    trl_loss = ULDLoss(cfg)
    b, n, vs, vt = 2, 9, 48, 80
    z = teacher_logits(b * n, vs, torch.float32, 3.0, seed=15).reshape(b, n, vs).requires_grad_()
    t = teacher_logits(b * n, vt, torch.float32, 3.0, seed=16).reshape(b, n, vt)
    labels_s = torch.zeros(b, n, dtype=torch.long)
    labels_t = torch.zeros(b, n, dtype=torch.long)
    want = trl_loss(z, t, labels_s, labels_t, labels_s, labels_t)
    (gw,) = torch.autograd.grad(want, z)
    for backend in BACKENDS:
        got = uld_loss(z, t, k=vt, temperature=st_t, teacher_temperature=te_t, backend=backend)
        (gg,) = torch.autograd.grad(got, z)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-6)


def test_hybrid_unmatched_term_equals_trl(tokenizers_pair):
    from trl.experimental.gold.gold_trainer import ULDLoss

    _, te_tok, st_tok = tokenizers_pair
    cfg = _gold_config(uld_use_hybrid_loss=True)
    trl_loss = ULDLoss(cfg, student_tokenizer=st_tok, teacher_tokenizer=te_tok)
    vm = VocabMap.from_tokenizers(st_tok, te_tok)
    assert VocabMap.from_tokenizers(st_tok, te_tok) is vm  # built once per pair
    assert vm.num_matched == len(trl_loss._vocab_mapping)
    vs, vt = st_tok.get_vocab_size(), te_tok.get_vocab_size()
    assert 0 < vm.num_matched < vs  # both sides have unmatched entries (TRL skips the term otherwise)
    z = teacher_logits(6, vs, torch.float64, 3.0, seed=17)
    t = teacher_logits(6, vt, torch.float64, 3.0, seed=18)
    trl_loss._compute_hybrid_uld_loss(z.softmax(-1), t.softmax(-1))
    got = hybrid_uld_loss(z, t, vm, k=vt, matched_weight=0.0, unmatched_weight=1.0)
    torch.testing.assert_close(got, trl_loss.last_unmatched_loss.double(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Hybrid
# ------------------------------------------------------------------------------------------------
def _hybrid_by_hand(z, t, t2s, wm, wu):
    p, q = torch.softmax(z, -1), torch.softmax(t, -1)
    m = t2s >= 0
    tj, pj = q[:, m], p[:, t2s[m]]
    P, Q = tj.sum(-1), pj.sum(-1)
    matched = (tj * (tj.log() - pj.log())).sum(-1) + (1 - P) * ((1 - P).log() - (1 - Q).log())
    s_m = torch.zeros(z.shape[-1], dtype=torch.bool)
    s_m[t2s[m]] = True
    unmatched = uld_dense(p[:, ~s_m], q[:, ~m])
    return wm * matched + wu * unmatched


@pytest.mark.parametrize("backend", BACKENDS)
def test_hybrid_equals_its_expression(backend):
    vs, vt = 30, 45
    g = torch.Generator().manual_seed(19)
    t2s = torch.full((vt,), -1, dtype=torch.long)
    tids = torch.randperm(vt, generator=g)[:18]
    t2s[tids] = torch.randperm(vs, generator=g)[:18]
    t_vocab = {(f"s{int(t2s[i])}" if t2s[i] >= 0 else f"t{i}"): i for i in range(vt)}
    vm = VocabMap({f"s{i}": i for i in range(vs)}, t_vocab)
    assert torch.equal(vm.teacher_to_student, t2s) and vm.num_matched == 18
    z = teacher_logits(8, vs, torch.float64, 2.0, seed=20).requires_grad_()
    t = teacher_logits(8, vt, torch.float64, 2.0, seed=21)
    want = _hybrid_by_hand(z, t, t2s, 18 / vt, 1 - 18 / vt)
    got = hybrid_uld_loss(z, t, vm, k=vt, reduction="none", backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (gw,) = torch.autograd.grad(want.sum(), z)
    (gg,) = torch.autograd.grad(got.sum(), z)
    torch.testing.assert_close(gg, gw, rtol=1e-9, atol=1e-12)
    # fixed weights; a SparseTeacher holding the whole distribution gives the same
    want = _hybrid_by_hand(z, t, t2s, 0.3, 2.0)
    got = hybrid_uld_loss(z, capture(t, k=vt), vm, k=vt, matched_weight=0.3, unmatched_weight=2.0,
                          reduction="none", backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # small k: the cpu kernel and the reference agree
    a = hybrid_uld_loss(z, t, vm, k=5, reduction="none", backend="cpu")
    b = hybrid_uld_loss(z, t, vm, k=5, reduction="none", backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# The teacher side from a SparseTeacher / TeacherCache, through the alignment
# ------------------------------------------------------------------------------------------------
def test_teacher_cache_rows_through_the_alignment(tmp_path, tokenizers_pair):
    st_tok, te_tok, _ = tokenizers_pair
    texts = TEXTS[:3]
    es, et = st_tok.encode_batch(texts), te_tok.encode_batch(texts)
    ls, lt = max(len(e.ids) for e in es), max(len(e.ids) for e in et)
    vs, vt = st_tok.get_vocab_size(), te_tok.get_vocab_size()
    al = align_tokens([e.offsets for e in es], [e.offsets for e in et])
    z = teacher_logits(3 * ls, vs, torch.float32, 3.0, seed=22).reshape(3, ls, vs).requires_grad_()
    t = teacher_logits(3 * lt, vt, torch.float32, 3.0, seed=23).reshape(3, lt, vt)
    cache = TeacherCache(tmp_path / "c", mode="topk", k=vt, temperature=1.0, values_dtype="float32", sync=False)
    cache.write(torch.arange(3), capture(t, k=vt))
    stored = cache.read(torch.arange(3))
    assert isinstance(stored, SparseTeacher) and stored.shape == (3, lt)
    zs, tr = al.gather(z, t)
    _, sr = al.gather(z, stored)
    assert zs.shape[0] == int(al.num_spans.sum()) and sr.shape == (zs.shape[0],)
    dense = uld_loss(zs, tr, k=vt)
    cached = uld_loss(zs, sr, k=vt)
    torch.testing.assert_close(cached, dense, rtol=1e-5, atol=1e-6)
    want = uld_dense(torch.softmax(zs.double(), -1), torch.softmax(tr.double(), -1)).mean()
    torch.testing.assert_close(cached.double(), want, rtol=1e-5, atol=1e-6)
    vm = VocabMap.from_tokenizers(st_tok, te_tok)
    h_dense = hybrid_uld_loss(zs, tr, vm, k=vt)
    h_cached = hybrid_uld_loss(zs, sr, vm, k=vt)
    torch.testing.assert_close(h_cached, h_dense, rtol=1e-5, atol=1e-6)
    h_cached.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    cache.close()


# ------------------------------------------------------------------------------------------------
# Settings and inputs
# ------------------------------------------------------------------------------------------------
def test_settings_and_inputs_are_checked():
    z, t = torch.randn(3, 8), torch.randn(3, 5)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        uld_loss(z, t, k=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        uld_loss(z, t, reduction="avg")
    with pytest.raises(ValueError, match="temperature must be > 0.0, got 0.0"):
        uld_loss(z, t, temperature=0.0)
    with pytest.raises(ValueError, match="teacher_temperature must be > 0.0"):
        uld_loss(z, t, teacher_temperature=-1.0)
    with pytest.raises(ValueError, match="one row per student row"):
        uld_loss(z, torch.randn(4, 5))
    with pytest.raises(ValueError, match="differs from the capture temperature"):
        uld_loss(z, capture(t, k=3, temperature=2.0), teacher_temperature=1.0)
    with pytest.raises(ValueError, match="top-k SparseTeacher"):
        uld_loss(z, capture(t, mode="sample", num_samples=4))
    vm = VocabMap({"a": 0}, {"a": 1}, student_vocab_size=8, teacher_vocab_size=5)
    with pytest.raises(ValueError, match="both be None"):
        hybrid_uld_loss(z, t, vm, matched_weight=0.5)
    with pytest.raises(ValueError, match="vocab_map.student_vocab_size"):
        hybrid_uld_loss(torch.randn(3, 9), t, vm)
    assert fastkd.uld_loss is uld_loss
