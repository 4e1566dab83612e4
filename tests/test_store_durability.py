"""``TeacherCache`` durability: every kind of damage to a cache file is repaired from redundant data
with a warning or reported by an error naming the file; rows reported written never silently
disappear. Targeted cases per file kind, then a seeded campaign (bench/cache_durability.py): writers
SIGKILLed at random moments over several rounds and restarted under the same names, then random
byte flips, truncations and deletions of every file of the cache, each trial checked."""
import importlib.util
import json
import os
import shutil
import struct
import warnings

import pytest
import torch
from conftest import teacher_logits as _logits

from fastkd.cache import FORMAT_VERSION, TeacherCache, TeacherCacheError, TeacherCacheWarning, capture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = 16  # bytes of one commit-log entry


def _row(i, v=200, k=8):
    return capture(_logits(4, v, seed=100 + i).reshape(1, 4, v), k=k)


def _fill(path, writer, ids, **kw):
    kw = dict(dict(k=8, vocab_size=200, teacher="t", dataset="d", values_dtype="float32"), **kw)
    c = TeacherCache(path, writer=writer, **kw)
    for i in ids:
        c.write([i], _row(i, kw["vocab_size"], kw["k"]))
    return c


def _all_back(path, ids, **kw):
    r = TeacherCache(path, readonly=True, **kw)
    for i in ids:
        got, want = r.read([i]), _row(i)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.values, want.values)
        assert torch.equal(got.lse, want.lse)
    return r


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "c"
    _fill(path, "a", [0, 1, 2]).close()
    _fill(path, "b", [10, 11]).close()
    return path


# ---- commit logs -----------------------------------------------------------------------------
def test_damaged_last_commit_entry_is_recovered_with_a_warning_and_rewritten(cache):
    log = cache / "shard-a.commit"
    raw = bytearray(log.read_bytes())
    assert len(raw) % ENTRY == 0 and len(raw) >= 3 * ENTRY
    raw[-ENTRY] ^= 0x40  # the last entry now claims another length and fails its checksum
    log.write_bytes(bytes(raw))
    with pytest.warns(TeacherCacheWarning, match="shard-a.commit.*checksum"):
        r = _all_back(cache, [0, 1, 2, 10, 11])
    assert r.missing([0, 1, 2]) == []
    with pytest.warns(TeacherCacheWarning, match="shard-a.commit.*rewrote"):
        w = _fill(cache, "a", [3])
    w.close()
    assert log.stat().st_size == ENTRY * 2  # one entry for the recovered length, one for row 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _all_back(cache, [0, 1, 2, 3, 10, 11])


def test_torn_last_commit_entry_is_never_appended_after(cache):
    log = cache / "shard-a.commit"
    with open(log, "ab") as f:  # a power cut in the middle of appending an entry
        f.write(struct.pack("<Q", (cache / "shard-a.fkd").stat().st_size)[:8])
    _all_back(cache, [0, 1, 2])
    with pytest.warns(TeacherCacheWarning, match="torn entry"):
        w = _fill(cache, "a", [3])
    w.write([4], _row(4))
    w.close()
    assert log.stat().st_size % ENTRY == 0
    _fill(cache, "a", [5]).close()
    _all_back(cache, [0, 1, 2, 3, 4, 5, 10, 11])


def test_deleted_commit_log_is_rebuilt_from_the_chunks(cache):
    os.unlink(cache / "shard-b.commit")
    with pytest.warns(TeacherCacheWarning, match="shard-b.commit is missing"):
        _all_back(cache, [0, 1, 2, 10, 11])
    with pytest.warns(TeacherCacheWarning, match="shard-b.commit is missing; rewrote"):
        _fill(cache, "b", [12]).close()
    assert (cache / "shard-b.commit").stat().st_size == 2 * ENTRY
    _all_back(cache, [0, 1, 2, 10, 11, 12])


def test_deleted_shard_with_its_commit_log_left_is_an_error(cache):
    os.unlink(cache / "shard-b.fkd")
    with pytest.raises(TeacherCacheError, match="shard-b.fkd is missing, but its commit log"):
        TeacherCache(cache, readonly=True)
    with pytest.warns(TeacherCacheWarning, match="shard-b.fkd is missing"):
        r = _all_back(cache, [0, 1, 2], skip_bad_shards=True)
    assert r.missing([10, 11]) == [10, 11]


def test_damage_in_the_middle_of_an_uncommitted_region_is_not_taken_for_a_torn_tail(cache):
    shard = cache / "shard-a.fkd"
    os.unlink(cache / "shard-a.commit")  # nothing vouches for the chunks any more ...
    raw = bytearray(shard.read_bytes())
    hsize = struct.unpack_from("<I", raw, 12)[0]
    raw[hsize + 2] ^= 0x01  # ... and the first chunk's header is damaged: the later chunks are intact
    shard.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TeacherCacheError, match="shard-a.fkd: corrupt chunk at byte .* complete chunk after it"):
            TeacherCache(cache, readonly=True)
    assert any("shard-a.commit is missing" in str(w.message) for w in caught)
    with pytest.raises(TeacherCacheError, match="shard-a.fkd: corrupt chunk"):
        TeacherCache(cache, writer="a")
    assert shard.stat().st_size == len(raw)  # the writer truncated nothing


# ---- torn-but-complete chunks and the writer lock -------------------------------------------------
def test_a_complete_chunk_without_its_commit_entry_is_seen_by_every_handle(cache):
    log = cache / "shard-a.commit"
    log.write_bytes(log.read_bytes()[:-ENTRY])  # killed between the chunk's fsync and its commit entry
    r = TeacherCache(cache, readonly=True)
    assert r.missing([0, 1, 2, 10]) == []

    def teacher():
        raise AssertionError("the teacher ran for rows that are stored")
    w = TeacherCache(cache, writer="a")
    assert torch.equal(w.get_or_capture([2, 0], teacher).ids, torch.cat([_row(2).ids, _row(0).ids]))
    w.close()
    assert log.stat().st_size == 3 * ENTRY  # the writer committed the chunk when it reopened its shard
    shards = {n: (cache / n).stat().st_size for n in ("shard-a.fkd", "shard-b.fkd")}
    c = TeacherCache(cache, writer="a")
    c.get_or_capture([0, 1, 2], teacher)
    c.close()
    assert {n: (cache / n).stat().st_size for n in shards} == shards  # nothing stored twice


def test_the_writer_lock_is_taken_when_the_handle_opens(tmp_path):
    first = TeacherCache(tmp_path / "l", k=8, vocab_size=200, writer="x")
    with pytest.raises(TeacherCacheError, match="shard-x.fkd is being written by another"):
        TeacherCache(tmp_path / "l", writer="x")
    first.write([0], _row(0))  # the first opener is the one that writes
    first.close()
    TeacherCache(tmp_path / "l", writer="x").close()
    TeacherCache(tmp_path / "l", writer="x", readonly=True).close()


# ---- the manifest ------------------------------------------------------------------------------
@pytest.mark.parametrize("damage,message", [
    (lambda t: t.encode()[:40] + b"\xff" + t.encode()[41:], "not UTF-8"),
    (lambda t: t[:-3].encode(), "not valid JSON"),
    (lambda t: b"[1, 2]", "JSON list where an object"),
    (lambda t: t.replace('"num_samples"', '"num_sample"').encode(), "missing key 'num_samples'"),
    (lambda t: t.replace('"vocab_size": 200', '"vocab_size": "200"').encode(), "vocab_size must be an int"),
    (lambda t: t.replace('"k": 8', '"k": 9').encode(), "checksum does not match"),
    (lambda t: t.replace('"format_version": 2', '"format_version": 1').encode(), "format version 1"),
])
def test_every_kind_of_manifest_damage_names_the_file(cache, damage, message):
    man = cache / "manifest.json"
    man.write_bytes(damage(man.read_text()))
    for kw in (dict(readonly=True), dict(writer="a"), dict(writer="c", k=8, teacher="t")):
        with pytest.raises(TeacherCacheError, match="manifest.json.*" + message):
            TeacherCache(cache, **kw)


def test_deleted_manifest_is_rebuilt_from_the_shard_headers(cache):
    original = json.loads((cache / "manifest.json").read_text())
    os.unlink(cache / "manifest.json")
    with pytest.warns(TeacherCacheWarning, match="manifest.json is missing; using the settings.*shard-a.fkd"):
        r = _all_back(cache, [0, 1, 2, 10, 11])
    assert r.manifest["teacher"] == "t" and not (cache / "manifest.json").exists()  # readonly wrote nothing
    with pytest.raises(ValueError, match="teacher: cache has 't', asked for 'other'"):
        TeacherCache(cache, writer="c", teacher="other")
    assert not (cache / "manifest.json").exists()  # never a manifest the shards contradict
    with pytest.warns(TeacherCacheWarning, match="rebuilt it from the headers of shard-a.fkd, shard-b.fkd"):
        w = TeacherCache(cache, writer="c")  # teacher and dataset left as None: taken from the shards
    w.write([20], _row(20))
    w.close()
    rebuilt = json.loads((cache / "manifest.json").read_text())
    for key in ("cache_id", "teacher", "dataset", "k", "vocab_size", "temperature", "values_dtype"):
        assert rebuilt[key] == original[key]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _all_back(cache, [0, 1, 2, 10, 11, 20], k=8, teacher="t", dataset="d")


def test_missing_manifest_with_shards_that_disagree_is_an_error(tmp_path, cache):
    _fill(tmp_path / "other", "z", [30], teacher="u").close()
    shutil.copy(tmp_path / "other" / "shard-z.fkd", cache / "shard-z.fkd")
    os.unlink(cache / "manifest.json")
    with pytest.raises(TeacherCacheError, match="manifest.json is missing, and the shards disagree.*shard-z.fkd"):
        TeacherCache(cache, readonly=True)


# ---- foreign shards and duplicate ids ---------------------------------------------------------
@pytest.mark.parametrize("other,what", [(dict(teacher="u"), "teacher: shard has 'u', manifest 't'"),
                                        (dict(k=4), "k: shard has 4, manifest 8"),
                                        (dict(), "belongs to another cache")])
def test_a_foreign_shard_is_named_and_can_be_skipped(tmp_path, cache, other, what):
    _fill(tmp_path / "other", "z", [30], **other).close()
    for suffix in (".fkd", ".commit"):
        shutil.copy(tmp_path / "other" / f"shard-z{suffix}", cache / f"shard-z{suffix}")
    with pytest.raises(TeacherCacheError, match=f"shard-z.fkd does not belong with .*manifest.json.*{what}"):
        TeacherCache(cache, readonly=True)
    with pytest.warns(TeacherCacheWarning, match="skipping .*shard-z.fkd"):
        r = _all_back(cache, [0, 1, 2, 10, 11], skip_bad_shards=True)
    assert 30 not in r and len(r) == 5


def test_one_sample_in_two_shards(cache):
    w = _fill(cache, "c", [])
    w._index.pop(1)  # as if it had captured sample 1 before seeing shard a's copy
    w.write([1], _row(1))  # the same data: one copy serves
    w.close()
    r = _all_back(cache, [0, 1, 2, 10, 11])
    assert len(r) == 5
    w = _fill(cache, "d", [])
    w._index.pop(2)
    w.write([2], _row(7))  # other data under the same id
    w.close()
    with pytest.raises(TeacherCacheError, match="sample 2 is stored with different data in .*shard-a.fkd and "
                                                ".*shard-d.fkd"):
        TeacherCache(cache, readonly=True)
    with pytest.warns(TeacherCacheWarning, match="sample 2 .*reading the copy in .*shard-a.fkd"):
        _all_back(cache, [0, 1, 2, 10, 11], skip_bad_shards=True)


def test_old_format_shard_is_named(cache):
    shard = cache / "shard-b.fkd"
    raw = bytearray(shard.read_bytes())
    struct.pack_into("<I", raw, 8, FORMAT_VERSION - 1)
    shard.write_bytes(bytes(raw))
    with pytest.raises(TeacherCacheError, match=f"shard-b.fkd: a shard of format version {FORMAT_VERSION - 1}"):
        TeacherCache(cache, readonly=True)


# ---- the campaign ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def campaign():
    spec = importlib.util.spec_from_file_location("fastkd_cache_durability",
                                                  os.path.join(ROOT, "bench", "cache_durability.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_killed_writers_and_damaged_files_never_lose_a_reported_row(tmp_path, campaign):
    kills = campaign.run_kills(str(tmp_path / "cache"), writers=2, rounds=3, ids_per_writer=60, batch=2,
                               kill_writes=8, kill_delay=0.05, seed=7, snapshot=str(tmp_path / "snapshot"))
    stats = kills["stats"]
    assert kills["failures"] == []
    assert stats["kills"] >= 3 and stats["rows reported"] == 120  # the finishing round completes every id
    assert stats["rows lost"] == stats["rows wrong"] == stats["rows stored twice"] == 0
    assert len(kills["snapshot_reported"]) > 0
    records = campaign.run_damage(str(tmp_path / "snapshot"), kills["snapshot_reported"], str(tmp_path / "t"),
                                  trials=18, seed=7)
    assert {r["kind"] for r in records} == set(campaign.FILE_KINDS)
    for r in records:  # per trial: a clear error naming the file, or every reported row back exactly
        assert r["outcome"] in ("error", "repaired", "intact"), r
        assert r["writer_outcome"] in ("error", "repaired", "intact"), r
    outcomes = {(r["kind"], r["outcome"]) for r in records}
    assert ("shard", "error") in outcomes and ("manifest", "error") in outcomes
    assert ("manifest", "repaired") in outcomes  # the deleted manifest: rebuilt from the shard headers
