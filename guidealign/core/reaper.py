"""Stop an engine's processes when the process that started them dies, even by SIGKILL.

vLLM's engine core runs in processes of its own, and nothing in vLLM ends them when their
parent is killed: a SIGKILLed worker would leave its engine holding the model's memory.
``guard`` starts a tiny watchdog that blocks reading a pipe only the parent holds; the
pipe closes when the parent exits, however it exits, and the watchdog then kills the
processes it was given (with their children). ``release`` ends the watchdog after a
normal shutdown.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# the watchdog's process: imports only this module (psutil and the standard library), found
# where this process found it (whatever the watchdog's working directory and sys.path)
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_WATCHDOG = (f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); "
             "from guidealign.core.reaper import _watch; _watch(sys.argv[1:])")


def _watch(items: list[str]) -> None:
    """The watchdog's body: block until the owner's pipe closes (the owner released it, or
    died however it died), then kill the processes ``items`` ("pid:create time") name."""
    sys.stdin.buffer.read()  # returns at end of file
    procs = set()
    for item in items:
        pid, created = item.split(":")
        procs.add((int(pid), float(created)))
    kill(procs)


def child_pids() -> set[tuple[int, float]]:
    """(pid, create time) of this process's children, recursively, but multiprocessing's
    resource tracker: started with a first spawn (the engine's), it is this process's for as
    long as it lives, and killing it with an engine's processes (the watchdog, on ``release``)
    left the shared memory registered with it (vLLM's tensor-parallel broadcast buffers in
    /dev/shm) to leak when a later engine was killed."""
    import psutil

    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if not _is_resource_tracker(p):
                out.add((p.pid, p.create_time()))
        except psutil.Error:
            pass
    return out


def _is_resource_tracker(p) -> bool:
    return any("resource_tracker" in a for a in p.cmdline())


def _alive(procs: set[tuple[int, float]]) -> list:
    """The psutil processes of ``procs`` (pid, create time) still running: not a pid reused since."""
    import psutil

    out = []
    for pid, created in procs:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:
                out.append(p)
        except psutil.Error:
            pass
    return out


def wait_exit(procs: set[tuple[int, float]], timeout: float) -> int:
    """Wait up to ``timeout`` seconds for ``procs`` (pid, create time, from :func:`child_pids`)
    to exit; how many are still alive then."""
    import psutil

    live = _alive(procs)
    return len(psutil.wait_procs(live, timeout=timeout)[1]) if live else 0


def guard(procs: set[tuple[int, float]]) -> subprocess.Popen | None:
    """Start a watchdog that kills ``procs`` once this process is gone."""
    if not procs:
        return None
    args = [f"{pid}:{created!r}" for pid, created in sorted(procs)]
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def guard_process(pid: int) -> subprocess.Popen | None:
    """:func:`guard` for one process (and, when it fires, its children), or None when it is gone."""
    import psutil

    try:
        return guard({(pid, psutil.Process(pid).create_time())})
    except psutil.Error:
        return None


def release(watchdog: subprocess.Popen | None) -> None:
    """After a normal shutdown: close the pipe so the watchdog checks once and exits."""
    if watchdog is not None and watchdog.poll() is None:
        watchdog.stdin.close()
        watchdog.wait(timeout=30)


@contextmanager
def start_deadline(seconds: float, before: set[tuple[int, float]]):
    """For a block that starts processes (an engine): once ``seconds`` (0: never) have passed,
    kill the processes started since ``before`` (``child_pids()``), with their children, and
    any it starts after, until the block ends, so that what waits on them fails instead of
    waiting for ever. Yields ``expired()``: whether the time ran out."""
    fired, done = threading.Event(), threading.Event()

    def watch():
        if done.wait(seconds):
            return
        fired.set()
        while True:
            kill(child_pids() - before)
            if done.wait(0.5):
                return

    thread = None
    if seconds and seconds > 0:
        thread = threading.Thread(target=watch, name="engine-start-deadline", daemon=True)
        thread.start()
    try:
        yield fired.is_set
    finally:
        done.set()
        if thread is not None:
            thread.join()


@contextmanager
def progress_deadline(seconds: float, procs: set[tuple[int, float]], on_expire=None):
    """For a block that waits on ``procs`` (an engine's processes) to make progress: once
    ``seconds`` (0: never) pass without a call of ``tick()``, kill ``procs`` with their
    children, then call ``on_expire()`` (to wake the wait, where the processes' death alone
    does not), so that the wait fails instead of hanging (a tensor-parallel worker stuck in an
    NCCL collective mid-generation waits for ever, and the rank's heartbeat beats meanwhile).
    Yields ``(tick, expired)``: ``tick()`` says progress was made, ``expired()`` whether the
    time ran out (the processes are then killed)."""
    last = [time.monotonic()]
    fired, done = threading.Event(), threading.Event()
    poll = max(0.01, min(5.0, seconds / 4))

    def tick() -> None:
        last[0] = time.monotonic()

    def watch():
        woke = time.monotonic()
        while not done.wait(max(0.01, min(poll, last[0] + seconds - time.monotonic()))):
            now = time.monotonic()
            if now - woke > poll + 30:
                # this thread slept far past its poll: the whole job was stopped (a Slurm suspend,
                # SIGSTOP) and nothing could make progress meanwhile: the clock starts again
                last[0] = now
            woke = now
            if now - last[0] >= seconds:
                fired.set()
                kill(procs)
                if on_expire is not None:
                    on_expire()
                return

    thread = None
    if seconds and seconds > 0 and procs:
        thread = threading.Thread(target=watch, name="engine-progress-deadline", daemon=True)
        thread.start()
    try:
        yield tick, fired.is_set
    finally:
        done.set()
        if thread is not None:
            thread.join()


def kill(procs: set[tuple[int, float]]) -> None:
    """SIGKILL ``procs`` (pid, create time) and their children, now."""
    import psutil

    victims = []
    for p in _alive(procs):
        try:
            victims += [p] + p.children(recursive=True)
        except psutil.Error:
            pass
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
