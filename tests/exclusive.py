"""A machine-wide lock for tests that start a service only one process on this machine can run
(a local SLURM on fixed ports, a local Ray cluster). Under pytest-xdist (``-n 2 --dist
loadfile``, as CI runs) a second worker that needs the same service waits for the first."""
from __future__ import annotations

import contextlib
import fcntl
import tempfile
from pathlib import Path


@contextlib.contextmanager
def machine_lock(name: str):
    with open(Path(tempfile.gettempdir()) / f"guidealign-tests-{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
