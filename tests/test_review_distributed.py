"""Review of work splitting and resuming across ranks: failure markers of array tasks that
were requeued on their own, claims of owners on other machines with this host's name, rank
validation in map_shards, and ranks of a SLURM array whose tasks run several srun tasks.

No timed assertions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from guidealign.shards import claims, map_shards, read_manifest, resolve_rank
from guidealign.shards.failure import failures, mark_failed
from synthetic import write_prompt_shards


def _slurm(monkeypatch, **env):
    for k in ("GUIDEALIGN_RUN_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


def _backdate(path, created: float) -> None:
    data = json.loads(path.read_text())
    data["created"] = created
    path.write_text(json.dumps(data))


def test_an_array_task_is_not_stopped_by_an_earlier_attempt_of_another_task(tmp_path, monkeypatch):
    """Each array task is a SLURM job with its own SLURM_RESTART_COUNT: equal attempt numbers
    of two tasks say nothing about which attempt of the run a marker belongs to."""
    wd = tmp_path / "run"
    # task 3 (job 103) was requeued on its own once and failed again in its attempt 1
    _slurm(monkeypatch, SLURM_ARRAY_JOB_ID=100, SLURM_JOB_ID=103, SLURM_RESTART_COUNT=1)
    m = mark_failed(wd, 3, "task 3 failed in its attempt 1")
    _backdate(m, 0.0)  # long before the reader below started
    # then the whole array was requeued: task 3 waits for its attempt 2, task 1 (job 101, never
    # requeued before) restarts on its attempt 1 before task 3 has cleared its marker
    _slurm(monkeypatch, SLURM_ARRAY_JOB_ID=100, SLURM_JOB_ID=101, SLURM_RESTART_COUNT=1)
    assert failures(wd) == []
    # a failure of task 3 written after task 1 started still counts
    _backdate(m, time.time() + 5)
    assert [x["rank"] for x in failures(wd)] == [3]
    # as does one of a task on its first attempt while this one is on its first too
    _slurm(monkeypatch, SLURM_ARRAY_JOB_ID=100, SLURM_JOB_ID=102, SLURM_RESTART_COUNT=0)
    m2 = mark_failed(wd, 2, "task 2 failed")
    _backdate(m2, 0.0)
    _backdate(m, 0.0)
    _slurm(monkeypatch, SLURM_ARRAY_JOB_ID=100, SLURM_JOB_ID=101, SLURM_RESTART_COUNT=0)
    assert [x["rank"] for x in failures(wd)] == [2]
    # within one job (a job's tasks share its restart count) attempts still compare, also for
    # markers written before they carried the job id (SLURM_JOB_ID in their run id names it)
    (wd / "_failed" / "rank-00002.json").unlink()
    _slurm(monkeypatch, SLURM_JOB_ID=77, SLURM_RESTART_COUNT=1)
    data = json.loads(m.read_text())
    data.pop("job", None)
    data.update(run_id="SLURM_JOB_ID=77", attempt=1, created=0.0)
    m.write_text(json.dumps(data))
    assert [x["rank"] for x in failures(wd)] == [3]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_claim_of_another_machine_with_this_hostname_is_not_taken_while_fresh(tmp_path):
    """Nodes (or containers) with one hostname, and the initial pid namespace, whose inode is
    the same on every Linux machine: the owner's pid missing here says nothing about it."""
    path = claims.claim_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    rec = {**claims.owner_record("twin"), "pid": _dead_pid(), "boot": "boot-id-of-another-machine"}
    path.write_text(json.dumps(rec))  # a fresh heartbeat: the owner is working right now
    assert not claims.is_stale(path, ttl_s=3600)
    assert claims.try_claim(tmp_path, 0, ttl_s=3600, owner="me") is None
    assert json.loads(path.read_text())["owner"] == "twin"
    # the same record from this machine (its boot id) is a dead local owner: taken at once
    mine = claims.claim_path(tmp_path, 1)
    mine.write_text(json.dumps({**claims.owner_record("dead"), "pid": _dead_pid()}))
    assert claims.is_stale(mine, ttl_s=3600)


def _double(table: pa.Table, i: int) -> pa.Table:
    return table.append_column("n", pa.array([len(p) * 2 for p in table.column("prompt").to_pylist()]))


@pytest.mark.parametrize("rank,world_size", [(2, 2), (-1, 2), (0, 0)])
@pytest.mark.parametrize("assign", ["static", "dynamic"])
def test_map_shards_refuses_a_rank_outside_its_world(tmp_path, rank, world_size, assign):
    """rank 2 of 2 would process no shard and report success (shards i % 2 == 2: none)."""
    src = tmp_path / "prompts"
    write_prompt_shards(src, [{"id": f"p{i}", "prompt": f"q{i}"} for i in range(8)], shard_rows=2)
    with pytest.raises(ValueError, match="invalid rank"):
        map_shards("double", src, tmp_path / "double", "fp", fn=_double, rank=rank,
                   world_size=world_size, progress=False, assign=assign)
    assert read_manifest(tmp_path / "double") is None  # refused before anything was written


def test_ranks_of_an_array_whose_tasks_run_several_srun_tasks():
    """`sbatch --array=0-1 --ntasks=2` + `srun guidealign detect`: four processes, four ranks;
    the array task's rank alone gave both srun tasks of a task the same rank (every shard of
    it processed twice at once, by writers that delete each other's temp files)."""
    base = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1",
            "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    got = [resolve_rank(env={**base, "SLURM_ARRAY_TASK_ID": str(t), "SLURM_PROCID": str(p)})
           for t in (0, 1) for p in (0, 1)]
    assert sorted(got) == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # the batch script itself (no step) and one-task steps keep the array's numbering
    batch = {k: v for k, v in base.items() if k != "SLURM_STEP_ID"}
    assert resolve_rank(env={**batch, "SLURM_ARRAY_TASK_ID": "1", "SLURM_PROCID": "0"}) == (1, 2)
    assert resolve_rank(env={**base, "SLURM_NTASKS": "1", "SLURM_ARRAY_TASK_ID": "1",
                             "SLURM_PROCID": "0"}) == (1, 2)


def test_an_array_task_without_the_arrays_task_count_is_refused_not_taken_as_the_only_rank():
    """SLURM_ARRAY_TASK_ID without SLURM_ARRAY_TASK_COUNT (a Slurm that does not set it): the
    task pair after it (PROCID 0 of 1 tasks) made every array task rank 0 of 1, each doing
    every shard. Refused unless the rank and world size are given (then they are used)."""
    import pytest

    from guidealign.shards import resolve_rank

    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_COUNT is not"):
        resolve_rank(env=env)
    assert resolve_rank(3, 4, env=env) == (3, 4)
    assert resolve_rank(env={**env, "RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)  # a launcher's come first


def test_a_stale_nfs_handle_while_reading_a_record_is_read_again(tmp_path, monkeypatch):
    """On NFS, a record another node replaced by a rename between this node's lookup and its
    read fails with ESTALE; the waiting ranks poll manifests and completion records while the
    owners rewrite them, and one such read raised out of the wait and ended the run. It is
    read again; a missing file is still absent. A manifest rewritten with the same content is
    left as it is (every rank writes its stage's manifest at the start)."""
    import errno
    import json
    from pathlib import Path as P

    from guidealign.shards import read_manifest, write_manifest
    from guidealign.shards.artifact import read_done

    d = tmp_path / "stage"
    write_manifest(d, stage="s", num_shards=2, fingerprint="fp")
    (d / "_done.json").write_text(json.dumps({"fingerprint": "x"}))
    real = P.read_text
    stale = {"n": 0}

    def flaky(self, *a, **k):
        if self.name in ("_stage.json", "_done.json") and stale["n"] < 2:
            stale["n"] += 1
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(self, *a, **k)

    monkeypatch.setattr(P, "read_text", flaky)
    assert read_manifest(d)["num_shards"] == 2 and stale["n"] == 2
    stale["n"] = 0
    assert read_done(d) == {"fingerprint": "x"}
    assert read_manifest(tmp_path / "none") is None
    monkeypatch.setattr(P, "read_text", real)
    before = (d / "_stage.json").stat().st_ino
    write_manifest(d, stage="s", num_shards=2, fingerprint="fp")
    assert (d / "_stage.json").stat().st_ino == before  # not replaced
    write_manifest(d, stage="s", num_shards=3, fingerprint="fp")
    assert read_manifest(d)["num_shards"] == 3
