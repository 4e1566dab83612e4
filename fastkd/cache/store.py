"""``TeacherCache``: a persistent, crash-safe, memory-mapped store of ``SparseTeacher`` rows.

The on-disk format (one manifest, one append-only shard and commit log per writer) and its
durability rules are in the ``TeacherCache`` docstring and in ``docs/cache.md``.
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import math
import mmap
import os
import socket
import struct
import time
import warnings
import zlib
from typing import Callable, Dict, List, NamedTuple, Optional, Union

import numpy as np
import torch

from .._settings import MODES, SAMPLINGS, check, check_int, check_k
from .teacher import LOGPROB_ROUNDING, PAD_ID, SparseTeacher, capture, check_rows


# ============================================================================================
# TeacherCache: the persistent store
# ============================================================================================
# Format 2: checksummed commit-log entries, shard headers carrying their provenance, a manifest
# carrying its own checksum and the cache's id. Format 1 caches are refused with an error.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = "fastkd-teacher-cache"
_SHARD_MAGIC = b"FKDSHARD"
# magic, format version, header size, provenance bytes; then the provenance (JSON) and a crc32 of all of it
_SHARD_HEADER = struct.Struct("<8sIII")
_MAX_PROVENANCE = 1 << 16
_COMMIT_MAGIC = b"FKDL"
_COMMIT_ENTRY = struct.Struct("<Q4sI")      # committed length, magic, crc32 of the first 12 bytes
_CHUNK_MAGIC = b"FKDC"
_CHUNK_HEADER = struct.Struct("<4sIQII")   # magic, n_samples, body bytes, table crc32, header crc32
_TABLE_DTYPE = np.dtype([("sid", "<i8"), ("ntok", "<u4"), ("nent", "<u4"), ("off", "<u8"),
                         ("nbytes", "<u4"), ("crc", "<u4")])
_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# What a shard's header records and must share with the manifest: what its rows mean, and which
# cache they belong to (cache_id is drawn when the manifest is created).
_PROVENANCE = ("format_version", "cache_id", "mode", "k", "num_samples", "sampling", "temperature", "vocab_size",
               "teacher", "dataset", "values_dtype", "lse_dtype", "id_bits", "count_bits")
_MANIFEST_ADVICE = ("Move it out of the directory and reopen the cache: a cache with shards rebuilds its manifest "
                    "from their headers.")


class TeacherCacheError(RuntimeError):
    """A cache file is corrupt, truncated, foreign, or locked by another writer (the message names the file)."""


class TeacherCacheWarning(RuntimeWarning):
    """A cache file was damaged or missing and was recovered from redundant data (the message names it),
    or a shard was skipped (``skip_bad_shards=True``)."""


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _setting_problems(d: dict) -> List[str]:
    """What is wrong with the settings of a manifest or a shard header (missing keys, types, values)."""
    missing = [key for key in _PROVENANCE if key not in d]
    if missing:
        return [f"missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"]
    bad = []

    def want(key, ok, what):
        if not ok:
            bad.append(f"{key} must be {what}, found {d[key]!r}")
    mode = d["mode"]
    want("mode", mode in MODES, f"one of {MODES}")
    want("cache_id", isinstance(d["cache_id"], str) and len(d["cache_id"]) > 0, "a non-empty string")
    t = d["temperature"]
    want("temperature", (_is_int(t) or isinstance(t, float)) and math.isfinite(t) and t > 0, "a positive number")
    v = d["vocab_size"]
    want("vocab_size", _is_int(v) and v >= 1, "an int >= 1")
    if _is_int(v) and v >= 1:
        want("id_bits", d["id_bits"] == _bits_for(v), f"{_bits_for(v)} for vocab_size {v}")
    for key in ("teacher", "dataset"):
        want(key, d[key] is None or isinstance(d[key], str), "a string or null")
    want("lse_dtype", d["lse_dtype"] == "float32", "'float32'")
    topk = mode == "topk"
    if topk:
        want("k", _is_int(d["k"]) and d["k"] >= 1, "an int >= 1 in mode 'topk'")
        want("values_dtype", d["values_dtype"] in _VALUE_DTYPES, f"one of {list(_VALUE_DTYPES)} in mode 'topk'")
    else:
        want("k", d["k"] is None, "null in mode 'sample'")
        want("values_dtype", d["values_dtype"] is None, "null in mode 'sample'")
    if mode == "sample":
        n = d["num_samples"]
        want("num_samples", _is_int(n) and n >= 1, "an int >= 1 in mode 'sample'")
        want("sampling", d["sampling"] in SAMPLINGS, f"one of {SAMPLINGS} in mode 'sample'")
        if _is_int(n) and n >= 1:
            want("count_bits", d["count_bits"] == _bits_for(n), f"{_bits_for(n)} for num_samples {n}")
    else:
        for key in ("num_samples", "sampling", "count_bits"):
            want(key, d[key] is None, "null in mode 'topk'")
    return bad


def _manifest_checksum(man: dict) -> str:
    body = {key: value for key, value in man.items() if key != "checksum"}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _format_version_error(path: str, what: str, version) -> TeacherCacheError:
    if _is_int(version) and version < FORMAT_VERSION:
        return TeacherCacheError(
            f"{path}: {what} of format version {version}; this fastkd reads format version {FORMAT_VERSION} "
            f"(checksummed commit logs, shard headers that record their provenance) and does not convert older "
            f"caches. Capture into a new directory, or read this one with the fastkd release that wrote it.")
    return TeacherCacheError(f"{path}: {what} of format version {version!r}; this fastkd reads format version "
                             f"{FORMAT_VERSION}")


def _check_manifest_file(man, path: str) -> None:
    """Every kind of manifest damage, as a TeacherCacheError naming the file."""
    if not isinstance(man, dict):
        raise TeacherCacheError(f"{path} is damaged: a JSON {type(man).__name__} where an object was expected. "
                                + _MANIFEST_ADVICE)
    if man.get("format") != _MANIFEST_FORMAT:
        raise TeacherCacheError(f"{path} is not a fastkd teacher-cache manifest (format {man.get('format')!r}, "
                                f"expected {_MANIFEST_FORMAT!r}). " + _MANIFEST_ADVICE)
    if man.get("format_version") != FORMAT_VERSION:
        raise _format_version_error(path, "a fastkd teacher cache", man.get("format_version"))
    bad = _setting_problems(man)
    if not bad and man.get("checksum") != _manifest_checksum(man):
        bad = ["its checksum does not match its content"]
    if bad:
        raise TeacherCacheError(f"{path} is damaged: {'; '.join(bad)}. " + _MANIFEST_ADVICE)


def _read_shard_header(path: str) -> Optional[tuple]:
    """``(provenance, header size)`` of a shard, or None while its header is incomplete (a shard
    being created, or one torn before its header was whole). A damaged header is an error."""
    with open(path, "rb") as f:
        head = f.read(_SHARD_HEADER.size)
        if len(head) < _SHARD_HEADER.size:
            return None
        magic, version, hsize, plen = _SHARD_HEADER.unpack(head)
        if magic != _SHARD_MAGIC:
            raise TeacherCacheError(f"{path}: not a fastkd cache shard (bad magic bytes)")
        if version != FORMAT_VERSION:
            raise _format_version_error(path, "a shard", version)
        if plen > _MAX_PROVENANCE or hsize != _SHARD_HEADER.size + plen + 4:
            raise TeacherCacheError(f"{path}: damaged shard header (inconsistent sizes)")
        rest = f.read(plen + 4)
    if len(rest) < plen + 4:
        return None
    if _crc(head + rest[:plen]) != struct.unpack("<I", rest[plen:])[0]:
        raise TeacherCacheError(f"{path}: damaged shard header (checksum)")
    try:
        prov = json.loads(rest[:plen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TeacherCacheError(f"{path}: damaged shard header ({exc})") from None
    bad = _setting_problems(prov) if isinstance(prov, dict) else ["not a JSON object"]
    if bad:
        raise TeacherCacheError(f"{path}: damaged shard header ({'; '.join(bad)})")
    return prov, hsize


def _provenance_diff(prov: dict, man: dict) -> List[str]:
    return [f"{key}: shard has {prov.get(key)!r}, manifest {man.get(key)!r}" for key in _PROVENANCE
            if prov.get(key) != man.get(key)]


class _LogState(NamedTuple):
    committed: int   # the committed length (largest valid entry; 0 if none)
    exists: bool     # the commit log file exists
    entries: int     # whole entries in the file
    bad: int         # whole entries failing their checksum (all of them, or the trailing ones)
    torn: int        # bytes of a partial last entry


class _Shard:
    """One record shard: an append-only file of checksummed chunks + a log of committed lengths."""

    def __init__(self, path: str):
        self.path = path
        self.commit_path = path[: -len(".fkd")] + ".commit"
        self.provenance: Optional[dict] = None  # the header's, once read and checked
        self.scanned = 0      # bytes of this shard already indexed
        self.committed = 0    # committed length as last read
        self.bad: Optional[str] = None  # why the shard is skipped (skip_bad_shards=True)
        self.mm: Optional[np.memmap] = None

    def read_log(self, full: bool) -> _LogState:
        """The commit log's state. ``full``: check every entry (a writer reopening its shard); else
        walk back from the end to the last entry that passes its checksum (a reader)."""
        try:
            with open(self.commit_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return _LogState(0, False, 0, 0, 0)
        n, esize = len(raw) // _COMMIT_ENTRY.size, _COMMIT_ENTRY.size
        committed = bad = 0
        for i in (range(n) if full else range(n - 1, -1, -1)):
            length, magic, crc = _COMMIT_ENTRY.unpack_from(raw, esize * i)
            if magic != _COMMIT_MAGIC or _crc(raw[esize * i: esize * i + 12]) != crc:
                bad += 1
                continue
            committed = max(committed, length)
            if not full:
                break
        return _LogState(committed, True, n, bad, len(raw) % esize)

    def memmap(self) -> np.memmap:
        size = os.path.getsize(self.path)
        if self.mm is None or self.mm.shape[0] < size:
            self.mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self.mm


def _commit_entry(length: int) -> bytes:
    head = struct.pack("<Q4s", length, _COMMIT_MAGIC)
    return head + struct.pack("<I", _crc(head))


def _next_chunk_header(path: str, start: int, size: int) -> Optional[int]:
    """Offset of the first well-formed chunk header (magic and header checksum) in ``[start, size)``."""
    if start >= size:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        size = min(size, len(mm))
        q = mm.find(_CHUNK_MAGIC, start, size)
        while q != -1:
            head = mm[q: q + _CHUNK_HEADER.size]
            if len(head) == _CHUNK_HEADER.size and _crc(head[:-4]) == _CHUNK_HEADER.unpack(head)[4]:
                return q
            q = mm.find(_CHUNK_MAGIC, q + 1, size)
    return None


class TeacherCache:
    r"""Persistent store of :class:`SparseTeacher` rows, keyed by sample index.

    A directory holding ``manifest.json`` (provenance: format version, cache id, mode, k or N,
    capture temperature, vocab size, teacher name, dataset fingerprint, dtypes, id packing, and a
    checksum of all of it) and one record shard per writer process (``shard-<writer>.fkd`` +
    ``shard-<writer>.commit``). Each shard's header repeats the manifest's provenance. A sample is one
    ``write`` row: any number of tokens (e.g. a sequence), each token a sparse teacher row.

    Storage per token: the log-sum-exp (float32), then top-k: k log-probabilities in
    ``values_dtype`` (float16 by default) and k ids packed to ⌈log2 V⌉ bits (k = 64, V = 128256:
    4 + 128 + 136 = 268 bytes); sampled: the number of unique ids and, per unique id, the id
    (⌈log2 V⌉ bits) and its count (⌈log2 N⌉ bits), variable-length, found through the per-sample
    offset table. ``repr`` prints the measured bytes/token.

    Durability: every ``write`` appends one checksummed chunk, fsyncs it, then appends the new length
    (a checksummed entry) to the shard's commit log and fsyncs that; when ``write`` returns, its rows
    survive a crash. Every handle indexes every complete, valid chunk of a shard, committed or not;
    the commit log says how much of the shard must be valid. Reopening a shard whose tail is torn (a
    crash mid-write) drops the torn tail and resumes. A shard shorter than its commit log, a committed
    chunk failing its checksum, a damaged chunk with valid chunks after it, a damaged or foreign
    manifest or shard header, or one sample id stored in two shards with different data raises a
    :class:`TeacherCacheError` naming the file(s). A damaged, truncated or missing commit log, and a
    missing manifest, are recovered from the shards with a :class:`TeacherCacheWarning`. Each process
    writes only its own shard (an exclusive lock, taken when a writer handle opens, enforces it); any
    number of processes read. ``docs/cache.md`` lists what each kind of damage gives.

    Args:
        path: the cache directory (created if missing unless ``readonly``).
        mode, k, num_samples, sampling, temperature, vocab_size, teacher, dataset, values_dtype: the
            capture settings and provenance (``sampling``: "iid" or "systematic", see :func:`capture`).
            ``None`` takes the manifest's value for an existing cache, so a cache keeps reading and
            capturing as it was written (the defaults ``"topk"``, 64, 50, "systematic", 1.0, float16
            for a new one; ``vocab_size`` is then taken from the first
            write). A given value must match an existing manifest.
        writer: this process's shard name (default ``rank<RANK>`` from the environment, else
            ``rank0``); two live handles with one name is an error (the second to open is refused).
        readonly: never create or write anything.
        sync: fsync each write (turn off only for throwaway caches).
        skip_bad_shards: a shard that cannot be trusted (damaged header or committed chunk, truncated,
            written for another cache or other settings, or whose file is gone while its commit log
            remains) is skipped with a :class:`TeacherCacheWarning` naming it, and the other shards stay
            readable; a sample id stored twice with different data keeps the copy of the shard whose name
            sorts first, with a warning naming both. Default: each of these is an error.
    """

    def __init__(self, path: Union[str, os.PathLike], *, mode: Optional[str] = None, k: Optional[int] = None,
                 num_samples: Optional[int] = None, temperature: Optional[float] = None,
                 vocab_size: Optional[int] = None, teacher: Optional[str] = None, dataset: Optional[str] = None,
                 values_dtype: Union[str, torch.dtype, None] = None, writer: Optional[str] = None,
                 readonly: bool = False, sync: bool = True, sampling: Optional[str] = None,
                 skip_bad_shards: bool = False):
        self.path = os.fspath(path)
        self.readonly = bool(readonly)
        self.sync = bool(sync)
        self.skip_bad_shards = bool(skip_bad_shards)
        # The capture settings, by the rules every entry point shares (None: the manifest's value).
        for name, value in (("mode", mode), ("num_samples", num_samples), ("temperature", temperature),
                            ("sampling", sampling)):
            if value is not None:
                check(name, value)
        if k is not None:
            check_k(k)
        check_int("vocab_size", vocab_size, low=1, allow_none=True)
        for name, value in (("teacher", teacher), ("dataset", dataset)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__}")
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
        self._own_path = os.path.join(self.path, f"shard-{writer}.fkd")
        self._own: Optional[_Shard] = None
        self._own_fd: Optional[int] = None
        self._commit_fd: Optional[int] = None
        self._warned: set = set()
        if not self.readonly:
            os.makedirs(self.path, exist_ok=True)
        elif not os.path.isdir(self.path):
            raise FileNotFoundError(f"TeacherCache directory {self.path!r} does not exist (readonly=True)")
        self.manifest: Optional[dict] = None
        try:
            self._load_manifest()
            if not self.readonly:
                self._lock_writer()
            self.refresh()
            if self._own_fd is not None and self.manifest is not None and (
                    os.fstat(self._own_fd).st_size > 0 or os.path.exists(self._commit_path_of(self._own_path))):
                self._open_writer()  # recover this writer's shard now: torn tail, damaged commit log
        except BaseException:
            self.close()
            raise

    def _warn(self, key, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, TeacherCacheWarning, stacklevel=3)

    @staticmethod
    def _commit_path_of(shard_path: str) -> str:
        return shard_path[: -len(".fkd")] + ".commit"

    # ---- manifest ------------------------------------------------------------------------
    @property
    def manifest_path(self) -> str:
        return os.path.join(self.path, MANIFEST_NAME)

    def _settings(self, vocab_size: int) -> dict:
        r = self._requested
        mode = r["mode"] or "topk"
        num_samples = r["num_samples"] or 50
        return {
            "format": _MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "cache_id": os.urandom(16).hex(),
            "mode": mode,
            "k": (r["k"] or 64) if mode == "topk" else None,
            "num_samples": num_samples if mode == "sample" else None,
            "sampling": (r["sampling"] or "systematic") if mode == "sample" else None,
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

    def _check_manifest(self, man: dict, where: Optional[str] = None) -> None:
        """The requested settings against a manifest (a mismatch is a ValueError)."""
        bad = []
        for key, want in self._requested.items():
            if want is None:
                continue
            have = man.get(key)
            if key in ("k", "values_dtype") and man.get("mode") != "topk":
                continue
            if key in ("num_samples", "sampling") and man.get("mode") != "sample":
                continue
            same = math.isclose(have, want, rel_tol=1e-9) if key == "temperature" and have is not None else have == want
            if not same:
                bad.append(f"{key}: cache has {have!r}, asked for {want!r}")
        if bad:
            raise ValueError(f"{where or self.manifest_path} does not match this TeacherCache: " + "; ".join(bad)
                             + ". Use another directory, or open it with the cache's settings.")

    def _read_manifest(self) -> Optional[dict]:
        try:
            with open(self.manifest_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            man = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise TeacherCacheError(f"{self.manifest_path} is damaged: not UTF-8 text ({exc.reason} at byte "
                                    f"{exc.start}). " + _MANIFEST_ADVICE) from None
        except json.JSONDecodeError as exc:
            raise TeacherCacheError(f"{self.manifest_path} is damaged: not valid JSON ({exc}). "
                                    + _MANIFEST_ADVICE) from None
        _check_manifest_file(man, self.manifest_path)
        return man

    def _load_manifest(self) -> None:
        man = self._read_manifest()
        if man is None:
            man = self._manifest_from_shards()
            if man is None:
                if self._requested["vocab_size"] is not None and not self.readonly:
                    self._create_manifest(self._requested["vocab_size"])
                return
        self._check_manifest(man)
        self.manifest = man

    def _manifest_from_shards(self) -> Optional[dict]:
        """With the manifest missing: the manifest the shards' headers describe (None if no shard has
        a header yet). Written to disk unless readonly; always with a warning naming the shards."""
        heads: Dict[str, dict] = {}
        for name in sorted(os.listdir(self.path)):
            if not (name.startswith("shard-") and name.endswith(".fkd")):
                continue
            p = os.path.join(self.path, name)
            try:
                head = _read_shard_header(p)
            except FileNotFoundError:
                continue
            except TeacherCacheError as exc:
                if self.skip_bad_shards and p != self._own_path:
                    continue  # refresh() skips it again, with a warning
                raise TeacherCacheError(f"{self.manifest_path} is missing and cannot be rebuilt from the shard "
                                        f"headers: {exc}") from None
            if head is not None:
                heads[p] = head[0]
        if not heads:
            return None
        first, prov = next(iter(heads.items()))
        for p, other in heads.items():
            diff = _provenance_diff(other, prov)
            if diff:
                raise TeacherCacheError(
                    f"{self.manifest_path} is missing, and the shards disagree about what it held: {p} and {first} "
                    f"differ in {'; '.join(d.replace('manifest', 'other shard') for d in diff)}. Move the shards "
                    f"of the other cache out of the directory and reopen.")
        man = dict(prov, format=_MANIFEST_FORMAT,
                   id_packing="little-endian bitstream, id_bits per id; counts and per-token unique counts "
                              "stored minus 1 in count_bits",
                   created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   created_by="fastkd (rebuilt from the shard headers)")
        man["checksum"] = _manifest_checksum(man)
        names = ", ".join(os.path.basename(p) for p in heads)
        self._check_manifest(man, where=f"the shards of {self.path} ({names})")
        if self.readonly:
            self._warn(("manifest", "rebuilt"), f"{self.manifest_path} is missing; using the settings recorded in "
                       f"the headers of {names} (readonly: the manifest is not rewritten)")
            return man
        self._install_manifest(man)
        self._warn(("manifest", "rebuilt"), f"{self.manifest_path} was missing; rebuilt it from the headers of "
                   f"{names}")
        return self._read_manifest()

    def _install_manifest(self, man: dict) -> None:
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

    def _create_manifest(self, vocab_size: int) -> None:
        # Shards that already exist decide what the manifest holds; a fresh one never contradicts them.
        man = self._manifest_from_shards()
        if man is None:
            man = self._settings(vocab_size)
            man["checksum"] = _manifest_checksum(man)
            self._install_manifest(man)
            man = self._read_manifest()
        self._check_manifest(man)
        self.manifest = man

    def _header_bytes(self) -> bytes:
        prov = json.dumps({key: self.manifest[key] for key in _PROVENANCE}, sort_keys=True).encode()
        head = _SHARD_HEADER.pack(_SHARD_MAGIC, FORMAT_VERSION, _SHARD_HEADER.size + len(prov) + 4, len(prov)) + prov
        return head + struct.pack("<I", _crc(head))

    def _check_provenance(self, shard: _Shard, prov: dict) -> None:
        diff = _provenance_diff(prov, self.manifest)
        if diff:
            what = ("it belongs to another cache" if diff[0].startswith("cache_id") and len(diff) == 1
                    else "it was written under other settings")
            raise TeacherCacheError(f"{shard.path} does not belong with {self.manifest_path}: {what} "
                                    f"({'; '.join(diff)}). Move it out of the directory, or open the cache with "
                                    f"skip_bad_shards=True to read the other shards.")

    # ---- scanning -----------------------------------------------------------------------
    @staticmethod
    def _read_chunk(f, pos: int, size: int, verify_all: bool, committed: int) -> tuple:
        """``(None, end, table)`` for a complete, valid chunk at ``pos``, else ``(why, None, None)``.
        Payload checksums are checked too when ``verify_all`` or the chunk ends past ``committed``
        (a chunk the commit log does not vouch for)."""
        f.seek(pos)
        head = f.read(_CHUNK_HEADER.size)
        if len(head) < _CHUNK_HEADER.size:
            return "truncated chunk header", None, None
        magic, n_samples, body, tcrc, hcrc = _CHUNK_HEADER.unpack(head)
        if magic != _CHUNK_MAGIC or _crc(head[:-4]) != hcrc:
            return "bad chunk header checksum", None, None
        end = pos + _CHUNK_HEADER.size + body
        if end > size:
            return f"chunk runs past the end of the file ({size} bytes)", None, None
        table_raw = f.read(n_samples * _TABLE_DTYPE.itemsize)
        if len(table_raw) < n_samples * _TABLE_DTYPE.itemsize or _crc(table_raw) != tcrc:
            return "bad sample-table checksum", None, None
        table = np.frombuffer(table_raw, dtype=_TABLE_DTYPE)
        lo = table["off"].astype(np.int64)
        if n_samples == 0 or (lo < len(table_raw)).any() or (lo + table["nbytes"] > body).any():
            return "sample table out of bounds", None, None
        if verify_all or end > committed:
            body_start = pos + _CHUNK_HEADER.size
            for row in table:
                f.seek(body_start + int(row["off"]))
                if _crc(f.read(int(row["nbytes"]))) != int(row["crc"]):
                    return f"bad payload checksum of sample {int(row['sid'])}", None, None
        return None, end, table

    def _scan(self, shard: _Shard, verify_all: bool) -> int:
        """Index the complete, valid chunks of ``shard`` from ``shard.scanned`` to the end of the file;
        return the end of the last one. A bad chunk below ``shard.committed``, or one followed by a
        valid chunk, is corruption; a bad chunk at the end above it is a torn tail."""
        size = os.path.getsize(shard.path)
        pos = shard.scanned
        new_entries = []
        retried = False
        with open(shard.path, "rb") as f:
            while pos < size:
                why, end, table = self._read_chunk(f, pos, size, verify_all, shard.committed)
                if why is None:
                    new_entries.append((table, pos + _CHUNK_HEADER.size))
                    pos, retried = end, False
                    continue
                if pos < shard.committed:
                    raise TeacherCacheError(f"{shard.path}: corrupt chunk at byte {pos} ({why}); rows reported "
                                            f"written are damaged. Move the shard out of the directory (its rows "
                                            f"are then captured again), or open with skip_bad_shards=True.")
                later = _next_chunk_header(shard.path, pos + 1, size)
                if later is None:
                    break  # a torn tail: a write that never completed
                if not retried:  # a live writer may have completed this chunk since it was read: look again
                    retried = True
                    size = os.path.getsize(shard.path)
                    continue
                raise TeacherCacheError(f"{shard.path}: corrupt chunk at byte {pos} ({why}) with a complete "
                                        f"chunk after it at byte {later}: not a torn tail, the rows after the "
                                        f"damage would be lost. Move the shard out of the directory, or open "
                                        f"with skip_bad_shards=True.")
        no = self._shard_by_path[shard.path]
        for table, body_start in new_entries:
            for row in table:
                self._add_row(int(row["sid"]), (no, body_start + int(row["off"]), int(row["nbytes"]),
                                                int(row["ntok"]), int(row["nent"]), int(row["crc"])))
        shard.scanned = pos
        return pos

    def _row_bytes(self, entry: tuple) -> bytes:
        no, off, nbytes = entry[:3]
        return bytes(np.asarray(self._shards[no].memmap()[off: off + nbytes]))

    def _add_row(self, sid: int, entry: tuple) -> None:
        old = self._index.get(sid)
        if old is None or old[:2] == entry[:2]:
            self._index[sid] = entry
            return
        if old[2:] == entry[2:] and self._row_bytes(old) == self._row_bytes(entry):
            return  # the same row stored twice (two writers captured it at once): one copy serves
        a, b = self._shards[old[0]].path, self._shards[entry[0]].path
        if not self.skip_bad_shards:
            raise TeacherCacheError(f"sample {sid} is stored with different data in {a} and {b}. Move the shard "
                                    f"that should not be in this cache out of the directory, or open with "
                                    f"skip_bad_shards=True to read the copy in {min(a, b)}.")
        self._warn(("conflict", sid), f"sample {sid} is stored with different data in {a} and {b}; reading the "
                   f"copy in {min(a, b)}")
        if b < a:
            self._index[sid] = entry

    def _skip(self, shard: _Shard, exc: TeacherCacheError) -> None:
        shard.bad = str(exc)
        no = self._shard_by_path[shard.path]
        for sid in [s for s, entry in self._index.items() if entry[0] == no]:
            del self._index[sid]
        self._warn(("skip", shard.path), f"skipping {shard.path}: {exc}")

    def _refresh_shard(self, shard: _Shard) -> None:
        log = shard.read_log(full=False)
        if log.bad:
            log = shard.read_log(full=False)  # once more: an entry may have been mid-append
        try:
            size = os.path.getsize(shard.path)
        except FileNotFoundError:
            raise TeacherCacheError(f"{shard.path} disappeared while the cache was open") from None
        if size < log.committed:
            raise TeacherCacheError(f"{shard.path}: truncated shard: {size} bytes on disk but {log.committed} "
                                    f"bytes were committed. Restore the file, or move it out of the directory "
                                    f"(its rows are then captured again), or open with skip_bad_shards=True.")
        if shard.provenance is None:
            head = _read_shard_header(shard.path)
            if head is None:
                if log.committed > 0:
                    raise TeacherCacheError(f"{shard.path}: truncated shard header, but {log.committed} bytes "
                                            f"were committed")
                return  # a shard whose writer has not written its header yet
            self._check_provenance(shard, head[0])
            shard.provenance, shard.scanned = head[0], head[1]
        if log.bad:
            self._warn(("log", shard.commit_path, log.entries), f"{shard.commit_path}: the last {log.bad} "
                       f"entr{'y fails its' if log.bad == 1 else 'ies fail their'} checksum; the committed rows "
                       f"are recovered from the chunk checksums of {shard.path} (its writer rewrites the log when "
                       f"it reopens the shard)")
        elif not log.exists and size > shard.scanned and shard.scanned > 0:
            self._warn(("log", shard.commit_path, "missing"), f"{shard.commit_path} is missing; the rows of "
                       f"{shard.path} are recovered from its chunk checksums (its writer rewrites the log when it "
                       f"reopens the shard)")
        shard.committed = log.committed
        if size > shard.scanned:
            self._scan(shard, verify_all=False)

    def refresh(self) -> None:
        """Pick up shards and rows written (by any process) since the last look."""
        if self.manifest is None:
            self._load_manifest()
            if self.manifest is None:
                return
        names = set(os.listdir(self.path))
        for name in sorted(n for n in names if n.startswith("shard-") and n.endswith(".fkd")):
            p = os.path.join(self.path, name)
            if p not in self._shard_by_path:
                self._shard_by_path[p] = len(self._shards)
                self._shards.append(_Shard(p))
        for shard in self._shards:
            if shard.bad is not None or (shard.path == self._own_path and self._own_fd is not None):
                continue  # this handle's own shard is checked and recovered by _open_writer
            try:
                self._refresh_shard(shard)
            except TeacherCacheError as exc:
                if not self.skip_bad_shards:
                    raise
                self._skip(shard, exc)
        # A commit log whose shard is gone: the rows it committed are lost, never silently.
        for name in sorted(n for n in names if n.startswith("shard-") and n.endswith(".commit")):
            if name[: -len(".commit")] + ".fkd" in names:
                continue
            log_path = os.path.join(self.path, name)
            committed = _Shard(log_path[: -len(".commit")] + ".fkd").read_log(full=False).committed
            if committed == 0:
                continue
            exc = TeacherCacheError(f"{log_path[: -len('.commit')]}.fkd is missing, but its commit log {log_path} "
                                    f"records {committed} committed bytes: those rows are gone. Restore the shard, "
                                    f"or remove the commit log to accept the loss (the rows are then captured "
                                    f"again), or open with skip_bad_shards=True.")
            if not self.skip_bad_shards:
                raise exc
            self._warn(("orphan", log_path), f"skipping {exc}")

    # ---- writing ------------------------------------------------------------------------
    def _lock_writer(self) -> None:
        fd = os.open(self._own_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TeacherCacheError(f"{self._own_path} is being written by another TeacherCache handle; give each "
                                    f"writer its own writer= name (or open readers with readonly=True)") from None
        self._own_fd = fd

    def _rewrite_log(self, shard: _Shard, length: int) -> None:
        """Replace the commit log by one entry of ``length`` (atomic: a new file renamed over the old)."""
        tmp = os.path.join(self.path, "." + os.path.basename(shard.commit_path) + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, _commit_entry(length))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, shard.commit_path)
        _fsync_dir(self.path)

    def _open_writer(self) -> None:
        """Take over this writer's shard: check it, drop a torn tail, repair its commit log."""
        if self._own is not None:
            return
        if self.readonly or self._own_fd is None:
            raise TeacherCacheError(f"TeacherCache {self.path!r} was opened readonly")
        path, fd = self._own_path, self._own_fd
        if path not in self._shard_by_path:
            self._shard_by_path[path] = len(self._shards)
            self._shards.append(_Shard(path))
        shard = self._shards[self._shard_by_path[path]]
        log = shard.read_log(full=True)
        size = os.fstat(fd).st_size
        if size < log.committed:
            raise TeacherCacheError(f"{path}: truncated shard: {size} bytes on disk but {log.committed} bytes were "
                                    f"committed. Restore the file, or move it and {shard.commit_path} out of the "
                                    f"directory (its rows are then captured again).")
        header = self._header_bytes()
        try:
            head = _read_shard_header(path)
        except TeacherCacheError:
            if log.committed > 0 or size > len(header):
                raise
            head = None  # a damaged header with no chunk after it: nothing to lose
        if head is None:
            if log.committed > 0:
                raise TeacherCacheError(f"{path}: truncated shard header, but {log.committed} bytes were committed")
            # New, or torn before its header was complete. The commit log exists before the header,
            # so a shard with chunks and no commit log is one whose log was lost.
            cfd = os.open(shard.commit_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.fsync(cfd)
            os.close(cfd)
            _fsync_dir(self.path)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            _write_all(fd, header)
            os.fsync(fd)
            size = len(header)
            log = _LogState(0, True, 0, 0, 0)
            shard.provenance, shard.scanned = json.loads(header[_SHARD_HEADER.size:-4]), size
        else:
            self._check_provenance(shard, head[0])
            if shard.provenance is None:
                shard.provenance, shard.scanned = head[0], head[1]
        shard.committed = log.committed
        # Recovery: everything past the commit log is checked to the last byte; a torn tail goes.
        good = self._scan(shard, verify_all=True)
        if good < size:
            os.ftruncate(fd, good)
            os.fsync(fd)
        self._own = shard
        if log.bad or log.torn or not log.exists:
            what = ("is missing" if not log.exists else
                    f"had {log.bad} entr{'y' if log.bad == 1 else 'ies'} failing its checksum" if log.bad else
                    f"ended in a torn entry ({log.torn} bytes)")
            if log.exists or good > len(header):  # a missing log is damage once chunks exist
                self._warn(("log", shard.commit_path, "rewritten"), f"{shard.commit_path} {what}; rewrote it from "
                           f"the chunk checksums of {path} ({good} bytes committed)")
            self._rewrite_log(shard, good)
            shard.committed = good
        self._commit_fd = os.open(shard.commit_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if head is None:
            shard.committed = good  # a bare header: nothing to commit yet
        if good != shard.committed:
            self._append_commit(good)

    def _append_commit(self, length: int) -> None:
        _write_all(self._commit_fd, _commit_entry(length))
        if self.sync:
            os.fsync(self._commit_fd)
        self._own.committed = length

    def _encode(self, st: SparseTeacher, b: int) -> tuple:
        man = self.manifest
        lse = st.lse[b].reshape(-1).to(torch.float32).numpy()
        n_tok = lse.shape[0]
        idb = man["id_bits"]
        if st.mode == "topk":
            ids = st.ids[b].reshape(n_tok, -1)
            pad = ids == PAD_ID
            # A padding entry is stored as id 0 with value NaN (a value no valid row holds).
            vals = st.values[b].reshape(n_tok, -1).masked_fill(pad, float("nan")).to(_VALUE_DTYPES[man["values_dtype"]])
            ids = ids.masked_fill(pad, 0).numpy()
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

    def _rounding(self) -> float:
        """How far log Σp of a row may exceed 0 from the rounding of this cache's values dtype: a row
        read back from a float16 cache sums to 1 only within float16's rounding of its k values."""
        if self.manifest["mode"] != "topk":
            return LOGPROB_ROUNDING
        eps = torch.finfo(_VALUE_DTYPES[self.manifest["values_dtype"]]).eps
        return max(LOGPROB_ROUNDING, 0.5 * eps * math.log(max(self.manifest["k"], 2)))

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
        # Never store a row that would not read back as written (the rule of the SparseTeacher constructor).
        check_rows(st.mode, st.ids, values=st.values, counts=st.counts, vocab_size=st.vocab_size,
                   num_samples=st.num_samples, what="TeacherCache.write", rounding=self._rounding())
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
        if os.fstat(self._own_fd).st_size > start:  # what a failed earlier write left behind
            os.ftruncate(self._own_fd, start)
        os.lseek(self._own_fd, start, os.SEEK_SET)
        _write_all(self._own_fd, blob)
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
        out["lse"][b, :n_tok] = torch.from_numpy(lse.astype(np.float32))
        pos = 4 * n_tok
        if man["mode"] == "topk":
            k = man["k"]
            vdt = _VALUE_DTYPES[man["values_dtype"]]
            vb = torch.finfo(vdt).bits // 8
            raw = buf[pos: pos + n_tok * k * vb].view("<i2" if vb == 2 else "<i4").astype(np.int16 if vb == 2
                                                                                         else np.int32)
            vals = torch.from_numpy(raw).view(vdt).to(torch.float32).reshape(n_tok, k)
            pos += n_tok * k * vb
            ids = torch.from_numpy(_unpack_bits(buf[pos:], n_tok * k, idb)).reshape(n_tok, k)
            pad = torch.isnan(vals)  # the padding marker of _encode
            out["values"][b, :n_tok] = vals.masked_fill(pad, float("-inf"))
            out["ids"][b, :n_tok] = ids.masked_fill(pad, PAD_ID)
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
        out["ids"][b, :n_tok] = torch.from_numpy(ids_out)
        out["counts"][b, :n_tok] = torch.from_numpy(cnt_out)

    def read(self, sample_ids, *, device: Union[str, torch.device, None] = None, return_mask: bool = False):
        """The stored rows of ``sample_ids`` as a :class:`SparseTeacher` of shape ``(B, T)``.

        Reads only those rows' bytes. Tensors come in pinned memory when CUDA is available, and are
        moved to ``device`` (non-blocking) if given.

        Samples of different lengths: with ``return_mask=True`` the result is ``(sparse_teacher,
        mask)``, the batch padded to the longest sample, ``T = max length``, and ``mask`` a ``(B, T)``
        bool tensor, True on stored rows. A padded row holds padding only (ids −1; top-k: values
        −inf, sampled: counts 0): give its position ``ignore_index`` in the target (e.g.
        ``labels.masked_fill(~mask, -100)``) so that the loss neither counts nor trains on it.
        Without ``return_mask`` all samples must hold the same number of tokens (else a ValueError).

        A sequence of T tokens has T − 1 teacher rows when, as for a causal LM, row t is the
        distribution of token t + 1: store and read the rows of ``logits[:, :-1]``, and pair them
        with ``student_logits[:, :-1]`` and labels ``tokens[:, 1:]``."""
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
        lengths = [self._index[s][3] for s in sids]
        if len(set(lengths)) != 1 and not return_mask:
            raise ValueError(f"samples hold different numbers of tokens {sorted(set(lengths))}; pass "
                             f"return_mask=True for a batch padded to the longest with its mask, or read them in "
                             f"groups of equal length")
        n_tok = max(lengths)
        bsz = len(sids)
        pin = torch.cuda.is_available()
        width = man["k"] if man["mode"] == "topk" else min(man["num_samples"], man["vocab_size"])

        def alloc(shape, dtype, fill):
            t = torch.full(shape, fill, dtype=dtype)
            return t.pin_memory() if pin else t
        out = {"ids": alloc((bsz, n_tok, width), torch.int64, PAD_ID), "lse": alloc((bsz, n_tok), torch.float32, 0.0)}
        if man["mode"] == "topk":
            out["values"] = alloc((bsz, n_tok, width), torch.float32, float("-inf"))
        else:
            out["counts"] = alloc((bsz, n_tok, width), torch.int32, 0)
        for b, sid in enumerate(sids):
            self._decode(sid, out, b)
        st = SparseTeacher(man["mode"], out["ids"], out["lse"], temperature=man["temperature"],
                           vocab_size=man["vocab_size"], values=out.get("values"), counts=out.get("counts"),
                           num_samples=man["num_samples"], validate=False)
        if device is not None and torch.device(device) != st.device:
            st = st.to(device, non_blocking=True)
        if not return_mask:
            return st
        mask = torch.arange(n_tok).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        return st, mask.to(st.device)

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
                         sampling=man["sampling"] or "systematic", backend=backend)
            # A batch may hold one sample twice: store its first occurrence.
            first: Dict[int, int] = {}
            for j, i in enumerate(todo):
                first.setdefault(sids[i], j)
            keep = sorted(first.values())
            if len(keep) != len(todo):
                st = st[torch.tensor(keep, dtype=torch.long, device=st.device)]
            self.write([sids[todo[j]] for j in keep], st)
        return self.read(sids, device=device)

    # ---- datasets -----------------------------------------------------------------------
    def to_dataset(self, path: Optional[str] = None, *, batch_size: int = 256, progress: bool = True,
                   sample_ids=None):
        """This cache as a Hugging Face ``datasets.Dataset``: one row per sample with per-position
        lists (ids and log-probabilities, or ids and counts), the manifest's provenance in the
        dataset's ``info``; streamed in batches of ``batch_size`` samples into an Arrow file at
        ``path`` (default: a new temporary directory) that the dataset memory-maps. ``sample_ids``:
        the samples to export (default: all, by increasing id). Layout: ``fastkd/cache/hf.py``."""
        from . import hf

        self.refresh()
        sids = sorted(self._index) if sample_ids is None else _as_id_list(sample_ids)
        return hf.to_dataset(self, sids, path, batch_size=batch_size, progress=progress)

    @staticmethod
    def from_dataset(dataset, path: Union[str, os.PathLike], **kwargs) -> "TeacherCache":
        """A ``TeacherCache`` at ``path`` filled from a ``datasets.Dataset``: fastkd's own export
        (:meth:`to_dataset`) or other offline-KD tools' per-position ``target_token_ids`` /
        ``target_logprobs`` / ``target_mask`` columns; streamed in batches, every row checked as
        by :meth:`write`. Keyword arguments: ``batch_size``, ``progress``, and the cache settings
        (``vocab_size``, ``k``, ``temperature``, ``teacher``, ``dataset_name``, ``values_dtype``,
        ``num_samples``, ``sampling``, ``sync``, ...) where the dataset records none or to check
        them against its provenance (:func:`fastkd.cache.hf.from_dataset`)."""
        from . import hf

        return hf.from_dataset(dataset, lambda **settings: TeacherCache(path, **settings), **kwargs)

    # ---- bookkeeping --------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return sum(entry[3] for entry in self._index.values())

    @property
    def nbytes(self) -> int:
        """Bytes of all indexed shards (headers and tables included)."""
        return sum(max(s.committed, s.scanned) for s in self._shards if s.bad is None)

    @property
    def bytes_per_token(self) -> float:
        """Stored bytes per token: rows, sample tables and chunk headers (each shard's fixed header of a
        few hundred bytes is left out)."""
        n = self.num_tokens
        headers = sum(s.scanned and len(json.dumps(s.provenance, sort_keys=True)) + _SHARD_HEADER.size + 4
                      for s in self._shards if s.bad is None and s.provenance is not None)
        return (self.nbytes - headers) / n if n else float("nan")

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
            f"num_samples={man['num_samples']}, sampling={man['sampling']!r}"
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
