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
import os
import socket
import struct
import time
import zlib
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch

from .._settings import check, check_int, check_k
from .teacher import SparseTeacher, capture


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
        # The capture settings, by the rules every entry point shares (None: the manifest's value).
        for name, value in (("mode", mode), ("num_samples", num_samples), ("temperature", temperature),
                            ("sampling", sampling)):
            if value is not None:
                check(name, value)
        if k is not None:
            check_k(k)
        check_int("vocab_size", vocab_size, low=1, allow_none=True)
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
