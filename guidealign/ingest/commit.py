"""Committing ingest shards from background threads, several at a time when they queue up.

Same files, markers and guarantees as ``guidealign.shards.write.write_shard`` (a marker exists
only once its shard and quarantine files are durable; any old marker is gone before a new file
takes its place; files appear by rename, never half-written), at less cost per shard:

- each Parquet file is encoded into memory, its sha256 taken from those bytes (no re-read of
  the file) and written with one ``write``;
- the shards waiting when the writer gets to them are committed as one group: their files all
  written, then all synced (on a journaling file system the first ``fdatasync`` commits the
  others too: about one journal commit a group instead of one a file), then renamed, then one
  fsync of each directory, then their markers written, synced and renamed in order, then one
  fsync of the dataset directory;
- each shard's tables are built and encoded as soon as it is submitted, by ``encoders``
  threads (two shards encoded at once on two cores: encoding is most of the writer's CPU, and
  one thread for it was the slowest part of a JSONL ingest once its parse was compiled);
- two more threads: one writes each group's encoded files while the other waits on the
  previous group's syncs (file system latency, no CPU), so the syncs stay off the critical path;
- ``id``, ``prompt`` and ``source`` are unique per row and ``metadata`` mostly is, so Parquet's
  dictionary encoding (tried first for every column, then given up page by page) and its min/max
  statistics (no reader here filters on them) are left out: ~40% less encoding time and smaller
  files (zstd still compresses repeated values).

Everything here but the marker JSON runs in pyarrow, hashlib or system calls, which release
the GIL, so the writer overlaps the reading and hashing of the next blocks.
"""
from __future__ import annotations

import hashlib
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from guidealign.shards.layout import marker_path, quarantine_path, shard_path
from guidealign.shards.marker import Marker
from guidealign.shards.write import fsync_dir, torch_threads

# ids: 16 hex digits each, which zstd cannot shrink much; with their lengths stored apart
# (DELTA_LENGTH_BYTE_ARRAY) it compresses the digits alone: 30% less CPU for that column, and
# smaller. The other columns encode fastest as PLAIN.
PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": False, "write_statistics": False,
                   "column_encoding": {"id": "DELTA_LENGTH_BYTE_ARRAY"}}
QUARANTINE_OPTIONS = {"compression": "zstd"}
_sync = getattr(os, "fdatasync", os.fsync)


def parquet_bytes(table: pa.Table, **options) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


class _Files:
    """Files written now and synced together later: ``sync()`` fdatasyncs them all, then closes
    them. On a journaling file system the first sync commits the journal for every file already
    written, so a group of N files costs about one journal commit instead of N."""

    def __init__(self):
        self.fds: list[int] = []

    def write(self, path: Path, data) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.fds.append(fd)
        view = memoryview(data)
        while view.nbytes:
            view = view[os.write(fd, view):]

    def sync(self) -> None:
        try:
            for fd in self.fds:
                _sync(fd)
        finally:
            self.close()

    def close(self) -> None:
        """Close every file (all of them, even when one close fails); raise the first error."""
        fds, self.fds = self.fds, []
        err = None
        for fd in fds:
            try:
                os.close(fd)
            except OSError as e:  # e.g. EIO or a quota reported only at close on NFS
                err = err or e
        if err is not None:
            raise err


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@dataclass
class Pending:
    """One shard to commit; ``build`` makes its tables (in an encoder thread)."""
    index: int
    fingerprint: str
    build: Callable[[], tuple[pa.Table, pa.Table | None]]
    seconds: float
    stats: dict
    encoded: Future | None = field(default=None, repr=False)  # of ``_Encoded``: set by ``submit``


@dataclass
class _Encoded:
    """A shard's files as bytes: the shard, and its quarantine (None: it has no bad rows)."""
    rows: int
    data: pa.Buffer
    quarantined: int
    quarantine: pa.Buffer | None


def _encode(p: Pending) -> _Encoded:
    table, quarantine = p.build()
    q = None
    if quarantine is not None and quarantine.num_rows:
        q = parquet_bytes(quarantine, **QUARANTINE_OPTIONS)
    return _Encoded(table.num_rows, parquet_bytes(table, **PARQUET_OPTIONS),
                    quarantine.num_rows if q is not None else 0, q)


def _with_waiting(q: queue.Queue, first, most: int) -> tuple[list, bool]:
    """``first`` and the items waiting in ``q`` behind it, ``most`` in all at most, and whether
    the end (None) came among them."""
    items = [first]
    while len(items) < most:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            return items, True
        items.append(nxt)
    return items, False


def default_encoders() -> int:
    """Threads that encode shards at once: one a core, 2 to 4."""
    return max(2, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2))


@dataclass
class _Written:
    """A group whose files are written (not yet synced): what the sync thread finishes."""
    files: _Files
    markers: list[Marker]
    renames: list[tuple[Path | None, Path]]  # (None, path): remove path
    touched_q: bool

    def joined(self, later: "_Written") -> "_Written":
        """This group and a later one, made durable as one (one directory sync for both)."""
        self.files.fds += later.files.fds
        return _Written(self.files, self.markers + later.markers, self.renames + later.renames,
                        self.touched_q or later.touched_q)


class ShardWriter:
    """Commits shards in index order from two background threads; at most ``max_pending`` wait.

    The write thread builds, encodes and writes each group's files; the sync thread makes them
    durable and commits their markers, so one group's fsyncs overlap the encoding of the next.

    ``kill_after`` (tests, chaos): SIGKILL this process right after the marker of the
    ``kill_after``-th shard this writer committed is durable."""

    def __init__(self, dst: Path, max_pending: int = 3, max_group: int = 8, kill_after: int = 0,
                 encoders: int = 2):
        self.dst = Path(dst)
        self.pool = ThreadPoolExecutor(max_workers=encoders, thread_name_prefix="ingest-encode")
        self.q: queue.Queue = queue.Queue(maxsize=max_pending)
        self.synced: queue.Queue = queue.Queue(maxsize=8)  # written groups waiting for the sync thread
        self.max_group = max_group
        self.kill_after = kill_after
        self.committed = 0
        self.error: BaseException | None = None  # raised once, to the caller
        # after any error nothing more is committed (not even groups already written before
        # it): a rerun redoes them, and their temp files are removed by the next ingest
        self.failed = False
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="ingest-write", daemon=True)
        self.sync_thread = threading.Thread(target=self._run_sync, name="ingest-sync", daemon=True)
        self.thread.start()
        self.sync_thread.start()

    # --- caller's side ---------------------------------------------------------------------
    def submit(self, item: Pending) -> None:
        self._raise()
        item.encoded = self.pool.submit(_encode, item)
        while True:
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def close(self) -> None:
        """Wait for every submitted shard to be committed; raise the writer's error if any."""
        if not self.closed:
            self.closed = True
            self.q.put(None)
            self.thread.join()
            self.sync_thread.join()
            self.pool.shutdown(wait=True, cancel_futures=True)
        self._raise()

    def _raise(self) -> None:
        with self.lock:
            err, self.error = self.error, None
        if err is not None:
            raise err

    def _fail(self, e: BaseException) -> None:
        with self.lock:  # both threads may fail at once: the first error is the one raised
            if not self.failed:
                self.failed, self.error = True, e

    # --- write thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            stop = False
            while not stop:
                item = self.q.get()
                if item is None:
                    return
                group, stop = _with_waiting(self.q, item, self.max_group)
                # after an error, later items are taken and dropped, so a caller blocked in
                # submit() wakes up and sees the error
                if not self.failed:
                    try:
                        self._commit(group)
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        self._fail(e)
        finally:
            self.synced.put(None)

    def _commit(self, group: list[Pending]) -> None:
        """Write the group's files and hand them to the sync thread."""
        files = _Files()
        try:
            markers, renames, touched_q = self._write_group(group, files)
        except BaseException:
            try:
                files.close()
            except OSError:
                pass  # the write error is the one to report
            raise
        self.synced.put(_Written(files, markers, renames, touched_q))

    def _write_group(self, group: list[Pending], files: _Files) -> tuple[list, list, bool]:
        """Build, encode and write (unsynced) each shard's files; their markers, the renames
        to do once the files are durable, and whether the quarantine directory changed."""
        dst = self.dst
        qdir = quarantine_path(dst, 0).parent
        dst.mkdir(parents=True, exist_ok=True)
        markers, renames, touched_q = [], [], False
        for p in group:
            enc = p.encoded.result()
            p.encoded = None  # (its bytes go with this loop, not with the queue's references)
            q_sha = ""
            qpath = quarantine_path(dst, p.index)
            if enc.quarantine is not None:
                qdir.mkdir(parents=True, exist_ok=True)
                files.write(_tmp(qpath), enc.quarantine)
                renames.append((_tmp(qpath), qpath))
                q_sha = hashlib.sha256(enc.quarantine).hexdigest()
                touched_q = True
            elif qpath.exists():
                renames.append((None, qpath))  # removed with the renames, after the old marker
                touched_q = True
            spath = shard_path(dst, p.index)
            files.write(_tmp(spath), enc.data)
            renames.append((_tmp(spath), spath))
            markers.append(Marker(index=p.index, rows=enc.rows, bytes=enc.data.size,
                                  sha256=hashlib.sha256(enc.data).hexdigest(), fingerprint=p.fingerprint,
                                  seconds=round(p.seconds, 4), quarantined=enc.quarantined, created=0.0,
                                  stats=p.stats, quarantine_sha256=q_sha, threads=torch_threads()))
            del enc
        return markers, renames, touched_q

    # --- sync thread -----------------------------------------------------------------------
    def _run_sync(self) -> None:
        while True:
            w = self.synced.get()
            if w is None:
                return
            # the groups written meanwhile are made durable with it, as one
            later, end = _with_waiting(self.synced, w, self.synced.maxsize + 1)
            for nxt in later[1:]:
                w = w.joined(nxt)
            try:
                if not self.failed:
                    self._make_durable(w)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._fail(e)
            try:
                w.files.close()  # a group skipped after an error still has its files open
            except OSError as e:
                self._fail(e)
            if end:
                return

    def _make_durable(self, w: _Written) -> None:
        """Old markers gone, files synced (all, then renamed), directories synced, then the
        markers written, synced and renamed in order."""
        dst = self.dst
        old = [p for p in (marker_path(dst, m.index) for m in w.markers) if p.exists()]
        for p in old:
            p.unlink(missing_ok=True)
        if old:  # a rerun over committed shards: their markers durably gone before any rename
            fsync_dir(dst)
        w.files.sync()  # every file of the group written first, then all synced
        for tmp, path in w.renames:
            if tmp is None:
                path.unlink(missing_ok=True)
            else:
                os.replace(tmp, path)
        if w.touched_q:
            fsync_dir(quarantine_path(dst, 0).parent)
        fsync_dir(dst)  # the files (and the removal of their old markers) are durable
        stop = len(w.markers)
        if self.kill_after and self.committed < self.kill_after <= self.committed + stop:
            stop = self.kill_after - self.committed
        files = _Files()
        try:
            for m in w.markers[:stop]:
                m.created = time.time()
                files.write(_tmp(marker_path(dst, m.index)), m.to_json().encode())
            files.sync()
        finally:
            files.close()
        for m in w.markers[:stop]:
            mpath = marker_path(dst, m.index)
            os.replace(_tmp(mpath), mpath)
        fsync_dir(dst)
        self.committed += stop
        if stop < len(w.markers) or (self.kill_after and self.committed >= self.kill_after):
            os.kill(os.getpid(), signal.SIGKILL)
