"""Artifacts (a library, a trained model, an index): build in a temp dir, rename into place,
then write ``_done.json`` last. A reader trusts an artifact only when ``_done.json`` exists;
a rerun whose fingerprint matches the one in ``_done.json`` does nothing."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from guidealign.shards import write_json_atomic
from guidealign.shards.artifact_files import file_checksums
from guidealign.shards.nfs import read_text
from guidealign.shards.write import fsync_dir, torch_threads

DONE = "_done.json"


def read_done(d: str | Path) -> dict | None:
    """The artifact's completion record; None when absent or not one (damaged: not an object)."""
    try:
        done = json.loads(read_text(Path(d) / DONE))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return done if isinstance(done, dict) else None


def is_current(d: str | Path, fp: str) -> bool:
    done = read_done(d)
    return done is not None and done.get("fingerprint") == fp


class NotReady(RuntimeError):
    """An artifact that is not complete, or not the one wanted, when the wait for it ended."""


def wait_done(d: str | Path, timeout: float = 0, poll: float = 5.0, *, accept=None) -> dict:
    """Block until the artifact at ``d`` is complete, and ``accept(done)`` (when given) holds
    (``timeout=0``: check once). While it waits it stops when a rank of the run failed or
    nothing moved (shards/failure.py). ``accept``'s docstring says what a refused
    ``_done.json`` lacks, for the error message."""
    from guidealign.shards.watch import Watch, waiting

    deadline = time.monotonic() + timeout
    watch = Watch(Path(d).parent, str(Path(d) / DONE))
    with waiting(str(d)):
        while True:
            done = read_done(d)
            if done is not None and (accept is None or accept(done)):
                return done
            why = f"no {DONE}" if done is None else (accept.__doc__ or "not accepted").strip()
            if time.monotonic() >= deadline:
                raise NotReady(f"{d} is not complete ({why}): run the stage that builds it first")
            watch.check(None if done is None else done.get("fingerprint"), f"{d}: {why}")
            time.sleep(poll)


@contextmanager
def build_dir(final: str | Path):
    """Yield a fresh temp dir beside ``final``; on success it replaces ``final`` (no ``_done.json``
    yet: the caller writes it with :func:`mark_done` after the rename)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # what a killed earlier build left (one builder per artifact: rank 0): its temp dir, and
    # the old artifact it had moved aside (killed between the two renames, or in the rmtree)
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            # the old artifact is invalid from here on: drop its marker first (durably: after a
            # power loss the old folder must not come back with it), then the files
            (final / DONE).unlink(missing_ok=True)
            fsync_dir(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_dir(final.parent)  # the rename, durable before mark_done writes _done.json
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def mark_done(d: str | Path, *, fingerprint: str, rows: int, seconds: float, **extra) -> dict:
    info = {"fingerprint": fingerprint, "rows": int(rows), "seconds": round(seconds, 3),
            "created": time.time(), "threads": torch_threads(), "files": file_checksums(d), **extra}
    write_json_atomic(Path(d) / DONE, info)
    return info
