"""Crashes at chosen points of the shard and artifact writers, and what a rerun makes of them."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pyarrow as pa
import pytest

import guidealign.shards.artifact as artifact
import guidealign.shards.stage as stage
import guidealign.shards.write as write
from guidealign.shards import (committed, fingerprint, iter_tables, map_shards, read_manifest, wait_complete,
                               write_manifest, write_shard)
from guidealign.shards.failure import guard, heartbeats


def _make_input(d: Path, n: int) -> None:
    for i in range(n):
        write_shard(d, i, pa.table({"id": [f"{i}-{j}" for j in range(2)]}), "input")
    write_manifest(d, stage="prompts", num_shards=n, fingerprint="input")


def _shrink_input(src: Path, n: int) -> None:
    import shutil

    shutil.rmtree(src)
    _make_input(src, n)


def _names(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def test_two_writers_with_the_same_pid_do_not_share_a_temp_file(tmp_path, monkeypatch):
    """Ranks on two hosts (or in two containers) can have the same pid and write the manifest
    at the same moment; the heartbeat thread writes beside the main one. A temp name made of
    the pid alone had the second writer rename the first one's temp away: FileNotFoundError."""
    real = os.replace
    calls = []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 1:  # the other writer does its whole write meanwhile
            write_manifest(tmp_path, stage="s", num_shards=4, fingerprint="c")
        return real(a, b)
    monkeypatch.setattr(write.os, "replace", replace)
    write_manifest(tmp_path, stage="s", num_shards=4, fingerprint="c")
    assert read_manifest(tmp_path)["num_shards"] == 4
    assert _names(tmp_path) == ["_stage.json"]


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, pyarrow as pa
    import guidealign.shards.write as w
    w.os.replace = lambda a, b: os._exit(9)  # SIGKILL between the temp write and the rename
    w.write_shard(sys.argv[1], 0, pa.table({"a": [1]}), "fp", quarantine=pa.table({"a": [2]}))
""")


def test_temp_files_of_a_killed_write_are_removed_by_the_rewrite(tmp_path):
    for _ in range(2):
        assert subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)]).returncode == 9
    assert list(tmp_path.rglob(".*.tmp"))  # the kill left its temp file
    write_shard(tmp_path, 0, pa.table({"a": [1]}), "fp")
    assert _names(tmp_path) == ["shard-00000.done.json", "shard-00000.parquet"]


def test_a_failed_write_removes_its_temp_file(tmp_path, monkeypatch):
    def boom(a, b):
        raise OSError("disk full")
    monkeypatch.setattr(write.os, "replace", boom)
    with pytest.raises(OSError):
        write_shard(tmp_path, 0, pa.table({"a": [1]}), "fp")
    assert _names(tmp_path) == []


def test_a_crash_while_retiring_never_leaves_a_complete_dataset_with_extra_shards(tmp_path, monkeypatch):
    """The input shrank from 4 shards to 2 and the stage died before it retired shards 2 and 3:
    a reduce stage must not find the dataset complete and then read 4 shards."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_input(src, 4)
    map_shards("s", src, dst, "c", fn=lambda t, i: t, progress=False)
    _shrink_input(src, 2)

    def killed(*a, **k):
        raise SystemExit("killed")
    monkeypatch.setattr(stage, "retire_shards_from", killed)
    with pytest.raises(SystemExit):
        map_shards("s", src, dst, "c", fn=lambda t, i: t, progress=False)
    try:
        wait_complete(dst)
    except RuntimeError:
        return  # incomplete: the rerun retires them
    assert [t.num_rows for t in iter_tables(dst)] == [2, 2]  # complete: only the 2 current shards


def test_a_retire_killed_after_a_marker_leaves_no_orphan_files(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_input(src, 4)
    map_shards("s", src, dst, "c", fn=lambda t, i: (t, t.slice(0, 1)), progress=False)
    _shrink_input(src, 2)
    real = Path.unlink

    def unlink(self, missing_ok=False):
        real(self, missing_ok=missing_ok)
        if self.name == "shard-00003.done.json":
            raise SystemExit("killed")
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(SystemExit):
        map_shards("s", src, dst, "c", fn=lambda t, i: t, progress=False)
    monkeypatch.setattr(Path, "unlink", real)
    map_shards("s", src, dst, "c", fn=lambda t, i: t, progress=False)
    assert committed(dst) == [0, 1]
    assert [n for n in _names(dst) if "shard-" in n] == [
        "quarantine/shard-00000.parquet", "quarantine/shard-00001.parquet",
        *(f"shard-0000{i}.{e}" for i in range(2) for e in ("done.json", "parquet"))]


def test_an_artifact_build_killed_between_its_renames_leaves_no_old_copy(tmp_path, monkeypatch):
    final = tmp_path / "model"
    with artifact.build_dir(final) as d:
        (d / "weights.bin").write_bytes(b"old")
    artifact.mark_done(final, fingerprint="f1", rows=1, seconds=0)
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:  # final moved aside, the new build not yet in place
            raise SystemExit("killed")
        return real(a, b)
    monkeypatch.setattr(artifact.os, "replace", replace)
    with pytest.raises(SystemExit):
        with artifact.build_dir(final) as d:
            (d / "weights.bin").write_bytes(b"new")
    assert not artifact.is_current(final, "f1") and not artifact.is_current(final, "f2")
    monkeypatch.setattr(artifact.os, "replace", real)
    with artifact.build_dir(final) as d:
        (d / "weights.bin").write_bytes(b"new")
    artifact.mark_done(final, fingerprint="f2", rows=1, seconds=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (final / "weights.bin").read_bytes() == b"new" and artifact.is_current(final, "f2")


def test_a_fingerprint_does_not_depend_on_a_sets_iteration_order():
    """str() of a set follows its iteration order, which for strings changes with
    PYTHONHASHSEED between processes: every rerun then redid every shard."""
    a = {0}
    a.add(8)
    b = {8}
    b.add(0)
    assert list(a) != list(b)  # same set, other order
    assert fingerprint({"stop": a}) == fingerprint({"stop": b})
    assert fingerprint({"stop": frozenset(a)}) == fingerprint({"stop": b})
    assert fingerprint({"stop": {1, 2}}) != fingerprint({"stop": {1, 3}})


def test_a_marker_whose_file_is_gone_is_not_complete_without_a_fingerprint(tmp_path):
    """An ingest-like dataset (no recorded input): wait_complete took a marker without its file
    as done, and the readers (which check the file) then silently left the shard out."""
    for i in range(3):
        write_shard(tmp_path, i, pa.table({"id": [i]}), f"ingest-{i}")
    write_manifest(tmp_path, stage="ingest", num_shards=3, fingerprint="ingest")
    wait_complete(tmp_path)
    (tmp_path / "shard-00001.parquet").unlink()
    with pytest.raises(RuntimeError, match=r"incomplete.*\[1\]"):
        wait_complete(tmp_path)


def test_the_last_heartbeat_says_exited_even_with_a_beat_in_flight(tmp_path, monkeypatch):
    """The heartbeat thread's beat, begun before the rank exited, landed after the exit beat:
    the rank then looked alive and working to every other rank."""
    import guidealign.shards.failure as failure

    real = failure.write_json_atomic
    in_flight, release = threading.Event(), threading.Event()

    def slow(path, obj):
        if threading.current_thread().name == "guidealign-heartbeat" and not in_flight.is_set():
            in_flight.set()
            release.wait(0.5)
        real(path, obj)
    monkeypatch.setattr(failure, "write_json_atomic", slow)
    with guard(tmp_path, 0, 1, stage="s", beat_s=0.01):
        assert in_flight.wait(5)
    release.set()
    for t in threading.enumerate():
        if t.name == "guidealign-heartbeat":
            t.join(5)
    assert heartbeats(tmp_path)["rank-00000.json"]["state"] == "exited"


@pytest.mark.parametrize("damage", ["[1, 2]", '{"num_shards": "3x"}', '{"stage": "x"}', "\udcff"])
def test_a_manifest_or_done_record_that_is_not_one_reads_as_absent(tmp_path, damage):
    from guidealign.shards import read_manifest
    from guidealign.shards.artifact import read_done
    from guidealign.shards.stage import map_shards

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "_stage.json").write_text(damage, errors="surrogateescape")
    (tmp_path / "d" / "_done.json").write_text("[1]" if damage.startswith("{") else damage,
                                               errors="surrogateescape")
    assert read_manifest(tmp_path / "d") is None and read_done(tmp_path / "d") is None
    # a stage over it writes a good manifest instead of failing on the damaged one
    from guidealign.shards import write_manifest, write_shard

    write_manifest(tmp_path / "src", stage="s", num_shards=1, fingerprint="f")
    write_shard(tmp_path / "src", 0, pa.table({"id": ["a"]}), "f")
    map_shards("t", tmp_path / "src", tmp_path / "d", "fp", fn=lambda t, i: t, progress=False)
    assert read_manifest(tmp_path / "d")["num_shards"] == 1
