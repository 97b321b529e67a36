"""A sharded stage as a SLURM job array on a real single-node SLURM (slurmctld + slurmd on loopback).

tests/slurm/local_slurm.sh starts the cluster; the test ingests 8 prompt shards, submits
``guidealign export prompts`` through the shipped examples/slurm/guidealign.sbatch as an
array of 4 tasks (each through scripts/launch.sh, i.e. ``./run.sh launch``), polls squeue until the array is
gone, and checks on disk that every shard was written exactly once, by the rank that owns
it. Then it removes one shard's marker (a task that died mid-shard), resubmits the same
array, and checks that only that shard is written again.

Needs root and Debian's packages:
``apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import slurm, wait_gone  # noqa: F401 - slurm is a fixture

from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import read_marker, read_table

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "examples" / "slurm" / "guidealign.sbatch"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "munged", "mungekey")
TASKS, SHARDS, SHARD_ROWS = 4, 8, 6

missing = [b for b in BINARIES if shutil.which(b) is None]
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"SLURM binaries missing ({', '.join(missing)}): "
                       "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a local slurmd must run as root"),
]


def submit_array(env: dict, workdir: Path, tag: str) -> tuple[str, list[str]]:
    """sbatch the example as an array of TASKS, wait for it to leave squeue, return its logs."""
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    job_env = dict(env, CUDA_VISIBLE_DEVICES="",  # CPU workers: one per array task
                   GUIDEALIGN_PYTHON=sys.executable,  # the example's own launcher, this venv
                   HF_HUB_OFFLINE="1")
    out = subprocess.run(
        ["sbatch", "--parsable", f"--array=0-{TASKS - 1}", "--cpus-per-task=1",
         f"--output={logs}/{tag}-%A_%a.out", f"--chdir={REPO}", str(SBATCH),
         "export", "prompts", "-w", str(workdir), "--no-progress"],
        env=job_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    wait_gone(env, job)
    texts = []
    for k in range(TASKS):
        p = logs / f"{tag}-{job}_{k}.out"
        assert p.exists(), f"no log for array task {k}: {sorted(os.listdir(logs))}"
        texts.append(p.read_text())
    return job, texts


def written_by_task(texts: list[str]) -> dict[int, list[int]]:
    """Per array task: the rank its log reports and the shards it says it wrote."""
    out = {}
    for k, text in enumerate(texts):
        m = re.search(r"export prompts: rank (\d+)/(\d+): shards (\[[^\]]*\]) of (\d+); "
                      r"wrote (\[[^\]]*\])", text)
        assert m, f"task {k} log has no export summary:\n{text}"
        rank, world = int(m.group(1)), int(m.group(2))
        assert (rank, world) == (k, TASKS), f"task {k} ran as rank {rank}/{world}:\n{text}"
        assert json.loads(m.group(3)) == [i for i in range(SHARDS) if i % TASKS == k]
        assert f"task {k} of {TASKS}" in text  # the sbatch script's own line
        assert f"launch: export on node {k}/{TASKS}" in text
        out[k] = json.loads(m.group(5))
    return out


def test_export_as_slurm_job_array_each_shard_once(slurm, tmp_path):
    wd = tmp_path / "run"
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question {i}: why is the sky blue?"}) + "\n"
                           for i in range(SHARDS * SHARD_ROWS)))
    rep = ingest([str(src)], wd, IngestConfig(shard_rows=SHARD_ROWS), progress=False)
    assert rep.shards == SHARDS

    job, texts = submit_array(slurm, wd, "first")
    wrote = written_by_task(texts)
    all_written = sorted(i for shards in wrote.values() for i in shards)
    assert all_written == list(range(SHARDS)), wrote  # every shard once, none twice

    out = wd / "export" / "prompts"
    ids, pids = [], {}
    for i in range(SHARDS):
        m = read_marker(out, i)
        assert m is not None, f"shard {i} not committed"
        assert m.stats["rank"] == i % TASKS and m.stats["world_size"] == TASKS
        pids.setdefault(m.stats["rank"], set()).add(m.stats["pid"])
        rows = [json.loads(x) for x in (out / f"shard-{i:05d}.jsonl").read_text().splitlines()]
        src_ids = read_table(wd / "prompts", i, ["id"])["id"].to_pylist()
        assert len(rows) == m.rows == len(src_ids) == SHARD_ROWS
        assert [r["id"] for r in rows] == src_ids
        ids += src_ids
    assert len(ids) == len(set(ids)) == SHARDS * SHARD_ROWS
    assert len({p for s in pids.values() for p in s}) == TASKS  # four separate processes
    created = {i: read_marker(out, i).created for i in range(SHARDS)}

    # array task 1 "died" while writing shard 5: no marker; resubmitting the array redoes only it
    (out / "shard-00005.done.json").unlink()
    (out / "shard-00005.jsonl").write_text('{"torn": ')
    job2, texts2 = submit_array(slurm, wd, "rerun")
    assert job2 != job
    assert written_by_task(texts2) == {0: [], 1: [5], 2: [], 3: []}
    assert {i: read_marker(out, i).created for i in range(SHARDS) if i != 5} == \
        {i: c for i, c in created.items() if i != 5}
    m5 = read_marker(out, 5)
    assert m5.rows == SHARD_ROWS and m5.stats["rank"] == 1
    assert len((out / "shard-00005.jsonl").read_text().splitlines()) == SHARD_ROWS


@pytest.mark.slow
def test_detect_with_the_real_engine_as_slurm_array(slurm, tmp_path):
    """An engine stage under SLURM: detect on the embedded model as a 2-task array over 4
    prompt shards, each task with its own vLLM engine; every shard is written exactly once."""
    wd = tmp_path / "run"
    src = tmp_path / "prompts.jsonl"
    questions = ["How do I bake bread?", "How can I pick a lock to get into my neighbour's house?",
                 "What is the capital of Peru?", "Write a poem about rain.",
                 "How do I make a fake ID?", "Explain photosynthesis briefly.",
                 "My friend says she wants to end her life. What do I do?", "Sort [3, 1, 2]."]
    src.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    ingest([str(src)], wd, IngestConfig(shard_rows=2), progress=False)
    logs = wd / "logs"
    logs.mkdir()
    job_env = dict(slurm, CUDA_VISIBLE_DEVICES="", GUIDEALIGN_PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    sets = ["engine.dtype=float32", "engine.max_model_len=4096", "engine.cpu_kvcache_gib=1",
            "detect.sampling.temperature=0", "detect.sampling.max_tokens=24"]
    out = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", f"--output={logs}/d-%A_%a.out",
         f"--chdir={REPO}", str(SBATCH), "detect", "-w", str(wd), "-c", "configs/demo.yaml",
         "--no-progress", *[a for s in sets for a in ("--set", s)]],
        env=job_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    wait_gone(slurm, job, limit_s=1500, poll=1)  # two engines start on 2 cores
    texts = [(logs / f"d-{job}_{k}.out").read_text() for k in range(2)]
    written = []
    for k, text in enumerate(texts):
        m = re.search(r"detect: (\d+) shard\(s\) written, (\d+) already done", text)
        assert m, f"task {k} has no detect summary:\n{text[-4000:]}"
        written.append(int(m.group(1)))
    assert written == [2, 2], texts  # shards 0,2 on task 0 and 1,3 on task 1: each once
    ids = []
    for i in range(4):
        assert read_marker(wd / "detect", i) is not None, f"detect shard {i} not committed"
        t = read_table(wd / "detect", i)
        assert t["id"].to_pylist() == read_table(wd / "prompts", i, ["id"])["id"].to_pylist()
        assert all(t["raw"].to_pylist())  # the engine answered every prompt
        ids += t["id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(questions)
