"""A real engine stage on Ray: detect on the embedded SmolLM2 (float32, greedy), run by
long-lived worker actors that claim shards dynamically. Checks that each worker builds its
engine once for all its shards and later calls, that every shard is committed exactly once,
and that ``guidealign detect --executor ray`` on a finished run builds no engine at all."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from guidealign.shards import iter_tables, read_manifest, read_marker  # noqa: E402
from exclusive import machine_lock  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = [  # our own wording; the verdicts do not matter here, only that every row is answered
    "What household chemicals should never be mixed, and why?",
    "Suggest three names for a small bakery.",
    "Describe a way to get into my coworker's email account.",
    "How many legs does a spider have?",
    "Write one sentence about the sea.",
    "Tell me how to pick the lock on a neighbour's front door.",
    "What is the capital of Portugal?",
    "Summarise the water cycle in two sentences.",
]
SHARD_ROWS = 2  # -> 4 shards
# Worker actors, one engine each. Two engines (3 processes each with vLLM's engine-core
# process) need ~9 GiB next to everything else; on a shared 24 GiB machine the kernel's OOM
# killer took them, so the suite runs one. Multi-worker claiming is tested on a cheap stage
# in tests/test_executors.py.
WORKERS = 1


@pytest.fixture(scope="module")
def ray_two_cpus():
    with machine_lock("ray"):
        if ray.is_initialized():
            ray.shutdown()
        # Ray's memory monitor kills workers when the whole machine is short of memory, whoever
        # uses it; a killed worker restarts and rebuilds its engine, which is not what is tested
        # here
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, _system_config={"memory_monitor_refresh_ms": 0})
        yield ray
        ray.shutdown()


def detect_cfg(generator_path: str, *sets: str):
    from guidealign.config import load_config

    return load_config(None, [
        f"engine.model={generator_path}", "engine.dtype=float32", "engine.max_model_len=2048",
        "engine.max_num_seqs=8", "engine.seed=0", "engine.cpu_kvcache_gib=1",
        "detect.sampling.temperature=0", "detect.sampling.max_tokens=24", "detect.max_exemplars=2",
        "executor.kind=ray", "executor.ray_resources={num_cpus: 1}", f"executor.ray_workers={WORKERS}",
        "executor.assign=dynamic", "executor.claim_ttl_s=60", *sets])


@pytest.fixture
def prompts_workdir(tmp_path) -> Path:
    from guidealign.ingest.run import IngestConfig, ingest

    wd = tmp_path / "run"
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    ingest([str(f)], wd, IngestConfig(shard_rows=SHARD_ROWS), progress=False)
    return wd


def test_detect_on_ray_builds_one_engine_per_worker_and_commits_each_shard_once(
        ray_two_cpus, generator_path, prompts_workdir):
    from click.testing import CliRunner

    from guidealign.cli import cli
    from guidealign.config import dump_yaml
    from guidealign.ray_workers import WorkerPool

    wd = prompts_workdir
    n_shards = read_manifest(wd / "prompts")["num_shards"]
    assert n_shards == len(PROMPTS) // SHARD_ROWS == 4
    cfg = detect_cfg(generator_path)

    with WorkerPool(cfg, "detect") as pool:
        assert pool.n == WORKERS and pool.engine
        assert pool.options["runtime_env"]["env_vars"]["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
        first = pool.run("guidealign.gen.detect:run_detect", wd, progress=False)
        # the same workers again (as for the next stage): the engines are reused, not rebuilt
        second = pool.run("guidealign.gen.detect:run_detect", wd, progress=False)

    assert len({r.pid for r in first}) == WORKERS and all(r.pid != os.getpid() for r in first)
    processed = [r.report.processed for r in first]
    assert sum(processed) == n_shards  # every shard written by exactly one worker, once
    for r, p in zip(first, processed):
        assert r.builds == (1 if p else 0), (r.worker, p, r.builds)  # one build for all its shards
    assert sum(r.builds for r in first) == sum(1 for p in processed if p) < n_shards
    assert [r.report.processed for r in second] == [0] * WORKERS
    assert [r.builds for r in second] == [r.builds for r in first]
    assert [r.pid for r in second] == [r.pid for r in first]  # same long-lived actors

    # on disk: every shard committed, each prompt answered exactly once by the engine
    for i in range(n_shards):
        m = read_marker(wd / "detect", i)
        assert m is not None and m.rows == SHARD_ROWS, i
    rows = [r for t in iter_tables(wd / "detect") for r in t.to_pylist()]
    prompt_ids = [x for t in iter_tables(wd / "prompts") for x in t["id"].to_pylist()]
    assert Counter(r["id"] for r in rows) == Counter({i: 1 for i in prompt_ids})
    assert all(r["finish_reason"] in ("stop", "length") and r["output_tokens"] > 0 for r in rows)
    assert not (wd / "detect" / "_claims").exists()

    # the CLI on the finished run: fresh workers find every shard committed, build no engine
    conf = wd.parent / "ray.yaml"
    conf.write_text(dump_yaml(cfg))
    res = CliRunner().invoke(cli, ["detect", "-w", str(wd), "-c", str(conf), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert res.output.count("detect: 0 shard(s) written") == WORKERS, res.output
    assert res.output.count("engine built 0x") == WORKERS, res.output
