"""``TeacherCache`` ⇄ Hugging Face ``datasets``: export a cache as a ``datasets.Dataset`` (so
Parquet, ``save_to_disk`` and the Hub work on it) and import one, fastkd's own layout or the
per-position ``target_token_ids`` / ``target_logprobs`` / ``target_mask`` columns of other offline-KD
tools. Both directions stream in batches of samples (bounded memory); ``datasets`` and ``pyarrow``
are imported only here, inside the functions.

The layout, one row per sample (T tokens, K = the cache's k):

=============  ===============================  ==================================================
column         type                             holds
=============  ===============================  ==================================================
``sample_id``  int64                            the cache's key of the sample
``lse``        list[float32] (T)                the stored log-sum-exp per token
``token_ids``  list[list[int32]] (T × K)        top-k: the stored ids, −1 for padding;
                                                sampled: the unique drawn ids (ragged, no padding)
``logprobs``   list[list[float32]] (T × K)      top-k only: log-probabilities, −inf for padding
``counts``     list[list[int32]]                sampled only: the count of each id
=============  ===============================  ==================================================

The cache's provenance (the manifest's settings, teacher and dataset names, cache id) is stored as
JSON in the dataset's ``info.description``, under the key ``"fastkd_teacher_cache"``.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterator, Optional

import numpy as np
import torch

from .teacher import PAD_ID, SparseTeacher

INFO_KEY = "fastkd_teacher_cache"
# The manifest's keys that travel with an export and that an import restores.
EXPORTED = ("mode", "k", "num_samples", "sampling", "temperature", "vocab_size", "teacher", "dataset",
            "values_dtype", "cache_id", "format_version")
# Column names of other offline-KD tools (per position: K ids, K log-probabilities, K mask flags).
FOREIGN = ("target_token_ids", "target_logprobs", "target_mask")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of datasets
        return None
    return tqdm(total=total, desc=desc, unit="sample")


def _nested(pa, lengths_outer: np.ndarray, lengths_inner: np.ndarray, flat, value_type):
    """list<list<value>> from the outer lengths (positions per sample), the inner lengths (entries
    per position) and the flat values."""
    inner_off = np.zeros(len(lengths_inner) + 1, dtype=np.int32)
    np.cumsum(lengths_inner, out=inner_off[1:])
    outer_off = np.zeros(len(lengths_outer) + 1, dtype=np.int32)
    np.cumsum(lengths_outer, out=outer_off[1:])
    inner = pa.ListArray.from_arrays(pa.array(inner_off), pa.array(flat, type=value_type))
    return pa.ListArray.from_arrays(pa.array(outer_off), inner)


def _record_batches(cache, sids, batch_size: int, bar) -> Iterator:
    import pyarrow as pa

    man = cache.manifest
    topk = man["mode"] == "topk"
    for i in range(0, len(sids), batch_size):
        part = sids[i: i + batch_size]
        st, mask = cache.read(part, return_mask=True)
        lengths = mask.sum(1).numpy().astype(np.int64)
        keep = mask.reshape(-1).numpy()
        ids = st.ids.reshape(-1, st.k).numpy()[keep]
        lse = st.lse.reshape(-1).numpy()[keep]
        lse_off = np.zeros(len(part) + 1, dtype=np.int32)
        np.cumsum(lengths, out=lse_off[1:])
        cols = {"sample_id": pa.array(np.asarray(part, dtype=np.int64)),
                "lse": pa.ListArray.from_arrays(pa.array(lse_off), pa.array(lse, type=pa.float32()))}
        if topk:
            k = st.k
            per_pos = np.full(ids.shape[0], k, dtype=np.int64)
            cols["token_ids"] = _nested(pa, lengths, per_pos, ids.reshape(-1).astype(np.int32), pa.int32())
            vals = st.values.reshape(-1, k).numpy()[keep]
            cols["logprobs"] = _nested(pa, lengths, per_pos, vals.reshape(-1).astype(np.float32), pa.float32())
        else:
            counts = st.counts.reshape(-1, st.k).numpy()[keep]
            used = counts > 0
            per_pos = used.sum(1)
            cols["token_ids"] = _nested(pa, lengths, per_pos, ids[used].astype(np.int32), pa.int32())
            cols["counts"] = _nested(pa, lengths, per_pos, counts[used].astype(np.int32), pa.int32())
        if bar is not None:
            bar.update(len(part))
        yield pa.RecordBatch.from_pydict(cols)


def to_dataset(cache, sids, path: Optional[str] = None, *, batch_size: int = 256, progress: bool = True):
    """The samples ``sids`` of ``cache`` (a ``TeacherCache``) as a ``datasets.Dataset`` (see the
    module docstring for the layout).

    Samples are read ``batch_size`` at a time and appended to an Arrow stream file at ``path``
    (default: ``teacher.arrow`` in a new temporary directory), which the returned dataset memory-maps:
    memory stays bounded by one batch whatever the cache's size."""
    import datasets
    import pyarrow as pa

    if cache.manifest is None:
        raise ValueError(f"TeacherCache {cache.path!r} is empty (no manifest): nothing to export")
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="fastkd-dataset-"), "teacher.arrow")
    man = cache.manifest
    list2 = pa.list_(pa.list_(pa.int32()))
    fields = [("sample_id", pa.int64()), ("lse", pa.list_(pa.float32())), ("token_ids", list2)]
    fields.append(("logprobs", pa.list_(pa.list_(pa.float32()))) if man["mode"] == "topk" else ("counts", list2))
    schema = pa.schema(fields)
    bar = _progress(len(sids), "export", progress)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in _record_batches(cache, sids, batch_size, bar):
            writer.write_batch(batch)
    if bar is not None:
        bar.close()
    info = datasets.DatasetInfo(description=json.dumps({INFO_KEY: {key: man.get(key) for key in EXPORTED}}))
    return datasets.Dataset.from_file(path, info=info)


def provenance(dataset) -> Optional[dict]:
    """The cache settings recorded in an exported dataset's info, or None."""
    try:
        return json.loads(dataset.info.description or "")[INFO_KEY]
    except (ValueError, TypeError, KeyError):
        return None


def _flat(col):
    """A list<list<x>> column of one Arrow batch → (positions per sample, entries per position, values)."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    outer = arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    inner_arr = arr.flatten()
    if pa.types.is_list(inner_arr.type) or pa.types.is_large_list(inner_arr.type):
        inner = inner_arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        values = inner_arr.flatten().to_numpy(zero_copy_only=False)
    else:  # one value per position (a position mask)
        inner = None
        values = inner_arr.to_numpy(zero_copy_only=False)
    return outer, inner, values


def _dense(inner: np.ndarray, values: np.ndarray, width: int, fill, dtype) -> np.ndarray:
    """Ragged per-position entries → ``(positions, width)`` padded with ``fill``."""
    if inner.size and int(inner.max()) > width:
        raise ValueError(f"a position holds {int(inner.max())} entries, more than k = {width}")
    out = np.full((inner.shape[0], width), fill, dtype=dtype)
    row = np.repeat(np.arange(inner.shape[0]), inner)
    start = np.cumsum(inner) - inner
    col = np.arange(values.shape[0]) - np.repeat(start, inner)
    out[row, col] = values
    return out


def from_dataset(dataset, open_cache, *, batch_size: int = 256, progress: bool = True,
                 vocab_size: Optional[int] = None,
                 k: Optional[int] = None, temperature: Optional[float] = None, teacher: Optional[str] = None,
                 dataset_name: Optional[str] = None, values_dtype=None, sync: bool = True, **cache_kwargs):
    """A new (or extended) ``TeacherCache`` holding the rows of ``dataset``: ``open_cache(**settings)``
    opens it (``TeacherCache.from_dataset`` passes one for its ``path``).

    Accepted layouts: fastkd's own (the module docstring; its provenance comes from the dataset's
    info), or other tools' per-position ``target_token_ids`` (K ids), ``target_logprobs`` (their
    log-probabilities over the full vocabulary) and optional ``target_mask`` (per entry, or one flag
    per position), imported as a top-k cache through :meth:`SparseTeacher.from_logprobs` (so every
    row is checked) with ``k`` the widest position unless given. A ``sample_id`` column gives the
    keys (default: the row number). Settings given here must agree with the recorded provenance;
    ``vocab_size`` is required when the dataset records none.

    Rows are read ``batch_size`` at a time (as Arrow batches) and written as they come: memory stays
    bounded by one batch."""
    names = set(dataset.column_names)
    prov = provenance(dataset) or {}
    own = "token_ids" in names and ("logprobs" in names or "counts" in names)
    foreign = FOREIGN[0] in names and FOREIGN[1] in names
    if not own and not foreign:
        raise ValueError(f"dataset has columns {sorted(names)}: expected fastkd's (token_ids + logprobs, or "
                         f"token_ids + counts) or {FOREIGN[0]!r} + {FOREIGN[1]!r} (+ {FOREIGN[2]!r})")
    mode = "sample" if own and "counts" in names else "topk"

    def setting(name, given, default=None):
        have = prov.get(name)
        if given is not None and have is not None and given != have:
            raise ValueError(f"{name}={given!r} disagrees with the dataset's recorded {name}={have!r}")
        return given if given is not None else (have if have is not None else default)

    vocab_size = setting("vocab_size", vocab_size)
    if vocab_size is None:
        raise ValueError("vocab_size is required: the dataset records no fastkd provenance")
    temperature = setting("temperature", temperature, 1.0)
    kw = dict(mode=mode, vocab_size=vocab_size, temperature=temperature, teacher=setting("teacher", teacher),
              dataset=setting("dataset", dataset_name), sync=sync)
    if mode == "topk":
        kw["values_dtype"] = setting("values_dtype", values_dtype)
    else:
        kw["num_samples"] = setting("num_samples", cache_kwargs.pop("num_samples", None))
        kw["sampling"] = setting("sampling", cache_kwargs.pop("sampling", None))
        if kw["num_samples"] is None:
            raise ValueError("num_samples is required for a sampled cache whose dataset records none")
    kw.update(cache_kwargs)
    id_col, val_col = ("token_ids", "logprobs" if mode == "topk" else "counts") if own else FOREIGN[:2]
    if mode == "topk":
        k = setting("k", k)
        if k is None:  # the widest position of the dataset (one pass over the id column only)
            k = 1
            for tbl in dataset.select_columns([id_col]).with_format("arrow").iter(batch_size=batch_size):
                _, inner, _ = _flat(tbl.column(id_col))
                if inner.size:
                    k = max(k, int(inner.max()))
        kw["k"] = k
    cache = open_cache(**kw)
    try:
        _import_rows(cache, dataset, own, mode, id_col, val_col, vocab_size, temperature, batch_size, progress)
    except BaseException:
        cache.close()
        raise
    return cache


def _import_rows(cache, dataset, own, mode, id_col, val_col, vocab_size, temperature, batch_size, progress):
    names = set(dataset.column_names)
    man = cache.manifest
    bar = _progress(len(dataset), "import", progress)
    row0 = 0
    for tbl in dataset.with_format("arrow").iter(batch_size=batch_size):
        n = tbl.num_rows
        sids = (tbl.column("sample_id").to_numpy().astype(np.int64) if "sample_id" in names
                else np.arange(row0, row0 + n, dtype=np.int64))
        outer, inner, ids_flat = _flat(tbl.column(id_col))
        _, inner_v, vals_flat = _flat(tbl.column(val_col))
        if not np.array_equal(inner, inner_v):
            raise ValueError(f"columns {id_col!r} and {val_col!r} hold different numbers of entries per position "
                             f"(in the batch of rows {row0}..{row0 + n - 1})")
        pos_start = np.cumsum(outer) - outer
        if mode == "topk":
            k = man["k"]
            ids = torch.from_numpy(_dense(inner, ids_flat.astype(np.int64), k, PAD_ID, np.int64))
            vals = torch.from_numpy(_dense(inner, vals_flat.astype(np.float32), k, -np.inf, np.float32))
            mask = None
            if not own and FOREIGN[2] in names:
                _, inner_m, m_flat = _flat(tbl.column(FOREIGN[2]))
                m_flat = m_flat.astype(bool)
                if inner_m is None:   # one flag per position
                    mask = torch.from_numpy(np.repeat(m_flat[:, None], k, axis=1))
                else:
                    mask = torch.from_numpy(_dense(inner_m, m_flat, k, False, bool))
        else:
            width = min(man["num_samples"], man["vocab_size"])
            ids = torch.from_numpy(_dense(inner, ids_flat.astype(np.int64), width, PAD_ID, np.int64))
            counts = torch.from_numpy(_dense(inner, vals_flat.astype(np.int32), width, 0, np.int32))
        lse = None
        if own:
            lse_outer, _, lse_flat = _flat(tbl.column("lse"))
            lse = torch.from_numpy(lse_flat.astype(np.float32))
        # one write per run of equal lengths within the batch
        by_len = {}
        for b in range(n):
            by_len.setdefault(int(outer[b]), []).append(b)
        for length, rows in by_len.items():
            idx = torch.from_numpy(np.concatenate([np.arange(pos_start[b], pos_start[b] + length) for b in rows])
                                   .astype(np.int64)) if length else torch.zeros(0, dtype=torch.long)
            shape = (len(rows), length)
            if mode == "topk" and not own:
                st = SparseTeacher.from_logprobs(ids[idx].reshape(*shape, -1), vals[idx].reshape(*shape, -1),
                                                 vocab_size=vocab_size, temperature=temperature,
                                                 mask=None if mask is None else mask[idx].reshape(*shape, -1))
            elif mode == "topk":
                st = SparseTeacher("topk", ids[idx].reshape(*shape, -1), lse[idx].reshape(shape),
                                   temperature=temperature, vocab_size=vocab_size,
                                   values=vals[idx].reshape(*shape, -1), validate=False)
            else:
                st = SparseTeacher("sample", ids[idx].reshape(*shape, -1), lse[idx].reshape(shape),
                                   temperature=temperature, vocab_size=vocab_size,
                                   counts=counts[idx].reshape(*shape, -1), num_samples=man["num_samples"],
                                   validate=False)
            cache.write([int(sids[b]) for b in rows], st)  # checks every row (TeacherCache.write)
        row0 += n
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
