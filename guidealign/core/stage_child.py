"""One stage called in a child process of its own, so that the rank process never holds a
CUDA context.

The encoder stages (library, train-retriever, index, retrieve: ``Stage.cuda_here``) run torch
on the GPU in the process that calls them. In a rank process that context stays until the
process ends: on GPUs in EXCLUSIVE_PROCESS compute mode (one process at a time) the next
engine or torchrun then cannot start at all, and in the default mode it holds ~0.5-1 GiB
of the GPU that vLLM sizes its cache from. ``run_in_child`` calls the stage function in a
spawned process with the same arguments and hands back its report, or raises its error;
the child's CUDA context goes when it exits. The child runs under the rank's shard assignment
and fail-fast guard: it beats the rank's heartbeat file (the rank stops beating meanwhile, so
that its "working" does not hide a stall), waits on the rank's stall clock, writes the rank's
failure marker, and counts other ranks' markers from the rank's start. A child left behind by
a SIGKILLed rank is killed by a watchdog (``core.reaper``), like an engine's processes.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import traceback
from pathlib import Path

log = logging.getLogger(__name__)

# how long an interrupted rank waits for the child to stop (it got the same Ctrl-C)
STOP_GRACE_S = 30.0


def wanted(mode: str, gpus_visible) -> bool:
    """Whether ``run`` calls a ``cuda_here`` stage in a child process: ``executor.stage_process``
    "child", or "auto" with GPUs visible (``gpus_visible()``, asked only then)."""
    if mode == "child":
        return True
    if mode == "inline":
        return False
    if mode != "auto":
        raise ValueError(f"executor.stage_process must be auto, child or inline, not {mode!r}")
    return bool(gpus_visible())


def run_in_child(fn: str, cfg, workdir: str | Path, *, rank: int = 0, world_size: int = 1,
                 progress: bool = True):
    """The stage function ``fn`` ("module:function", as in the stage table) called as
    ``fn(cfg, workdir, rank=..., world_size=..., progress=...)`` in a spawned child process,
    under this process's shard assignment (``executor.assign``) and fail-fast guard (the child
    beats this rank's heartbeat file, waits on its stall clock and writes its failure marker
    while this process stops beating): its report, or its exception raised here (with the
    child's traceback as a note)."""
    from guidealign.core import reaper
    from guidealign.shards.claims import current_assignment
    from guidealign.shards.failure import child_guard, handed_to_child

    name = fn.rpartition(":")[2]
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    level = logging.getLogger().getEffectiveLevel()
    p = ctx.Process(target=_child_main, name=f"stage-{name}",
                    args=(fn, cfg, str(workdir), rank, world_size, progress, level, current_assignment(),
                          child_guard(), send))
    watchdog = None
    try:
        with handed_to_child():
            p.start()
            send.close()  # the child holds the only writing end: a dead child reads as end of file
            watchdog = reaper.guard_process(p.pid)
            try:
                result = recv.recv()
            except EOFError:
                result = None
            except Exception as e:  # noqa: BLE001 - e.g. an exception that does not unpickle here
                result = ("error", None, f"its result could not be read: {type(e).__name__}: {e}")
            p.join()
    except BaseException:
        if p.pid is not None:
            _stop(p)
        raise
    finally:
        recv.close()
        reaper.release(watchdog)
    if result is None:
        how = (f"was killed by signal {-p.exitcode}" if p.exitcode is not None and p.exitcode < 0
               else f"exited with status {p.exitcode}")
        raise RuntimeError(f"{name}: its child process {how} before it reported")
    status, payload, tb = result
    if status == "ok":
        return payload
    if isinstance(payload, BaseException):
        payload.add_note(f"(raised in {name}'s child process, pid {p.pid}):\n{tb}")
        raise payload
    raise RuntimeError(f"{name} failed in its child process: {tb}")


def _stop(p) -> None:
    """After an interrupt: the child got the same Ctrl-C (one process group); give it
    ``STOP_GRACE_S`` to end, then kill it."""
    p.join(STOP_GRACE_S)
    if p.is_alive():
        p.kill()
        p.join()


def _child_main(fn, cfg, workdir, rank, world_size, progress, level, asg, guarded, conn) -> None:
    import importlib
    import pickle

    from guidealign.shards.claims import assignment
    from guidealign.shards.failure import guard

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        mod, _, attr = fn.partition(":")
        with (guard(stage=attr, **guarded) if guarded else contextlib.nullcontext()), \
                assignment(asg.kind, asg.ttl_s, asg.poll_s):
            rep = getattr(importlib.import_module(mod), attr)(cfg, workdir, rank=rank, world_size=world_size,
                                                              progress=progress)
        result = ("ok", rep, "")
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the rank
        tb = traceback.format_exc()
        try:  # sent as it is only when it comes back whole (an __init__ of its own may not)
            pickle.loads(pickle.dumps(e))
        except Exception:  # noqa: BLE001
            e = RuntimeError(f"{type(e).__name__}: {e}")
        result = ("error", e, tb)
    try:
        conn.send(result)
    except Exception:  # noqa: BLE001 - a report that does not pickle
        conn.send(("error", None, result[2] or f"{fn}'s report could not be sent back"))
    conn.close()
    # no interpreter teardown: it would wait for any thread a stage left running
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if result[0] == "ok" else 1)
