"""Fail fast across ranks: failure markers, heartbeats and a stall clock for every wait.

Files in the run directory (WORKDIR):

- ``_failed/rank-00003.json``: written by a rank whose stage raised (the error, stage, host,
  pid, run id). Every waiter polls this folder and aborts with that error
  (:class:`RankFailed`) instead of waiting for shards that will never come.
- ``_ranks/rank-00003.json``: a heartbeat, rewritten every few seconds while a rank runs a
  stage (:func:`guard`), saying whether it is ``working`` or ``waiting``.

Two processes that run one rank (nodes that disagree on the number of workers: ``launch``
works ranks out from each node's GPU count) would both write that rank's shards, and the ranks
no node runs would stall every wait. Each beat first reads its heartbeat file back: another
process's beat there since this one's last is a :class:`RankConflict`, recorded as this rank's
failure and raised before the next shard (``raise_if_conflict``) and in every wait; a wait also
raises it when a live heartbeat of the same stage says another world size.

A wait ends on *stalled progress*, not on a long clock: when for ``stall_timeout_s`` no new
shard was committed and no working rank's heartbeat moved, it raises :class:`Stalled`,
naming what is missing (a dead rank that wrote no marker, e.g. killed by the OOM killer; a
SLURM array task still pending). Heartbeats are compared with their own previous value,
never with this machine's clock, so clock skew between nodes does not matter.

Which failure markers count: a marker carries the run id (``GUIDEALIGN_RUN_ID``, else
``SLURM_ARRAY_JOB_ID``, else ``SLURM_JOB_ID``). With run ids on both sides they must match
(a marker left by an earlier job is ignored); without one, a marker counts when it was
written after this process started. A rank deletes its own old marker when it starts.

A requeued SLURM job keeps its job id, so a marker also carries its attempt
(``SLURM_RESTART_COUNT``, 0 when unset) and its job (``SLURM_JOB_ID``): a marker of another attempt
of the same run counts only when it was written after this process started. So after ``scontrol
requeue`` (every rank on its next attempt) a rank that starts before the failed rank has restarted
and cleared its marker is not stopped by the earlier attempt's failure, while a rank still on
attempt 0 is stopped by the failure of a rank that was requeued on its own and failed again.
Attempt numbers compare only within one SLURM job (its tasks share one restart count): every
task of an array is a job of its own with its own count, so for a marker of another array task
"the same attempt" means only that neither was ever requeued (both on attempt 0); otherwise
the marker counts when written after this process started.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from guidealign.shards.claims import current_assignment
from guidealign.shards.write import write_json_atomic

log = logging.getLogger(__name__)

FAILED_DIR = "_failed"
RANKS_DIR = "_ranks"
# Default stall clock (executor.stall_timeout_s when a stage runs under guard()).
DEFAULT_STALL_S = 1800.0


class RankFailed(RuntimeError):
    """Another rank of this run failed: waiting for its output is pointless."""


class Stalled(RuntimeError):
    """Nothing moved for stall_timeout_s while this rank waited."""


class RankConflict(RuntimeError):
    """Another process runs this rank, or this stage with another world size."""


def run_id(env: dict | None = None) -> str | None:
    env = os.environ if env is None else env
    for k in ("GUIDEALIGN_RUN_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID"):
        if env.get(k):
            return f"{k}={env[k]}"
    return None


def attempt(env: dict | None = None) -> int:
    """Which attempt of a requeued SLURM job this is (``SLURM_RESTART_COUNT``; 0 if unset)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def job(env: dict | None = None) -> str | None:
    """The SLURM job whose restart count ``attempt`` reads (an array task's own job id)."""
    env = os.environ if env is None else env
    return env.get("SLURM_JOB_ID") or None


def _marker_job(marker: dict) -> str | None:
    """The job of a marker; one written before markers named it: its run id's SLURM_JOB_ID."""
    if marker.get("job"):
        return str(marker["job"])
    rid = str(marker.get("run_id") or "")
    if rid.startswith("SLURM_JOB_ID="):
        return rid.partition("=")[2] or None
    return None


def _process_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable
        return _IMPORTED


_IMPORTED = time.time()


def _rank_start(ctx) -> float:
    """When the rank started: its process's start, or, in a child that runs its stage, the rank
    process's (``_Context.started``)."""
    return ctx.started if ctx is not None and ctx.started is not None else _process_start()


def _name(rank) -> str:
    return f"rank-{int(rank):05d}.json" if rank is not None else f"pid-{os.getpid()}.json"


def failure_path(workdir: str | Path, rank: int | None) -> Path:
    return Path(workdir) / FAILED_DIR / _name(rank)


def mark_failed(workdir: str | Path, rank: int | None, error: str, *, stage: str = "",
                world_size: int | None = None, pid: int | None = None, step: str = "") -> Path:
    """Record that ``rank`` failed (atomic; overwrites an older marker of the same rank).
    ``step``: the stage a whole ``run`` was in (``stage`` is then "run")."""
    p = failure_path(workdir, rank)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, {"rank": rank, "world_size": world_size, "stage": stage, "step": step,
                          "error": error[-4000:], "host": socket.gethostname(),
                          "pid": pid or os.getpid(), "run_id": run_id(), "attempt": attempt(),
                          "job": job(), "created": time.time()})
    return p


def clear_failed(workdir: str | Path, rank: int | None) -> None:
    failure_path(workdir, rank).unlink(missing_ok=True)


def clear_all_failed(workdir: str | Path) -> None:
    """Remove the markers of this run id (and those without one): for a driver that starts all
    the ranks of a stage itself (Ray), before it starts them, so that an earlier run's failure
    under the same fixed run id (``GUIDEALIGN_RUN_ID``) cannot stop this run's waiters before
    the failed rank clears it. Markers of another run id never count here and are left alone."""
    d = Path(workdir) / FAILED_DIR
    me = run_id()
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            theirs = json.loads(p.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            theirs = None  # unreadable: no run's marker that counts
        if theirs in (None, me):
            p.unlink(missing_ok=True)


def _counts(marker: dict, me: str | None, started: float, my_attempt: int = 0,
            my_job: str | None = None) -> bool:
    theirs = marker.get("run_id")
    after_start = float(marker.get("created", 0.0)) >= started
    if me and theirs:
        if me != theirs:
            return False
        their_attempt = marker.get("attempt", 0)
        if _marker_job(marker) == my_job:  # one restart count: attempts compare
            same = their_attempt == my_attempt
        else:  # array tasks count their attempts apart: equal only when none was requeued
            same = their_attempt == my_attempt == 0
        return same or after_start
    return after_start


def read_markers(workdir: str | Path) -> list[dict]:
    """Every readable failure marker in ``workdir``, of any run, in file-name order (one being
    written or removed meanwhile is skipped)."""
    d = Path(workdir) / FAILED_DIR
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(m, dict):
            out.append(m)
    return out


def in_this_world(marker: dict, ctx=None) -> bool:
    """Whether ``marker``'s rank can be a rank of this process's world: a rank at or above
    this rank's world size is of an earlier run with more ranks (resumed with fewer GPUs or
    nodes under the same ``GUIDEALIGN_RUN_ID``), whose marker nobody of this run clears: it
    stopped every wait of the resumed run at once, naming a rank that does not exist."""
    ctx = _CTX if ctx is None else ctx
    rank, world = marker.get("rank"), ctx.world_size if ctx is not None else None
    if not isinstance(rank, int) or isinstance(rank, bool) or not isinstance(world, int):
        return True
    return rank < world


def failures(workdir: str | Path, *, exclude_rank: int | None = None) -> list[dict]:
    """Failure markers of the current run in ``workdir`` (see the module doc); a rank outside
    this rank's world is none of this run's (:func:`in_this_world`)."""
    markers = read_markers(workdir)
    if not markers:
        return []
    started = _rank_start(_CTX)
    me, mine, my_job = run_id(), attempt(), job()
    return [m for m in markers if (exclude_rank is None or m.get("rank") != exclude_rank)
            and in_this_world(m) and _counts(m, me, started, mine, my_job)]


def raise_if_failed(workdir: str | Path, waiting_for: str = "") -> None:
    ctx = _CTX
    mine = ctx.rank if ctx and Path(ctx.workdir) == Path(workdir) else None
    found = failures(workdir, exclude_rank=mine)
    if found:
        m = found[0]
        more = f" (and {len(found) - 1} more rank(s))" if len(found) > 1 else ""
        step = f" (in {m['step']})" if m.get("step") else ""
        raise RankFailed(f"rank {m.get('rank')} failed in {m.get('stage') or 'its stage'}{step} on "
                         f"{m.get('host')} (pid {m.get('pid')}){more}: {m.get('error', '').strip()}"
                         + (f"; stopped waiting for {waiting_for}" if waiting_for else ""))


# --- heartbeats and the current rank's context ------------------------------------------

@dataclass
class _Context:
    workdir: Path
    rank: int | None
    world_size: int | None
    stage: str
    stall_timeout_s: float
    state: str = "working"
    waiting_for: str = ""
    # a child process running this rank's stage (guidealign/core/stage_child.py): the rank process's
    # start (failure markers older than it are an earlier run's), and, in the rank process,
    # whether the child beats for it
    started: float | None = None
    handed: bool = False
    written: tuple | None = None  # (host, pid) of this process's last beat
    step: str = ""  # the stage a whole `run` is in (set_step), named in its failure marker
    conflict: str | None = None


_CTX: _Context | None = None
_LOCK = threading.Lock()


def stall_timeout() -> float:
    return _CTX.stall_timeout_s if _CTX else DEFAULT_STALL_S


def set_step(name: str) -> None:
    """Say which stage this rank's ``run`` is in now: a failure marker names it beside "run"
    (heartbeats keep the guard's stage: two processes of one rank are told apart by it)."""
    if _CTX is not None:
        _CTX.step = name


def context() -> _Context | None:
    """This process's rank context inside :func:`guard` (None outside)."""
    return _CTX


def _beat(ctx: _Context) -> None:
    d = ctx.workdir / RANKS_DIR
    d.mkdir(parents=True, exist_ok=True)
    me = (socket.gethostname(), os.getpid())
    write_json_atomic(d / _name(ctx.rank), {
        "rank": ctx.rank, "world_size": ctx.world_size, "stage": ctx.stage, "state": ctx.state,
        "waiting_for": ctx.waiting_for, "host": me[0], "pid": me[1],
        "run_id": run_id(), "time": time.time()})
    ctx.written = me


def _check_rank_file(ctx: _Context) -> None:
    """Before a beat: another process of this run that beat this rank's file since this one's
    last beat runs the same rank of the same stage (under the static assignment, where ranks
    split the shards). Recorded in ``ctx.conflict`` and as this rank's failure (the
    other ranks' waits stop on it); this process raises it before its next shard and in waits."""
    if ctx.written is None or ctx.conflict is not None or ctx.rank is None:
        return
    try:
        hb = json.loads((ctx.workdir / RANKS_DIR / _name(ctx.rank)).read_text())
    except (OSError, ValueError):
        return
    other = (hb.get("host"), hb.get("pid")) if isinstance(hb, dict) else None
    if other is None or other == ctx.written or not splits_like_this_rank(hb, ctx):
        return
    # Left alone too: a command of the same stage and world size on this host (two evals of
    # other benchmarks, side by side). What launch's numbering clash gives is another node, or
    # another world size.
    if other[0] == ctx.written[0] and hb.get("world_size") == ctx.world_size:
        return
    ctx.conflict = (f"rank {ctx.rank} is run by two processes: this one ({ctx.written[0]}, pid "
                    f"{ctx.written[1]}, world size {ctx.world_size}) and {other[0]} (pid {other[1]}, "
                    f"world size {hb.get('world_size')}, stage {hb.get('stage') or '?'}). " + CONFLICT_HINT)
    mark_failed(ctx.workdir, ctx.rank, f"RankConflict: {ctx.conflict}", stage=ctx.stage,
                world_size=ctx.world_size)


def splits_like_this_rank(hb: dict, ctx: _Context) -> bool:
    """Whether heartbeat ``hb`` is of a process that splits shards by rank beside this one: the
    same run and stage, not leaving ("exited": a Ctrl-C'd run still closing its engine when the
    rerun starts), under the static assignment (with claims a rank run twice does no harm). Not
    so: another stage (eval while SFT trains writes other datasets)."""
    return (current_assignment().kind == "static" and hb.get("state") != "exited"
            and hb.get("run_id") == run_id() and hb.get("stage") == ctx.stage)


CONFLICT_HINT = ("guidealign launch numbers a node's workers from its own GPU count: give every "
                  "node the same GPUs (--gpus-per-node, not a --gpus total), and check each node's "
                  "--node-rank/--nodes (SLURM_PROCID/SLURM_NTASKS, array task ids).")


def raise_if_conflict() -> None:
    """Raise the :class:`RankConflict` this process's heartbeat found, if any."""
    if _CTX is not None and _CTX.conflict:
        raise RankConflict(_CTX.conflict)


def heartbeats(workdir: str | Path) -> dict[str, dict]:
    d = Path(workdir) / RANKS_DIR
    out = {}
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            out[p.name] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out


@contextmanager
def guard(workdir: str | Path | None, rank: int | None = None, world_size: int | None = None, *,
          stage: str = "", stall_timeout_s: float | None = None, beat_s: float | None = None,
          started: float | None = None):
    """Run a rank's stage under the fail-fast rules: clear this rank's old failure marker,
    send heartbeats, and write a failure marker when the body raises. Nested guards (the
    ``run`` command around the pipeline) are pass-throughs. ``started``: in a child process
    that runs the rank's stage, the rank process's start (see :func:`child_guard`)."""
    global _CTX
    if workdir is None or _CTX is not None:
        yield
        return
    stall = float(stall_timeout_s) if stall_timeout_s and stall_timeout_s > 0 else DEFAULT_STALL_S
    beat = beat_s or max(1.0, min(30.0, stall / 10))
    ctx = _Context(Path(workdir), rank, world_size, stage, stall, started=started)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    clear_failed(ctx.workdir, rank)
    stop = threading.Event()

    def loop():
        while not stop.wait(beat):
            try:
                with _LOCK:
                    if not ctx.handed:
                        _check_rank_file(ctx)
                        _beat(ctx)
            except OSError as e:  # a full or flaky disk must not kill the stage
                log.debug("heartbeat: %s", e)

    _beat(ctx)
    t = threading.Thread(target=loop, name="guidealign-heartbeat", daemon=True)
    _CTX = ctx
    t.start()
    try:
        yield ctx
        # found while the last shard was in the works: this rank's run does not count as done
        raise_if_conflict()
    except BaseException as e:
        if _is_failure(e):
            err = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            try:
                mark_failed(ctx.workdir, rank, err, stage=stage, world_size=world_size,
                            step=ctx.step if ctx.step != stage else "")
            except OSError as oe:
                log.warning("could not write the failure marker: %s", oe)
        raise
    finally:
        stop.set()
        _CTX = None
        try:
            ctx.state = "exited"
            with _LOCK:  # after a beat the thread has in flight, so "exited" is the last word
                _beat(ctx)
        except OSError:
            pass


def child_guard() -> dict | None:
    """``guard`` keywords for a child process that runs this rank's stage (same workdir, rank,
    stall clock and heartbeat file; failure markers dated from this process's start), or None
    outside a guard."""
    ctx = _CTX
    if ctx is None:
        return None
    return {"workdir": str(ctx.workdir), "rank": ctx.rank, "world_size": ctx.world_size,
            "stall_timeout_s": ctx.stall_timeout_s,
            "started": _rank_start(ctx)}


@contextmanager
def handed_to_child():
    """While a child process runs this rank's stage under :func:`child_guard` (it beats the same
    heartbeat file, "waiting" when it waits), this process does not beat: its "working" would
    count as progress for every other rank's stall clock."""
    ctx = _CTX
    if ctx is None:
        yield
        return
    with _LOCK:
        ctx.handed = True
    try:
        yield
    finally:
        with _LOCK:
            ctx.handed = False
            try:
                _beat(ctx)
            except OSError:
                pass


def _is_failure(e: BaseException) -> bool:
    if isinstance(e, SystemExit):
        return e.code not in (0, None)
    code = getattr(e, "exit_code", None)  # click.exceptions.Exit(0) ends a command normally
    if type(e).__name__ == "Exit" and code == 0:
        return False
    return True
