"""The sparse teacher: what a cache keeps of a teacher's logits, and ``capture``, the one fused
pass that produces it.

``capture`` reads full teacher logits once and keeps, per row, what distillation needs: the
full-vocabulary log-sum-exp and either the top-k ids with log-probabilities normalised over the FULL
vocabulary, or N draws with replacement from p stored as unique ids + counts (unbiased,
E[count/N] = p; after Anshumann et al. 2025, "Sparse Logit Sampling"). ``fastkd.sparse_kd_loss``
trains a student against such a ``SparseTeacher``; ``fastkd.TeacherCache`` stores them on disk.
``SparseTeacher.from_logprobs`` (with ``logprobs_from_vllm``) builds one from an inference server's
per-token top-k log-probabilities instead, and ``check_rows`` is the one check of every row that
the constructor, ``from_logprobs`` and ``TeacherCache.write`` share.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .. import _inputs
from .._backends import registry
from .._ops import capture as _capture_ops
from .._reference.capture import teacher_dense_probs
from .._settings import MODES, capture_settings, check, check_k

_INT_DTYPES = _inputs.INT_DTYPES
# The id of an entry that holds nothing (a row with fewer than K entries).
PAD_ID = -1
# How far a log-probability may exceed 0, and log Σp exceed log 1, from rounding alone (a server's
# float32 log-softmax, a float16 cache): beyond it a row is an error, within it it is clamped to 1.
LOGPROB_ROUNDING = 1e-4


class SparseTeacher:
    """What the cache keeps of a teacher's logits, for rows of leading shape ``shape``.

    Fields (all tensors share the leading shape ``S`` and one device):

    * ``mode``: ``"topk"`` or ``"sample"``.
    * ``ids``: ``(*S, K)`` int64. Top-k: the k most probable ids, by decreasing probability (ties:
      smaller id first). Sample: the unique drawn ids in increasing order, then padding ``-1``
      (K = min(num_samples, V)).
    * ``values``: top-k only, ``(*S, K)`` float32 (float64 for float64 teachers):
      ``log_softmax(teacher_logits / temperature, -1).gather(-1, ids)``, i.e. log-probabilities
      normalised over the FULL vocabulary. ``None`` in sample mode.
    * ``counts``: sample only, ``(*S, K)`` int32: how many of the ``num_samples`` draws gave each id
      (0 for padding). ``None`` in top-k mode.
    * ``lse``: ``(*S,)``: ``torch.logsumexp(teacher_logits / temperature, -1)`` (so the stored
      teacher logits are ``temperature * (values + lse)``).
    * ``temperature`` (the capture temperature τ), ``vocab_size`` (V), ``num_samples`` (N, sample mode).

    Indexing (``st[rows]``), ``flatten()``, ``reshape()``, ``to()``, ``pin_memory()`` and
    ``SparseTeacher.cat`` act on the leading dimensions, so a chunked loss can slice rows.

    Padding: id ``PAD_ID`` (−1) marks an entry that holds nothing (a row with fewer than K entries);
    its value or count is ignored (a top-k padding entry reads back from a cache as −inf).

    The constructor checks every row (``validate=True``, see :func:`check_rows`): ids in [0, V) or
    padding, no id twice in a row, no NaN, top-k log-probabilities ≤ 0 and Σp ≤ 1 up to
    ``LOGPROB_ROUNDING``, sampled counts ≥ 1 on stored ids summing to N. A bad row is a
    ``ValueError`` naming the problem and the first offending row. The check reads the tensors (a
    host sync on a GPU) and is skipped under ``torch.compile``; ``validate=False`` skips it for rows
    known to be well formed (what ``capture`` and ``TeacherCache.read`` return).
    """

    __slots__ = ("mode", "ids", "values", "counts", "lse", "temperature", "vocab_size", "num_samples")

    def __init__(self, mode: str, ids: torch.Tensor, lse: torch.Tensor, *, temperature: float, vocab_size: int,
                 values: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None,
                 num_samples: Optional[int] = None, validate: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(ids, torch.Tensor) or ids.dtype not in _INT_DTYPES or ids.dim() < 1:
            raise TypeError(f"ids must be an integer tensor of shape (..., K), got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if not isinstance(lse, torch.Tensor) or not lse.is_floating_point():
            raise TypeError("lse must be a floating-point tensor of shape ids.shape[:-1]")
        if tuple(lse.shape) != tuple(ids.shape[:-1]):
            raise ValueError(f"lse must have shape {tuple(ids.shape[:-1])} (ids' leading shape), got "
                             f"{tuple(lse.shape)}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        check("temperature", temperature)
        if mode == "topk":
            if values is None or counts is not None:
                raise ValueError("a top-k SparseTeacher needs values (log-probabilities) and no counts")
            if not values.is_floating_point() or values.shape != ids.shape:
                raise ValueError(f"values must be a floating tensor of ids' shape {tuple(ids.shape)}, got "
                                 f"{values.dtype} {tuple(values.shape)}")
            if ids.shape[-1] > vocab_size:
                raise ValueError(f"k = {ids.shape[-1]} ids per row exceeds vocab_size = {vocab_size}")
        else:
            if counts is None or values is not None:
                raise ValueError("a sampled SparseTeacher needs counts and no values")
            if counts.dtype not in _INT_DTYPES or counts.shape != ids.shape:
                raise ValueError(f"counts must be an integer tensor of ids' shape {tuple(ids.shape)}, got "
                                 f"{counts.dtype} {tuple(counts.shape)}")
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
                raise ValueError(f"num_samples must be an int >= 1 for a sampled SparseTeacher, got "
                                 f"{num_samples!r}")
        for name, t in (("values", values), ("counts", counts), ("lse", lse)):
            if t is not None and t.device != ids.device:
                raise ValueError(f"{name} must be on ids' device {ids.device}, got {t.device}")
        if validate and not _inputs.is_compiling():
            check_rows(mode, ids, values=values, counts=counts, vocab_size=vocab_size, num_samples=num_samples)
        self.mode = mode
        self.ids = ids
        self.values = values
        self.counts = counts
        self.lse = lse
        self.temperature = float(temperature)
        self.vocab_size = vocab_size
        self.num_samples = num_samples if mode == "sample" else None

    # ---- shape and movement -------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.lse.shape

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def _map(self, fn) -> "SparseTeacher":
        return SparseTeacher(self.mode, fn(self.ids), fn(self.lse), temperature=self.temperature,
                             vocab_size=self.vocab_size, values=None if self.values is None else fn(self.values),
                             counts=None if self.counts is None else fn(self.counts), num_samples=self.num_samples,
                             validate=False)

    def _map_rows(self, fn) -> "SparseTeacher":
        """Apply ``fn`` to the leading dims: per-row tensors get a trailing singleton added first."""
        def g(t):
            return fn(t) if t.dim() == self.lse.dim() + 1 else fn(t.unsqueeze(-1)).squeeze(-1)
        return self._map(g)

    def __getitem__(self, index) -> "SparseTeacher":
        if not isinstance(index, tuple):
            index = (index,)
        if any(i is Ellipsis for i in index):
            raise IndexError("SparseTeacher indexing takes leading-dimension indices, not Ellipsis")
        return self._map_rows(lambda t: t[index])

    def flatten(self) -> "SparseTeacher":
        """Leading dims flattened to one: shape ``(N,)``, ids ``(N, K)``."""
        return self.reshape(-1)

    def reshape(self, *shape) -> "SparseTeacher":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        return self._map_rows(lambda t: t.reshape(*shape, t.shape[-1]))

    def to(self, device=None, non_blocking: bool = False) -> "SparseTeacher":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> "SparseTeacher":
        return self._map(lambda t: t.pin_memory())

    @staticmethod
    def cat(parts: Sequence["SparseTeacher"], dim: int = 0) -> "SparseTeacher":
        """Concatenate along a leading dimension; all parts must share mode, K, τ, V and N."""
        if not parts:
            raise ValueError("SparseTeacher.cat needs at least one part")
        first = parts[0]
        for p in parts[1:]:
            if (p.mode, p.k, p.temperature, p.vocab_size, p.num_samples) != \
                    (first.mode, first.k, first.temperature, first.vocab_size, first.num_samples):
                raise ValueError("SparseTeacher.cat: parts differ in mode, k, temperature, vocab_size or "
                                 "num_samples")
        if dim < 0:
            dim += first.lse.dim()

        def cat(name):
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts, dim=dim)
        return SparseTeacher(first.mode, cat("ids"), cat("lse"), temperature=first.temperature,
                             vocab_size=first.vocab_size, values=cat("values"), counts=cat("counts"),
                             num_samples=first.num_samples, validate=False)

    # ---- rows from elsewhere ------------------------------------------------------------------
    @classmethod
    def from_logprobs(cls, token_ids, logprobs, *, vocab_size: int, temperature: float = 1.0,
                      mask=None) -> "SparseTeacher":
        r"""A top-k teacher from per-token ids and their log-probabilities over the FULL vocabulary,
        as inference servers return them (vLLM's ``prompt_logprobs``, SGLang; see
        :func:`logprobs_from_vllm`).

        ``token_ids`` ``(..., K)`` integers and ``logprobs`` ``(..., K)`` floats (tensors, arrays or
        nested lists) give, per token, K ids and ``log p_i`` at the server's temperature
        ``temperature``. An entry is absent where ``mask`` (``(..., K)`` bool, True = present) is
        False or its id is ``PAD_ID`` (−1): rows may hold fewer than K entries (ragged rows).

        The result is a top-k :class:`SparseTeacher` of shape ``(...)``: ``ids`` the given ids with
        ``PAD_ID`` at absent entries, ``values`` the log-probabilities (−inf at absent entries;
        float64 if ``logprobs`` is float64, else float32), ``lse`` 0 (the log-probabilities are
        their own logits). With ``tail="bucket"`` the loss puts the mass outside the stored ids,

            tail = 1 − Σ_i p_i = −expm1(logsumexp(logprobs))     (float64, no cancellation)

        (:meth:`tail_mass`), into one bucket. Log-probabilities above 0 and a Σp above 1 by at most
        ``LOGPROB_ROUNDING`` are rounding: they are clamped to log p ≤ 0 and Σp = 1 (the row is
        shifted by its log Σp). Anything else is a ``ValueError`` naming the problem and the first
        offending row: shapes that disagree, NaN, an id outside [0, vocab_size), an id twice in a
        row, a log-probability > 0 or Σp > 1 beyond rounding.
        """
        check("vocab_size", vocab_size)
        check("temperature", temperature)
        ids = token_ids if isinstance(token_ids, torch.Tensor) else torch.as_tensor(token_ids)
        lp = logprobs if isinstance(logprobs, torch.Tensor) else torch.as_tensor(logprobs)
        if ids.dtype not in _INT_DTYPES or ids.dim() < 1:
            raise TypeError(f"token_ids must be integers of shape (..., K), got {ids.dtype} of shape "
                            f"{tuple(ids.shape)}")
        if not lp.is_floating_point():
            raise TypeError(f"logprobs must be floating-point, got {lp.dtype}")
        if lp.shape != ids.shape:
            raise ValueError(f"token_ids and logprobs must have one shape (..., K), got {tuple(ids.shape)} and "
                             f"{tuple(lp.shape)}")
        lp = lp.to(ids.device)
        present = ids != PAD_ID
        if mask is not None:
            m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(mask)
            if m.dtype != torch.bool or m.shape != ids.shape:
                raise ValueError(f"mask must be a bool tensor of token_ids' shape {tuple(ids.shape)}, got {m.dtype} "
                                 f"of shape {tuple(m.shape)}")
            present = present & m.to(ids.device)
        if ids.shape[-1] > vocab_size:
            raise ValueError(f"k = {ids.shape[-1]} entries per row exceeds vocab_size = {vocab_size}")
        ids = torch.where(present, ids.long(), torch.full_like(ids, PAD_ID, dtype=torch.long))
        lp64 = torch.where(present, lp.double(), torch.full_like(lp, float("-inf"), dtype=torch.float64))
        check_rows("topk", ids, values=lp64, vocab_size=vocab_size, what="from_logprobs")
        lp64 = lp64.clamp_max(0.0)
        log_total = torch.logsumexp(lp64, -1, keepdim=True)
        lp64 = torch.where(log_total > 0, lp64 - log_total, lp64)
        out_dtype = torch.float64 if lp.dtype == torch.float64 else torch.float32
        return cls("topk", ids, torch.zeros(ids.shape[:-1], dtype=out_dtype, device=ids.device),
                   temperature=temperature, vocab_size=vocab_size, values=lp64.to(out_dtype), validate=False)

    # ---- the teacher distribution ----------------------------------------------------------
    def tail_mass(self) -> torch.Tensor:
        """``(*S,)`` float64: the teacher mass outside the stored ids, 1 − Σp, computed as
        ``−expm1(logsumexp(values))`` for top-k rows (exact when Σp is close to 1; clamped at 0),
        ``1 − Σ counts / N`` (0) for sampled rows. (The loss kernels form the same quantity as
        1 − Σw in float64 from the weights in the student's accumulation dtype.)"""
        if self.mode == "topk":
            v = self.values.double().masked_fill(self.ids < 0, float("-inf"))
            return (-torch.expm1(torch.logsumexp(v, -1))).clamp_min(0.0)
        return 1.0 - self.counts.double().sum(-1) / float(self.num_samples)

    def teacher_probs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(*S, K)`` stored teacher probabilities w: ``values.exp()`` (top-k) or ``counts / N``
        (sampled); 0 on padding."""
        if self.mode == "topk":
            return self.values.to(dtype).exp()
        return self.counts.to(dtype) / float(self.num_samples)

    def dense_probs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(*S, V)`` the stored distribution scattered into the full vocabulary (materialises V!)."""
        flat = self.flatten()
        w = flat.teacher_probs(torch.float64)
        out = teacher_dense_probs(flat.ids, w, self.vocab_size).to(dtype)
        return out.reshape(*self.shape, self.vocab_size)

    def __repr__(self) -> str:
        what = f"k={self.k}" if self.mode == "topk" else f"num_samples={self.num_samples}"
        return (f"SparseTeacher(mode={self.mode!r}, shape={tuple(self.shape)}, {what}, "
                f"vocab_size={self.vocab_size}, temperature={self.temperature}, device={self.device})")


def capture(teacher_logits: torch.Tensor, *, k: int = 64, temperature: float = 1.0, mode: str = "topk",
            num_samples: int = 50, generator: Optional[torch.Generator] = None, sampling: str = "systematic",
            backend: str = "auto", vocab_size: Optional[int] = None) -> SparseTeacher:
    r"""One fused pass over teacher logits ``(..., V)`` → :class:`SparseTeacher` of shape ``(...)``.

    ``mode="topk"`` equals, up to rounding (and tie order)::

        s = teacher_logits.float() / temperature
        lse = torch.logsumexp(s, -1)
        vals, ids = torch.topk(s, k, -1)          # sorted, ties -> smaller id first
        values = vals - lse.unsqueeze(-1)         # log-probabilities over the FULL vocabulary

    ``mode="sample"`` draws ``num_samples`` ids with replacement from ``p = softmax(s)``: with
    ``u = torch.rand(rows, num_samples, generator=generator, dtype=torch.float64)`` a draw is the
    smallest id i whose cumulative probability (vocabulary order) exceeds u; the result keeps unique
    ids (ascending) with their counts, padded with id −1 / count 0 to width ``min(num_samples, V)``.
    ``E[counts / num_samples] = p``; the same generator state gives the same draws.

    ``sampling="systematic"`` (the default; ``"iid"`` gives the independent draws above) replaces
    the independent uniforms by one stratified comb per row,
    ``u_j = (j + U) / num_samples`` with ``U = torch.rand(rows, 1, generator=generator,
    dtype=torch.float64)``: still ``E[counts / num_samples] = p`` exactly (each u_j is uniform on its
    own stratum), but an id with ``p_i >= 1/num_samples`` is drawn ``floor(N p_i)`` or ``ceil(N p_i)``
    times instead of Binomial(N, p_i) times, so the stored target is much less noisy (systematic
    resampling, as in particle filters).

    ``vocab_size``: the real vocabulary size of a teacher whose head is padded wider (e.g. 152064
    rows for a 151665-token tokenizer): only the first ``vocab_size`` columns are read, so the
    padded columns never get probability, and the result has ``vocab_size = vocab_size``.

    The teacher gets no gradient (capture reads ``teacher_logits.detach()``).
    """
    cs = capture_settings(mode=mode, k=k, num_samples=num_samples, sampling=sampling, temperature=temperature,
                          backend=backend)
    check("vocab_size", vocab_size)
    _inputs.check_logits("teacher_logits", teacher_logits)
    teacher_logits = _inputs.narrow_vocab("teacher_logits", teacher_logits, vocab_size)
    vocab = teacher_logits.shape[-1]
    device = teacher_logits.device
    lead = teacher_logits.shape[:-1]
    if cs.mode == "topk":
        check_k(k, vocab)
    else:
        check_generator(generator, device)
    op = "capture_topk" if cs.mode == "topk" else "capture_sample"
    resolved = registry.resolve(op, cs.backend, device)
    registry.check_dtype(op, resolved, teacher_logits.dtype)

    t2 = _inputs.rows(teacher_logits.detach(), vocab)
    if cs.mode == "topk":
        ids, values, lse = _capture_ops.capture_topk(t2, k=cs.k, temperature=cs.temperature, backend=resolved)
        return SparseTeacher("topk", ids.reshape(*lead, cs.k), lse.reshape(lead), temperature=cs.temperature,
                             vocab_size=vocab, values=values.reshape(*lead, cs.k), validate=False)
    uniforms = draw_uniforms(t2.shape[0], cs.num_samples, cs.sampling, generator, device)
    ids, counts, lse = _capture_ops.capture_sample(t2, uniforms, temperature=cs.temperature, backend=resolved)
    width = ids.shape[-1]
    return SparseTeacher("sample", ids.reshape(*lead, width), lse.reshape(lead), temperature=cs.temperature,
                         vocab_size=vocab, counts=counts.reshape(*lead, width), num_samples=cs.num_samples,
                         validate=False)


def check_generator(generator, device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on the logits' device type {device.type}, got {generator.device}")


def draw_uniforms(n_rows: int, num_samples: int, sampling: str, generator, device) -> torch.Tensor:
    """The (n_rows, num_samples) float64 uniforms of a sampled capture: i.i.d., or one stratified
    comb per row, u_j = (j + U) / num_samples (see :func:`capture`)."""
    if sampling == "iid":
        return torch.rand((n_rows, num_samples), generator=generator, dtype=torch.float64, device=device)
    offset = torch.rand((n_rows, 1), generator=generator, dtype=torch.float64, device=device)
    comb = torch.arange(num_samples, dtype=torch.float64, device=device)
    return (comb + offset) / num_samples


def _row_name(lead: tuple, r: int) -> str:
    """Flat row ``r`` of rows of leading shape ``lead``, as an index into that shape."""
    idx = []
    for size in reversed(lead):
        idx.append(r % size)
        r //= size
    idx = tuple(reversed(idx))
    if not idx:
        return "the row"
    return f"row {idx[0]}" if len(idx) == 1 else f"row {idx}"


def check_rows(mode: str, ids: torch.Tensor, *, values: Optional[torch.Tensor] = None,
               counts: Optional[torch.Tensor] = None, vocab_size: int, num_samples: Optional[int] = None,
               what: str = "SparseTeacher", rounding: float = LOGPROB_ROUNDING) -> None:
    """Every row of a sparse teacher is one that the losses and ``TeacherCache`` take as it is, or
    a ``ValueError`` naming the problem and the first offending row (an index into the leading
    shape): an id outside [0, V) that is not ``PAD_ID``; an id twice in a row; top-k: NaN, a
    log-probability > ``rounding``, log Σp > ``rounding``; sampled: a count < 1 on a
    stored id, a count other than 0 on padding, counts not summing to ``num_samples``. Padding
    entries' values are not read. The tensors are read on the host."""
    lead = tuple(ids.shape[:-1])
    kk = ids.shape[-1]
    if ids.numel() == 0:
        return
    i2 = ids.detach().reshape(-1, kk).to("cpu", torch.int64)
    pad = i2 == PAD_ID

    def fail(problem: str, bad: torch.Tensor, detail) -> None:
        rows_bad = bad if bad.dim() == 1 else bad.any(1)
        r = int(rows_bad.nonzero()[0, 0])
        raise ValueError(f"{what}: {problem}; first at {_row_name(lead, r)}: {detail(r)}")

    bad = ((i2 < 0) & ~pad) | (i2 >= vocab_size)
    if bool(bad.any()):
        fail(f"ids must lie in [0, {vocab_size}) (or be {PAD_ID} for padding)", bad,
             lambda r: f"id {int(i2[r][bad[r]][0])}")
    srt = i2.sort(1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] != PAD_ID)
    if bool(dup.any()):
        fail("an id appears twice in one row", dup, lambda r: f"id {int(srt[r, 1:][dup[r]][0])} repeated")
    if mode == "topk":
        v = values.detach().reshape(-1, kk).to("cpu", torch.float64)
        nan = torch.isnan(v) & ~pad
        if bool(nan.any()):
            fail("log-probabilities hold NaN", nan, lambda r: f"entry {int(nan[r].nonzero()[0, 0])}")
        v = v.masked_fill(pad, float("-inf"))
        pos = v > rounding
        if bool(pos.any()):
            fail("a log-probability is > 0 (a probability above 1)", pos,
                 lambda r: f"log p = {float(v[r][pos[r]][0]):.6g} for id {int(i2[r][pos[r]][0])}")
        log_total = torch.logsumexp(v, 1)
        over = log_total > rounding
        if bool(over.any()):
            fail("the probabilities of a row sum to more than 1 (log-probabilities must be normalised over the "
                 "full vocabulary)", over, lambda r: f"sum p = {math.exp(float(log_total[r])):.6g}")
        return
    c = counts.detach().reshape(-1, kk).to("cpu", torch.int64)
    low = (c < 1) & ~pad
    if bool(low.any()):
        fail("a stored id has a count below 1", low, lambda r: f"count {int(c[r][low[r]][0])}")
    padc = (c != 0) & pad
    if bool(padc.any()):
        fail("a padding entry has a count other than 0", padc, lambda r: f"count {int(c[r][padc[r]][0])}")
    total = c.sum(1)
    off = total != num_samples
    if bool(off.any()):
        fail(f"the counts of a row must sum to num_samples = {num_samples}", off,
             lambda r: f"sum {int(total[r])}")


def logprobs_from_vllm(prompt_logprobs, *, k: Optional[int] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's ``prompt_logprobs`` of one sequence → ``(token_ids, logprobs, mask)`` for
    :meth:`SparseTeacher.from_logprobs` (vLLM itself is not imported).

    ``prompt_logprobs`` is a list with one entry per prompt token: ``None`` for position 0 (nothing
    predicts the first token), else a dict ``{token_id: x}`` where ``x`` is a float or an object
    with a ``.logprob`` (vLLM's ``Logprob``) — the top-k ids plus, when it is not among them, the
    prompt token itself. Position 0 is dropped, so a prompt of T tokens gives T − 1 rows: row j
    is the teacher's distribution of token j + 1 given tokens 0..j, the row that pairs with the
    student's logits at position j (``student_logits[:, :-1]``, labels ``tokens[1:]``).

    Per row the entries are ordered by decreasing log-probability (ties keep the server's order),
    cut to the first ``k`` if given; rows with fewer entries than ``K`` are padded (id ``PAD_ID``,
    log-probability −inf, mask False), where ``K = k`` if given (so every sequence has the width of
    a cache of that k), else the longest row. Returns int64 ``(T − 1, K)``, float32 ``(T − 1, K)``
    and bool ``(T − 1, K)`` tensors.
    """
    if k is not None:
        check_k(k)
    rows = []
    for pos, entry in enumerate(prompt_logprobs):
        if entry is None:
            if pos == 0:
                continue
            raise ValueError(f"prompt_logprobs[{pos}] is None; only position 0 (the first prompt token) may be")
        if not isinstance(entry, dict):
            raise TypeError(f"prompt_logprobs[{pos}] must be a dict {{token_id: logprob}}, got {type(entry).__name__}")
        items = [(int(tid), float(getattr(x, "logprob", x))) for tid, x in entry.items()]
        items.sort(key=lambda item: -item[1])
        rows.append(items[:k] if k is not None else items)
    width = k if k is not None else max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
    lps = torch.full((len(rows), width), float("-inf"), dtype=torch.float32)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for j, items in enumerate(rows):
        n = len(items)
        if n:
            ids[j, :n] = torch.tensor([i for i, _ in items], dtype=torch.int64)
            lps[j, :n] = torch.tensor([x for _, x in items], dtype=torch.float32)
            mask[j, :n] = True
    return ids, lps, mask
