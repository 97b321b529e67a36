"""Dynamic shard claiming (shards/claims.py, map_shards(assign="dynamic")): claims are
exclusive, kept alive by a heartbeat, taken over when their owner stops, and four worker
processes of which one is SIGKILLed mid-shard commit every shard exactly once."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from guidealign.shards import (claims, committed, iter_tables, map_shards, read_marker, read_table,
                    write_manifest, write_shard)

TESTS = Path(__file__).resolve().parent


def make_input(src: Path, n_shards: int, rows: int = 5) -> None:
    write_manifest(src, stage="src", num_shards=n_shards, fingerprint="in")
    for i in range(n_shards):
        write_shard(src, i, pa.table({"id": [f"{i}-{j}" for j in range(rows)],
                                      "x": list(range(rows))}), "in")


def foreign_claim(dst: Path, index: int, age_s: float) -> Path:
    """A claim left by a worker on another host, last heartbeat ``age_s`` seconds ago."""
    p = claims.claim_path(dst, index)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"owner": "elsewhere:1:x", "host": "another-host-" + socket.gethostname(),
                             "pid": 1, "pidns": "0", "claimed_at": 0}))
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


# --- claims --------------------------------------------------------------------------------

def test_a_claim_is_exclusive_until_released(tmp_path):
    a = claims.try_claim(tmp_path, 3, ttl_s=60, owner="a")
    assert a is not None and a.held()
    assert json.loads(claims.claim_path(tmp_path, 3).read_text())["owner"] == "a"
    assert claims.try_claim(tmp_path, 3, ttl_s=60, owner="b") is None
    other = claims.try_claim(tmp_path, 4, ttl_s=60, owner="b")
    assert other is not None  # other shards are free
    other.release()
    a.release()
    assert not claims.claim_path(tmp_path, 3).exists()
    b = claims.try_claim(tmp_path, 3, ttl_s=60, owner="b")
    assert b is not None and b.held()
    b.release()


def test_a_claim_whose_heartbeat_stopped_is_taken_over(tmp_path):
    fresh = foreign_claim(tmp_path, 0, age_s=1)
    assert not claims.is_stale(fresh, ttl_s=30)
    assert claims.try_claim(tmp_path, 0, ttl_s=30, owner="me") is None  # live owner elsewhere
    old = foreign_claim(tmp_path, 1, age_s=60)
    assert claims.is_stale(old, ttl_s=30)
    c = claims.try_claim(tmp_path, 1, ttl_s=30, owner="me")
    assert c is not None and c.held()
    assert json.loads(old.read_text())["owner"] == "me"
    c.release()
    assert sorted(p.name for p in old.parent.iterdir()) == ["shard-00000.claim"]  # nothing left aside


def test_a_claim_of_a_dead_local_process_is_taken_over_at_once(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    path = claims.claim_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**claims.owner_record("dead"), "pid": p.pid}))
    assert claims.is_stale(path, ttl_s=3600)
    live = claims.claim_path(tmp_path, 1)
    live.write_text(json.dumps({**claims.owner_record("live"), "pid": os.getppid()}))
    assert not claims.is_stale(live, ttl_s=3600)


def test_the_heartbeat_keeps_a_held_claim_fresh(tmp_path):
    c = claims.try_claim(tmp_path, 0, ttl_s=0.4, owner="me")
    path = claims.claim_path(tmp_path, 0)
    old = time.time() - 3600
    os.utime(path, (old, old))  # as if the last heartbeat were an hour ago
    while os.stat(path).st_mtime < old + 1:  # the heartbeat thread touches it again
        time.sleep(0.02)
    assert c.held()
    c.release()
    assert not path.exists()


def test_a_worker_whose_claim_was_taken_drops_its_result(tmp_path):
    from guidealign.shards.stage import shard_fingerprint

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_input(src, 1)
    fp = shard_fingerprint("c", src, 0)

    def fn(t, i):
        # while this worker works, another one takes its claim over (as if this worker's
        # heartbeat had stalled for longer than the TTL) and commits the shard
        p = claims.claim_path(dst, i)
        p.unlink()
        p.write_text(json.dumps(claims.owner_record("other")))
        write_shard(dst, i, t.append_column("by", pa.array(["other"] * t.num_rows)), fp,
                    stats={"by": "other"})
        return t.append_column("by", pa.array(["me"] * t.num_rows))

    rep = map_shards("s", src, dst, "c", fn=fn, progress=False, assign="dynamic", claim_ttl_s=60)
    assert rep.processed == 0
    assert read_marker(dst, 0).stats == {"by": "other"}
    assert set(read_table(dst, 0)["by"].to_pylist()) == {"other"}
    assert json.loads(claims.claim_path(dst, 0).read_text())["owner"] == "other"  # not removed


def test_a_worker_that_took_a_claim_over_drops_its_result_when_the_old_owner_committed(tmp_path):
    """The other side of a takeover: this worker took over a stale claim (the old owner's
    heartbeat had stalled, not its work), and the old owner commits the shard while this worker
    still processes it. This worker's result is dropped: the committed shard is not written
    a second time (same marker, the old owner's rows)."""
    from guidealign.shards.stage import shard_fingerprint

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_input(src, 1)
    fp = shard_fingerprint("c", src, 0)
    foreign_claim(dst, 0, age_s=600)  # stale: taken over at once
    committed_by_old = []

    def fn(t, i):
        # the old owner wakes up and commits its result while this worker works
        committed_by_old.append(write_shard(dst, i, t.append_column("by", pa.array(["old"] * t.num_rows)), fp,
                                            stats={"by": "old"}))
        return t.append_column("by", pa.array(["me"] * t.num_rows))

    rep = map_shards("s", src, dst, "c", fn=fn, progress=False, assign="dynamic", claim_ttl_s=60)
    assert rep.processed == 0
    assert read_marker(dst, 0) == committed_by_old[0]
    assert set(read_table(dst, 0)["by"].to_pylist()) == {"old"}


def _steal_worker(dst: str, n: int, barrier, out) -> None:
    barrier.wait()
    held = []
    for i in range(n):
        c = claims.try_claim(dst, i, ttl_s=30, owner=f"w{os.getpid()}")
        if c is not None:
            held.append(c)
    barrier.wait()  # everyone has tried every shard
    out.put(sorted(c.path.name for c in held if c.held()))
    barrier.wait()


def test_two_stealers_never_both_hold_a_claim(tmp_path):
    """8 processes race to take over 30 stale claims: each claim ends with exactly one holder."""
    n = 30
    for i in range(n):
        foreign_claim(tmp_path, i, age_s=600)
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_steal_worker, args=(str(tmp_path), n, barrier, out)) for _ in range(8)]
    for p in procs:
        p.start()
    held = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    counts = Counter(name for h in held for name in h)
    assert counts == {claims.claim_path(tmp_path, i).name: 1 for i in range(n)}


# --- four workers, one killed ----------------------------------------------------------------

def test_four_workers_one_killed_commit_every_shard_exactly_once(tmp_path):
    n_shards, rows = 24, 5
    src, dst, journal, gate = tmp_path / "src", tmp_path / "dst", tmp_path / "journal", tmp_path / "gate"
    make_input(src, n_shards, rows)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    procs = []
    for r in range(4):
        hooks = {"CLAIM_TEST_DIE_AT": "2"} if r == 0 else {}
        procs.append(subprocess.Popen(
            [sys.executable, str(TESTS / "claim_worker.py"), str(src), str(dst), str(journal), "30"],
            env={**env, "RANK": str(r), "WORLD_SIZE": "4", "CLAIM_TEST_GATE": str(gate), **hooks}))
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [-signal.SIGKILL, 0, 0, 0]
    doomed = procs[0].pid

    lines = [line.split() for line in journal.read_text().splitlines()]
    starts = Counter(int(i) for w, i, _ in lines if w == "start")
    finishes = Counter(int(i) for w, i, _ in lines if w == "finish")
    killed_in = [int(i) for w, i, pid in lines if w == "start" and int(pid) == doomed]
    assert len(killed_in) == 2  # it died inside its second shard
    lost = killed_in[1]
    assert finishes == {i: 1 for i in range(n_shards)}  # every shard finished exactly once
    assert starts == {i: 2 if i == lost else 1 for i in range(n_shards)}
    assert not any(w == "finish" and int(i) == lost and int(pid) == doomed for w, i, pid in lines)

    assert committed(dst) == list(range(n_shards))
    ids = Counter(v for t in iter_tables(dst) for v in t["id"].to_pylist())
    assert ids == {f"{i}-{j}": 1 for i in range(n_shards) for j in range(rows)}
    workers = {read_marker(dst, i).stats["pid"] for i in range(n_shards)}
    assert doomed in workers and len(workers) >= 2  # the doomed one committed its first shard
    assert read_marker(dst, lost).stats["pid"] != doomed
    assert not (dst / claims.CLAIMS_DIR).exists()  # every claim removed after its commit

    # a rerun with dynamic claiming finds everything committed and processes nothing
    again = map_shards("claimtest", src, dst, "claimtest-v1", fn=lambda t, i: 1 / 0,
                       progress=False, assign="dynamic", claim_ttl_s=30)
    assert (again.processed, again.skipped) == (0, n_shards)


def test_dynamic_and_static_write_the_same_shards(tmp_path):
    src = tmp_path / "src"
    make_input(src, 5)

    def fn(t, i):
        return t.append_column("y", pa.array([v * 2 for v in t["x"].to_pylist()]))

    rs = map_shards("s", src, tmp_path / "static", "c", fn=fn, progress=False)
    with claims.assignment("dynamic", ttl_s=30):  # what executors set from executor.assign
        rd = map_shards("s", src, tmp_path / "dynamic", "c", fn=fn, progress=False)
    assert claims.current_assignment().kind == "static"
    assert rs.processed == rd.processed == 5
    for i in range(5):
        assert read_marker(tmp_path / "static", i).sha256 == read_marker(tmp_path / "dynamic", i).sha256
    with pytest.raises(ValueError, match="executor.assign"):
        claims.Assignment("round-robin")


def test_a_steal_leaves_a_claim_whose_owner_beat_since_it_was_judged_in_place(tmp_path, monkeypatch):
    """The stealer moved the claim aside before finding it had changed, then put it back: in
    between, the live owner's held() failed and a third worker claimed the shard."""
    import os

    from guidealign.shards import claims

    a = claims.try_claim(tmp_path, 0, 60)
    p = claims.claim_path(tmp_path, 0)
    st, seen = os.stat(p), claims._read(p)
    time.sleep(0.01)
    os.utime(p)  # the owner's heartbeat, after the stealer's stat
    seen_by_owner = []
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        seen_by_owner.append(a.held())
    monkeypatch.setattr(claims.os, "rename", rename)
    assert claims._steal(p, st, seen, claims.owner_record()) is False
    assert seen_by_owner == [] and a.held()  # never moved, never missing
    assert claims.try_claim(tmp_path, 0, 60) is None  # still held


def test_a_steal_whose_moved_claim_was_cleared_meanwhile_loses_quietly(tmp_path, monkeypatch):
    """A worker that saw every shard committed cleared the stealer's moved-aside file between
    its rename and its stat: the stealer crashed with FileNotFoundError (a rank failure)."""
    from guidealign.shards import claims

    c = claims.try_claim(tmp_path, 0, 0.3)
    c._stop.set()
    c._thread.join()  # its heartbeat stalled
    time.sleep(0.5)  # older than the TTL
    real_rename = claims.os.rename

    def rename(src, dst):
        real_rename(src, dst)
        claims.clear_claims(tmp_path, 0.3)
    monkeypatch.setattr(claims.os, "rename", rename)
    assert claims.try_claim(tmp_path, 0, 0.3) is None


def test_a_worker_killed_while_claiming_leaves_no_empty_claim(tmp_path):
    """A kill between the claim's O_EXCL create and its write left an empty claim that named
    no owner: even on its own host the shard waited out the TTL. The record is written first
    and linked into place, so a claim is whole or absent; the temp file a kill leaves names its
    dead owner, and clear_claims removes it."""
    dst = tmp_path / "out"
    script = ("import os, signal, sys; from guidealign.shards import claims; "
              "os.link = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
              "claims.try_claim(sys.argv[1], 0, ttl_s=3600)")
    p = subprocess.run([sys.executable, "-c", script, str(dst)], capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL
    left = [q.name for q in claims.claim_path(dst, 0).parent.iterdir()]
    assert "shard-00000.claim" not in left and len(left) == 1 and left[0].startswith("shard-00000.claim.tmp-")
    got = claims.try_claim(dst, 0, ttl_s=3600)  # at once, TTL or not
    assert got is not None and json.loads(claims.claim_path(dst, 0).read_text())["pid"] == os.getpid()
    assert claims.try_claim(dst, 0, ttl_s=3600) is None  # held: a second claim fails
    got.release()
    claims.clear_claims(dst, ttl_s=3600)  # the dead claimer's temp file goes with the claims
    assert not (dst / claims.CLAIMS_DIR).exists()


def test_a_file_system_without_hard_links_still_claims_once(tmp_path, monkeypatch):
    import errno

    def no_links(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(claims.os, "link", no_links)
    dst = tmp_path / "out"
    first = claims.try_claim(dst, 0, ttl_s=3600)
    assert first is not None and claims.try_claim(dst, 0, ttl_s=3600) is None
    assert [p.name for p in claims.claim_path(dst, 0).parent.iterdir()] == ["shard-00000.claim"]
    first.release()
