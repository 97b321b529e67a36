"""Dynamic shard assignment: workers claim the next free shard instead of owning ``i mod W``.

A claim is the file ``DST/_claims/shard-NNNNN.claim``, created by hard-linking a temp file
that already holds its record (so exactly one worker creates it, and no claim is ever seen
empty; ``O_CREAT|O_EXCL`` where the file system has no hard links) and holding its owner's id, host, pid and pid namespace. Its
mtime is the owner's heartbeat: a thread touches it every ``ttl/4`` seconds while the shard
is processed. A claim is stale when its heartbeat is older than ``ttl`` seconds (by the file
system's clock, which stamps it, never by this machine's: nodes' clocks differ), or when its
owner ran on this host (same host name, boot id and pid namespace: machines or containers can
share a host name, and the initial pid namespace has the same inode on every Linux machine)
and that pid no longer exists. A worker steals a
stale claim by renaming it to a name of its own (``os.rename`` moves a given file once, so of
two stealers only one gets it), checking that the file it moved is the stale one it looked at
(same inode and mtime; otherwise it puts the file back), and then claiming the shard afresh
the same way. A claim is removed after its shard is committed, or when processing raised.
Static ranks claim their shards too (``map_shards``): a second process writing the same
dataset (two runs started at once on one run directory) waits for a shard instead of
writing it again.

Claiming decides who works on a shard; the commit marker still decides what is done: a worker
re-checks the shard's fingerprint after claiming it, so a shard committed meanwhile is never
redone. A worker that finds its claim gone at commit time (its heartbeat stalled for longer
than ``ttl`` and another worker took over) drops its result.

Which assignment map stages use: the ``assign=`` argument of ``map_shards``, else the one of
the enclosing ``with assignment(...)`` block (executors and CLI commands open one from
``executor.assign`` and ``executor.claim_ttl_s``), else ``static``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ASSIGNMENTS = ("static", "dynamic")
CLAIMS_DIR = "_claims"


@dataclass
class Assignment:
    kind: str = "static"  # "static" (shard i -> rank i mod W) or "dynamic" (claim files)
    ttl_s: float = 120.0  # a claim whose heartbeat is older than this is taken over
    poll_s: float | None = None  # wait between scans while others hold claims (None: ttl/8, 0.05..1 s)

    def __post_init__(self):
        if self.kind not in ASSIGNMENTS:
            raise ValueError(f"executor.assign must be one of {ASSIGNMENTS}, got {self.kind!r}")
        if self.ttl_s <= 0:
            raise ValueError(f"executor.claim_ttl_s must be > 0, got {self.ttl_s!r}")

    @property
    def poll(self) -> float:
        return self.poll_s if self.poll_s is not None else min(1.0, max(0.05, self.ttl_s / 8))


_current = Assignment()


def current_assignment() -> Assignment:
    return _current


@contextlib.contextmanager
def assignment(kind: str = "static", ttl_s: float = 120.0, poll_s: float | None = None):
    """The assignment of the map stages run inside the ``with`` block."""
    global _current
    before = _current
    _current = Assignment(kind, ttl_s, poll_s)
    try:
        yield _current
    finally:
        _current = before


# --- owners --------------------------------------------------------------------------------

def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _boot_id() -> str:
    """This machine's boot id (one per machine and boot; "" where the kernel has none)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def owner_record(owner: str | None = None) -> dict:
    """Who holds a claim; ``nonce`` tells this claim apart from any other (inodes get reused)."""
    return {"owner": owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            "host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
            "boot": _boot_id(), "claimed_at": time.time(), "nonce": uuid.uuid4().hex}


def _owner_is_dead(rec: dict) -> bool:
    """True only when the owner ran in this host's pid namespace and its pid is gone."""
    if rec.get("host") != socket.gethostname() or rec.get("pidns") != _pid_namespace():
        return False
    if rec.get("boot", "") != _boot_id():  # another machine (or boot) with this host's name
        return False
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def claim_path(dst: str | Path, index: int) -> Path:
    return Path(dst) / CLAIMS_DIR / f"shard-{index:05d}.claim"


def _read(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # absent, or being written right now (created, not yet filled)
    return rec if isinstance(rec, dict) else None


# --- one claim -----------------------------------------------------------------------------

class Claim:
    """A held claim: heartbeats while held; ``release()`` removes it (only if still ours)."""

    def __init__(self, path: Path, record: dict, ttl_s: float):
        self.path = path
        self.record = record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(max(0.02, ttl_s / 4),),
                                        name=f"claim-heartbeat-{path.name}", daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            if not self.held():  # taken over, or moved aside for a moment by a stealer
                continue
            try:
                os.utime(self.path)
            except OSError:
                pass

    def held(self) -> bool:
        """The claim file is still the one this worker created."""
        rec = _read(self.path)
        return rec is not None and rec.get("nonce") == self.record["nonce"]

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.held():
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _create(path: Path, record: dict) -> bool:
    """Create the claim ``path`` holding ``record``, unless it exists. The record is written
    to a temp file first and hard-linked into place (a create that fails when the name exists,
    on NFS too): a worker killed between an ``O_EXCL`` create and its write left an empty claim
    that named no owner, so even on its own host it counted as stale only after the TTL. A temp
    file a kill leaves is cleared with the claims (``shard-*.claim*``)."""
    tmp = path.with_name(f"{path.name}.tmp-{record.get('nonce', os.getpid())}")
    with open(tmp, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:  # a file system without hard links: create, then write
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        return _create_then_write(path, record)
    finally:
        tmp.unlink(missing_ok=True)


def _create_then_write(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    return True


def _create_claim(path: Path, record: dict) -> bool:
    """``_create`` in ``path``'s folder, making the folder again when a worker that saw every
    shard committed removed it (``remove_claims_dir``) between our mkdir and our create."""
    for _ in range(5):
        try:
            return _create(path, record)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
    return _create(path, record)


def _fs_now(d: Path) -> float:
    """Now by the clock that stamps the claims' mtimes: the file system's (an NFS server
    stamps the times of a create and of ``os.utime(path)``, not the owner's machine). Read off
    ``d`` touched now; this machine's clock where that fails. Comparing heartbeats with this
    machine's clock instead let a node whose clock runs ahead by more than the TTL take every
    live claim (and two such nodes take each other's, forever)."""
    try:
        os.utime(d)
        return os.stat(d).st_mtime
    except OSError:
        return time.time()


def is_stale(path: Path, ttl_s: float, st: os.stat_result | None = None,
             rec: dict | None = None) -> bool:
    """The claim at ``path`` has no live owner: heartbeat older than ``ttl_s`` (by the file
    system's clock, :func:`_fs_now`), or a dead local pid."""
    try:
        st = st or os.stat(path)
    except FileNotFoundError:
        return False
    if _fs_now(path.parent) - st.st_mtime > ttl_s:
        return True  # (a torn, unreadable claim ages out this way too)
    rec = rec if rec is not None else _read(path)
    return rec is not None and _owner_is_dead(rec)


def _steal(path: Path, st: os.stat_result, seen: dict | None, record: dict) -> bool:
    """Move the stale claim (``st``, ``seen``) aside (one stealer wins the rename), then
    claim afresh."""
    aside = path.with_name(f"{path.name}.stale-{record['nonce']}")
    try:
        # the owner may have beaten since it was judged: then leave it in place (moved aside
        # and put back, it was missing meanwhile: its owner's held() failed, a third worker
        # could claim the shard); this leaves microseconds, not the time since the judgement
        now = os.stat(path)
        if (now.st_ino, now.st_mtime_ns) != (st.st_ino, st.st_mtime_ns):
            return False
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # another stealer moved it, or its owner released it
    try:
        moved = os.stat(aside)
    except FileNotFoundError:
        return False  # removed by clear_claims (every shard committed meanwhile): lost the race
    if (moved.st_ino, moved.st_mtime_ns, _read(aside)) != (st.st_ino, st.st_mtime_ns, seen):
        # not the file we judged stale (it was replaced meanwhile): put it back if free
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    log.warning("took over stale claim %s", path)
    return _create_claim(path, record)


def try_claim(dst: str | Path, index: int, ttl_s: float, owner: str | None = None) -> Claim | None:
    """Claim shard ``index`` of ``dst``; None when a live owner holds it."""
    path = claim_path(dst, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = owner_record(owner)
    if _create_claim(path, record):
        return Claim(path, record, ttl_s)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Claim(path, record, ttl_s) if _create_claim(path, record) else None
    seen = _read(path)
    if is_stale(path, ttl_s, st, seen) and _steal(path, st, seen, record):
        return Claim(path, record, ttl_s)
    return None


def holder(dst: str | Path, index: int) -> dict:
    """The record of whoever holds shard ``index``'s claim now ({} when none, or unreadable)."""
    return _read(claim_path(dst, index)) or {}


def remove_claims_dir(dst: str | Path) -> None:
    """Remove ``DST/_claims`` once no claim is left in it."""
    with contextlib.suppress(OSError):
        (Path(dst) / CLAIMS_DIR).rmdir()


def clear_claims(dst: str | Path, ttl_s: float) -> None:
    """Once every shard is committed (dynamic), or this rank's are (static): remove the claims
    no live worker heartbeats any more (older than ``ttl_s``: the claim of a worker killed
    between its commit and its release, a stealer's moved-aside file; nobody claims a committed
    shard again, so they stayed for good), then ``DST/_claims`` when it is empty. A live claim
    stays: its owner releases it. Stale as a stealer judges it (:func:`is_stale`: the file
    system's clock, a dead local pid), so removing one is what a stealer does, less the new
    claim: a shard still to do is claimed afresh by whoever comes to it."""
    for p in (Path(dst) / CLAIMS_DIR).glob("shard-*.claim*"):
        if is_stale(p, ttl_s):
            p.unlink(missing_ok=True)
    remove_claims_dir(dst)
