"""run_sft's torchrun is stopped with its workers, which sit in sessions of their own.

A stand-in for torchrun does what torch's elastic agent does: it starts its worker with
``start_new_session=True``, and on SIGTERM/SIGINT it takes a moment to stop that worker before
it exits. The "rank" is a real process running ``launcher.run_to_end``, signalled the way a
terminal's Ctrl-C or ``launch`` reaches it: the whole process group."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

TORCHRUN = r"""
import os, signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
def stop(sig, frame):
    with open(sys.argv[2], "a") as f:
        f.write(f"{sig}\n")
    time.sleep(1.0)  # the agent takes a moment to stop its workers
    os.killpg(worker.pid, signal.SIGTERM)
    os.waitpid(worker.pid, 0)  # (not worker.wait(): the interrupted main thread holds its lock)
    with open(sys.argv[2], "a") as f:
        f.write("stopped\n")
    os._exit(1)
if sys.argv[3] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {worker.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
worker.wait()
"""

RANK = r"""
import signal, sys
# a rank in a terminal or under launch takes Ctrl-C; one started by a non-interactive shell's
# `&` or by pytest-xdist's worker inherits SIGINT ignored (Python then never raises KeyboardInterrupt)
signal.signal(signal.SIGINT, signal.default_int_handler)
from guidealign.sft.launcher import run_to_end
run_to_end([sys.executable, "-c", sys.argv[1], *sys.argv[2:5]], grace=float(sys.argv[5]))
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(pids, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def _start(tmp_path, mode: str, grace: float):
    pids, sigs = tmp_path / "pids", tmp_path / "signals"
    rank = subprocess.Popen([sys.executable, "-c", RANK, TORCHRUN, str(pids), str(sigs), mode, str(grace)],
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not pids.exists():
        assert rank.poll() is None and time.monotonic() < deadline, "the stand-in torchrun did not start"
        time.sleep(0.05)
    torchrun, worker = map(int, pids.read_text().split())
    # and the rank has its watchdog (started right after torchrun): it is inside its wait
    while len(psutil.Process(rank.pid).children()) < 2:
        assert rank.poll() is None and time.monotonic() < deadline, "the rank's watchdog did not start"
        time.sleep(0.05)
    return rank, torchrun, worker, sigs


@pytest.fixture
def cleanup():
    pids = []
    yield pids
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_torchrun_once_and_its_workers_with_it(tmp_path, cleanup, sig):
    rank, torchrun, worker, sigs = _start(tmp_path, "stop", grace=30)
    cleanup += [torchrun, worker]
    os.killpg(rank.pid, sig)  # the terminal's Ctrl-C, launch forwarding it or stopping the rank
    assert rank.wait(timeout=60) != 0
    assert _gone([torchrun, worker]), "torchrun's worker outlived the interrupted rank"
    # torchrun was asked once (a second signal would cut its own stopping of the workers short)
    # and stopped them itself, not killed midway
    assert sigs.read_text().split() == [str(int(signal.SIGTERM)), "stopped"]


def test_a_torchrun_that_does_not_stop_is_killed_with_its_workers_after_the_grace(tmp_path, cleanup):
    rank, torchrun, worker, _ = _start(tmp_path, "ignore", grace=1)
    cleanup += [torchrun, worker]
    os.killpg(rank.pid, signal.SIGINT)
    assert rank.wait(timeout=60) != 0
    assert _gone([torchrun, worker])


def test_a_killed_rank_takes_torchrun_and_its_workers_with_it(tmp_path, cleanup):
    rank, torchrun, worker, _ = _start(tmp_path, "stop", grace=30)
    cleanup += [torchrun, worker]
    os.killpg(rank.pid, signal.SIGKILL)
    rank.wait(timeout=30)
    assert _gone([torchrun, worker]), "torchrun or its worker outlived a SIGKILLed rank"


def test_torchrun_status_is_returned(tmp_path):
    from guidealign.sft.launcher import run_to_end

    assert run_to_end([sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert run_to_end([sys.executable, "-c", "pass"]) == 0
