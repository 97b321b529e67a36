"""Two processes that run one rank, or ranks of one stage that disagree on the world size (nodes
that `launch` numbered from different GPU counts), stop with a RankConflict instead of writing
shards twice and stalling on the ones no rank owns.

No timed assertions: the polling loops are hang guards only.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from guidealign.shards import claims, map_shards
from guidealign.shards.failure import RankConflict, RankFailed, failures, guard, handed_to_child
from guidealign.shards.watch import Watch
from synthetic import write_prompt_shards


@pytest.fixture(autouse=True)
def _no_run_ids(monkeypatch):
    for k in ("GUIDEALIGN_RUN_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)


def _beat_file(wd: Path, rank: int) -> Path:
    return wd / "_ranks" / f"rank-{rank:05d}.json"


def _foreign_beat(wd: Path, rank: int, *, world_size: int = 4, stage: str = "detect", pid: int = 1,
                  host: str = "other-node", state: str = "working", t: float | None = None) -> None:
    p = _beat_file(wd, rank)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp-test")
    tmp.write_text(json.dumps({"rank": rank, "world_size": world_size, "stage": stage, "state": state,
                               "waiting_for": "", "host": host, "pid": pid, "run_id": None,
                               "time": time.time() if t is None else t}))
    os.replace(tmp, p)


def _beats_of_mine(wd: Path, rank: int, n: int) -> None:
    """Wait until this process's heartbeat thread has beaten ``rank``'s file ``n`` times (a
    hang guard of 120 s, not a timing check)."""
    seen, deadline = set(), time.monotonic() + 120
    while len(seen) < n:
        assert time.monotonic() < deadline, "the heartbeat thread stopped beating"
        try:
            hb = json.loads(_beat_file(wd, rank).read_text())
        except (OSError, ValueError):
            continue
        if hb.get("pid") == os.getpid():
            seen.add(hb["time"])
        time.sleep(0.005)


def test_a_second_process_beating_the_same_rank_stops_it_before_its_next_shard(tmp_path):
    """Two nodes both running rank 1 (one counted 4 GPUs, one 2): each finds the other's beat in
    the rank's heartbeat file, records a RankConflict as the rank's failure (the other ranks'
    waits stop on it) and raises it before writing another shard."""
    wd = tmp_path / "run"
    src = wd / "prompts"
    write_prompt_shards(src, [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(16)], shard_rows=2)
    written = []

    def fn(table, i):
        written.append(i)
        return table

    with pytest.raises(RankConflict, match=r"rank 1 is run by two processes.*other-node.*--gpus-per-node"):
        with guard(wd, 1, 4, stage="detect", beat_s=0.02):
            deadline = time.monotonic() + 120
            while not failures(wd):  # the other node beats the same file, as it would
                assert time.monotonic() < deadline, "the conflict was never found"
                _foreign_beat(wd, 1, world_size=8)
                time.sleep(0.01)
            map_shards("detect", src, wd / "out", "fp", fn=fn, rank=1, world_size=4, progress=False)
    assert written == []  # not one shard of rank 1 written by this process after the conflict
    (marker,) = failures(wd)
    assert marker["rank"] == 1 and marker["error"].startswith("RankConflict: rank 1 is run by two processes")
    assert "world size 8" in marker["error"] and "world size 4" in marker["error"]
    with pytest.raises(RankFailed, match="RankConflict"):  # how rank 0's wait learns of it
        with guard(wd, 0, 4, stage="detect"):
            Watch(wd, "detect shards").check(0)


@pytest.mark.parametrize("case", ["child", "dynamic", "other stage", "same host and world", "exited"])
def test_no_conflict_for_this_ranks_own_child_another_stage_or_under_claims(tmp_path, case):
    """A child process running this rank's stage beats the same file (``handed_to_child``): no
    conflict. Under the dynamic assignment claims split the shards, so a rank run twice does no
    harm; another stage run beside this one in the same run directory (eval while SFT trains)
    writes other datasets; a command of the same stage and world size on this host is a user's
    second command (two evals of other benchmarks), not launch's numbering; a process that is
    leaving (its last beat says "exited") runs nothing more: no conflict, however long the
    other beats beside it."""
    wd = tmp_path / "run"
    with guard(wd, 1, 4, stage="detect", beat_s=0.02):
        if case == "child":
            with handed_to_child():
                for _ in range(20):
                    _foreign_beat(wd, 1, pid=os.getpid() + 1, host=socket.gethostname())
                    time.sleep(0.01)
                    # while its child runs, this process neither beats nor checks: the file
                    # holds the child's beat only (each beat of this process's would replace it)
                    assert json.loads(_beat_file(wd, 1).read_text())["pid"] == os.getpid() + 1
            _beats_of_mine(wd, 1, 20)
        else:
            other = {"dynamic": {"world_size": 8}, "other stage": {"world_size": 8, "stage": "eval"},
                     "same host and world": {"host": socket.gethostname()},
                     "exited": {"world_size": 8, "state": "exited"}}[case]
            with claims.assignment("dynamic" if case == "dynamic" else "static"):
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:  # the other beats beside this rank's beats
                    _foreign_beat(wd, 1, **other)
                    time.sleep(0.01)
                _beats_of_mine(wd, 1, 5)
        Watch(wd, "detect shards").check(0)
    assert failures(wd) == []


def test_a_conflict_found_during_the_last_shard_fails_the_rank_at_its_end(tmp_path):
    """No shard or wait follows the shard in the works when the conflict is found: the rank
    still ends failed (its marker says why), not with status 0."""
    wd = tmp_path / "run"
    with pytest.raises(RankConflict, match="world size 4\\) and other-node"):
        with guard(wd, 1, 4, stage="detect", beat_s=0.02):
            deadline = time.monotonic() + 120
            while not failures(wd):
                assert time.monotonic() < deadline, "the conflict was never found"
                _foreign_beat(wd, 1, world_size=4)  # another node, same world size: a --node-rank mixup
                time.sleep(0.01)
    assert failures(wd)[0]["error"].startswith("RankConflict:")


def test_a_wait_stops_on_a_live_rank_of_the_stage_with_another_world_size(tmp_path):
    """Rank 5 of 8 beating beside rank 0 of 4 in the same stage: the shards are split two ways.
    Only a heartbeat that moves during the wait counts (a killed earlier run's stays put), and
    only of the same stage and run (``launch`` gives one process per node to ingest, one per
    GPU to detect), not once it has exited."""
    wd = tmp_path / "run"
    with guard(wd, 0, 4, stage="detect"):
        for kw in ({"stage": "ingest", "world_size": 2}, {"state": "exited", "world_size": 8}):
            _foreign_beat(wd, 5, t=1.0, **kw)
            w = Watch(wd, "detect shards")
            w.check(0)
            _foreign_beat(wd, 5, t=2.0, **kw)
            w.check(0)  # moved, but another stage, or exited: no conflict
        _foreign_beat(wd, 5, world_size=8, t=3.0)
        w = Watch(wd, "detect shards")
        w.check(0)
        w.check(0)  # stale: never moved
        with claims.assignment("dynamic"):
            _foreign_beat(wd, 5, world_size=8, t=4.0)
            w.check(0)
        _foreign_beat(wd, 5, world_size=8, t=5.0)
        with pytest.raises(RankConflict, match=r"rank 5 of detect .* world size 8, this rank \(0\) with 4"):
            w.check(0)
