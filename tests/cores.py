"""The cores each pytest-xdist worker computes on, and the whole machine for local clusters.

Under pytest-xdist (CI: ``-n 2`` on 2 cores) each worker, and all it starts (engines, CLI
subprocesses), runs on its own share of the cores. Unpinned, each worker's engines bound their
OpenMP threads to every core (``engine.cpu_threads_bind: auto``) and torch used every core too,
so two workers' engines ran two spinning threads per core: the longest tests ran 1.5-4.5x slower
beside each other than alone. Pinned, an engine (``auto`` reads the affinity) and torch's default
thread count see the worker's cores only; settings that name cores (the e2e ranks'
``engine.cpu_threads_bind``) still get them. A local SLURM emulates a node of the whole machine,
so its daemons start with every core (``whole_machine``). GUIDEALIGN_TEST_PIN=0 turns it off.
"""
from __future__ import annotations

import os

# the cores this process was given: read on import, which conftest does before it pins
ALL = tuple(sorted(os.sched_getaffinity(0)))


def pin_xdist_worker() -> None:
    """Pin this pytest-xdist worker to every ``count``-th core from its index (no-op outside xdist,
    with one worker, or with fewer cores than workers)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count < 2 or len(ALL) < count \
            or os.environ.get("GUIDEALIGN_TEST_PIN") == "0":
        return
    os.sched_setaffinity(0, set(ALL[int(worker[2:]) % count::count]))


def whole_machine() -> None:
    """``preexec_fn`` for a process that must see every core (a local cluster's daemons)."""
    os.sched_setaffinity(0, set(ALL))
