"""Fail fast across ranks, and waits that never take stale data.

- a rank that fails leaves WORKDIR/_failed/rank-N.json, and the ranks waiting for it exit
  with its error (real `guidealign run` processes);
- a wait with nobody working ends on the stall clock, not a two-day timeout;
- failure markers of an earlier run, or of an earlier attempt of a requeued SLURM job, are ignored;
- a changed config never lets a reduce stage read a stale shard, and non-lead ranks take
  the index only when it was built from the current library.

No timed assertions: subprocess timeouts are hang guards only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from guidealign.shards import map_shards, read_manifest, wait_complete
from guidealign.shards.failure import RankFailed, Stalled, failures, mark_failed
from guidealign.shards.watch import Watch
from guidealign.shards.manifest import is_complete, missing_shards
from synthetic import write_prompt_shards

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GUIDEALIGN_RUN_ID")}


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "guidealign", *args], cwd=REPO,
                            env={**ENV, "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(pred, what: str, guard: float = 300.0) -> None:
    """Poll ``pred`` (a hang guard, not a timing check)."""
    deadline = time.monotonic() + guard
    while not pred():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.2)


def heartbeat_state(wd: Path, rank: int) -> str | None:
    try:
        return json.loads((wd / "_ranks" / f"rank-{rank:05d}.json").read_text())["state"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def test_a_failing_rank_makes_the_waiting_ranks_exit_with_its_error(tmp_path):
    wd = tmp_path / "run"
    # ranks 1 and 2 of 3 wait for rank 0's ingest (executor.wait_timeout_s=0: no clock)
    waiters = [start("run", "-w", str(wd), "--rank", str(r), "--world-size", "3",
                     "--stages", "ingest", "--no-progress") for r in (1, 2)]
    try:
        wait_until(lambda: all(heartbeat_state(wd, r) == "waiting" for r in (1, 2)),
                   "ranks 1 and 2 waiting for the prompts")
        # rank 0's input does not exist: its ingest fails (past the preflight, which would
        # stop it before the stage, as it does without --no-check)
        lead = start("run", "-w", str(wd), "--rank", "0", "--world-size", "3", "--stages", "ingest",
                     "--no-progress", "--no-check", "--set", f"inputs=[{tmp_path}/missing.jsonl]")
        _, lead_err = lead.communicate(timeout=300)
        assert lead.returncode != 0 and "no such file or directory" in lead_err
        marker = json.loads((wd / "_failed" / "rank-00000.json").read_text())
        assert marker["rank"] == 0 and "missing.jsonl" in marker["error"]
        assert (marker["stage"], marker["step"]) == ("run", "ingest")  # the stage the run was in
        for p in waiters:
            _, err = p.communicate(timeout=120)  # hang guard: the wait polls every 5 s
            assert p.returncode != 0
            assert "RankFailed: rank 0 failed in run (in ingest)" in err and "missing.jsonl" in err
    finally:
        for p in waiters:
            if p.poll() is None:
                p.kill()
    # a rerun of rank 0 clears its own marker when it starts
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "hello"}) + "\n")
    lead = start("run", "-w", str(wd), "--rank", "0", "--world-size", "1", "--stages", "ingest",
                 "--no-progress", "--set", f"inputs=[{src}]")
    _, err = lead.communicate(timeout=300)
    assert lead.returncode == 0, err
    assert not (wd / "_failed" / "rank-00000.json").exists()


def test_a_wait_with_nobody_working_ends_on_the_stall_clock(tmp_path):
    wd = tmp_path / "run"
    # rank 1 of 2 waits for prompts that rank 0 (never started: a pending array task) owns
    p = start("run", "-w", str(wd), "--rank", "1", "--world-size", "2", "--stages", "ingest",
              "--no-progress", "--set", "executor.stall_timeout_s=3")
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "Stalled: no progress on" in err and "for 3s (executor.stall_timeout_s)" in err
    assert "has no manifest" in err
    # its own failure marker now stops anyone else waiting on this run
    assert json.loads((wd / "_failed" / "rank-00001.json").read_text())["stage"] == "run"


def test_failure_markers_of_an_earlier_run_are_ignored(tmp_path, monkeypatch):
    wd = tmp_path / "run"
    monkeypatch.delenv("GUIDEALIGN_RUN_ID", raising=False)
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    old = mark_failed(wd, 3, "boom from yesterday")
    data = json.loads(old.read_text())
    data["created"] = 0.0  # written long before this process started
    old.write_text(json.dumps(data))
    assert failures(wd) == []
    Watch(wd, "x").check(0)  # no RankFailed
    # with run ids: only the same run's markers count
    monkeypatch.setenv("GUIDEALIGN_RUN_ID", "job-2")
    data["run_id"] = "GUIDEALIGN_RUN_ID=job-1"
    data["created"] = time.time()
    old.write_text(json.dumps(data))
    assert failures(wd) == []
    mark_failed(wd, 4, "boom now")
    with pytest.raises(RankFailed, match="rank 4 failed .*boom now"):
        Watch(wd, "x").check(0)


def test_an_unreadable_failure_marker_is_skipped_by_the_ranks_and_by_status(tmp_path, monkeypatch):
    """A marker being written, or damaged (bytes that are not UTF-8, JSON that is not an
    object), is passed over; a readable one beside it still stops the ranks."""
    from guidealign.status import failed_ranks

    wd = tmp_path / "run"
    monkeypatch.delenv("GUIDEALIGN_RUN_ID", raising=False)
    mark_failed(wd, 4, "boom now")
    (wd / "_failed" / "rank-00000.json").write_bytes(b"\xff\xfe{not json")
    (wd / "_failed" / "rank-00001.json").write_text("[1, 2]")
    assert [m["rank"] for m in failures(wd)] == [4]
    assert [ln.split(" failed")[0] for ln in failed_ranks(wd)] == ["rank 4"]


def test_a_requeued_slurm_job_is_not_stopped_by_its_earlier_attempt(tmp_path, monkeypatch):
    """``scontrol requeue`` keeps SLURM_JOB_ID: a marker of attempt 0 written before this rank
    started must not stop attempt 1; one written after it started (a rank that was requeued on
    its own and failed again, or one still on attempt 0) does."""
    wd = tmp_path / "run"
    monkeypatch.delenv("GUIDEALIGN_RUN_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    old = mark_failed(wd, 3, "node lost in attempt 0")
    data = json.loads(old.read_text())
    assert data["attempt"] == 0
    data["created"] = 0.0  # written before this process started
    old.write_text(json.dumps(data))
    assert [m["rank"] for m in failures(wd)] == [3]  # attempt 0 itself: same run, it counts
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert failures(wd) == []
    Watch(wd, "x").check(0)  # no RankFailed
    data["created"] = time.time() + 1  # the same attempt-0 marker, written after this rank started
    old.write_text(json.dumps(data))
    assert [m["rank"] for m in failures(wd)] == [3]
    mark_failed(wd, 4, "boom in attempt 1")
    assert json.loads((wd / "_failed" / "rank-00004.json").read_text())["attempt"] == 1
    with pytest.raises(RankFailed, match="rank 3 failed"):
        Watch(wd, "x").check(0)


def test_stall_clock_restarts_on_progress(tmp_path):
    w = Watch(tmp_path, "x", stall_timeout_s=0.2)
    w.check(0)
    time.sleep(0.3)
    w.check(1)  # a new shard committed: progress, no stall
    time.sleep(0.3)
    with pytest.raises(Stalled, match="no progress on x"):
        w.check(1)


def _beat_as(wd: Path, name: str, run: str | None, t: float, world_size: int = 2) -> None:
    from guidealign.shards.failure import RANKS_DIR

    (wd / RANKS_DIR).mkdir(parents=True, exist_ok=True)
    (wd / RANKS_DIR / name).write_text(json.dumps({
        "rank": 0, "world_size": world_size, "stage": "eval", "state": "working", "waiting_for": None,
        "host": "h", "pid": 1, "run_id": run, "time": t}))


@pytest.mark.parametrize("theirs, stalls", [("GUIDEALIGN_RUN_ID=other", True), (None, True),
                                            ("GUIDEALIGN_RUN_ID=mine", False)])
def test_only_this_runs_heartbeats_count_as_progress(tmp_path, monkeypatch, theirs, stalls):
    """A working heartbeat of another run (another run id, or none) in the same run directory
    kept a wait from ever stalling while that process lived (an eval beside a run whose rank 0
    died); a heartbeat of this run's other ranks still counts."""
    monkeypatch.setenv("GUIDEALIGN_RUN_ID", "mine")
    w = Watch(tmp_path, "x", stall_timeout_s=0.3)
    stalled = False
    for k in range(8):
        _beat_as(tmp_path, "rank-00000.json", theirs, 1000.0 + k)  # it moves at every poll
        try:
            w.check(0)
        except Stalled:
            stalled = True
            break
        time.sleep(0.1)
    assert stalled == stalls


# --- stale shards and the index ---------------------------------------------------------

def _double(table: pa.Table, i: int) -> pa.Table:
    return table.append_column("n", pa.array([len(p) * 2 for p in table.column("prompt").to_pylist()]))


def test_a_changed_config_never_lets_a_reduce_stage_read_a_stale_shard(tmp_path):
    wd = tmp_path / "run"
    write_prompt_shards(wd / "prompts", [{"id": f"p{i}", "prompt": f"q{i}"} for i in range(8)],
                        shard_rows=2)  # 4 shards
    for r in (0, 1):  # the first run: two ranks, config A
        map_shards("double", wd / "prompts", wd / "double", "config-A", fn=_double, rank=r,
                   world_size=2, progress=False)
    assert is_complete(wd / "double") and wait_complete(wd / "double")["fingerprint"] == "config-A"
    # rerun with config B: rank 0 has redone its shards (0, 2), rank 1 not yet (1, 3 stale)
    map_shards("double", wd / "prompts", wd / "double", "config-B", fn=_double, rank=0,
               world_size=2, progress=False)
    assert missing_shards(wd / "double") == [1, 3]
    assert not is_complete(wd / "double")
    with pytest.raises(RuntimeError, match=r"has 2 stale shard\(s\) \(committed under another config"):
        wait_complete(wd / "double")
    # the reduce stage's own expected config decides, whatever the manifest says
    assert not is_complete(wd / "double", config_fp="config-A")
    # a reduce stage waiting across ranks sees only current shards: rank 1 redoes 1 and 3
    map_shards("double", wd / "prompts", wd / "double", "config-B", fn=_double, rank=1,
               world_size=2, progress=False)
    assert wait_complete(wd / "double", config_fp="config-B")["fingerprint"] == "config-B"
    # changed input: a prompt shard rewritten makes the shard made from it stale
    write_prompt_shards(wd / "prompts", [{"id": f"p{i}", "prompt": f"Q{i}"} for i in range(8)],
                        shard_rows=2)
    assert sorted(missing_shards(wd / "double")) == [0, 1, 2, 3]
    assert read_manifest(wd / "double")["num_shards"] == 4


def test_the_library_refuses_stale_guideline_shards(tmp_path):
    """The real reduce stage: guideline shards from a rank that has not rerun are refused."""
    from guidealign.config import load_config
    from guidealign.retrieval.library import run_library
    from synthetic import coded_guideline_rows

    wd = tmp_path / "run"
    rows = coded_guideline_rows(4, 4, seed=5)
    write_prompt_shards(wd / "prompts", [{"id": r["id"], "prompt": r["prompt"]} for r in rows],
                        shard_rows=4)
    by_id = {r["id"]: r for r in rows}

    def guidelines(table: pa.Table, i: int) -> pa.Table:
        ids = table.column("id").to_pylist()
        return pa.table({"id": ids, "prompt": table.column("prompt").to_pylist(),
                         "risky": [by_id[x]["risky"] for x in ids],
                         "guidelines": [by_id[x]["guidelines"] for x in ids]})

    for r in (0, 1):
        map_shards("guidelines", wd / "prompts", wd / "guidelines", "gl-A", fn=guidelines, rank=r,
                   world_size=2, progress=False)
    cfg = load_config(overrides=["library.threads=1"])
    assert run_library(cfg, wd, progress=False).after_near > 0
    map_shards("guidelines", wd / "prompts", wd / "guidelines", "gl-B", fn=guidelines, rank=0,
               world_size=2, progress=False)
    with pytest.raises(RuntimeError, match="stale shard"):
        run_library(load_config(overrides=["library.threads=1", "library.fuzzy_threshold=0.8"]),
                    wd, progress=False)


@pytest.mark.slow
def test_non_lead_ranks_take_the_index_only_from_the_current_library(tmp_path):
    from guidealign.config import load_config
    from guidealign.retrieval.index import wait_current_index as _wait_index
    from guidealign.retrieval.index import run_index
    from guidealign.retrieval.library import run_library
    from synthetic import coded_guideline_rows, write_guideline_shards

    wd = tmp_path / "run"
    write_guideline_shards(wd / "guidelines", coded_guideline_rows(4, 3, seed=2), shard_rows=8)
    sets = ["library.threads=1", "index.threads=1", "index.model=embedded:all-minilm-l6-v2",
            "index.use_gpu=false"]
    cfg = load_config(overrides=sets)
    run_library(cfg, wd, progress=False)
    run_index(cfg, wd, progress=False)
    assert _wait_index(cfg, wd, timeout=0.5, poll=0.1)["library_version"]
    # new guideline shards (a rerun upstream): rank 0 is about to rebuild the library, so the
    # old library and the old index are refused
    write_guideline_shards(wd / "guidelines", coded_guideline_rows(5, 3, seed=3), shard_rows=8)
    with pytest.raises(RuntimeError, match="built from another library version"):
        _wait_index(cfg, wd, timeout=0.5, poll=0.1)
    run_library(cfg, wd, progress=False)
    with pytest.raises(RuntimeError, match="built from another library version"):
        _wait_index(cfg, wd, timeout=0.5, poll=0.1)  # library rebuilt, index not yet
    run_index(cfg, wd, progress=False)
    lib = json.loads((wd / "library" / "_done.json").read_text())
    assert _wait_index(cfg, wd, timeout=0.5, poll=0.1)["library_version"] == lib["version"]
