"""The sparse teacher: what a cache keeps of a teacher's logits, and ``capture``, the one fused
pass that produces it.

``capture`` reads full teacher logits once and keeps, per row, what distillation needs: the
full-vocabulary log-sum-exp and either the top-k ids with log-probabilities normalised over the FULL
vocabulary, or N draws with replacement from p stored as unique ids + counts (unbiased,
E[count/N] = p; after Anshumann et al. 2025, "Sparse Logit Sampling"). ``fastkd.sparse_kd_loss``
trains a student against such a ``SparseTeacher``; ``fastkd.TeacherCache`` stores them on disk.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _inputs
from .._backends import registry
from .._ops import capture as _capture_ops
from .._reference.capture import teacher_dense_probs
from .._settings import MODES, capture_settings, check, check_k

_INT_DTYPES = _inputs.INT_DTYPES


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
    """

    __slots__ = ("mode", "ids", "values", "counts", "lse", "temperature", "vocab_size", "num_samples")

    def __init__(self, mode: str, ids: torch.Tensor, lse: torch.Tensor, *, temperature: float, vocab_size: int,
                 values: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None,
                 num_samples: Optional[int] = None):
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
                             counts=None if self.counts is None else fn(self.counts), num_samples=self.num_samples)

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
                             num_samples=first.num_samples)

    # ---- the teacher distribution ----------------------------------------------------------
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
            num_samples: int = 50, generator: Optional[torch.Generator] = None, sampling: str = "iid",
            backend: str = "auto") -> SparseTeacher:
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

    ``sampling="systematic"`` replaces the independent uniforms by one stratified comb per row,
    ``u_j = (j + U) / num_samples`` with ``U = torch.rand(rows, 1, generator=generator,
    dtype=torch.float64)``: still ``E[counts / num_samples] = p`` exactly (each u_j is uniform on its
    own stratum), but an id with ``p_i >= 1/num_samples`` is drawn ``floor(N p_i)`` or ``ceil(N p_i)``
    times instead of Binomial(N, p_i) times, so the stored target is much less noisy (systematic
    resampling, as in particle filters).

    The teacher gets no gradient (capture reads ``teacher_logits.detach()``).
    """
    cs = capture_settings(mode=mode, k=k, num_samples=num_samples, sampling=sampling, temperature=temperature,
                          backend=backend)
    _inputs.check_logits("teacher_logits", teacher_logits)
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
                             vocab_size=vocab, values=values.reshape(*lead, cs.k))
    uniforms = draw_uniforms(t2.shape[0], cs.num_samples, cs.sampling, generator, device)
    ids, counts, lse = _capture_ops.capture_sample(t2, uniforms, temperature=cs.temperature, backend=resolved)
    width = ids.shape[-1]
    return SparseTeacher("sample", ids.reshape(*lead, width), lse.reshape(lead), temperature=cs.temperature,
                         vocab_size=vocab, counts=counts.reshape(*lead, width), num_samples=cs.num_samples)


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
