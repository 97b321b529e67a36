"""A real single-node SLURM for the tests (tests/slurm/local_slurm.sh): the module fixture
that starts and stops it, and the wait for a job to leave the queue."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from cores import whole_machine
from exclusive import machine_lock

SCRIPT = Path(__file__).resolve().parent / "slurm" / "local_slurm.sh"


@pytest.fixture(scope="module")
def slurm(module_tmp):
    d = module_tmp.mktemp("slurm")
    with machine_lock("slurm"):  # its daemons listen on fixed ports
        start = subprocess.run([str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=180,
                               preexec_fn=whole_machine)  # a node of every core
        env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
        try:
            assert start.returncode == 0, f"local SLURM did not start:\n{start.stdout}\n{start.stderr}"
            yield env
        finally:
            subprocess.run([str(SCRIPT), "stop", str(d)], capture_output=True, text=True, timeout=120)


def wait_gone(env: dict, job: str, limit_s: float = 600, poll: float = 0.5) -> None:
    """Poll squeue until no task of ``job`` is left (``limit_s`` is a hang guard, not a timing check)."""
    deadline = time.monotonic() + limit_s
    while True:
        q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], env=env,
                           capture_output=True, text=True, timeout=60)
        if q.returncode == 0 and not q.stdout.strip():
            return
        assert time.monotonic() < deadline, f"job {job} still queued: {q.stdout}{q.stderr}"
        time.sleep(poll)
