"""The engine watchdog (``core.reaper``): what it records and kills."""
from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, time
    import psutil
    from multiprocessing import resource_tracker
    from guidealign.core import reaper

    def nap(s):
        time.sleep(s)

    if __name__ == "__main__":
        before = reaper.child_pids()
        # the first spawn of this process also starts multiprocessing's resource tracker
        done, stuck = (mp.get_context("spawn").Process(target=nap, args=(s,)) for s in (0.2, 600))
        done.start(); stuck.start()
        procs = reaper.child_pids() - before
        tracker = resource_tracker._resource_tracker._pid
        assert tracker is not None and psutil.pid_exists(tracker)
        print("tracker recorded:", tracker in {pid for pid, _ in procs})
        watchdog = reaper.guard(procs)
        done.join()
        reaper.release(watchdog)  # kills what is still alive of what it was given
        stuck.join(10)
        print("stuck killed:", stuck.exitcode is not None)
        time.sleep(0.3)
        try:
            alive = psutil.Process(tracker).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        print("tracker alive:", alive)
""")


def test_the_engine_watchdog_leaves_the_resource_tracker_alone(tmp_path):
    """An engine's processes are what this process started while it started (``child_pids``
    before and after); multiprocessing's resource tracker, started by the engine's first spawn,
    is this process's until it exits. Recorded with the engine's processes, the watchdog killed
    it on ``close_llm``: the shared memory registered with it (vLLM's broadcast buffers of a
    tensor-parallel engine, in /dev/shm) then leaked when a later engine was killed, and the
    next spawn warned and started another. A recorded process still alive is killed as before."""
    script = tmp_path / "reap.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tracker recorded: False" in out.stdout
    assert "stuck killed: True" in out.stdout
    assert "tracker alive: True" in out.stdout


def test_a_start_deadline_kills_what_the_block_started_once_its_time_is_up():
    """``start_deadline``: processes the block started (and their children) are killed once the
    time is up, so a wait on them ends; before that, or without a limit, nothing is touched."""
    import subprocess as sp

    from guidealign.core import reaper

    before = reaper.child_pids()
    with reaper.start_deadline(0.5, before) as expired:
        p = sp.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        assert p.wait(timeout=60) != 0  # killed, not finished
    assert expired()
    with reaper.start_deadline(0, reaper.child_pids()) as expired:
        q = sp.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
        assert q.wait(timeout=60) == 0
    assert not expired()
    with reaper.start_deadline(60, reaper.child_pids()) as expired:
        q = sp.Popen([sys.executable, "-c", "pass"])
        assert q.wait(timeout=60) == 0
    assert not expired()
