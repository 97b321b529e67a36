"""Review of the storage layer and orchestration: claims judged by the clock that stamps them,
and artifact files on disk before the ``_done.json`` that commits them.

No timed assertions: clocks are replaced, never waited for."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import guidealign.shards.artifact as artifact
from guidealign.shards import claims


def _claim_of_another_node(dst, index: int):
    path = claims.claim_path(dst, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written just now (a fresh heartbeat) by a live worker on another machine
    path.write_text(json.dumps({**claims.owner_record("elsewhere"), "host": "another-node",
                                "boot": "another-boot-id"}))
    return path


def test_a_node_whose_clock_runs_ahead_does_not_take_a_live_claim(tmp_path, monkeypatch):
    """A claim's heartbeat is its mtime, stamped by the shared file system (an NFS server's
    clock, not the owner's). A worker on a node whose clock runs an hour ahead must not judge
    a claim touched a moment ago stale, and must still take one whose heartbeat stopped."""
    fresh = _claim_of_another_node(tmp_path, 0)
    real = time.time
    monkeypatch.setattr(claims, "time", SimpleNamespace(time=lambda: real() + 3600))
    assert not claims.is_stale(fresh, ttl_s=120), "a fresh claim judged stale by a clock 1 h ahead"
    assert claims.try_claim(tmp_path, 0, ttl_s=120, owner="me") is None
    assert json.loads(fresh.read_text())["owner"] == "elsewhere"

    old = _claim_of_another_node(tmp_path, 1)
    t = os.stat(old).st_mtime - 600  # its last heartbeat 10 minutes ago, by the file system
    os.utime(old, (t, t))
    assert claims.is_stale(old, ttl_s=120)
    c = claims.try_claim(tmp_path, 1, ttl_s=120, owner="me")
    assert c is not None and c.held()
    c.release()


def test_an_artifacts_files_are_on_disk_before_its_done_record(tmp_path, monkeypatch):
    """faiss.write_index, torch and pyarrow write an artifact's files without fsync;
    ``_done.json`` is fsynced. After a power loss it must not commit files whose data (or
    directory entries) were still only in the page cache: each is synced before it."""
    real, synced = os.fsync, []

    def spy(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    final = (tmp_path / "index").resolve()
    with artifact.build_dir(final) as d:
        (d / "model").mkdir()
        with open(d / "model" / "weights.bin", "wb") as f:  # as the libraries write: no fsync
            f.write(b"w" * 4096)
    monkeypatch.setattr(os, "fsync", spy)
    done = artifact.mark_done(final, fingerprint="f", rows=1, seconds=0)
    assert "model/weights.bin" in done["files"]
    first_done = next(k for k, p in enumerate(synced) if artifact.DONE in p.name)
    before = set(synced[:first_done])
    assert final / "model" / "weights.bin" in before, f"synced before {artifact.DONE}: {sorted(before)}"
    assert final / "model" in before  # the file's directory entry
