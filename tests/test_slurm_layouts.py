"""The documented SLURM layouts, on a real single-node SLURM (tests/slurm/local_slurm.sh):

- layout 1, one job of several tasks: the sbatch script starts one launcher per task under
  ``srun --kill-on-bad-exit``; rank 0 ingests while rank 1 waits, and when rank 0 fails the
  whole job ends (no rank idles) with rank 0's failure marker in the run directory;
- layout 2, a chain: ``submit-stages.sh`` submits map stages as arrays and reduce stages as
  single jobs, each after the previous one succeeded (checked on the printed commands).

Needs root and Debian's slurmctld/slurmd/munge, like tests/test_slurm.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import slurm, wait_gone  # noqa: F401 - slurm is a fixture

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "examples" / "slurm" / "guidealign.sbatch"
CHAIN = REPO / "examples" / "slurm" / "submit-stages.sh"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "srun", "munged", "mungekey")
missing = [b for b in BINARIES if shutil.which(b) is None]
needs_slurm = pytest.mark.skipif(
    bool(missing) or os.geteuid() != 0,
    reason=f"needs root and SLURM (missing: {', '.join(missing) or 'none'}): apt-get install -y "
           "--no-install-recommends slurmctld slurmd slurm-client munge")


def submit_and_wait(env: dict, args: list[str], out: Path) -> str:
    job_env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    job_env.update(CUDA_VISIBLE_DEVICES="", GUIDEALIGN_PYTHON=sys.executable)
    p = subprocess.run(["sbatch", "--parsable", f"--output={out}", f"--chdir={REPO}", *args],
                       env=job_env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    wait_gone(env, job)
    return job


@needs_slurm
@pytest.mark.parametrize("ok", [True, False], ids=["succeeds", "rank0-fails"])
def test_one_job_of_two_tasks_runs_under_srun_and_ends_together(slurm, tmp_path, ok):
    wd = tmp_path / "run"
    src = tmp_path / ("p.jsonl" if ok else "missing.jsonl")
    if ok:
        src.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(6)))
    log = tmp_path / "job.out"
    submit_and_wait(slurm, ["--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", str(SBATCH),
                            "run", "-w", str(wd), "--stages", "ingest", "--no-progress",
                            # (a missing input fails every task's preflight; past it, rank 0's ingest)
                            *([] if ok else ["--no-check"]), "--set", f"inputs=[{src}]"], log)
    text = log.read_text()
    # one launcher per task, node ranks 0 and 1 of 2 (SLURM_PROCID under srun); when rank 0
    # fails, task 1 may be stopped before its launcher prints a line (a race, not a defect):
    # srun's own record of stopping it then shows that it ran
    assert "launch: run on node 0/2" in text, text
    assert "launch: run on node 1/2" in text or not ok and "task 1: Terminated" in text, text
    if ok:
        assert (wd / "prompts" / "_stage.json").exists()
        assert not (wd / "_failed").exists() or not list((wd / "_failed").iterdir()), text
    else:
        marker = json.loads((wd / "_failed" / "rank-00000.json").read_text())
        assert "missing.jsonl" in marker["error"]
        assert not (wd / "prompts" / "_stage.json").exists()


def test_stage_chain_is_arrays_and_single_jobs_each_after_the_last(tmp_path):
    p = subprocess.run([str(CHAIN), "3", "-c", "configs/gpu-paper.yaml", "-w", "/shared/x"],
                       env=dict(os.environ, SUBMIT="echo", SBATCH_ARGS="--gpus-per-node=8"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    jobs = [line.split(": ", 1) for line in p.stderr.splitlines() if ": " in line]
    stages = [j[0] for j in jobs]
    assert stages == ["reduce ingest", "map detect", "map guidelines", "reduce library",
                      "reduce train-retriever", "reduce index", "map retrieve", "map respond",
                      "reduce sft"]
    for n, (kind_stage, cmd) in enumerate(jobs):
        words = cmd.split()
        assert "--kill-on-invalid-dep=yes" in words and "--gpus-per-node=8" in words
        assert ("--array=0-2" in words) == kind_stage.startswith("map")
        deps = [w for w in words if w.startswith("--dependency=")]
        assert deps == ([] if n == 0 else [f"--dependency=afterok:JOB{n}"])
        assert words[words.index(str(SBATCH)) + 1] == kind_stage.split()[1]


def test_the_chain_pushes_after_sft_when_asked(tmp_path):
    """The chain stopped after sft, and nothing said a push set in the config never ran."""
    p = subprocess.run([str(CHAIN), "2", "-c", "configs/gpu-paper.yaml", "-w", "/shared/x",
                        "--set", "push.repo_id=me/data"],
                       env=dict(os.environ, SUBMIT="echo", PUSH="1"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    jobs = [line.split(": ", 1) for line in p.stderr.splitlines() if ": " in line]
    assert [j[0] for j in jobs][-2:] == ["reduce sft", "reduce push"]
    assert "--dependency=afterok:JOB9" in jobs[-1][1].split()


@pytest.mark.parametrize("repo_dir", [None, "my repo"], ids=["this-repo", "path-with-space"])
def test_the_chain_runs_the_batch_script_from_any_submit_directory(tmp_path, repo_dir):
    """The batch script ran `scripts/launch.sh` relative to the submit directory: every job of a
    chain submitted from outside the repository failed with exit 127 (and the chain was
    cancelled). submit-stages.sh now passes the launcher's path (GUIDEALIGN_LAUNCH, shell-quoted:
    a repository under a path with a space broke the first fix), and a batch script that cannot
    find one says so. No SLURM needed: a stand-in `sbatch` runs the script in the submit
    directory as SLURM would, with the launcher's --dry-run."""
    chain = CHAIN
    if repo_dir:  # the scripts in a copy of the repository's layout under a path with a space
        root = tmp_path / repo_dir
        (root / "examples" / "slurm").mkdir(parents=True)
        (root / "scripts").mkdir()
        for f in (CHAIN, SBATCH):
            shutil.copy(f, root / "examples" / "slurm" / f.name)
        (root / "scripts" / "launch.sh").symlink_to(REPO / "scripts" / "launch.sh")
        chain = root / "examples" / "slurm" / CHAIN.name
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/bash\n"
                    'while [[ $1 == --* ]]; do shift; done\n'  # sbatch's own options
                    'script=$1; shift\n'
                    'SLURM_SUBMIT_DIR=$PWD bash "$script" --dry-run "$@" >> "$LOG" 2>&1 || echo "rc=$?" >> "$LOG"\n'
                    "echo 1\n")
    fake.chmod(0o755)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GUIDEALIGN_LAUNCH", "GUIDEALIGN_REPO")}
    env.update(SUBMIT=str(fake), LOG=str(tmp_path / "log"), GUIDEALIGN_PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([str(chain), "2", "-w", "runs/x"], cwd=away, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    log = (tmp_path / "log").read_text()
    assert "rc=" not in log and "No such file" not in log, log
    assert log.count("launch: ") == 9 and "-m guidealign respond -w runs/x" in log, log  # every job planned
    # the batch script alone, from outside the repository, without a launcher: a clear error
    p = subprocess.run(["bash", str(SBATCH), "detect"], cwd=away, env=dict(env, SLURM_SUBMIT_DIR=str(away)),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "GUIDEALIGN_LAUNCH" in p.stderr, p.stderr
