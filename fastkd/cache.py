"""Teacher-logit cache: one-pass capture of a sparse teacher, the sparse KD loss, a persistent store.

``capture`` reads full teacher logits once and keeps, per row, what distillation needs: the
full-vocabulary log-sum-exp and either the top-k ids with log-probabilities normalised over the FULL
vocabulary, or N draws with replacement from p stored as unique ids + counts (unbiased,
E[count/N] = p; after Anshumann et al. 2025, "Sparse Logit Sampling"). ``sparse_kd_loss`` trains a
student against such a ``SparseTeacher``. ``TeacherCache`` stores them on disk (see its docstring).
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import math
import os
import socket
import struct
import time
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from . import _cache_reference as _ref
from . import _sparse_ops
from .losses import _check_number, _divisor, _is_compiling, check_logits, check_target

MODES = ("topk", "sample")
SAMPLINGS = ("iid", "systematic")
TAILS = ("bucket", "renorm", "sampled")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


# ============================================================================================
# SparseTeacher
# ============================================================================================
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
        _check_number("temperature", temperature, low=0.0, low_open=True)
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
        out = _ref.teacher_dense_probs(flat.ids, w, self.vocab_size).to(dtype)
        return out.reshape(*self.shape, self.vocab_size)

    def __repr__(self) -> str:
        what = f"k={self.k}" if self.mode == "topk" else f"num_samples={self.num_samples}"
        return (f"SparseTeacher(mode={self.mode!r}, shape={tuple(self.shape)}, {what}, "
                f"vocab_size={self.vocab_size}, temperature={self.temperature}, device={self.device})")


# ============================================================================================
# capture
# ============================================================================================
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
    check_logits("teacher_logits", teacher_logits)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_number("temperature", temperature, low=0.0, low_open=True)
    if math.isinf(temperature):
        raise ValueError("temperature must be finite")
    vocab = teacher_logits.shape[-1]
    device = teacher_logits.device
    lead = teacher_logits.shape[:-1]
    if mode == "topk":
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1 or k > vocab:
            raise ValueError(f"k must lie in [1, V={vocab}], got {k}")
    else:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != device.type:
                raise ValueError(f"generator must be on the logits' device type {device.type}, got "
                                 f"{generator.device}")
    registry = _sparse_ops._CAPTURE_TOPK_IMPLS if mode == "topk" else _sparse_ops._CAPTURE_SAMPLE_IMPLS
    resolved = _sparse_ops.pick_backend(backend, device, registry)
    if teacher_logits.dtype == torch.float64 and resolved in ("cuda", "triton"):
        raise TypeError(f"float64 logits are supported by the cpu and torch backends, not {resolved!r}")

    t2 = teacher_logits.detach().reshape(-1, vocab)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    if mode == "topk":
        ids, values, lse = _sparse_ops.run_capture_topk(t2, k, temperature, resolved)
        return SparseTeacher("topk", ids.reshape(*lead, k), lse.reshape(lead), temperature=temperature,
                             vocab_size=vocab, values=values.reshape(*lead, k))
    if sampling == "iid":
        uniforms = torch.rand((t2.shape[0], num_samples), generator=generator, dtype=torch.float64, device=device)
    else:
        offset = torch.rand((t2.shape[0], 1), generator=generator, dtype=torch.float64, device=device)
        comb = torch.arange(num_samples, dtype=torch.float64, device=device)
        uniforms = (comb + offset) / num_samples
    ids, counts, lse = _sparse_ops.run_capture_sample(t2, uniforms, temperature, resolved)
    width = ids.shape[-1]
    return SparseTeacher("sample", ids.reshape(*lead, width), lse.reshape(lead), temperature=temperature,
                         vocab_size=vocab, counts=counts.reshape(*lead, width), num_samples=num_samples)


# ============================================================================================
# sparse_kd_loss
# ============================================================================================
def sparse_kd_loss(
    student_logits: torch.Tensor,
    sparse_teacher: SparseTeacher,
    target: Optional[torch.Tensor] = None,
    *,
    tail: str = "bucket",
    temperature: Optional[float] = None,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    divergence: str = "forward_kl",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    t2_scale: bool = True,
    num_items: Union[int, torch.Tensor, None] = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""KD loss against a :class:`SparseTeacher`; the student is normalised over the FULL vocabulary.

    With ``T`` the capture temperature, ``log_q = F.log_softmax(student / T, -1)``, ``I`` the stored
    ids of a row, ``w`` the stored teacher probabilities (``exp(values)`` or ``counts / N``),
    ``P = w.sum(-1)`` and ``Q = log_q.exp()[I].sum(-1)``, the soft term ``D`` per row is:

    * ``tail="bucket"`` (top-k): KL over the K+1 buckets {i ∈ I} ∪ {tail}::

          D = (w * (w.log() - log_q[I])).sum(-1) + (1 - P) * (log(1 - P) - log(1 - Q))

      (log(1 − Q) is computed from the complement's own log-sum-exp). With k = V this is
      exactly ``kd_loss``'s forward KL.
    * ``tail="renorm"`` (top-k): the teacher renormalised over I (biased; matches tools that store
      renormalised top-k): ``w' = w / P``, ``D = (w' * (w'.log() - log_q[I])).sum(-1)``.
    * sampled teachers (any ``tail``; ``"sampled"`` names it): ``D = (w * (w.log() - log_q[I])).sum(-1)``
      with ``w = counts / N``: its gradient ``(q − counts/N)/T`` is an unbiased estimate of full KD's.

    Then, as in :func:`fastkd.kd_loss` (``keep = target != ignore_index``)::

        loss_row = soft_weight * (T**2 if t2_scale else 1) * D
                   + hard_weight * F.cross_entropy(student, target, reduction="none",
                                                   label_smoothing=label_smoothing)
        loss = loss_row[keep].sum() / keep.sum().clamp_min(1)      # reduction="mean"

    Args:
        student_logits: ``(..., V)`` float32/bfloat16/float16 (float64 on CPU); its leading dims must
            hold as many rows as ``sparse_teacher`` (e.g. both ``(B, T)``).
        sparse_teacher: from :func:`capture` or :meth:`TeacherCache.read`, same device, V equal.
        target, soft_weight, hard_weight, ignore_index, label_smoothing, reduction, t2_scale,
            num_items, backend: as in :func:`fastkd.kd_loss`.
        tail: ``"bucket"`` (default), ``"renorm"`` or ``"sampled"`` (the latter for sampled teachers only).
        temperature: ``None`` (default) uses the capture temperature; any other value must equal it,
            since the stored probabilities cannot be re-tempered without the full vocabulary.
        divergence: only ``"forward_kl"`` (reverse KL and JSD need p on every token the student
            favours, which a sparse teacher does not have).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or ``(...)`` for ``reduction="none"``.
    """
    check_logits("student_logits", student_logits)
    if not isinstance(sparse_teacher, SparseTeacher):
        raise TypeError(f"sparse_teacher must be a fastkd.SparseTeacher, got {type(sparse_teacher).__name__}")
    st = sparse_teacher
    vocab = student_logits.shape[-1]
    if st.vocab_size != vocab:
        raise ValueError(f"student_logits has V={vocab} but sparse_teacher was captured with "
                         f"vocab_size={st.vocab_size}")
    lead = student_logits.shape[:-1]
    n_rows = math.prod(lead)
    if math.prod(st.shape) != n_rows:
        raise ValueError(f"sparse_teacher must hold one row per student row: student leading shape "
                         f"{tuple(lead)} ({n_rows} rows), sparse_teacher shape {tuple(st.shape)}")
    device = student_logits.device
    if st.device != device:
        raise ValueError(f"sparse_teacher must be on the student's device {device}, got {st.device}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if st.mode == "topk" and tail == "sampled":
        raise ValueError("tail='sampled' needs a sampled teacher (capture(mode='sample')); use 'bucket' or "
                         "'renorm' for a top-k teacher")
    if divergence != "forward_kl":
        raise ValueError(f"sparse_kd_loss supports divergence='forward_kl' only, got {divergence!r}")
    if temperature is None:
        temperature = st.temperature
    _check_number("temperature", temperature, low=0.0, low_open=True)
    if not math.isclose(temperature, st.temperature, rel_tol=1e-6):
        raise ValueError(f"temperature={temperature} differs from the capture temperature "
                         f"{st.temperature}; re-capture at this temperature")
    _check_number("soft_weight", soft_weight)
    _check_number("hard_weight", hard_weight)
    _check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    from .losses import REDUCTIONS
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hard_weight != 0.0 and target is None:
        raise ValueError("hard_weight != 0 needs target (class ids of shape student_logits.shape[:-1])")
    if target is not None:
        check_target(target, lead, vocab, ignore_index, device)

    flat = st.flatten()
    ids = flat.ids if flat.ids.dtype == torch.int64 else flat.ids.long()
    # Stored ids must lie in [0, V) (−1: padding). Checked like targets: a ValueError on CPU, a
    # device-side assert elsewhere; the kernels also never read out of bounds (bad rows give NaN).
    bad = (ids < -1) | (ids >= vocab)
    if ids.device.type == "cpu" and not _is_compiling():
        if ids.numel() and bool(bad.any()):
            raise ValueError(f"sparse_teacher.ids must lie in [0, {vocab}) (or -1 for padding); found "
                             f"{int(ids[bad][0])}")
    elif ids.numel():
        torch._assert_async(~bad.any(), "fastkd: sparse_teacher id out of range [0, V)")

    resolved = _sparse_ops.pick_backend(backend, device, _sparse_ops._SPARSE_KD_IMPLS)
    if student_logits.dtype == torch.float64 and resolved in ("cuda", "triton"):
        raise TypeError(f"float64 logits are supported by the cpu and torch backends, not {resolved!r}")
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    weights = flat.teacher_probs(acc)
    if st.mode == "sample":
        tail_code = _ref.TAIL_SAMPLED
    else:
        tail_code = _ref.TAIL_BUCKET if tail == "bucket" else _ref.TAIL_RENORM

    s2 = student_logits.reshape(-1, vocab)
    if s2.stride(-1) != 1:
        s2 = s2.contiguous()
    y = None if target is None else target.reshape(-1).long()
    divisor = _divisor(y, s2.shape[0], reduction, num_items, ignore_index, device, acc)
    soft_scale = soft_weight * (temperature * temperature if t2_scale else 1.0)
    rows = _sparse_ops.sparse_kd_rows(s2, ids, weights, y, divisor, tail=tail_code, temperature=temperature,
                                      soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, backend=resolved)
    if reduction == "none":
        return rows.reshape(lead)
    return rows.sum()


# ============================================================================================
# TeacherCache: the persistent store
# ============================================================================================
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SHARD_MAGIC = b"FKDSHARD"
_SHARD_HEADER = struct.Struct("<8sII32s")  # magic, format version, header size, manifest digest
_CHUNK_MAGIC = b"FKDC"
_CHUNK_HEADER = struct.Struct("<4sIQII")   # magic, n_samples, body bytes, table crc32, header crc32
_TABLE_DTYPE = np.dtype([("sid", "<i8"), ("ntok", "<u4"), ("nent", "<u4"), ("off", "<u8"),
                         ("nbytes", "<u4"), ("crc", "<u4")])
_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Fields that must agree between a cache and whoever opens or writes it.
_IDENTITY = ("format_version", "mode", "k", "num_samples", "temperature", "vocab_size", "teacher", "dataset",
             "values_dtype", "lse_dtype", "id_bits", "count_bits")


class TeacherCacheError(RuntimeError):
    """A cache file is corrupt, truncated, or locked by another writer (the message names the file)."""


def _bits_for(n_values: int) -> int:
    """Bits of an unsigned field that holds 0 .. n_values − 1 (at least 1)."""
    return max(1, (int(n_values) - 1).bit_length())


def _pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Little-endian bitstream of ``values`` (non-negative, < 2**bits), zero-padded to whole bytes."""
    v = np.ascontiguousarray(values, dtype=np.uint64).ravel()
    if v.size == 0:
        return b""
    bitmat = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bitmat.ravel(), bitorder="little").tobytes()


def _unpack_bits(buf: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of ``_pack_bits``: ``count`` values of ``bits`` bits (<= 32) from a uint8 array."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    nbytes = (count * bits + 7) // 8
    padded = np.zeros(nbytes + 8, dtype=np.uint8)
    padded[:nbytes] = buf[:nbytes]
    pos = np.arange(count, dtype=np.int64) * bits
    byte = pos >> 3
    word = np.zeros(count, dtype=np.uint64)
    for j in range(5):  # a field of <= 32 bits starting at bit offset <= 7 spans <= 5 bytes
        word |= padded[byte + j].astype(np.uint64) << np.uint64(8 * j)
    word >>= (pos & 7).astype(np.uint64)
    return (word & np.uint64((1 << bits) - 1)).astype(np.int64)


def _crc(data) -> int:
    return zlib.crc32(memoryview(data).cast("B")) & 0xFFFFFFFF


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Shard:
    """One record shard: an append-only file of checksummed chunks + a log of committed lengths."""

    def __init__(self, path: str):
        self.path = path
        self.commit_path = path[: -len(".fkd")] + ".commit"
        self.scanned = 0      # bytes of this shard already indexed
        self.committed = 0    # committed length as last read
        self.mm: Optional[np.memmap] = None

    def read_committed(self) -> int:
        """Last complete entry of the commit log (a torn last entry is ignored), 0 if none yet."""
        try:
            with open(self.commit_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return 0
        n = len(raw) // 8
        return struct.unpack_from("<Q", raw, 8 * (n - 1))[0] if n else 0

    def memmap(self) -> np.memmap:
        size = os.path.getsize(self.path)
        if self.mm is None or self.mm.shape[0] < size:
            self.mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self.mm


class TeacherCache:
    r"""Persistent store of :class:`SparseTeacher` rows, keyed by sample index.

    A directory holding ``manifest.json`` (provenance: format version, mode, k or N, capture
    temperature, vocab size, teacher name, dataset fingerprint, dtypes, id packing) and one record
    shard per writer process (``shard-<writer>.fkd`` + ``shard-<writer>.commit``). A sample is one
    ``write`` row: any number of tokens (e.g. a sequence), each token a sparse teacher row.

    Storage per token: the log-sum-exp (float32), then top-k: k log-probabilities in
    ``values_dtype`` (float16 by default) and k ids packed to ⌈log2 V⌉ bits (k = 64, V = 128256:
    4 + 128 + 136 = 268 bytes); sampled: the number of unique ids and, per unique id, the id
    (⌈log2 V⌉ bits) and its count (⌈log2 N⌉ bits), variable-length, found through the per-sample
    offset table. ``repr`` prints the measured bytes/token.

    Durability: every ``write`` appends one checksummed chunk, fsyncs it, then appends the new length
    to the shard's commit log and fsyncs that; when ``write`` returns, its rows survive a crash.
    Reopening a shard whose tail is torn (a crash mid-write) drops the torn tail and resumes; a
    shard shorter than its commit log, a chunk failing its checksum, or a manifest that disagrees
    (other V, k, N, temperature, teacher, dataset, dtypes) raises an error naming the file. Each
    process writes only its own shard (an exclusive lock enforces it); any number of processes read.

    Args:
        path: the cache directory (created if missing unless ``readonly``).
        mode, k, num_samples, sampling, temperature, vocab_size, teacher, dataset, values_dtype: the
            capture settings and provenance (``sampling``: "iid" or "systematic", see :func:`capture`).
            ``None`` takes the manifest's value for an existing cache (the defaults ``"topk"``, 64,
            50, "iid", 1.0, float16 for a new one; ``vocab_size`` is then taken from the first
            write). A given value must match an existing manifest.
        writer: this process's shard name (default ``rank<RANK>`` from the environment, else
            ``rank0``); two live processes with one name is an error.
        readonly: never create or write anything.
        sync: fsync each write (turn off only for throwaway caches).
    """

    def __init__(self, path: Union[str, os.PathLike], *, mode: Optional[str] = None, k: Optional[int] = None,
                 num_samples: Optional[int] = None, temperature: Optional[float] = None,
                 vocab_size: Optional[int] = None, teacher: Optional[str] = None, dataset: Optional[str] = None,
                 values_dtype: Union[str, torch.dtype, None] = None, writer: Optional[str] = None,
                 readonly: bool = False, sync: bool = True, sampling: Optional[str] = None):
        self.path = os.fspath(path)
        self.readonly = bool(readonly)
        self.sync = bool(sync)
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                        or num_samples < 1):
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if temperature is not None:
            _check_number("temperature", temperature, low=0.0, low_open=True)
        if sampling is not None and sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        if isinstance(values_dtype, torch.dtype):
            names = {v: n for n, v in _VALUE_DTYPES.items()}
            if values_dtype not in names:
                raise TypeError(f"values_dtype must be one of {list(_VALUE_DTYPES)}, got {values_dtype}")
            values_dtype = names[values_dtype]
        if values_dtype is not None and values_dtype not in _VALUE_DTYPES:
            raise TypeError(f"values_dtype must be one of {list(_VALUE_DTYPES)}, got {values_dtype!r}")
        self._requested = dict(mode=mode, k=k, num_samples=num_samples,
                               temperature=None if temperature is None else float(temperature),
                               vocab_size=vocab_size, teacher=teacher, dataset=dataset, values_dtype=values_dtype,
                               sampling=sampling)
        if writer is None:
            writer = "rank" + os.environ.get("RANK", "0")
        if not writer or any(c in writer for c in "/\\\0") or writer.startswith("."):
            raise ValueError(f"writer must be a plain file-name part, got {writer!r}")
        self.writer = writer
        self._shards: List[_Shard] = []
        self._shard_by_path: Dict[str, int] = {}
        self._index: Dict[int, tuple] = {}
        self._own: Optional[_Shard] = None
        self._own_fd: Optional[int] = None
        self._commit_fd: Optional[int] = None
        if not self.readonly:
            os.makedirs(self.path, exist_ok=True)
        elif not os.path.isdir(self.path):
            raise FileNotFoundError(f"TeacherCache directory {self.path!r} does not exist (readonly=True)")
        self.manifest: Optional[dict] = None
        self._load_manifest()
        self.refresh()

    # ---- manifest ------------------------------------------------------------------------
    @property
    def manifest_path(self) -> str:
        return os.path.join(self.path, MANIFEST_NAME)

    def _settings(self, vocab_size: int) -> dict:
        r = self._requested
        mode = r["mode"] or "topk"
        num_samples = r["num_samples"] or 50
        return {
            "format": "fastkd-teacher-cache", "format_version": FORMAT_VERSION, "mode": mode,
            "k": (r["k"] or 64) if mode == "topk" else None,
            "num_samples": num_samples if mode == "sample" else None,
            "sampling": (r["sampling"] or "iid") if mode == "sample" else None,
            "temperature": r["temperature"] if r["temperature"] is not None else 1.0,
            "vocab_size": vocab_size, "teacher": r["teacher"], "dataset": r["dataset"],
            "values_dtype": (r["values_dtype"] or "float16") if mode == "topk" else None,
            "lse_dtype": "float32", "id_bits": _bits_for(vocab_size),
            "count_bits": _bits_for(num_samples) if mode == "sample" else None,
            "id_packing": "little-endian bitstream, id_bits per id; counts and per-token unique counts "
                          "stored minus 1 in count_bits",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "created_by": "fastkd",
        }

    def _check_manifest(self, man: dict) -> None:
        if man.get("format") != "fastkd-teacher-cache" or man.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.manifest_path}: not a fastkd teacher cache of format version "
                             f"{FORMAT_VERSION} (found {man.get('format')!r} v{man.get('format_version')})")
        bad = []
        for key, want in self._requested.items():
            if want is None:
                continue
            have = man.get(key)
            if key in ("k", "values_dtype") and man.get("mode") != "topk":
                continue
            if key in ("num_samples", "sampling") and man.get("mode") != "sample":
                continue
            if key == "sampling":
                have = have or "iid"  # caches written before the option existed drew i.i.d.
            same = math.isclose(have, want, rel_tol=1e-9) if key == "temperature" and have is not None else have == want
            if not same:
                bad.append(f"{key}: cache has {have!r}, asked for {want!r}")
        if bad:
            raise ValueError(f"{self.manifest_path} does not match this TeacherCache: " + "; ".join(bad)
                             + ". Use another directory, or open it with the cache's settings.")

    def _load_manifest(self) -> None:
        try:
            with open(self.manifest_path, "r", encoding="utf-8") as f:
                man = json.load(f)
        except FileNotFoundError:
            if self._requested["vocab_size"] is not None and not self.readonly:
                self._create_manifest(self._requested["vocab_size"])
            return
        except json.JSONDecodeError as exc:
            raise TeacherCacheError(f"{self.manifest_path} is not valid JSON ({exc})") from None
        self._check_manifest(man)
        self.manifest = man

    def _create_manifest(self, vocab_size: int) -> None:
        man = self._settings(vocab_size)
        tmp = os.path.join(self.path, f".manifest.{socket.gethostname()}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(man, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.manifest_path)  # atomic create-if-absent: concurrent ranks agree on one
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        _fsync_dir(self.path)
        self.manifest = None
        self._load_manifest()

    def _digest(self) -> bytes:
        ident = {key: self.manifest.get(key) for key in _IDENTITY}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).digest()

    # ---- scanning -----------------------------------------------------------------------
    def _scan(self, shard: _Shard, limit: int, verify_payload: bool) -> int:
        """Index chunks of ``shard`` from ``shard.scanned`` up to ``limit`` bytes; return the end of
        the last complete, valid chunk. A bad chunk below ``shard.committed`` is corruption."""
        size = os.path.getsize(shard.path)
        with open(shard.path, "rb") as f:
            if shard.scanned == 0:
                head = f.read(_SHARD_HEADER.size)
                if len(head) < _SHARD_HEADER.size:
                    if shard.committed > 0:
                        raise TeacherCacheError(f"{shard.path}: truncated shard header")
                    return 0
                magic, version, hsize, digest = _SHARD_HEADER.unpack(head)
                if magic != _SHARD_MAGIC or version != FORMAT_VERSION or hsize != _SHARD_HEADER.size:
                    raise TeacherCacheError(f"{shard.path}: not a fastkd cache shard of format {FORMAT_VERSION}")
                if digest != self._digest():
                    raise ValueError(f"{shard.path} was written for another manifest than {self.manifest_path} "
                                     f"(other V, k, N, temperature, teacher or dataset)")
                shard.scanned = _SHARD_HEADER.size
            pos = shard.scanned
            new_entries = []
            while pos < limit:
                def fail(why):
                    if pos < shard.committed:
                        raise TeacherCacheError(f"{shard.path}: corrupt chunk at byte {pos} ({why}); "
                                                f"rows reported written are damaged")
                    return None
                f.seek(pos)
                head = f.read(_CHUNK_HEADER.size)
                if len(head) < _CHUNK_HEADER.size:
                    fail("truncated header")
                    break
                magic, n_samples, body, tcrc, hcrc = _CHUNK_HEADER.unpack(head)
                if magic != _CHUNK_MAGIC or _crc(head[:-4]) != hcrc:
                    fail("bad header checksum")
                    break
                end = pos + _CHUNK_HEADER.size + body
                if end > size:
                    fail(f"body runs past the end of the file ({size} bytes)")
                    break
                table_raw = f.read(n_samples * _TABLE_DTYPE.itemsize)
                if _crc(table_raw) != tcrc:
                    fail("bad sample-table checksum")
                    break
                table = np.frombuffer(table_raw, dtype=_TABLE_DTYPE)
                body_start = pos + _CHUNK_HEADER.size
                if verify_payload:
                    ok = True
                    for row in table:
                        f.seek(body_start + int(row["off"]))
                        if _crc(f.read(int(row["nbytes"]))) != int(row["crc"]):
                            ok = False
                            break
                    if not ok:
                        fail("bad payload checksum")
                        break
                new_entries.append((table, body_start))
                pos = end
        sid_no = self._shard_by_path[shard.path]
        for table, body_start in new_entries:
            for row in table:
                self._index[int(row["sid"])] = (sid_no, body_start + int(row["off"]), int(row["nbytes"]),
                                                int(row["ntok"]), int(row["nent"]), int(row["crc"]))
        shard.scanned = pos
        return pos

    def refresh(self) -> None:
        """Pick up shards and committed rows written (by any process) since the last look."""
        if self.manifest is None:
            self._load_manifest()
            if self.manifest is None:
                return
        names = sorted(n for n in os.listdir(self.path) if n.startswith("shard-") and n.endswith(".fkd"))
        for name in names:
            p = os.path.join(self.path, name)
            if p not in self._shard_by_path:
                self._shard_by_path[p] = len(self._shards)
                self._shards.append(_Shard(p))
        for shard in self._shards:
            if shard is self._own:
                continue
            committed = shard.read_committed()
            size = os.path.getsize(shard.path)
            if size < committed:
                raise TeacherCacheError(f"{shard.path}: truncated shard: {size} bytes on disk but "
                                        f"{committed} bytes were committed")
            shard.committed = committed
            if committed > shard.scanned:
                self._scan(shard, committed, verify_payload=False)

    # ---- writing ------------------------------------------------------------------------
    def _open_writer(self) -> None:
        if self._own is not None:
            return
        if self.readonly:
            raise TeacherCacheError(f"TeacherCache {self.path!r} was opened readonly")
        path = os.path.join(self.path, f"shard-{self.writer}.fkd")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TeacherCacheError(f"{path} is being written by another process; give each writer its own "
                                    f"writer= name") from None
        if path not in self._shard_by_path:
            self._shard_by_path[path] = len(self._shards)
            self._shards.append(_Shard(path))
        shard = self._shards[self._shard_by_path[path]]
        size = os.fstat(fd).st_size
        committed = shard.read_committed()
        if size < committed:
            os.close(fd)
            raise TeacherCacheError(f"{path}: truncated shard: {size} bytes on disk but {committed} bytes were "
                                    f"committed")
        if size < _SHARD_HEADER.size and committed == 0:  # new, or torn before its header was complete
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, _SHARD_HEADER.pack(_SHARD_MAGIC, FORMAT_VERSION, _SHARD_HEADER.size, self._digest()))
            os.fsync(fd)
            _fsync_dir(self.path)
            size = _SHARD_HEADER.size
        shard.committed = committed
        # Recovery: everything past the commit log is checked to the last byte; a torn tail goes.
        good = self._scan(shard, size, verify_payload=True)
        if good < size:
            os.ftruncate(fd, good)
            os.fsync(fd)
        self._own, self._own_fd = shard, fd
        self._commit_fd = os.open(shard.commit_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if good != committed:
            self._append_commit(good)

    def _append_commit(self, length: int) -> None:
        os.write(self._commit_fd, struct.pack("<Q", length))
        if self.sync:
            os.fsync(self._commit_fd)
        self._own.committed = length

    def _encode(self, st: SparseTeacher, b: int) -> tuple:
        man = self.manifest
        lse = st.lse[b].reshape(-1).to(torch.float32).numpy()
        n_tok = lse.shape[0]
        idb = man["id_bits"]
        if st.mode == "topk":
            ids = st.ids[b].reshape(n_tok, -1).numpy()
            vals = st.values[b].reshape(n_tok, -1).to(_VALUE_DTYPES[man["values_dtype"]])
            raw_vals = vals.view(torch.int16 if vals.element_size() == 2 else torch.int32).numpy()
            parts = [lse.astype("<f4").tobytes(), raw_vals.astype(raw_vals.dtype.newbyteorder("<")).tobytes(),
                     _pack_bits(ids, idb)]
            return b"".join(parts), n_tok, 0
        ids = st.ids[b].reshape(n_tok, -1).numpy()
        counts = st.counts[b].reshape(n_tok, -1).numpy()
        used = counts > 0
        uniq = used.sum(1)
        cb = man["count_bits"]
        parts = [lse.astype("<f4").tobytes(), _pack_bits(uniq - 1, cb), _pack_bits(ids[used], idb),
                 _pack_bits(counts[used] - 1, cb)]
        return b"".join(parts), n_tok, int(uniq.sum())

    def _check_teacher(self, st: SparseTeacher) -> None:
        man = self.manifest
        want = {"mode": man["mode"], "vocab_size": man["vocab_size"], "temperature": man["temperature"]}
        have = {"mode": st.mode, "vocab_size": st.vocab_size, "temperature": st.temperature}
        if man["mode"] == "topk":
            want["k"], have["k"] = man["k"], st.k
        else:
            want["num_samples"], have["num_samples"] = man["num_samples"], st.num_samples
        bad = [f"{key}={have[key]!r} (cache: {want[key]!r})" for key in want
               if not (math.isclose(have[key], want[key], rel_tol=1e-9) if key == "temperature"
                       else have[key] == want[key])]
        if bad:
            raise ValueError(f"sparse_teacher does not match {self.manifest_path}: " + ", ".join(bad))

    def write(self, sample_ids, sparse_teacher: SparseTeacher) -> None:
        """Store row ``b`` of ``sparse_teacher`` (shape ``(B, ...)``) under ``sample_ids[b]``.

        When this returns the rows are durable (fsynced and committed). Ids already stored are an
        error (``get_or_capture`` writes only missing ones)."""
        if not isinstance(sparse_teacher, SparseTeacher):
            raise TypeError(f"sparse_teacher must be a fastkd.SparseTeacher, got {type(sparse_teacher).__name__}")
        sids = _as_id_list(sample_ids)
        st = sparse_teacher
        if st.lse.dim() == 0 or st.shape[0] != len(sids):
            raise ValueError(f"sparse_teacher must have shape (B, ...) with B = len(sample_ids) = {len(sids)}, "
                             f"got {tuple(st.shape)}")
        if len(set(sids)) != len(sids):
            raise ValueError("sample_ids contains duplicates")
        if self.manifest is None:
            if self.readonly:
                raise TeacherCacheError(f"TeacherCache {self.path!r} was opened readonly")
            self._requested.setdefault("mode", st.mode)
            if self._requested["mode"] is None:
                self._requested["mode"] = st.mode
            if self._requested["temperature"] is None:
                self._requested["temperature"] = st.temperature
            if st.mode == "topk" and self._requested["k"] is None:
                self._requested["k"] = st.k
            if st.mode == "sample" and self._requested["num_samples"] is None:
                self._requested["num_samples"] = st.num_samples
            self._create_manifest(st.vocab_size)
        self._check_teacher(st)
        present = [s for s in sids if s in self._index]
        if present:
            raise ValueError(f"sample ids already stored in {self.path}: {present[:8]}"
                             + (" ..." if len(present) > 8 else ""))
        if len(sids) == 0:
            return
        self._open_writer()
        st = st.to("cpu")
        table = np.zeros(len(sids), dtype=_TABLE_DTYPE)
        payloads = []
        off = len(sids) * _TABLE_DTYPE.itemsize
        for b, sid in enumerate(sids):
            data, n_tok, n_ent = self._encode(st, b)
            table[b] = (sid, n_tok, n_ent, off, len(data), _crc(data))
            payloads.append(data)
            off += len(data)
        table_raw = table.tobytes()
        head = _CHUNK_HEADER.pack(_CHUNK_MAGIC, len(sids), off, _crc(table_raw), 0)
        head = head[:-4] + struct.pack("<I", _crc(head[:-4]))
        start = self._own.committed
        blob = b"".join([head, table_raw] + payloads)
        os.lseek(self._own_fd, start, os.SEEK_SET)
        view = memoryview(blob)
        while view:
            n = os.write(self._own_fd, view)
            view = view[n:]
        if self.sync:
            os.fsync(self._own_fd)
        end = start + len(blob)
        self._append_commit(end)
        no = self._shard_by_path[self._own.path]
        body_start = start + _CHUNK_HEADER.size
        for row in table:
            self._index[int(row["sid"])] = (no, body_start + int(row["off"]), int(row["nbytes"]), int(row["ntok"]),
                                            int(row["nent"]), int(row["crc"]))
        self._own.scanned = end

    # ---- reading ------------------------------------------------------------------------
    def __contains__(self, sample_id) -> bool:
        return int(sample_id) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, sample_ids) -> List[int]:
        """The ids among ``sample_ids`` not stored (as seen by this handle; see ``refresh``)."""
        return [s for s in _as_id_list(sample_ids) if s not in self._index]

    def _decode(self, sid: int, out: dict, b: int) -> None:
        no, off, nbytes, n_tok, n_ent, crc = self._index[sid]
        shard = self._shards[no]
        buf = np.asarray(shard.memmap()[off: off + nbytes])
        if buf.shape[0] != nbytes or _crc(buf) != crc:
            raise TeacherCacheError(f"{shard.path}: sample {sid} fails its checksum (corrupt shard)")
        man = self.manifest
        idb = man["id_bits"]
        lse = buf[: 4 * n_tok].view("<f4")
        out["lse"][b] = torch.from_numpy(lse.astype(np.float32))
        pos = 4 * n_tok
        if man["mode"] == "topk":
            k = man["k"]
            vdt = _VALUE_DTYPES[man["values_dtype"]]
            vb = torch.finfo(vdt).bits // 8
            raw = buf[pos: pos + n_tok * k * vb].view("<i2" if vb == 2 else "<i4").astype(np.int16 if vb == 2
                                                                                         else np.int32)
            out["values"][b] = torch.from_numpy(raw).view(vdt).to(torch.float32).reshape(n_tok, k)
            pos += n_tok * k * vb
            out["ids"][b] = torch.from_numpy(_unpack_bits(buf[pos:], n_tok * k, idb)).reshape(n_tok, k)
            return
        cb = man["count_bits"]
        uniq = _unpack_bits(buf[pos:], n_tok, cb) + 1
        pos += (n_tok * cb + 7) // 8
        ids = _unpack_bits(buf[pos:], n_ent, idb)
        pos += (n_ent * idb + 7) // 8
        counts = _unpack_bits(buf[pos:], n_ent, cb) + 1
        if int(uniq.sum()) != n_ent:
            raise TeacherCacheError(f"{shard.path}: sample {sid} has inconsistent entry counts (corrupt shard)")
        width = out["ids"].shape[-1]
        row = np.repeat(np.arange(n_tok), uniq)
        col = np.arange(n_ent) - np.repeat(np.cumsum(uniq) - uniq, uniq)
        ids_out = np.full((n_tok, width), -1, dtype=np.int64)
        cnt_out = np.zeros((n_tok, width), dtype=np.int32)
        ids_out[row, col] = ids
        cnt_out[row, col] = counts
        out["ids"][b] = torch.from_numpy(ids_out)
        out["counts"][b] = torch.from_numpy(cnt_out)

    def read(self, sample_ids, *, device: Union[str, torch.device, None] = None) -> SparseTeacher:
        """The stored rows of ``sample_ids`` as a :class:`SparseTeacher` of shape ``(B, T)``.

        Reads only those rows' bytes. All samples must hold the same number of tokens T. Tensors come
        in pinned memory when CUDA is available, and are moved to ``device`` (non-blocking) if given."""
        sids = _as_id_list(sample_ids)
        absent = [s for s in sids if s not in self._index]
        if absent:
            self.refresh()
            absent = [s for s in sids if s not in self._index]
        if absent:
            raise KeyError(f"sample ids not in {self.path}: {absent[:8]}" + (" ..." if len(absent) > 8 else ""))
        if not sids:
            raise ValueError("read() needs at least one sample id")
        man = self.manifest
        lengths = {self._index[s][3] for s in sids}
        if len(lengths) != 1:
            raise ValueError(f"samples hold different numbers of tokens {sorted(lengths)}; read them in groups "
                             f"of equal length")
        n_tok = lengths.pop()
        bsz = len(sids)
        pin = torch.cuda.is_available()
        width = man["k"] if man["mode"] == "topk" else min(man["num_samples"], man["vocab_size"])

        def alloc(shape, dtype):
            t = torch.empty(shape, dtype=dtype)
            return t.pin_memory() if pin else t
        out = {"ids": alloc((bsz, n_tok, width), torch.int64), "lse": alloc((bsz, n_tok), torch.float32)}
        if man["mode"] == "topk":
            out["values"] = alloc((bsz, n_tok, width), torch.float32)
        else:
            out["counts"] = alloc((bsz, n_tok, width), torch.int32)
        for b, sid in enumerate(sids):
            self._decode(sid, out, b)
        st = SparseTeacher(man["mode"], out["ids"], out["lse"], temperature=man["temperature"],
                           vocab_size=man["vocab_size"], values=out.get("values"), counts=out.get("counts"),
                           num_samples=man["num_samples"])
        if device is not None and torch.device(device) != st.device:
            st = st.to(device, non_blocking=True)
        return st

    def get_or_capture(self, sample_ids, teacher_fn: Callable, *, device: Union[str, torch.device, None] = None,
                       generator: Optional[torch.Generator] = None, backend: str = "auto") -> SparseTeacher:
        """Rows of ``sample_ids``, running the teacher only if some are not stored yet.

        ``teacher_fn`` is called at most once: with no argument it must return the teacher logits of
        ALL ``sample_ids`` (shape ``(B, ..., V)``, e.g. ``lambda: teacher(x)``); with one argument it
        gets the positions (a LongTensor into ``sample_ids``) of the missing rows and returns logits for
        just those. Missing rows are captured with the cache's settings and written; the result is
        then read back from the cache (so every epoch sees the same stored, quantised targets) and put
        on ``device`` (default: the logits' device when the teacher ran, else CPU)."""
        sids = _as_id_list(sample_ids)
        todo = [i for i, s in enumerate(sids) if s not in self._index]
        if todo:
            self.refresh()
            todo = [i for i, s in enumerate(sids) if s not in self._index]
        if todo:
            try:
                n_params = len([p for p in inspect.signature(teacher_fn).parameters.values()
                                if p.default is inspect.Parameter.empty
                                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
            except (TypeError, ValueError):
                n_params = 0
            pos = torch.tensor(todo, dtype=torch.long)
            with torch.no_grad():
                if n_params >= 1:
                    logits = teacher_fn(pos)
                    expect = len(todo)
                else:
                    logits = teacher_fn()
                    expect = len(sids)
            if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or logits.shape[0] != expect:
                raise ValueError(f"teacher_fn must return logits of shape ({expect}, ..., V), got "
                                 f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)}")
            if n_params == 0 and len(todo) != len(sids):
                logits = logits[pos.to(logits.device)]
            if device is None:
                device = logits.device
            man = self.manifest or self._settings(logits.shape[-1])
            if man["vocab_size"] != logits.shape[-1]:
                raise ValueError(f"teacher logits have V={logits.shape[-1]} but {self.manifest_path} says "
                                 f"vocab_size={man['vocab_size']}")
            st = capture(logits, k=man["k"] or 1, temperature=man["temperature"], mode=man["mode"],
                         num_samples=man["num_samples"] or 1, generator=generator,
                         sampling=man.get("sampling") or "iid", backend=backend)
            # A batch may hold one sample twice: store its first occurrence.
            first: Dict[int, int] = {}
            for j, i in enumerate(todo):
                first.setdefault(sids[i], j)
            keep = sorted(first.values())
            if len(keep) != len(todo):
                st = st[torch.tensor(keep, dtype=torch.long, device=st.device)]
            self.write([sids[todo[j]] for j in keep], st)
        return self.read(sids, device=device)

    # ---- bookkeeping --------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return sum(entry[3] for entry in self._index.values())

    @property
    def nbytes(self) -> int:
        """Committed bytes of all shards (headers and tables included)."""
        return sum(s.committed for s in self._shards)

    @property
    def bytes_per_token(self) -> float:
        n = self.num_tokens
        return self.nbytes / n if n else float("nan")

    def close(self) -> None:
        for fd in (self._own_fd, self._commit_fd):
            if fd is not None:
                os.close(fd)  # also releases the shard lock
        self._own_fd = self._commit_fd = None
        self._own = None
        for s in self._shards:
            s.mm = None

    def __enter__(self) -> "TeacherCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        man = self.manifest
        if man is None:
            return f"TeacherCache({self.path!r}, empty: no manifest yet)"
        what = f"k={man['k']}" if man["mode"] == "topk" else \
            f"num_samples={man['num_samples']}, sampling={man.get('sampling') or 'iid'!r}"
        return (f"TeacherCache({self.path!r}, mode={man['mode']!r}, {what}, vocab_size={man['vocab_size']}, "
                f"temperature={man['temperature']}, teacher={man['teacher']!r}, samples={len(self)}, "
                f"tokens={self.num_tokens}, bytes/token={self.bytes_per_token:.1f})")


def _as_id_list(sample_ids) -> List[int]:
    if isinstance(sample_ids, torch.Tensor):
        if sample_ids.is_floating_point() or sample_ids.is_complex():
            raise TypeError(f"sample_ids must be integers, got {sample_ids.dtype}")
        out = sample_ids.reshape(-1).tolist()
    elif isinstance(sample_ids, np.ndarray):
        if not np.issubdtype(sample_ids.dtype, np.integer):
            raise TypeError(f"sample_ids must be integers, got {sample_ids.dtype}")
        out = sample_ids.reshape(-1).tolist()
    elif isinstance(sample_ids, (int, np.integer)) and not isinstance(sample_ids, bool):
        out = [int(sample_ids)]
    else:
        out = list(sample_ids)
        for s in out:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
                raise TypeError(f"sample_ids must be integers, got {s!r}")
        out = [int(s) for s in out]
    for s in out:
        if s < 0:
            raise ValueError(f"sample_ids must be >= 0, got {s}")
    return out
