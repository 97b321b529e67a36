"""Stop 56 review of the shard layer: a resume under another world size, ranks half given by the
environment, launch.sh's interpreter, two runs on one run directory at once."""
from __future__ import annotations

import pyarrow as pa
import pytest

from guidealign.shards import write_manifest, write_shard
from guidealign.shards.failure import RankFailed, guard, mark_failed
from guidealign.shards.manifest import wait_complete


def _half_done(ds, n=2):
    write_manifest(ds, stage="detect", num_shards=n, fingerprint="fp")
    write_shard(ds, 0, pa.table({"id": ["a"]}), "fp")


def test_a_failure_marker_of_a_rank_outside_the_resumed_world_does_not_stop_its_waits(tmp_path, monkeypatch):
    # run 1: four ranks under a fixed run id, rank 3 killed (its marker stays: no rank 3 again);
    # run 2, resumed on two GPUs: its ranks wait for each other's shards, not for rank 3
    monkeypatch.setenv("GUIDEALIGN_RUN_ID", "fixed")
    ds = tmp_path / "detect"
    _half_done(ds)
    mark_failed(tmp_path, 3, "worker killed by signal 9", stage="detect", world_size=4)
    with guard(tmp_path, 0, 2, stage="detect"):
        with pytest.raises(RuntimeError, match="is incomplete") as e:
            wait_complete(ds, timeout=0.3, poll=0.05)
        assert not isinstance(e.value, RankFailed)
        # a rank of this world that failed still stops the wait at once
        mark_failed(tmp_path, 1, "boom", stage="detect", world_size=2)
        with pytest.raises(RankFailed, match="rank 1 failed"):
            wait_complete(ds, timeout=30, poll=0.05)


@pytest.mark.parametrize("env", [{"RANK": "2"}, {"WORLD_SIZE": "4"}])
def test_rank_or_world_size_alone_in_the_environment_is_refused_not_taken_as_rank_0_of_1(env):
    # four processes started with RANK=0..3 and no WORLD_SIZE each ran as rank 0 of 1: every
    # one did every shard, on one host, where no rank conflict is seen
    from guidealign.shards.ranks import resolve_rank

    with pytest.raises(ValueError, match="RANK is set but WORLD_SIZE is not|WORLD_SIZE is set but RANK is not"):
        resolve_rank(env=env)
    assert resolve_rank(1, 2, env=env) == (1, 2)  # both given: the environment is not read


def test_launch_sh_takes_an_interpreter_named_by_a_command_on_path(tmp_path):
    # GUIDEALIGN_PYTHON=python3 (a container's interpreter) was refused as "no Python
    # environment at python3", the name tested as a file in the caller's directory
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "launch.sh"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "ga-python"  # (a symlink would leave the venv: Python finds it from its path)
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
               GUIDEALIGN_PYTHON="ga-python")
    r = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "guidealign launch" in r.stdout
    env["GUIDEALIGN_PYTHON"] = "no-such-python-here"
    r = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "no Python environment at no-such-python-here" in r.stderr


def test_a_static_rank_waits_for_a_shard_another_process_is_writing_and_never_writes_it_again(tmp_path, caplog):
    # two commands of one stage started at once on one run directory (same rank and world size,
    # one host: no rank conflict, as for two evals side by side) each wrote every shard
    import logging
    import threading
    import time

    from guidealign.shards import claims, map_shards, read_marker

    src, dst = tmp_path / "prompts", tmp_path / "detect"
    write_manifest(src, stage="ingest", num_shards=3, fingerprint="in")
    for i in range(3):
        write_shard(src, i, pa.table({"id": [f"p{i}"]}), "in")
    other = claims.try_claim(dst, 0, ttl_s=60, owner="the-other-run")  # writing shard 0 now
    called, errors = [], []

    def fn(table, i):
        called.append(i)
        return table

    def run():
        try:
            with claims.assignment("static", 60, poll_s=0.02):
                map_shards("detect", src, dst, "fp", fn=fn, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    caplog.set_level(logging.WARNING, logger="guidealign.shards.stage")
    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while not called and "claimed by another process" not in caplog.text:
        assert time.monotonic() < deadline and t.is_alive(), errors
        time.sleep(0.01)
    # the other run commits shard 0 and lets its claim go
    from guidealign.shards.fingerprint import fingerprint

    fp0 = fingerprint("fp", read_marker(src, 0).sha256)
    theirs = write_shard(dst, 0, pa.table({"id": ["p0"], "by": ["other"]}), fp0)
    other.release()
    t.join(60)
    assert not t.is_alive() and not errors, errors
    assert called == [1, 2]  # shard 0 was the other run's to write: not computed again
    assert read_marker(dst, 0).sha256 == theirs.sha256
    assert not (dst / claims.CLAIMS_DIR).exists()


_KILLED_RANK = """
import os, signal, sys
from guidealign.shards import map_shards

def fn(table, i):
    if i == 1:  # SIGKILLed mid-shard: its claim of shard 1 stays behind
        os.kill(os.getpid(), signal.SIGKILL)
    return table

map_shards("detect", sys.argv[1], sys.argv[2], "fp", fn=fn, progress=False)
"""


def test_a_static_rank_killed_mid_shard_is_resumed_with_another_world_size_at_once(tmp_path):
    # (a guard for the claims static ranks take: a killed rank's claim on this host is taken
    # over at once, not after the TTL, and none is left behind)
    import subprocess
    import sys

    from guidealign.shards import claims, committed, map_shards, read_marker

    src, dst = tmp_path / "prompts", tmp_path / "detect"
    write_manifest(src, stage="ingest", num_shards=4, fingerprint="in")
    for i in range(4):
        write_shard(src, i, pa.table({"id": [f"p{i}"]}), "in")
    r = subprocess.run([sys.executable, "-c", _KILLED_RANK, str(src), str(dst)], timeout=120)
    assert r.returncode == -9
    assert claims.claim_path(dst, 1).exists() and committed(dst) == [0]
    before = read_marker(dst, 0)
    called = []

    def fn(table, i):
        called.append(i)
        return table

    with claims.assignment("static", 3600):  # a TTL no test waits out
        for rank in (1, 0):
            map_shards("detect", src, dst, "fp", fn=fn, rank=rank, world_size=2, progress=False)
    assert sorted(called) == [1, 2, 3] and committed(dst) == [0, 1, 2, 3]
    assert read_marker(dst, 0) == before  # the killed run's commit kept
    assert not (dst / claims.CLAIMS_DIR).exists()
