"""Distillation across tokenizers: aligning two tokenizations of one text, the Universal Logit
Distillation loss (``uld_loss``, Boizard et al. 2024) and the hybrid of a KL on the tokens both
vocabularies share with ULD on the rest (``hybrid_uld_loss``, as TRL's GOLD trainer).

A student and a teacher with different tokenizers predict different token sequences for the same
text. :func:`align_tokens` maps both onto *spans*: the shortest pieces of text whose boundaries are
token boundaries of both tokenizations. Each span yields one pair of rows, the student's and the
teacher's distribution for the span's first token. ``uld_loss`` compares such rows without any
correspondence between the vocabularies (sorted probabilities); ``hybrid_uld_loss`` also uses the
entries whose token strings are identical in both vocabularies (:class:`VocabMap`).

See ``docs/cross_tokenizer.md`` for a worked example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from . import _inputs
from ._backends import registry
from ._ops.sparse_kd import sparse_kd_rows
from ._ops.uld import uld_rows
from ._settings import TAIL_CODES, ULDSettings, acc_dtype, uld_settings
from .cache.teacher import SparseTeacher, capture

__all__ = ["TokenAlignment", "align_tokens", "VocabMap", "uld_loss", "hybrid_uld_loss"]

Teacher = Union[torch.Tensor, SparseTeacher]


# ------------------------------------------------------------------------------------------------
# Alignment
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenAlignment:
    """Two tokenizations of the same texts mapped onto common spans (see :func:`align_tokens`).

    With ``B`` sequences, ``Ls``/``Lt`` student/teacher tokens per sequence (padded) and ``S`` the
    largest number of spans in a sequence:

    * ``student_span`` ``(B, Ls)``, ``teacher_span`` ``(B, Lt)`` int64: the span of each token, −1 for
      padding and for tokens after the last common boundary (an unfinished span).
    * ``num_spans`` ``(B,)``: the spans of each sequence.
    * ``student_first``/``teacher_first`` ``(B, S)``: the position of each span's first token, −1 past
      ``num_spans``; ``student_count``/``teacher_count`` ``(B, S)``: its number of tokens (0 past).
    * ``span_start``/``span_end`` ``(B, S)``: its character extent ``[start, end)``.
    """

    student_span: torch.Tensor
    teacher_span: torch.Tensor
    num_spans: torch.Tensor
    student_first: torch.Tensor
    teacher_first: torch.Tensor
    student_count: torch.Tensor
    teacher_count: torch.Tensor
    span_start: torch.Tensor
    span_end: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """``(B, S)`` bool: the span exists."""
        return self.student_count > 0

    @property
    def one_to_one(self) -> torch.Tensor:
        """``(B, S)`` bool: one student token and one teacher token."""
        return (self.student_count == 1) & (self.teacher_count == 1)

    def index(self, shift: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(batch, student_row, teacher_row)``, each ``(M,)``, over the ``M`` spans in order (sequence
        by sequence): the rows :meth:`gather` takes, ``first token position − shift``.

        ``shift=0``: row ``i`` of the logits is the distribution over token ``i`` (logits already
        shifted against their labels). ``shift=1``: the logits of a causal LM over its own input
        (row ``i`` predicts token ``i + 1``); spans whose first token is a sequence's first token on
        either side have no prediction and are left out.
        """
        if shift not in (0, 1):
            raise ValueError(f"shift must be 0 or 1, got {shift!r}")
        ok = self.mask & (self.student_first >= shift) & (self.teacher_first >= shift)
        b, s = ok.nonzero(as_tuple=True)
        return b, self.student_first[b, s] - shift, self.teacher_first[b, s] - shift

    def gather(self, student_logits: torch.Tensor, teacher: Teacher, shift: int = 0) -> Tuple[torch.Tensor, Teacher]:
        """The aligned rows: ``student_logits[b, student_row]`` ``(M, V_s)`` and ``teacher[b, teacher_row]``
        (``(M, V_t)`` from teacher logits ``(B, Lt, V_t)``, or ``(M,)`` rows of a ``SparseTeacher`` of
        shape ``(B, Lt)``), with the rows of :meth:`index` (``shift`` as there).
        """
        b, ps, pt = self.index(shift)
        return student_logits[b, ps], teacher[b, pt]


def _as_offsets(offsets, lengths, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, L, 2)`` int64 offsets and ``(B,)`` lengths from a tensor or per-sequence lists of pairs."""
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 3 or offsets.shape[-1] != 2 or offsets.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor (B, L, 2) of [start, end) character offsets, "
                             f"got {offsets.dtype} {tuple(offsets.shape)}")
        off = offsets.long()
        if lengths is None:
            lengths = torch.full((off.shape[0],), off.shape[1], dtype=torch.long, device=off.device)
        return off, torch.as_tensor(lengths, dtype=torch.long, device=off.device)
    seqs = [list(s) for s in offsets]
    if lengths is not None:
        raise ValueError(f"lengths are taken from the lists themselves when {name} is a list of sequences")
    width = max([len(s) for s in seqs] + [1])
    off = torch.zeros(len(seqs), width, 2, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            off[i, :len(s)] = torch.tensor([tuple(p) for p in s], dtype=torch.long).reshape(-1, 2)
    return off, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def _boundaries(off: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ends with padding at +big, valid mask, genuine-boundary mask) of one side."""
    b, n, _ = off.shape
    pos = torch.arange(n, device=off.device)
    valid = pos < lengths.unsqueeze(1)
    big = torch.iinfo(torch.long).max // 2
    start = torch.where(valid, off[..., 0], torch.full_like(off[..., 0], big))
    end = torch.where(valid, off[..., 1], torch.full_like(off[..., 1], big))
    # nondecreasing ends are required; a padded row is sorted because padding is +big
    next_start = torch.cat([start[:, 1:], start.new_full((b, 1), big)], dim=1)
    next_end = torch.cat([end[:, 1:], end.new_full((b, 1), big)], dim=1)
    last = pos == (lengths.unsqueeze(1) - 1)
    # a token's end is a boundary of this side when the next token starts at or after it (tokens that
    # share one character, the byte pieces of a multi-byte character, overlap) and the next token does
    # not end there too (a zero-width token joins the span that ends where it sits)
    genuine = valid & (last | ((next_start >= end) & (next_end != end)))
    return end, valid, genuine


def align_tokens(student_offsets, teacher_offsets, *, student_lengths=None, teacher_lengths=None) -> TokenAlignment:
    """Map two tokenizations of the same texts onto common spans, vectorised over the batch.

    Args:
        student_offsets, teacher_offsets: ``[start, end)`` character offsets of each token, as
            ``tokenizers`` returns them (``Encoding.offsets``): an integer tensor ``(B, L, 2)`` (then
            ``*_lengths`` ``(B,)`` give the valid prefix of each row; default: all) or one list of
            ``(start, end)`` pairs per sequence. Within a sequence the ends must not decrease.

    The rule. A *boundary* of one side is the end ``e`` of a token such that the next token starts at
    or after ``e`` and does not end at ``e`` (or the sequence's last token). A *common boundary* is a
    character position that is a boundary of both sides; a *span* is the text between two
    consecutive common boundaries (the first one starting at the sequence's first token), and holds
    every token of either side whose end lies in it. Hence:

    * one-to-one: both sides end a token at the span's end and nowhere inside it;
    * one-to-many / many-to-one: one side splits the span, e.g. student ``"hello"`` against teacher
      ``"hel" "lo"`` (counts 1 and 2); a token split three ways gives counts 1 and 3;
    * many-to-many: both sides split it at different places (``"ab" "c"`` against ``"a" "bc"``);
    * several tokens that cover pieces of one character (byte-level tokenizers split a multi-byte
      character into byte tokens that all report that character's offsets) overlap, so no boundary
      falls between them: they stay in one span with whatever covers the whole character on the
      other side;
    * leading whitespace belongs to the token that carries it (``"Ġworld"``): spans follow the
      offsets as given, whitespace included;
    * tokens after the last common boundary (a truncated text) get span −1.

    Each span contributes one pair of rows (:meth:`TokenAlignment.gather`): the student's
    distribution for the span's first student token and the teacher's for the span's first teacher
    token (for causal LMs over their own inputs, ``shift=1``: the logits one position earlier). Both predict the start of the same piece of text; the later tokens of a split span take
    no part in the cross-tokenizer loss.

    Returns:
        :class:`TokenAlignment`.
    """
    so, sl = _as_offsets(student_offsets, student_lengths, "student_offsets")
    to, tl = _as_offsets(teacher_offsets, teacher_lengths, "teacher_offsets")
    if so.shape[0] != to.shape[0]:
        raise ValueError(f"student and teacher offsets must hold the same sequences: {so.shape[0]} vs {to.shape[0]}")
    to = to.to(so.device)
    tl = tl.to(so.device)
    sl = sl.to(so.device)
    for name, off, ln in (("student", so, sl), ("teacher", to, tl)):
        e = off[..., 1]
        pos = torch.arange(off.shape[1], device=off.device)
        inner = (pos[1:] < ln.unsqueeze(1))
        if bool(((e[:, 1:] < e[:, :-1]) & inner).any()):
            raise ValueError(f"{name}_offsets: token ends must not decrease within a sequence")
    s_end, s_valid, s_gen = _boundaries(so, sl)
    t_end, t_valid, t_gen = _boundaries(to, tl)

    def common(end_a, gen_a, end_b, gen_b):
        # the last token of side b whose end <= end_a; a match needs the same end and a boundary there
        j = (torch.searchsorted(end_b.contiguous(), end_a.contiguous(), right=True) - 1).clamp_min(0)
        return gen_a & (end_b.gather(1, j) == end_a) & gen_b.gather(1, j)

    s_match = common(s_end, s_gen, t_end, t_gen)
    t_match = common(t_end, t_gen, s_end, s_gen)
    num = s_match.sum(-1)
    if not torch.equal(num, t_match.sum(-1)):  # pragma: no cover - the two counts are one set
        raise AssertionError("align_tokens: inconsistent common boundaries")

    def spans(match, valid):
        before = torch.cumsum(match.long(), dim=1) - match.long()
        return torch.where(valid & (before < num.unsqueeze(1)), before, torch.full_like(before, -1))

    s_span = spans(s_match, s_valid)
    t_span = spans(t_match, t_valid)
    b = so.shape[0]
    n_spans = max(int(num.max()) if b else 0, 0)

    def per_span(span, off):
        n = off.shape[1]
        pos = torch.arange(n, device=off.device).expand_as(span)
        ok = span >= 0
        idx = torch.where(ok, span, torch.zeros_like(span))
        first = torch.full((b, n_spans), n, dtype=torch.long, device=off.device)
        count = torch.zeros((b, n_spans), dtype=torch.long, device=off.device)
        if n_spans:
            first.scatter_reduce_(1, idx, torch.where(ok, pos, torch.full_like(pos, n)), reduce="amin")
            count.scatter_add_(1, idx, ok.long())
        first = torch.where(count > 0, first, torch.full_like(first, -1))
        return first, count

    s_first, s_count = per_span(s_span, so)
    t_first, t_count = per_span(t_span, to)
    ok = s_count > 0
    safe = torch.where(ok, s_first, torch.zeros_like(s_first))
    start = torch.where(ok, so[..., 0].gather(1, safe), torch.full_like(safe, -1))
    last = torch.where(ok, s_first + s_count - 1, torch.zeros_like(s_first))
    end = torch.where(ok, so[..., 1].gather(1, last), torch.full_like(safe, -1))
    return TokenAlignment(s_span, t_span, num, s_first, t_first, s_count, t_count, start, end)


# ------------------------------------------------------------------------------------------------
# Vocabulary correspondence
# ------------------------------------------------------------------------------------------------
_MAPS: Dict[Tuple[int, int], Tuple[object, object, "VocabMap"]] = {}


class VocabMap:
    """The entries whose token strings are identical in the student's and the teacher's vocabulary.

    * ``teacher_to_student`` ``(V_t,)`` int64: the student id of each teacher id, −1 when the teacher's
      string is not in the student's vocabulary;
    * ``student_matched`` ``(V_s,)`` bool, ``num_matched``, ``student_vocab_size``, ``teacher_vocab_size``.

    Build it once per tokenizer pair with :meth:`from_tokenizers` (cached per pair) or from two
    ``{token string: id}`` dicts. For byte-level BPEs, equal strings are equal byte sequences.
    """

    def __init__(self, student_vocab: Dict[str, int], teacher_vocab: Dict[str, int], *,
                 student_vocab_size: Optional[int] = None, teacher_vocab_size: Optional[int] = None):
        vs = student_vocab_size or (max(student_vocab.values()) + 1 if student_vocab else 0)
        vt = teacher_vocab_size or (max(teacher_vocab.values()) + 1 if teacher_vocab else 0)
        t2s = torch.full((vt,), -1, dtype=torch.long)
        pairs = [(tid, student_vocab[s]) for s, tid in teacher_vocab.items() if s in student_vocab]
        if pairs:
            p = torch.tensor(pairs, dtype=torch.long)
            t2s[p[:, 0]] = p[:, 1]
        matched = torch.zeros(vs, dtype=torch.bool)
        matched[t2s[t2s >= 0]] = True
        self.teacher_to_student = t2s
        self.student_matched = matched
        self.num_matched = len(pairs)
        self.student_vocab_size = vs
        self.teacher_vocab_size = vt
        self._on: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_tokenizers(cls, student_tokenizer, teacher_tokenizer) -> "VocabMap":
        """From two ``tokenizers.Tokenizer`` (or anything with ``get_vocab()``); built once per pair
        and cached (the cache keeps both tokenizers alive)."""
        key = (id(student_tokenizer), id(teacher_tokenizer))
        hit = _MAPS.get(key)
        if hit is not None and hit[0] is student_tokenizer and hit[1] is teacher_tokenizer:
            return hit[2]

        def vocab(tok):
            try:
                v = tok.get_vocab(with_added_tokens=True)
            except TypeError:  # a tokenizer whose get_vocab() takes no arguments
                v = tok.get_vocab()
            size = tok.get_vocab_size() if hasattr(tok, "get_vocab_size") else 0
            return v, max(max(v.values(), default=-1) + 1, size)

        (sv, ns), (tv, nt) = vocab(student_tokenizer), vocab(teacher_tokenizer)
        vm = cls(sv, tv, student_vocab_size=ns, teacher_vocab_size=nt)
        _MAPS[key] = (student_tokenizer, teacher_tokenizer, vm)
        return vm

    def on(self, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(teacher_to_student, student_matched, teacher_matched)`` on ``device`` (copied once)."""
        device = torch.device(device)
        if device not in self._on:
            t2s = self.teacher_to_student.to(device)
            self._on[device] = (t2s, self.student_matched.to(device), t2s >= 0)
        return self._on[device]

    def __repr__(self) -> str:
        return (f"VocabMap(student_vocab_size={self.student_vocab_size}, teacher_vocab_size="
                f"{self.teacher_vocab_size}, num_matched={self.num_matched})")


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
def _sparse_teacher(teacher: Teacher, lead, device, s: ULDSettings) -> Tuple[SparseTeacher, float]:
    """The teacher as a flat top-k ``SparseTeacher`` (N,) and its temperature."""
    n_rows = math.prod(lead)
    if isinstance(teacher, SparseTeacher):
        st = teacher
        if st.mode != "topk":
            raise ValueError("a cross-tokenizer loss needs a top-k SparseTeacher (capture(mode='topk')); sorted "
                             "sampled counts would be a biased estimate")
        if s.teacher_temperature is not None and not math.isclose(s.teacher_temperature, st.temperature,
                                                                  rel_tol=1e-6):
            raise ValueError(f"teacher_temperature={s.teacher_temperature} differs from the capture temperature "
                             f"{st.temperature}; re-capture at this temperature")
        tt = st.temperature
    elif isinstance(teacher, torch.Tensor):
        _inputs.check_logits("teacher_logits", teacher)
        if teacher.device != device:
            raise ValueError(f"teacher_logits must be on the student's device {device}, got {teacher.device}")
        tt = s.teacher_temperature if s.teacher_temperature is not None else s.temperature
        st = None
    else:
        raise TypeError(f"the teacher must be logits (a torch.Tensor) or a fastkd.SparseTeacher, got "
                        f"{type(teacher).__name__}")
    shape = st.shape if st is not None else teacher.shape[:-1]
    if math.prod(shape) != n_rows:
        raise ValueError(f"the teacher must hold one row per student row: student leading shape {tuple(lead)} "
                         f"({n_rows} rows), teacher leading shape {tuple(shape)}")
    if st is None:
        st = capture(teacher.detach(), k=min(s.k, teacher.shape[-1]), temperature=tt, backend=s.backend)
    if st.device != device:
        raise ValueError(f"the SparseTeacher must be on the student's device {device}, got {st.device}")
    return st.flatten(), tt


def _head_and_tail(w: torch.Tensor, k: int, complete: bool, total: Optional[torch.Tensor] = None):
    """Sorted head ``w[:, :k]`` and the mass beyond it: ``total − head.sum()`` (``total`` 1 when
    None), exactly 0 when ``complete`` (every entry of the distribution is among the first k)."""
    head = w[:, :k].contiguous()
    if complete:
        return head, torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    total = 1.0 if total is None else total
    return head, (total - head.sum(-1)).clamp_min(0.0)


def uld_loss(student_logits: torch.Tensor, teacher: Teacher, *, k: int = 256, temperature: float = 1.0,
             teacher_temperature: Optional[float] = None, reduction: str = "mean",
             backend: str = "auto") -> torch.Tensor:
    r"""Universal Logit Distillation loss on aligned rows (Boizard et al. 2024), from the top-k of each side.

    ``student_logits`` ``(..., V_s)`` and the teacher's rows (logits ``(..., V_t)`` or a top-k
    :class:`SparseTeacher` with as many rows, e.g. from :meth:`TeacherCache.read`) are row-aligned
    (:meth:`TokenAlignment.gather`); ``V_s`` and ``V_t`` may differ. Per row, with
    ``p = softmax(student_logits / temperature, -1)``, the teacher's ``t = softmax(teacher_logits /
    teacher_temperature, -1)`` and ``kk = min(k, K_t)`` (``K_t`` the teacher's stored entries: its
    ``k`` captured, or ``min(k, V_t)`` for logits)::

        a = torch.topk(p, min(kk, V_s), -1).values               # decreasing
        b = torch.topk(t, kk, -1).values                          # decreasing
        a = F.pad(a, (0, kk - a.shape[-1]))                       # zero-padded like the paper's shorter side
        T_s = 1 - a.sum(-1)          (0 when V_s <= kk)           # mass beyond rank kk
        T_t = 1 - b.sum(-1)          (0 when K_t >= V_t and kk = K_t)
        loss_row = (a - b).abs().sum(-1) + (T_s - T_t).abs()
        loss = loss_row.mean()                                    # reduction="mean" ("sum", "none")

    The ranks beyond ``kk`` are not sorted: their exact contribution Σ_{r>kk} |a_r − b_r| lies in
    ``[|T_s − T_t|, T_s + T_t]`` and is replaced by its lower bound, so the loss is at most
    ``2 · min(T_s, T_t)`` below the full sorted L1 distance. With ``k`` at least both widths (and a
    teacher stored in full) it equals the closed form exactly::

        s = p.sort(-1, descending=True).values; u = t.sort(-1, descending=True).values
        w = max(V_s, V_t)
        loss_row = (F.pad(s, (0, w - V_s)) - F.pad(u, (0, w - V_t))).abs().sum(-1)

    The gradient flows to ``student_logits`` only (the teacher is read detached). On CPU both passes
    are fused in one C++ kernel (top-k with an online log-sum-exp, then the gradient); on GPUs the
    teacher's top-k comes from the fused capture kernels and the student side from PyTorch
    (``backend="torch"``: no fused ULD kernel exists for GPUs).

    Args:
        student_logits: ``(..., V_s)`` float32/bfloat16/float16 (float64 on CPU).
        teacher: teacher logits ``(..., V_t)`` on the student's device, or a top-k ``SparseTeacher``
            in the teacher's vocabulary.
        k: ranks compared exactly (≥ 1).
        temperature: the student's temperature; ``teacher_temperature`` the teacher's (default:
            ``temperature`` for logits, the capture temperature for a ``SparseTeacher``, which any
            value given must equal).
        reduction: ``"mean"`` over rows (default), ``"sum"`` or ``"none"`` (shape ``(...)``).
        backend: ``"auto"``, ``"cpu"`` or ``"torch"`` (the float64 reference).

    Returns:
        float32 loss (float64 for float64 inputs).
    """
    s = uld_settings(k=k, temperature=temperature, teacher_temperature=teacher_temperature, reduction=reduction,
                     backend=backend)
    _inputs.check_logits("student_logits", student_logits)
    lead = student_logits.shape[:-1]
    device = student_logits.device
    st, _ = _sparse_teacher(teacher, lead, device, s)
    acc = acc_dtype(student_logits.dtype)
    kk = min(s.k, st.k)
    head, tail = _head_and_tail(st.teacher_probs(acc), kk, complete=kk >= st.vocab_size)
    resolved = registry.resolve("uld", s.backend, device)
    registry.check_dtype("uld", resolved, student_logits.dtype)
    s2 = _inputs.rows(student_logits, student_logits.shape[-1])
    divisor = _inputs.divisor(None, s2.shape[0], s.reduction, None, -100, device, acc)
    rows = uld_rows(s2, head, tail, None, divisor, temperature=s.temperature, scale=1.0, backend=resolved)
    return _inputs.reduce_rows(rows, s.reduction, lead)


def hybrid_uld_loss(student_logits: torch.Tensor, teacher: Teacher, vocab_map: VocabMap, *, k: int = 256,
                    temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                    matched_weight: Optional[float] = None, unmatched_weight: Optional[float] = None,
                    reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    r"""The matched entries compared directly (a KL), the rest by ULD, on aligned rows.

    With ``p``, ``t``, ``kk`` as in :func:`uld_loss`, ``m = vocab_map.teacher_to_student``, ``M`` the
    teacher ids with ``m >= 0`` and ``I`` the teacher's top-``K_t`` ids of a row (all of them for logits
    with ``k >= V_t``), per row::

        J = [i for i in I if m[i] >= 0]                       # stored teacher entries with a student twin
        P = t[J].sum();  Q = p[m[J]].sum()
        matched = (t[J] * (t[J].log() - p[m[J]].log())).sum() + (1 - P) * ((1 - P).log() - (1 - Q).log())
        unmatched = uld(p over the student ids outside m[M], t over the teacher ids outside M)
        loss_row = matched_weight * matched + unmatched_weight * unmatched

    ``matched`` is the KL between the two distributions coarsened to the buckets ``{m[j] : j ∈ J}``
    plus one bucket for everything else, i.e. the soft term of ``fastkd.sparse_kd_loss`` with
    ``tail="bucket"`` against the teacher's stored entries moved to their student ids (entries
    without a twin dropped into the tail bucket), computed by the fused sparse kernels. ``unmatched`` is :func:`uld_loss`'s row on the sub-distributions,
    *not* renormalised (as TRL's GOLD trainer): ``a`` the largest ``p_j`` over the unmatched student
    columns, ``b`` the teacher's unmatched entries of its top-``K_t`` in decreasing order (first ``kk``),
    ``T_s = p[unmatched].sum() − a.sum()``, and ``T_t`` = the teacher's exact unmatched mass minus
    ``b.sum()`` for logits; for a ``SparseTeacher`` the mass it did not store, ``1 − Σ_I t``, is
    counted as unmatched (an upper bound of the unmatched tail).

    Weights: both ``None`` (default) gives TRL's adaptive weights ``matched_weight = num_matched /
    V_t`` and ``unmatched_weight = 1 − matched_weight``; otherwise both must be given.

    Args:
        vocab_map: :class:`VocabMap` of this (student, teacher) tokenizer pair.
        the rest: as in :func:`uld_loss`.
    """
    s = uld_settings(k=k, temperature=temperature, teacher_temperature=teacher_temperature,
                     matched_weight=matched_weight, unmatched_weight=unmatched_weight, reduction=reduction,
                     backend=backend)
    if not isinstance(vocab_map, VocabMap):
        raise TypeError(f"vocab_map must be a fastkd.VocabMap, got {type(vocab_map).__name__}")
    _inputs.check_logits("student_logits", student_logits)
    lead = student_logits.shape[:-1]
    device = student_logits.device
    vs = student_logits.shape[-1]
    if vs != vocab_map.student_vocab_size:
        raise ValueError(f"student_logits has V={vs} but vocab_map.student_vocab_size={vocab_map.student_vocab_size}")
    st, tt = _sparse_teacher(teacher, lead, device, s)
    if st.vocab_size != vocab_map.teacher_vocab_size:
        raise ValueError(f"the teacher has V={st.vocab_size} but vocab_map.teacher_vocab_size="
                         f"{vocab_map.teacher_vocab_size}")
    wm = s.matched_weight if s.matched_weight is not None else vocab_map.num_matched / max(1, st.vocab_size)
    wu = s.unmatched_weight if s.unmatched_weight is not None else 1.0 - wm
    t2s, s_matched, t_matched = vocab_map.on(device)
    acc = acc_dtype(student_logits.dtype)
    ids = st.ids.long()
    w = st.teacher_probs(acc)
    sid = t2s[ids]
    s2 = _inputs.rows(student_logits, vs)
    divisor = _inputs.divisor(None, s2.shape[0], s.reduction, None, -100, device, acc)

    # matched entries: the fused sparse KL with a bucket tail, teacher ids mapped into the student's
    res_sparse = registry.resolve("sparse_kd", s.backend, device)
    registry.check_dtype("sparse_kd", res_sparse, student_logits.dtype)
    m_w = torch.where(sid >= 0, w, torch.zeros_like(w))
    matched = sparse_kd_rows(s2, sid.contiguous(), m_w.contiguous(), None, divisor, tail=TAIL_CODES["bucket"],
                             temperature=s.temperature, soft_scale=wm, hard_weight=0.0, ignore_index=-100,
                             label_smoothing=0.0, backend=res_sparse)

    # unmatched entries: ULD on the sub-distributions
    u_w = torch.where(sid < 0, w, torch.zeros_like(w)).sort(-1, descending=True).values
    n_unmatched_t = st.vocab_size - vocab_map.num_matched
    kk = min(s.k, st.k)
    complete = st.k >= st.vocab_size and kk >= n_unmatched_t
    if isinstance(teacher, torch.Tensor):
        tl = _inputs.rows(teacher.detach(), st.vocab_size).to(acc) / tt
        total = torch.exp(torch.logsumexp(tl.masked_fill(t_matched, float("-inf")), -1) - torch.logsumexp(tl, -1))
    else:
        total = u_w.sum(-1) + (1.0 - w.sum(-1)).clamp_min(0.0)
    head, tail = _head_and_tail(u_w, kk, complete, total)
    res_uld = registry.resolve("uld", s.backend, device)
    registry.check_dtype("uld", res_uld, student_logits.dtype)
    unmatched = uld_rows(s2, head, tail, ~s_matched, divisor, temperature=s.temperature, scale=wu, backend=res_uld)
    return _inputs.reduce_rows(matched + unmatched, s.reduction, lead)

