"""Durability campaign of the teacher cache: writers killed at random moments, then every kind of cache
file damaged at random, each outcome checked.

Two parts, both driven by one seeded RNG:

* kills: ``--writers`` writer processes (named w0, w1, ...) fill one cache through ``get_or_capture``,
  each with its own sample ids, in small synchronous writes. Each round starts them under the same
  names and SIGKILLs each at a random moment after it starts opening the cache (so kills land in
  recovery, mid-write, between a chunk and its commit entry); this process reads along, checking every
  row it can see. After each round every row a writer reported written must read back exactly and no
  row may be stored twice. A last round lets the writers finish: then every id is stored exactly once.
* damage: copies of the cache as the last kill left it, each with one file damaged: a shard, a commit
  log or the manifest, with random bytes flipped, truncated at a random length, or deleted. Each trial
  opens a reader, then a writer (which recovers the damaged shard and writes one more row), then a
  reader again. Each step must end in a ``TeacherCacheError`` naming the damaged file, or with every
  reported row read back exactly (with a warning naming the file when something was repaired).

    python bench/cache_durability.py                          # a few minutes on 2 CPU cores
    python bench/cache_durability.py --rounds 3 --trials 10   # under a minute

Prints the counts (kills, rows written, rows lost, trials per file kind and outcomes); exits 1 if any
trial or round failed. ``tests/test_store_durability.py`` runs a short seeded form.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from typing import Callable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from fastkd.cache import TeacherCache, TeacherCacheError, TeacherCacheWarning, capture  # noqa: E402
from fastkd.cache import store  # noqa: E402

V, T, K = 300, 6, 8  # vocabulary, tokens per sample, top-k: small rows, many chunks
FILE_KINDS = ("shard", "commit", "manifest")
DAMAGES = ("flip", "truncate", "delete")

_WRITER = r"""
import sys, torch
from fastkd.cache import TeacherCache, capture
path, name = sys.argv[1], sys.argv[2]
ids = [int(s) for s in sys.argv[3].split(",")]
batch, seed, V, T, K = (int(a) for a in sys.argv[4:9])
capture(torch.randn(1, V), k=K)  # load the kernels first: the kill clock starts when the cache opens
print("READY", flush=True)
cache = TeacherCache(path, k=K, vocab_size=V, values_dtype="float32", teacher="durability-teacher",
                     dataset=f"seed{seed}", writer=name)

def logits_of(sids):
    return torch.stack([torch.randn(T, V, generator=torch.Generator().manual_seed(seed * 1000003 + s)) for s in sids])

for i in range(0, len(ids), batch):
    part = ids[i:i + batch]
    made = []

    def teacher(pos):
        made.extend(part[p] for p in pos.tolist())
        return logits_of([part[p] for p in pos.tolist()])
    cache.get_or_capture(part, teacher)
    print("W", len(made), *part, flush=True)
cache.close()
print("DONE", flush=True)
"""


def expected_row(sid: int, seed: int):
    """The rows a writer stores for sample ``sid`` (values kept as float32, so comparisons are exact)."""
    g = torch.Generator().manual_seed(seed * 1000003 + sid)
    return capture(torch.randn(1, T, V, generator=g), k=K)


def row_matches(cache: TeacherCache, sid: int, seed: int) -> bool:
    got, want = cache.read([sid]), expected_row(sid, seed)
    return (torch.equal(got.ids, want.ids) and torch.equal(got.values, want.values)
            and torch.equal(got.lse, want.lse))


def stored_rows(path: str) -> Counter:
    """How many times each sample id is stored, over the valid chunks of every shard."""
    seen: Counter = Counter()
    for name in sorted(os.listdir(path)):
        if not (name.startswith("shard-") and name.endswith(".fkd")):
            continue
        p = os.path.join(path, name)
        head = store._read_shard_header(p)
        if head is None:
            continue
        size, pos = os.path.getsize(p), head[1]
        with open(p, "rb") as f:
            while pos < size:
                why, end, table = TeacherCache._read_chunk(f, pos, size, True, 0)
                if why is not None:
                    break
                seen.update(int(s) for s in table["sid"])
                pos = end
    return seen


class _Writer:
    """One writer subprocess and the lines it printed (read by a thread)."""

    def __init__(self, path: str, name: str, ids: List[int], batch: int, seed: int):
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.proc = subprocess.Popen([sys.executable, "-c", _WRITER, path, name, ",".join(map(str, ids)),
                                      str(batch), str(seed), str(V), str(T), str(K)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self.lines: List[str] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            if not line.endswith("\n"):
                break  # cut short by the kill: not a report
            self.lines.append(line.split())
            if line.startswith("READY"):
                self.ready.set()
        self.ready.set()

    def writes(self) -> int:
        """Reported calls that stored rows (not the ones that found their rows already stored)."""
        return sum(1 for line in list(self.lines) if line[0] == "W" and int(line[1]) > 0)

    def finish(self, kill: Optional[tuple]) -> bool:
        """``kill = (n, delay)``: SIGKILL the writer ``delay`` seconds after its ``n``-th write this
        round (``n`` = 0: after it starts opening the cache); None: let it end. True if it was killed
        before it finished."""
        self.ready.wait(120)
        killed = False
        if kill is not None:
            n, delay = kill
            while self.proc.poll() is None and self.writes() < n:
                time.sleep(0.002)
            time.sleep(delay)
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                killed = True
        self.proc.wait(timeout=300)
        self.thread.join(timeout=30)
        err = self.proc.stderr.read()
        if not killed and self.proc.returncode != 0:
            raise RuntimeError(f"a writer failed (exit {self.proc.returncode}):\n{err}")
        return killed


def run_kills(path: str, *, writers: int = 2, rounds: int = 3, ids_per_writer: int = 40, batch: int = 2,
              kill_writes: int = 8, kill_delay: float = 0.05, seed: int = 0, snapshot: Optional[str] = None,
              progress: Optional[Callable[[], None]] = None) -> dict:
    """Kill rounds then a finishing round on the cache at ``path``. Each writer is killed at a random
    moment: after 0 .. ``kill_writes`` writes of the round, plus 0 .. ``kill_delay`` seconds (so the kill
    lands in recovery, inside a write, or between a chunk and its commit entry, whatever the machine's
    speed). ``snapshot``: a copy of the cache as the last kill left it. Returns the counts and the
    failures (each a message)."""
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)
    names = [f"w{w}" for w in range(writers)]
    ids = {n: [w + writers * i for i in range(ids_per_writer)] for w, n in enumerate(names)}
    reported: set = set()
    stats = Counter()
    failures: List[str] = []
    snapshot_reported: set = set()
    verified: set = set()
    for r in range(rounds + 1):
        last = r == rounds
        procs = {n: _Writer(path, n, ids[n], batch, seed) for n in names}
        delays = {n: None if last else (rng.randint(0, kill_writes), rng.uniform(0, kill_delay)) for n in names}
        done = {}
        threads = [threading.Thread(target=lambda n=n: done.__setitem__(n, procs[n].finish(delays[n])))
                   for n in names]
        for t in threads:
            t.start()
        reader = None
        while any(t.is_alive() for t in threads):  # read along while the writers run and die
            try:
                if reader is None:
                    reader = TeacherCache(path, readonly=True)
                reader.refresh()
                for sid in sorted(set(reader._index) - verified):
                    if not row_matches(reader, sid, seed):
                        failures.append(f"round {r}: a reader read wrong data for sample {sid}")
                    verified.add(sid)
            except (TeacherCacheError, KeyError, ValueError) as exc:
                failures.append(f"round {r}: a reader failed while writers ran: {type(exc).__name__}: {exc}")
                break
            time.sleep(0.05)
        for t in threads:
            t.join()
        if reader is not None:
            reader.close()
        stats["kills"] += sum(done.values())
        for n in names:
            for line in procs[n].lines:
                if line[0] == "W":
                    stats["rows written"] += int(line[1])
                    reported.update(int(s) for s in line[2:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TeacherCacheWarning)
            try:
                check = TeacherCache(path, readonly=True)
            except TeacherCacheError as exc:
                failures.append(f"round {r}: the cache does not open after the kills: {exc}")
                break
            lost = [s for s in sorted(reported) if s not in check]
            wrong = [s for s in sorted(reported) if s in check and not row_matches(check, s, seed)]
            check.close()
        twice = {s: c for s, c in stored_rows(path).items() if c > 1}
        stats["rows lost"] += len(lost)
        stats["rows wrong"] += len(wrong)
        stats["rows stored twice"] += len(twice)
        if lost or wrong or twice:
            failures.append(f"round {r}: lost {lost[:8]}, wrong {wrong[:8]}, stored twice {sorted(twice)[:8]}")
        if not last and snapshot is not None:
            if os.path.exists(snapshot):
                shutil.rmtree(snapshot)
            shutil.copytree(path, snapshot)
            snapshot_reported = set(reported)
        if progress is not None:
            progress()
    want = {s for n in names for s in ids[n]}
    if reported != want:
        failures.append(f"the finishing round left {len(want - reported)} ids unreported")
    stats["rows reported"] = len(reported)
    return {"stats": stats, "failures": failures, "snapshot_reported": snapshot_reported}


def _damage(path: str, op: str, rng: random.Random) -> str:
    if op == "delete":
        os.unlink(path)
        return "deleted"
    data = bytearray(open(path, "rb").read())
    if op == "truncate":
        size = len(data)
        n = rng.randrange(size) if size else 0
        del data[n:]
        what = f"truncated to {n} of {size} bytes"
    else:
        if not data:
            return "empty: nothing to flip"
        where = sorted(rng.randrange(len(data)) for _ in range(rng.randint(1, 3)))
        for p in where:
            data[p] ^= rng.randrange(1, 256)
        what = f"flipped bytes at {where}"
    with open(path, "wb") as f:
        f.write(bytes(data))
    return what


def _judge(path: str, damaged: str, must: set, seed: int, step: Callable[[], set]) -> tuple:
    """Run ``step`` (returns the ids that must then read back) and classify what happened."""
    name = os.path.basename(damaged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            extra = step()
            reader = TeacherCache(path, readonly=True)
            try:
                lost = [s for s in sorted(must | extra) if s not in reader]
                wrong = [s for s in sorted(must | extra) if s in reader and not row_matches(reader, s, seed)]
                wrong += [s for s in sorted(set(reader._index) - must - extra) if not row_matches(reader, s, seed)]
            finally:
                reader.close()
        except TeacherCacheError as exc:
            return ("error", "") if name in str(exc) else ("FAIL", f"error not naming {name}: {exc}")
        except Exception as exc:  # noqa: BLE001 (anything else is a failure of the trial)
            return "FAIL", f"{type(exc).__name__}: {exc}"
    if lost or wrong:
        return "FAIL", f"rows lost {lost[:8]}, wrong {wrong[:8]}"
    notes = [str(w.message) for w in caught if issubclass(w.category, TeacherCacheWarning)]
    if notes:
        return ("repaired", "") if any(name in n for n in notes) else ("FAIL", f"warning not naming {name}: {notes}")
    return "intact", ""


def run_damage(base: str, reported: set, work: str, *, trials: int = 20, seed: int = 0,
               progress: Optional[Callable[[], None]] = None) -> List[dict]:
    """``trials`` damage trials per file kind on copies of the cache ``base`` whose rows ``reported``
    were reported written; one record per trial."""
    rng = random.Random(seed + 1)
    files = {"shard": [], "commit": [], "manifest": []}
    for name in sorted(os.listdir(base)):
        if name == store.MANIFEST_NAME:
            files["manifest"].append(name)
        elif name.startswith("shard-") and name.endswith(".fkd"):
            files["shard"].append(name)
        elif name.startswith("shard-") and name.endswith(".commit"):
            files["commit"].append(name)
    records = []
    new_sid = 10 ** 6
    for kind in FILE_KINDS:
        for i in range(trials):
            if not files[kind]:
                break
            name = rng.choice(files[kind])
            op = DAMAGES[i % len(DAMAGES)] if i < len(DAMAGES) else rng.choice(("flip", "flip", "truncate"))
            trial = os.path.join(work, f"{kind}-{i}")
            shutil.copytree(base, trial)
            damaged = os.path.join(trial, name)
            what = _damage(damaged, op, rng)
            writer = name[len("shard-"):].rsplit(".", 1)[0] if kind != "manifest" else "w0"
            new_sid += 1

            def read_step():
                TeacherCache(trial, readonly=True).close()
                return set()

            def write_step(sid=new_sid):
                # the capture settings a restarted writer passes; teacher and dataset left unset
                with TeacherCache(trial, writer=writer, k=K, vocab_size=V, values_dtype="float32") as c:
                    c.write([sid], expected_row(sid, seed))
                return {sid}
            outcome, detail = _judge(trial, damaged, reported, seed, read_step)
            w_outcome, w_detail = _judge(trial, damaged, reported, seed, write_step)
            records.append(dict(kind=kind, file=name, damage=op, what=what, outcome=outcome, detail=detail,
                                writer_outcome=w_outcome, writer_detail=w_detail))
            shutil.rmtree(trial)
            if progress is not None:
                progress()
    return records


def summarise(kills: dict, records: List[dict]) -> str:
    s = kills["stats"]
    lines = [f"kills: {s['kills']}  rows written: {s['rows written']}  rows reported: {s['rows reported']}  "
             f"rows lost: {s['rows lost']}  rows wrong: {s['rows wrong']}  rows stored twice: "
             f"{s['rows stored twice']}  round failures: {len(kills['failures'])}"]
    lines.append(f"{'file kind':<10}{'damage':<10}{'trials':>7}   reader outcomes / writer outcomes")
    for kind in FILE_KINDS:
        for op in DAMAGES:
            rs = [r for r in records if r["kind"] == kind and r["damage"] == op]
            if not rs:
                continue
            a = Counter(r["outcome"] for r in rs)
            b = Counter(r["writer_outcome"] for r in rs)
            fmt = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items()))  # noqa: E731
            lines.append(f"{kind:<10}{op:<10}{len(rs):>7}   {fmt(a)} / {fmt(b)}")
    per_kind = Counter(r["kind"] for r in records)
    lines.append("trials per file kind: " + ", ".join(f"{k} {per_kind[k]}" for k in FILE_KINDS))
    for r in records:
        if "FAIL" in (r["outcome"], r["writer_outcome"]):
            lines.append(f"FAIL {r['kind']} {r['file']} {r['what']}: {r['detail'] or r['writer_detail']}")
    for f in kills["failures"]:
        lines.append("FAIL " + f)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="kill rounds (default 20)")
    ap.add_argument("--writers", type=int, default=3, help="writer processes per round (default 3)")
    ap.add_argument("--ids-per-writer", type=int, default=500, help="sample ids each writer stores (default 500)")
    ap.add_argument("--batch", type=int, default=2, help="samples per get_or_capture call (default 2)")
    ap.add_argument("--kill-writes", type=int, default=20,
                    help="kill each writer after 0 .. this many writes of a round (default 20) ...")
    ap.add_argument("--kill-delay", type=float, default=0.05,
                    help="... plus 0 .. this many seconds (default 0.05)")
    ap.add_argument("--trials", type=int, default=200, help="damage trials per file kind (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    work = args.dir or tempfile.mkdtemp(prefix="fastkd-durability-")
    os.makedirs(work, exist_ok=True)
    try:
        with tqdm(total=args.rounds + 1 + args.trials * len(FILE_KINDS), unit="step") as bar:
            bar.set_description("kill rounds")
            kills = run_kills(os.path.join(work, "cache"), writers=args.writers, rounds=args.rounds,
                              ids_per_writer=args.ids_per_writer, batch=args.batch, kill_writes=args.kill_writes,
                              kill_delay=args.kill_delay,
                              seed=args.seed, snapshot=os.path.join(work, "snapshot"), progress=bar.update)
            bar.set_description("damage trials")
            records = run_damage(os.path.join(work, "snapshot"), kills["snapshot_reported"],
                                 os.path.join(work, "trials"), trials=args.trials, seed=args.seed,
                                 progress=bar.update) if os.path.isdir(os.path.join(work, "snapshot")) else []
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(summarise(kills, records))
    failed = kills["failures"] or any("FAIL" in (r["outcome"], r["writer_outcome"]) for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
