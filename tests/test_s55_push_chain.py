"""The SLURM chain's last job (`submit-stages.sh` with PUSH=1) runs `guidealign push -c CONFIG -w
DIR`, with no WHAT: it failed at once ("Missing argument 'WHAT'", exit 2) after the hours of the
chain, and nothing was pushed. `push` with no WHAT now pushes what `guidealign run` pushes at its
end (run_push: push.what to push.repo_id, then the model to push.model_repo_id when set);
`push WHAT [REPO_ID]` is unchanged (WHAT only). Against the local Hub stand-in
(tests/hubserver.py), as tests/test_push.py."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from hubserver import HubServer
from test_push import TOKEN, hub_env, make_model, make_run, run, shard_paths

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "examples" / "slurm" / "guidealign.sbatch"
CHAIN = REPO / "examples" / "slurm" / "submit-stages.sh"
PUSH_SETS = ["--set", "push.repo_id=org/chain-ds", "--set", "push.model_repo_id=org/chain-model",
             "--set", "push.backoff_s=0.05"]


def assert_run_push(hub: HubServer, workdir: Path, m: Path) -> None:
    """What `run` pushes at its end: push.what (respond) to push.repo_id, the model to
    push.model_repo_id, each with its report under WORKDIR/push/."""
    assert set(hub.files("org/chain-ds")) == {".gitattributes", "README.md", *shard_paths(workdir, 2)}
    assert hub.content("org/chain-model", "model.safetensors", "model") == \
        (m / "model.safetensors").read_bytes()
    assert hub.state.repos[("dataset", "org/chain-ds")].private is True  # push.private's default
    assert (workdir / "push" / "dataset__org__chain-ds.json").exists()
    assert (workdir / "push" / "model__org__chain-model.json").exists()


def test_the_chains_push_job_pushes_what_run_pushes(tmp_path, workdir):
    """The chain submitted with a stand-in `sbatch` that runs the batch script of the push job
    (the last one) as SLURM would, and only that one: it pushes the dataset and the model."""
    make_run(workdir, shards=2)
    m = make_model(workdir)
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/bash\n"
                    'while [[ $1 == --* ]]; do shift; done\n'  # sbatch's own options
                    'script=$1; shift\n'
                    'echo "JOB $1 $*" >> "$LOG"\n'
                    'if [[ $1 == push ]]; then\n'
                    '  SLURM_SUBMIT_DIR=$PWD bash "$script" "$@" >> "$LOG" 2>&1 || echo "rc=$?" >> "$LOG"\n'
                    'fi\n'
                    "echo 1\n")
    fake.chmod(0o755)
    with HubServer(token=TOKEN) as hub:
        env = {k: v for k, v in hub_env(hub, tmp_path).items()
               if k not in ("GUIDEALIGN_LAUNCH", "GUIDEALIGN_REPO", "GUIDEALIGN_ALLOW_DOWNLOAD")}
        env.update(SUBMIT=str(fake), PUSH="1", LOG=str(tmp_path / "log"), GUIDEALIGN_PYTHON=sys.executable,
                   CUDA_VISIBLE_DEVICES="")
        p = subprocess.run([str(CHAIN), "2", "-w", str(workdir), *PUSH_SETS], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        log = (tmp_path / "log").read_text()
        assert [ln.split()[1] for ln in log.splitlines() if ln.startswith("JOB ")][-2:] == ["sft", "push"]
        assert "rc=" not in log and "Traceback" not in log, log[-4000:]
        assert "push dataset org/chain-ds" in log, log[-4000:]  # the model's summary is logged, as in `run`
        assert_run_push(hub, workdir, m)


def test_the_launchers_push_worker_command_pushes_what_run_pushes(tmp_path, workdir):
    """The worker command `launch push` plans for the chain's job (--dry-run), run as is."""
    make_run(workdir, shards=2)
    m = make_model(workdir)
    p = run([sys.executable, "-m", "guidealign", "launch", "--dry-run", "--gpus", "none", "push",
             "-w", str(workdir), *PUSH_SETS], dict(os.environ))
    assert p.returncode == 0, p.stderr
    worker = [ln for ln in p.stdout.splitlines() if "-m guidealign push" in ln]
    assert len(worker) == 1, p.stdout
    cmd = shlex.split(worker[0])
    assert cmd[cmd.index("push") + 1].startswith("-"), cmd  # no WHAT
    with HubServer(token=TOKEN) as hub:
        p = run(cmd + ["--no-progress"], hub_env(hub, tmp_path))
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert "push dataset org/chain-ds" in p.stdout
        assert_run_push(hub, workdir, m)


def test_push_without_what_follows_push_what_and_the_model_repo_alone(tmp_path, workdir):
    """push.what chooses the stage; push.model_repo_id alone pushes the model alone (as `run`);
    `push WHAT REPO_ID` still pushes WHAT only, whatever push.model_repo_id says."""
    make_run(workdir, shards=1)
    m = make_model(workdir)
    base = [sys.executable, "-m", "guidealign", "push", "-w", str(workdir), "--no-progress",
            "--set", "push.backoff_s=0.05"]
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        p = run(base + ["--set", "push.repo_id=org/lib", "--set", "push.what=library"], env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert "push dataset org/lib" in p.stdout
        assert not [r for r in hub.state.repos if r[0] == "model"]
        p = run(base + ["--set", "push.model_repo_id=org/only-model"], env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert "push model org/only-model" in p.stdout
        assert "model.safetensors" in hub.files("org/only-model", "model")
        assert [r for r in hub.state.repos if r[0] == "dataset"] == [("dataset", "org/lib")]
        # WHAT given: WHAT only (the model repo is not touched)
        p = run(base + ["respond", "org/what-only", "--set", "push.model_repo_id=org/not-this"], env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert ("dataset", "org/what-only") in hub.state.repos
        assert ("model", "org/not-this") not in hub.state.repos
        assert m.exists()


def test_push_without_what_and_without_a_repo_id_says_so(tmp_path, workdir):
    from guidealign.cli import cli

    make_run(workdir, shards=1)
    r = CliRunner().invoke(cli, ["push", "-w", str(workdir)])
    assert r.exit_code != 0
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output and "Missing argument" not in r.output, r.output
    assert "push.repo_id" in r.output and "WHAT" in r.output, r.output


def test_push_help_says_what_push_without_what_does():
    from guidealign.cli import cli

    r = CliRunner().invoke(cli, ["push", "--help"])
    assert r.exit_code == 0
    assert "[WHAT]" in r.output and "push.what" in r.output and "push.model_repo_id" in r.output, r.output
