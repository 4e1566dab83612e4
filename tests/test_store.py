"""``TeacherCache``: the persistent store of sparse teachers (round trips, the manifest's checks,
crash safety, several writers, bytes per token)."""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import teacher_logits as _logits

import fastkd
from fastkd.cache import TeacherCache, TeacherCacheError, capture


def test_cache_roundtrip_topk_and_get_or_capture(tmp_path):
    logits = _logits(6 * 5, 1000, torch.float32, 3.0, seed=20).reshape(6, 5, 1000)
    calls = []

    def teacher():
        calls.append(1)
        return logits

    c = TeacherCache(tmp_path / "c", k=16, temperature=2.0, teacher="unit-test", dataset="abc")
    st = c.get_or_capture([10, 11, 12, 13, 14, 15], teacher)
    ref = capture(logits, k=16, temperature=2.0)
    assert st.shape == (6, 5) and torch.equal(st.ids, ref.ids)
    torch.testing.assert_close(st.lse, ref.lse, rtol=0, atol=0)                    # float32 lse
    torch.testing.assert_close(st.values, ref.values.half().float(), rtol=0, atol=0)  # float16 values
    st2 = c.get_or_capture([12, 10], teacher)  # all stored: the teacher does not run
    assert len(calls) == 1 and torch.equal(st2.ids, ref.ids[[2, 0]])
    # one-argument form: called with the positions of the missing rows only
    seen = []
    st3 = c.get_or_capture([11, 99, 10, 98], lambda pos: (seen.append(pos.tolist()), logits[[0, 1]])[1])
    assert seen == [[1, 3]] and torch.equal(st3.ids[[1, 3]], ref.ids[[0, 1]])
    assert "bytes/token" in repr(c) and len(c) == 8
    # a batch holding one missing sample twice stores it once
    st4 = c.get_or_capture([50, 51, 50], lambda: logits[[0, 1, 0]])
    assert len(c) == 10 and torch.equal(st4.ids[2], ref.ids[0])
    c.close()
    r = TeacherCache(tmp_path / "c", readonly=True)
    assert torch.equal(r.read([15]).ids, ref.ids[[5]])
    with pytest.raises(KeyError, match="1234"):
        r.read([1234])


def test_cache_roundtrip_sample(tmp_path):
    logits = _logits(4 * 8, 300, torch.float32, 2.0, seed=21).reshape(4, 8, 300)
    g = torch.Generator().manual_seed(3)
    with TeacherCache(tmp_path / "s", mode="sample", num_samples=20) as c:
        st = c.get_or_capture(range(4), lambda: logits, generator=g)
    ref = capture(logits, mode="sample", num_samples=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(st.ids, ref.ids) and torch.equal(st.counts, ref.counts)
    torch.testing.assert_close(st.lse, ref.lse, rtol=0, atol=0)


@pytest.mark.parametrize("kw,field", [(dict(k=32), "k"), (dict(temperature=1.0), "temperature"),
                                      (dict(teacher="other"), "teacher"), (dict(vocab_size=999), "vocab_size"),
                                      (dict(mode="sample"), "mode")])
def test_cache_manifest_mismatch(tmp_path, kw, field):
    c = TeacherCache(tmp_path / "m", k=8, temperature=2.0, teacher="t", vocab_size=100)
    c.write([0], capture(_logits(3, 100).reshape(1, 3, 100), k=8, temperature=2.0))
    c.close()
    with pytest.raises(ValueError, match=f"manifest.json.*{field}"):
        TeacherCache(tmp_path / "m", **kw)
    c = TeacherCache(tmp_path / "m")
    with pytest.raises(ValueError, match="does not match"):
        c.write([1], capture(_logits(3, 100).reshape(1, 3, 100), k=4, temperature=2.0))
    with pytest.raises(ValueError, match="already stored"):
        c.write([0], capture(_logits(3, 100).reshape(1, 3, 100), k=8, temperature=2.0))


def _fill(path, writer, ids, seed=0, **kw):
    c = TeacherCache(path, k=8, vocab_size=200, writer=writer, **kw)
    for i in ids:
        c.write([i], capture(_logits(4, 200, seed=seed + i).reshape(1, 4, 200), k=8))
    return c


def test_cache_torn_tail_resumes_and_corruption_is_an_error(tmp_path):
    path = tmp_path / "d"
    c = _fill(path, "w", range(3))
    c.close()
    shard = path / "shard-w.fkd"
    good_size = shard.stat().st_size
    raw = shard.read_bytes()
    first_chunk = struct.unpack_from("<I", raw, 12)[0]  # the header's size
    with open(shard, "ab") as f:  # a crash mid-write: half a chunk past the commit log
        f.write(raw[first_chunk:first_chunk + 100])
    r = TeacherCache(path, readonly=True)  # readers ignore what was never committed
    assert sorted(r._index) == [0, 1, 2]
    c = _fill(path, "w", [3])  # the writer drops the torn tail and resumes
    assert sorted(c._index) == [0, 1, 2, 3]
    c.close()
    assert shard.stat().st_size > good_size
    r = TeacherCache(path, readonly=True)
    for i in range(4):
        assert torch.equal(r.read([i]).ids, capture(_logits(4, 200, seed=i).reshape(1, 4, 200), k=8).ids)

    # a flipped byte inside a committed row: a clear error naming the shard
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = TeacherCache(path, readonly=True)
    with pytest.raises(TeacherCacheError, match="shard-w.fkd"):
        r.read([3])
    # a truncated shard (shorter than its commit log): an error naming the shard
    shard.write_bytes(bytes(data[:-20]))
    with pytest.raises(TeacherCacheError, match="shard-w.fkd.*truncated"):
        TeacherCache(path, readonly=True)


def test_cache_several_writers_and_lock(tmp_path):
    path = tmp_path / "multi"
    a = _fill(path, "rank0", [0, 2, 4])
    b = _fill(path, "rank1", [1, 3])
    with pytest.raises(TeacherCacheError, match="shard-rank0.fkd is being written by another"):
        _fill(path, "rank0", [7])
    r = TeacherCache(path, readonly=True)
    assert sorted(r._index) == [0, 1, 2, 3, 4]
    st = r.read([4, 1])
    assert torch.equal(st.ids[1], capture(_logits(4, 200, seed=1).reshape(1, 4, 200), k=8).ids[0])
    b.write([5], capture(_logits(4, 200, seed=5).reshape(1, 4, 200), k=8))
    assert 5 in r.missing([5]) and torch.equal(r.read([5]).ids, b.read([5]).ids)  # read() refreshes
    a.close()
    b.close()


def test_cache_bytes_per_token_topk64_v128k(tmp_path):
    v = 128256
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 24, v, generator=g).to(torch.bfloat16)
    with TeacherCache(tmp_path / "b", k=64, sync=False) as c:
        c.write([0, 1], capture(t, k=64))
        assert c.manifest["id_bits"] == 17
        assert c.bytes_per_token <= 272
        back = c.read([1])
    assert torch.equal(back.ids, capture(t[1:], k=64).ids)


_WRITER = textwrap.dedent("""
    import sys, torch
    from fastkd.cache import TeacherCache, capture
    path = sys.argv[1]
    c = TeacherCache(path, k=32, vocab_size=3000, writer="victim")
    i = 0
    while True:
        ids = list(range(4 * i, 4 * i + 4))
        g = torch.Generator().manual_seed(i)
        logits = torch.randn(4, 64, 3000, generator=g)
        c.write(ids, capture(logits, k=32))
        print("W", i, flush=True)
        i += 1
""")


def test_killed_writer_loses_nothing_reported(tmp_path):
    path = str(tmp_path / "kill")
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fastkd.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([pkg_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.Popen([sys.executable, str(script), path], stdout=subprocess.PIPE, env=env, text=True)
    reported = []
    try:
        deadline = time.time() + 60
        while len(reported) < 6 and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            reported.append(int(line.split()[1]))
        time.sleep(0.013)  # land somewhere inside a later write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for line in proc.stdout:  # lines printed before the kill still count as reported
            reported.append(int(line.split()[1]))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(reported) >= 6, "the writer did not get going"

    def expect(i):
        g = torch.Generator().manual_seed(i)
        return capture(torch.randn(4, 64, 3000, generator=g), k=32)

    r = TeacherCache(path, readonly=True)
    for i in reported:
        st = r.read(list(range(4 * i, 4 * i + 4)))
        assert torch.equal(st.ids, expect(i).ids)
    # the same writer reopens its shard, drops any torn tail, and goes on
    w = TeacherCache(path, writer="victim")
    nxt = max(w._index) // 4 + 1
    w.write(list(range(4 * nxt, 4 * nxt + 4)), expect(nxt))
    w.close()
    r = TeacherCache(path, readonly=True)
    assert torch.equal(r.read(list(range(4 * nxt, 4 * nxt + 4))).ids, expect(nxt).ids)
    for i in reported:
        assert torch.equal(r.read(list(range(4 * i, 4 * i + 4))).ids, expect(i).ids)


def test_cache_writer_torn_before_header_complete(tmp_path):
    path = tmp_path / "h"
    _fill(path, "w", [0]).close()
    (path / "shard-x.fkd").write_bytes(b"FKDSH")  # a writer died while writing its shard header
    r = TeacherCache(path, readonly=True)
    assert sorted(r._index) == [0]
    c = _fill(path, "x", [1])
    c.close()
    r = TeacherCache(path, readonly=True)
    assert sorted(r._index) == [0, 1]
    assert torch.equal(r.read([1]).ids, capture(_logits(4, 200, seed=1).reshape(1, 4, 200), k=8).ids)


def test_cache_sampling_setting(tmp_path):
    logits = _logits(2 * 8, 300, torch.float32, 2.0, seed=21).reshape(2, 8, 300)
    with TeacherCache(tmp_path / "s", mode="sample", num_samples=20, sampling="systematic") as c:
        st = c.get_or_capture(range(2), lambda: logits, generator=torch.Generator().manual_seed(3))
        assert "sampling='systematic'" in repr(c)
    ref = capture(logits, mode="sample", num_samples=20, sampling="systematic",
                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(st.ids, ref.ids) and torch.equal(st.counts, ref.counts)
    assert TeacherCache(tmp_path / "s").manifest["sampling"] == "systematic"
    with pytest.raises(ValueError, match="manifest.json.*sampling"):
        TeacherCache(tmp_path / "s", sampling="iid")
    # a manifest that lost its sampling key is damaged, not a cache of some default
    man_path = tmp_path / "s" / "manifest.json"
    man = json.loads(man_path.read_text())
    del man["sampling"]
    man_path.write_text(json.dumps(man))
    with pytest.raises(TeacherCacheError, match="manifest.json is damaged: missing key 'sampling'"):
        TeacherCache(tmp_path / "s", readonly=True)
    with pytest.raises(ValueError, match="sampling must be one of"):
        TeacherCache(tmp_path / "x", mode="sample", sampling="stratified")
