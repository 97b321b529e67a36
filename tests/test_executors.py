"""The Ray executor on a real local Ray instance (2 CPUs, loopback, no dashboard).

The stage under test is a real map stage built with ``shards.map_shards`` over real
ingest output: it counts characters per prompt and records, in each shard's commit
marker, the rank, pid and Ray resources of the worker that wrote it, and appends one line
per processed shard to a journal, so "exactly once" is checked on disk, not assumed.
Sharded stages run on long-lived worker actors (``guidealign.ray_workers``); the engine
stage on them is tested in tests/test_ray_engine.py.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

ray = pytest.importorskip("ray")

from guidealign.config import Config  # noqa: E402
from guidealign.executors import ExecutorError, TaskResult, ray_task_options, run_stage  # noqa: E402
from guidealign.ingest.run import IngestConfig, ingest  # noqa: E402
from guidealign.shards import map_shards, read_marker, read_table  # noqa: E402
from exclusive import machine_lock  # noqa: E402

TESTS = Path(__file__).resolve().parent
N_PROMPTS, SHARD_ROWS = 40, 5  # -> 8 shards


# --- the stage: module-level so Ray workers import it (tests/ is on their PYTHONPATH) ---------

def run_charcount(cfg, workdir, *, rank=0, world_size=1, progress=True, crash_on=None):
    """prompts -> charcount: adds ``chars``; a real map stage with the standard signature."""
    workdir = Path(workdir)
    journal = workdir / "charcount.journal"

    def fn(table: pa.Table, index: int):
        if crash_on is not None and index == crash_on["shard"]:
            flag = workdir / f"crashed-{index}"
            if not crash_on.get("once") or not flag.exists():
                flag.touch()
                os._exit(3)  # the worker process dies mid-shard, like an OOM kill
        with open(journal, "a") as f:
            f.write(f"{index} {rank} {os.getpid()}\n")
        out = table.append_column("chars", pc.utf8_length(table["prompt"]))
        assigned = ray.get_runtime_context().get_assigned_resources() if ray.is_initialized() else {}
        return out, None, {"rank": rank, "world_size": world_size, "pid": os.getpid(),
                           "resources": assigned, "run_id": os.environ.get("GUIDEALIGN_RUN_ID")}

    return map_shards("charcount", workdir / "prompts", workdir / "charcount", "charcount-v1",
                      fn=fn, rank=rank, world_size=world_size, progress=progress)


def journal(workdir: Path) -> list[tuple[int, int, int]]:
    p = workdir / "charcount.journal"
    if not p.exists():
        return []
    return [tuple(map(int, line.split())) for line in p.read_text().splitlines()]


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    with machine_lock("ray"):
        if ray.is_initialized():
            ray.shutdown()
        ray.init(num_cpus=2, resources={"slot": 2}, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})
        yield ray
        ray.shutdown()


def write_prompts(path: Path, n: int = N_PROMPTS) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Prompt number {i}: " + "x" * i}) + "\n")
    return path


@pytest.fixture
def ingested(tmp_path) -> Path:
    wd = tmp_path / "run"
    rep = ingest([str(write_prompts(tmp_path / "p.jsonl"))], wd,
                 IngestConfig(shard_rows=SHARD_ROWS), progress=False)
    assert rep.shards == N_PROMPTS // SHARD_ROWS
    return wd


def ray_cfg(**resources) -> Config:
    cfg = Config()
    cfg.executor.kind = "ray"
    cfg.executor.ray_resources = resources or {"num_cpus": 1}
    return cfg


# --- tests ---------------------------------------------------------------------------------

def test_ray_task_options_maps_config_resources():
    assert ray_task_options({"num_gpus": 1}) == {"max_retries": 2, "num_gpus": 1}
    assert ray_task_options({"num_cpus": 4, "memory": 10, "a100": 1, "resources": {"x": 2}},
                            max_retries=0) == \
        {"max_retries": 0, "num_cpus": 4, "memory": 10, "resources": {"x": 2, "a100": 1}}


@pytest.mark.parametrize("assign", ["static", "dynamic"])
def test_ray_workers_pull_every_shard_exactly_once(ray_local, ingested, assign):
    wd = ingested
    cfg = ray_cfg(num_cpus=1)
    cfg.executor.ray_resources_by_stage = {"charcount": {"num_cpus": 1, "slot": 1},
                                           "other": {"num_cpus": 2}}
    cfg.executor.assign = assign
    results = run_stage(run_charcount, cfg, wd, progress=False)
    n = N_PROMPTS // SHARD_ROWS
    # the stage's own resources {CPU: 1, slot: 1}: the cluster holds two such workers, each
    # called once
    assert [r.worker for r in results] == [0, 1] and [r.rank for r in results] == [0, 1]
    assert all(isinstance(r, TaskResult) and r.world_size == 2 for r in results)
    assert all(r.pid != os.getpid() for r in results)  # ran in Ray workers, not here
    assert len({r.pid for r in results}) == 2
    assert sum(r.report.processed for r in results) == n
    assert all(r.builds == 0 for r in results)  # not an engine stage: no engine built

    ids = []
    for i in range(n):
        m = read_marker(wd / "charcount", i)
        assert m is not None, f"shard {i} has no marker"
        assert m.stats["world_size"] == 2
        if assign == "static":
            assert m.stats["rank"] == i % 2
        assert m.stats["resources"] == {"CPU": 1.0, "slot": 1.0}
        t = read_table(wd / "charcount", i)
        src = read_table(wd / "prompts", i)
        assert t.num_rows == src.num_rows == m.rows
        assert t["id"].to_pylist() == src["id"].to_pylist()
        assert t["chars"].to_pylist() == [len(p) for p in src["prompt"].to_pylist()]
        ids += t["id"].to_pylist()
    assert len(ids) == len(set(ids)) == N_PROMPTS
    assert sorted(s for s, _, _ in journal(wd)) == list(range(n))
    assert not (wd / "charcount" / "_claims").exists()

    # a rerun finds every marker and writes nothing
    again = run_stage(run_charcount, cfg, wd, progress=False)
    assert sum(r.report.processed for r in again) == 0
    assert len(journal(wd)) == n


def test_ray_workers_and_tasks_get_the_drivers_model_and_run_settings(ray_local, ingested, monkeypatch):
    """A worker of a running cluster has its raylet's environment, not the driver's: HF_HOME,
    HF_HUB_OFFLINE, GUIDEALIGN_HOME or GUIDEALIGN_RUN_ID set for the run never reached it (models
    looked up in another cache, downloads tried offline, failure markers of another run id)."""
    from guidealign.executors import run_on_ray

    monkeypatch.setenv("GUIDEALIGN_RUN_ID", "forwarded-42")  # set after the cluster started
    run_stage(run_charcount, ray_cfg(num_cpus=1), ingested, progress=False)
    n = N_PROMPTS // SHARD_ROWS
    assert {read_marker(ingested / "charcount", i).stats["run_id"] for i in range(n)} == {"forwarded-42"}
    monkeypatch.setenv("GUIDEALIGN_RUN_ID", "forwarded-43")
    import shutil
    shutil.rmtree(ingested / "charcount")
    run_on_ray(run_charcount, ray_cfg(num_cpus=1), ingested, n_tasks=1, progress=False)
    assert {read_marker(ingested / "charcount", i).stats["run_id"] for i in range(n)} == {"forwarded-43"}


def test_failed_worker_is_reported_and_a_rerun_redoes_only_missing_shards(ray_local, ingested):
    wd = ingested
    n = N_PROMPTS // SHARD_ROWS
    cfg = ray_cfg(num_cpus=1)
    cfg.executor.ray_max_restarts = 0
    # shard 3's worker (rank 1 of 2, static) dies every time and is not restarted
    with pytest.raises(ExecutorError, match=r"workers \[1\]"):
        run_stage(run_charcount, cfg, wd, progress=False, crash_on={"shard": 3})
    assert read_marker(wd / "charcount", 3) is None
    done_first = {i: read_marker(wd / "charcount", i).created for i in range(n)
                  if read_marker(wd / "charcount", i) is not None}
    assert set(range(0, n, 2)) | {1} == set(done_first)  # worker 0's shards, and 1 before 3
    # the same command again: only the missing shards are processed; the others keep their markers
    results = run_stage(run_charcount, cfg, wd, progress=False)
    assert sum(r.report.processed for r in results) == n - len(done_first)
    assert {i: read_marker(wd / "charcount", i).created for i in done_first} == done_first
    assert sorted(s for s, _, _ in journal(wd)) == list(range(n))


@pytest.mark.timeout(900)  # the old code waited 1800 s: fail instead of hanging the suite
def test_a_ray_workers_wait_ends_on_the_configured_stall_clock(ray_local, ingested):
    """Ray workers ran their stage outside the fail-fast guard: `index` on a run with no
    library (rank 0 waits for the library, rank 1 for rank 0's index) waited on the built-in
    30-minute stall clock whatever executor.stall_timeout_s said."""
    from guidealign.retrieval.index import run_index

    cfg = ray_cfg(num_cpus=1)
    cfg.executor.stall_timeout_s = 3
    cfg.executor.ray_max_restarts = 0
    with pytest.raises(ExecutorError, match=r"Stalled: no progress on .* for 3s \(executor.stall_timeout_s\)"):
        run_stage(run_index, cfg, ingested, n_workers=2, progress=False)


@pytest.mark.timeout(900)
def test_an_earlier_runs_failure_marker_under_the_same_run_id_does_not_stop_a_ray_run(ray_local, ingested,
                                                                                    monkeypatch):
    """A fixed GUIDEALIGN_RUN_ID (exported once in a shell) gave every rerun the id of the run
    that failed: its leftover marker stopped the new Ray workers' waits with the old error (for
    good when that rank is not in the new run: an earlier run on 4 workers, this one on 2; else
    until the rank clears its own). The driver starts every rank, so it clears the markers
    first; the wait here ends on its stall clock instead (no library: nothing ever comes)."""
    from guidealign.retrieval.index import run_index
    from guidealign.shards.failure import mark_failed

    monkeypatch.setenv("GUIDEALIGN_RUN_ID", "fixed-id")
    mark_failed(ingested, 3, "an error of the earlier run", stage="index", world_size=4)
    cfg = ray_cfg(num_cpus=1)
    cfg.executor.stall_timeout_s = 3
    cfg.executor.ray_max_restarts = 0
    with pytest.raises(ExecutorError) as e:
        run_stage(run_index, cfg, ingested, n_workers=2, progress=False)
    assert "an error of the earlier run" not in str(e.value) and "Stalled" in str(e.value)


def test_dead_worker_is_restarted_and_its_claimed_shard_taken_over(ray_local, ingested):
    wd = ingested
    n = N_PROMPTS // SHARD_ROWS
    cfg = ray_cfg(num_cpus=1)
    cfg.executor.assign = "dynamic"
    cfg.executor.claim_ttl_s = 30
    # shard 5's worker dies once, holding its claim; Ray restarts it and retries its call,
    # and whichever worker gets there first takes the dead worker's claim over
    results = run_stage(run_charcount, cfg, wd, progress=False,
                        crash_on={"shard": 5, "once": True})
    assert (wd / "crashed-5").exists()
    assert all(read_marker(wd / "charcount", i) is not None for i in range(n))
    assert sorted(s for s, _, _ in journal(wd)) == list(range(n))  # each shard processed once
    assert len(results) == 2  # both workers' calls returned (one after its restart)
    assert not (wd / "charcount" / "_claims").exists()


def test_stage_resources_and_the_tensor_parallel_check():
    from guidealign.ray_workers import capacity, check_engine_resources, resources_for

    cfg = Config()
    cfg.executor.ray_resources = {"num_cpus": 2}
    cfg.executor.ray_resources_by_stage = {"detect": {"num_gpus": 4, "num_cpus": 8}}
    assert resources_for(cfg.executor, "detect") == {"num_gpus": 4, "num_cpus": 8}
    assert resources_for(cfg.executor, "ingest") == {"num_cpus": 2}
    check_engine_resources("detect", {"num_gpus": 4}, 4, cluster_gpus=16)
    check_engine_resources("detect", {"num_cpus": 1}, 1, cluster_gpus=0)  # CPU cluster: fine
    with pytest.raises(ValueError, match=r"detect: each Ray worker gets 2 GPU\(s\), but "
                                         r"engine.tensor_parallel_size is 4"):
        check_engine_resources("detect", {"num_gpus": 2}, 4, cluster_gpus=16)
    with pytest.raises(ValueError, match="gets 0 GPU"):  # would silently run on the CPU
        check_engine_resources("respond", {"num_cpus": 4}, 1, cluster_gpus=8)
    assert capacity({"CPU": 64, "GPU": 16}, {"num_gpus": 4, "num_cpus": 8}) == 4
    assert capacity({"CPU": 64, "GPU": 16}, {"num_cpus": 1}) == 64
    assert capacity({"CPU": 2, "slot": 2}, {"num_cpus": 1, "resources": {"slot": 1}}) == 2
    assert capacity({"CPU": 8}, {"num_gpus": 1}) == 0


def test_ray_capacity_counts_what_fits_on_each_node_not_the_cluster_totals():
    """An actor runs on one node: two 8-GPU nodes of 24 CPUs hold two workers of 4 GPUs and
    16 CPUs (the totals, 16 GPUs and 48 CPUs, gave three: the third was never placed and the
    driver waited for it for ever). Dead nodes hold none."""
    from guidealign.ray_workers import capacity, node_capacity

    opts = {"num_gpus": 4, "num_cpus": 16}
    node = {"Alive": True, "Resources": {"CPU": 24.0, "GPU": 8.0, "memory": 1e12}}
    assert capacity({"CPU": 48, "GPU": 16}, opts) == 3
    assert node_capacity([node, dict(node)], opts) == 2
    assert node_capacity([node, dict(node, Alive=False)], opts) == 1
    assert node_capacity([dict(node, Resources={"CPU": 64.0, "GPU": 8.0})] * 2, opts) == 4


def test_a_ray_worker_that_cannot_be_placed_is_dropped_and_the_stage_runs_without_it(ray_local, ingested):
    """Three workers of 1 CPU asked for on a 2-CPU cluster: the third is never placed. With
    static shards it would never take its call (its shards never done, the driver waiting for
    ever); it is dropped after executor.ray_start_timeout_s and the two that started share
    every shard (ranks 0 and 1 of 2). The timeout runs from the pool's start and again from
    each worker that starts, so the second placeable worker is not held to the first's clock."""
    wd = ingested
    cfg = ray_cfg(num_cpus=1)
    cfg.executor.ray_workers = 3
    # the first of the two that fit must start within it, the second within it after the first:
    # 5 s was too little on two busy cores (a Ray worker process starts and imports the package),
    # and none had started (a flaky failure)
    cfg.executor.ray_start_timeout_s = 45
    results = run_stage(run_charcount, cfg, wd, progress=False)
    n = N_PROMPTS // SHARD_ROWS
    assert [r.rank for r in results] == [0, 1] and all(r.world_size == 2 for r in results)
    assert sum(r.report.processed for r in results) == n
    assert sorted(s for s, _, _ in journal(wd)) == list(range(n))


def test_engine_stage_asking_too_few_gpus_fails_before_any_worker_starts(ray_local, ingested):
    from guidealign.ray_workers import WorkerPool

    cfg = ray_cfg(num_cpus=1)
    cfg.engine.tensor_parallel_size = 2
    cfg.executor.ray_resources_by_stage = {"detect": {"num_gpus": 1}}
    with pytest.raises(ValueError, match="tensor_parallel_size is 2"):
        WorkerPool(cfg, "detect", n_shards=8)
    cfg.executor.ray_resources_by_stage = {}
    cfg.executor.assign = "round-robin"
    with pytest.raises(ValueError, match="executor.assign"):
        run_stage(run_charcount, cfg, ingested, progress=False)


def test_cli_executor_ray_runs_the_export_stage(ray_local, ingested):
    """`export --executor ray`: a map stage on Ray workers; every shard exported once, by a
    Ray worker, with the shard split of its worker's rank."""
    from click.testing import CliRunner

    from guidealign.cli import cli

    wd = ingested
    n = N_PROMPTS // SHARD_ROWS
    res = CliRunner().invoke(cli, ["export", "prompts", "-w", str(wd), "--executor", "ray",
                                   "--set", "executor.ray_resources={num_cpus: 1}"])
    assert res.exit_code == 0, res.output
    out = wd / "export" / "prompts"
    rows = []
    for i in range(n):
        m = read_marker(out, i)
        assert m is not None and m.stats["pid"] != os.getpid()
        assert i % m.stats["world_size"] == m.stats["rank"]
        lines = (out / f"shard-{i:05d}.jsonl").read_text().splitlines()
        assert len(lines) == m.rows == SHARD_ROWS
        rows += [json.loads(x) for x in lines]
    assert len(rows) == N_PROMPTS and len({r["id"] for r in rows}) == N_PROMPTS

    # a dataset with its own shard count (3, not the prompts' 8): at most one worker per shard
    from guidealign.shards import write_manifest, write_shard

    small = wd / "small"
    write_manifest(small, stage="small", num_shards=3, fingerprint="t")
    for i in range(3):
        write_shard(small, i, pa.table({"id": [f"s{i}a", f"s{i}b"]}), "t")
    res = CliRunner().invoke(cli, ["export", "small", "-w", str(wd), "--executor", "ray"])
    assert res.exit_code == 0, res.output
    markers = [read_marker(wd / "export" / "small", i) for i in range(3)]
    assert all(m is not None and m.stats["world_size"] <= 3 for m in markers)
    assert read_marker(wd / "export" / "small", 3) is None


def test_ray_workers_per_stage_input(tmp_path):
    from guidealign.executors import _input_shards
    from guidealign.gen.augment import load_risk_types
    from guidealign.stages import get

    cfg = Config()
    # augment: one worker per risk type at most, whether or not prompts exist
    assert _input_shards(get("augment"), cfg, tmp_path, {}) == len(load_risk_types(cfg)[0]) > 1
    with pytest.raises(RuntimeError, match="no manifest"):
        _input_shards(get("detect"), cfg, tmp_path, {})


def test_pipeline_on_ray_runs_ingest_as_one_task(ray_local, tmp_path):
    from guidealign.pipeline import run_pipeline

    cfg = ray_cfg(num_cpus=1)
    cfg.inputs = [str(write_prompts(tmp_path / "p.jsonl"))]
    cfg.ingest.shard_rows = SHARD_ROWS
    lines = []
    summary = run_pipeline(cfg, tmp_path / "run", stages=["ingest"], progress=False, echo=lines.append)
    assert summary["stages"] == ["ingest"] and summary["executor"] == "ray"
    assert all(read_marker(tmp_path / "run" / "prompts", i) for i in range(N_PROMPTS // SHARD_ROWS))
    assert any("40 prompts in 8 shard(s)" in x for x in lines), lines


def test_ray_executor_under_a_multi_worker_env_runs_locally(ingested, monkeypatch):
    """executor.kind=ray in a config used by a SLURM array task: the task runs its own rank."""
    from click.testing import CliRunner

    from guidealign.cli import cli

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    res = CliRunner().invoke(cli, ["export", "prompts", "-w", str(ingested), "--no-progress",
                                   "--set", "executor.kind=ray"])
    assert res.exit_code == 0, res.output
    assert "rank 1/4: shards [1, 5] of 8; wrote [1, 5]" in res.output


def test_cli_sets_the_assignment_for_the_command_only(ingested, monkeypatch):
    from click.testing import CliRunner

    from guidealign.cli import cli
    from guidealign.shards import claims

    res = CliRunner().invoke(cli, ["export", "prompts", "-w", str(ingested), "--no-progress",
                                   "--set", "executor.assign=round-robin"])
    assert res.exit_code != 0 and "executor.assign: expected one of static, dynamic" in res.output, res.output
    res = CliRunner().invoke(cli, ["export", "prompts", "-w", str(ingested), "--no-progress",
                                   "--set", "executor.assign=dynamic"])
    assert res.exit_code == 0, res.output

    import click

    import guidealign.hub.export as export_mod

    def probe(cfg, workdir, *, rank=0, world_size=1, progress=True, **options):
        a = claims.current_assignment()  # what the stage's map_shards would use
        click.echo(f"{a.kind} {a.ttl_s:g}")

    monkeypatch.setattr(export_mod, "run_export", probe)
    res = CliRunner().invoke(cli, ["export", "prompts", "-w", str(ingested), "--set",
                                   "executor.assign=dynamic", "--set", "executor.claim_ttl_s=45"])
    assert res.exit_code == 0 and res.output.strip() == "dynamic 45", res.output
    res = CliRunner().invoke(cli, ["export", "prompts", "-w", str(ingested)])
    assert res.output.strip() == "static 120", res.output
    assert claims.current_assignment().kind == "static"  # nothing leaks into this process


def test_a_driver_clears_only_its_own_runs_failure_markers(tmp_path, monkeypatch):
    """Markers of another run id never count for this run (failures()); the driver leaves them
    alone and removes its own run id's and those without one."""
    from guidealign.shards.failure import FAILED_DIR, clear_all_failed, mark_failed

    monkeypatch.setenv("GUIDEALIGN_RUN_ID", "other")
    mark_failed(tmp_path, 5, "another run's failure")
    monkeypatch.setenv("GUIDEALIGN_RUN_ID", "mine")
    mark_failed(tmp_path, 3, "this run's earlier failure")
    monkeypatch.delenv("GUIDEALIGN_RUN_ID")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    mark_failed(tmp_path, 4, "no run id")
    monkeypatch.setenv("GUIDEALIGN_RUN_ID", "mine")
    clear_all_failed(tmp_path)
    assert sorted(p.name for p in (tmp_path / FAILED_DIR).glob("*.json")) == ["rank-00005.json"]


def test_each_ray_task_runs_in_a_worker_process_that_exits_after_it(ray_local, ingested):
    """A stage task (train-retriever, index: encoders on a GPU) leaves no idle Ray worker behind
    holding what it loaded (a CUDA context, cached GPU memory): Ray reuses a task's worker
    process unless the function was declared with GPUs, and GPUs here come from the config
    through ``.options``. Two tasks in a row run in two processes, and the first is gone."""
    from guidealign.executors import run_on_ray

    pids = []
    for _ in range(2):
        shutil.rmtree(ingested / "charcount", ignore_errors=True)
        (res,) = run_on_ray(run_charcount, ray_cfg(num_cpus=1), ingested, n_tasks=1, progress=False)
        pids.append(res.pid)
    assert pids[0] != pids[1]
    deadline = time.monotonic() + 30
    while _alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pids[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_ray_workers_get_the_hub_token_and_the_nccl_and_vllm_settings():
    """A worker of a running cluster has its raylet's environment: push and gated models failed
    there without HF_TOKEN, a tensor-parallel engine without NCCL_SOCKET_IFNAME."""
    from guidealign.ray_workers import WORKER_ENV, worker_env

    env = {"HF_TOKEN": "hf_x", "NCCL_SOCKET_IFNAME": "ib0", "VLLM_ATTENTION_BACKEND": "FLASHINFER",
           "HF_HOME": "/shared/hf", "VLLM_WORKER_MULTIPROC_METHOD": "fork", "HOME": "/root", "PATH": "/bin"}
    assert worker_env(env) == {"HF_TOKEN": "hf_x", "NCCL_SOCKET_IFNAME": "ib0",
                               "VLLM_ATTENTION_BACKEND": "FLASHINFER", "HF_HOME": "/shared/hf", **WORKER_ENV}


class _FakeRay:
    def __init__(self):
        self.calls = []

    def wait(self, refs, num_returns, timeout):
        self.calls.append(("wait", len(refs), timeout))
        return refs, []

    def kill(self, actor, no_restart):
        self.calls.append(("kill", actor.name))


class _FakeActor:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls
        self.close = type("M", (), {"remote": lambda _self: self.calls.append(("close", name)) or name})()


def test_a_ray_pool_ends_its_workers_at_once_when_interrupted():
    """After Ctrl-C each actor still ran its stage, and its close call, queued behind it,
    waited 120 s per worker in turn (32 minutes for 16) while the engines went on."""
    from guidealign.ray_workers import WorkerPool

    for interrupted, want in ((True, [("kill", "a"), ("kill", "b")]),
                              (False, [("close", "a"), ("close", "b"), ("wait", 2, 120),
                                       ("kill", "a"), ("kill", "b")])):
        pool = object.__new__(WorkerPool)
        pool.ray = _FakeRay()
        pool.actors = [_FakeActor(n, pool.ray.calls) for n in ("a", "b")]
        pool.close(interrupted=interrupted)
        assert pool.ray.calls == want and pool.actors == []


def test_ray_workers_do_not_get_the_driver_nodes_vllm_address():
    from guidealign.ray_workers import worker_env

    env = worker_env({"VLLM_HOST_IP": "10.0.0.1", "VLLM_PORT": "51000", "VLLM_LOGGING_LEVEL": "DEBUG"})
    assert "VLLM_HOST_IP" not in env and "VLLM_PORT" not in env and env["VLLM_LOGGING_LEVEL"] == "DEBUG"
