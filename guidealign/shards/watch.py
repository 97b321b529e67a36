"""Waits under the fail-fast rules: a wait polls for failure markers and rank conflicts and
ends on stalled progress (see ``failure``'s module doc)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from guidealign.shards.failure import (CONFLICT_HINT, RankConflict, Stalled, context, heartbeats,
                                       raise_if_conflict, raise_if_failed, run_id,
                                       splits_like_this_rank, stall_timeout)


@contextmanager
def waiting(what: str):
    """Mark this rank as waiting (its heartbeats then do not count as progress)."""
    ctx = context()
    if ctx is None:
        yield
        return
    old = (ctx.state, ctx.waiting_for)
    ctx.state, ctx.waiting_for = "waiting", what
    try:
        yield
    finally:
        ctx.state, ctx.waiting_for = old


class Watch:
    """One wait's fail-fast checks: call :meth:`check` once per poll with a progress count."""

    def __init__(self, workdir: str | Path, what: str, stall_timeout_s: float | None = None):
        self.workdir = Path(workdir)
        self.what = what
        self.stall = stall_timeout_s if stall_timeout_s and stall_timeout_s > 0 else stall_timeout()
        self.last_move = time.monotonic()
        self.progress = None
        self.beats: dict[str, float] = {}

    def _beats_moved(self) -> bool:
        moved = False
        ctx = context()
        dirs = {self.workdir} | ({ctx.workdir} if ctx is not None else set())
        for name, hb in ((f"{d}/{n}", hb) for d in dirs for n, hb in heartbeats(d).items()):
            t = float(hb.get("time", 0.0))
            alive = name in self.beats and t != self.beats[name]
            if hb.get("state") == "working" and alive and _of_this_run(hb, ctx):
                moved = True
            if alive:
                _check_world(hb)
            self.beats[name] = t
        return moved

    def check(self, progress, missing: str = "") -> None:
        raise_if_conflict()
        raise_if_failed(self.workdir, self.what)
        ctx = context()
        if ctx is not None and ctx.workdir != self.workdir:  # e.g. a dataset under WORKDIR/eval/
            raise_if_failed(ctx.workdir, self.what)
        moved = self._beats_moved()
        if progress != self.progress:
            self.progress, moved = progress, True
        now = time.monotonic()
        if moved:
            self.last_move = now
        elif now - self.last_move >= self.stall:
            alive = [f"rank {hb.get('rank')} {hb.get('state')}"
                     + (f" for {hb['waiting_for']}" if hb.get("waiting_for") else "")
                     for hb in heartbeats(self.workdir).values() if hb.get("state") != "exited"]
            older = _markers_from_before(self.workdir)
            raise Stalled(f"no progress on {self.what} for {self.stall:.0f}s (executor.stall_timeout_s)"
                          + (f": {missing}" if missing else "")
                          + f"; heartbeats: {', '.join(alive) or 'none'}. "
                          + (older or "A rank died without a failure marker or never started (a pending "
                                      "SLURM array task?)")
                          + ": rerun the missing ranks (after `guidealign run`, every rank: this one "
                          "stops here too); committed shards are kept")


def _markers_from_before(workdir: Path) -> str:
    """The failure markers in ``workdir`` that the fail-fast rule passed over, said for a wait
    that stalled: without a run id a marker counts only when written after this rank started,
    so a rank that failed before this one's process started (ranks started by hand, nodes that
    start minutes apart) looks like one that died without a marker. Empty when there are none."""
    from datetime import datetime, timezone

    from guidealign.shards.failure import failures, in_this_world, read_markers

    def key(m):
        return m.get("rank"), m.get("pid"), m.get("created")

    counted = {key(m) for m in failures(workdir)}
    ctx = context()
    mine = ctx.rank if ctx is not None and Path(ctx.workdir) == Path(workdir) else None
    older = [m for m in read_markers(workdir) if m.get("rank") != mine and key(m) not in counted
             and in_this_world(m)]
    if not older:
        return ""
    said = []
    for m in older[:3]:
        when = datetime.fromtimestamp(float(m.get("created", 0.0)), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        error = (m.get("error") or "").strip().splitlines()
        said.append(f"rank {m.get('rank')} on {m.get('host')} (pid {m.get('pid')}) at {when}: "
                    f"{error[-1] if error else '?'}")
    more = f" (and {len(older) - 3} more)" if len(older) > 3 else ""
    return ("Failure markers written before this rank started were passed over as an earlier run's: "
            + "; ".join(said) + more + ". If that rank failed in this run, that is why (set the same "
            "GUIDEALIGN_RUN_ID on every rank, and a rank's failure stops the others at once); "
            "else a rank died without a failure marker or never started")


def _of_this_run(hb: dict, ctx) -> bool:
    """Whether a heartbeat is another rank's (or a child's) of this run, so that its work is
    progress this wait may count: the same run id (``launch``, a SLURM job), and, where neither
    has one (ranks started by hand), the same world size. Another run's or command's heartbeat
    in the same run directory (an eval, another job) is no progress of the ranks this waits for."""
    if hb.get("run_id") != run_id():
        return False
    return (run_id() is not None or ctx is None or ctx.world_size is None
            or hb.get("world_size") in (None, ctx.world_size))


def _check_world(hb: dict) -> None:
    """A live heartbeat (it moved during this wait) of this run and stage that says another
    world size than this rank's: under the static assignment, the ranks do not split the
    shards the same way."""
    ctx = context()
    if ctx is None or ctx.world_size is None or hb.get("world_size") in (None, ctx.world_size):
        return
    if not splits_like_this_rank(hb, ctx):
        return
    raise RankConflict(f"rank {hb.get('rank')} of {ctx.stage} on {hb.get('host')} (pid {hb.get('pid')}) "
                       f"runs with world size {hb.get('world_size')}, this rank ({ctx.rank}) with "
                       f"{ctx.world_size}. " + CONFLICT_HINT)
