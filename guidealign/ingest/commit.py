"""Committing ingest shards from a background thread, several at a time when they queue up.

Same files, markers and guarantees as ``guidealign.shards.write.write_shard`` (a marker exists
only once its shard and quarantine files are durable; any old marker is gone before a new file
takes its place; files appear by rename, never half-written), at less cost per shard:

- each Parquet file is encoded into memory, its sha256 taken from those bytes (no re-read of
  the file) and written with one ``write`` and an ``fdatasync``;
- the shards waiting when the writer gets to them are committed as one group: their old
  markers removed, their files written, synced and renamed, then one fsync of each directory
  (instead of one per file), then their markers (each synced) renamed in order, then one fsync
  of the dataset directory;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from guidealign.shards.layout import marker_path, quarantine_path, shard_path
from guidealign.shards.marker import Marker
from guidealign.shards.write import fsync_dir, torch_threads

PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": False, "write_statistics": False}
QUARANTINE_OPTIONS = {"compression": "zstd"}
_sync = getattr(os, "fdatasync", os.fsync)


def parquet_bytes(table: pa.Table, **options) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


def _write_synced(path: Path, data) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view.nbytes:
            view = view[os.write(fd, view):]
        _sync(fd)
    finally:
        os.close(fd)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@dataclass
class Pending:
    """One shard to commit; ``build`` makes its tables (in the writer thread)."""
    index: int
    fingerprint: str
    build: Callable[[], tuple[pa.Table, pa.Table | None]]
    seconds: float
    stats: dict


class ShardWriter:
    """Commits shards in index order from one background thread; at most ``max_pending`` wait.

    ``kill_after`` (tests, chaos): SIGKILL this process right after the marker of the
    ``kill_after``-th shard this writer committed is durable."""

    def __init__(self, dst: Path, max_pending: int = 3, max_group: int = 8, kill_after: int = 0):
        self.dst = Path(dst)
        self.q: queue.Queue = queue.Queue(maxsize=max_pending)
        self.max_group = max_group
        self.kill_after = kill_after
        self.committed = 0
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="ingest-write", daemon=True)
        self.thread.start()

    # --- caller's side ---------------------------------------------------------------------
    def submit(self, item: Pending) -> None:
        self._raise()
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
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    # --- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            item = self.q.get()
            if item is None:
                return
            group = [item]
            while len(group) < self.max_group:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            # after an error, later items are taken and dropped, so a caller blocked in
            # submit() wakes up and sees the error
            if self.error is None:
                try:
                    self._commit(group)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self.error = e

    def _commit(self, group: list[Pending]) -> None:
        dst = self.dst
        qdir = quarantine_path(dst, 0).parent
        dst.mkdir(parents=True, exist_ok=True)
        for p in group:
            marker_path(dst, p.index).unlink(missing_ok=True)
        markers, renames, touched_q = [], [], False
        for p in group:
            table, quarantine = p.build()
            n_q, q_sha = 0, ""
            qpath = quarantine_path(dst, p.index)
            if quarantine is not None and quarantine.num_rows:
                qdir.mkdir(parents=True, exist_ok=True)
                data = parquet_bytes(quarantine, **QUARANTINE_OPTIONS)
                _write_synced(_tmp(qpath), data)
                renames.append((_tmp(qpath), qpath))
                n_q, q_sha = quarantine.num_rows, hashlib.sha256(data).hexdigest()
                touched_q = True
            elif qpath.exists():
                qpath.unlink()
                touched_q = True
            spath = shard_path(dst, p.index)
            data = parquet_bytes(table, **PARQUET_OPTIONS)
            _write_synced(_tmp(spath), data)
            renames.append((_tmp(spath), spath))
            markers.append(Marker(index=p.index, rows=table.num_rows, bytes=data.size,
                                  sha256=hashlib.sha256(data).hexdigest(), fingerprint=p.fingerprint,
                                  seconds=round(p.seconds, 4), quarantined=n_q, created=0.0,
                                  stats=p.stats, quarantine_sha256=q_sha, threads=torch_threads()))
            del table, quarantine, data
        for tmp, path in renames:
            os.replace(tmp, path)
        if touched_q:
            fsync_dir(qdir)
        fsync_dir(dst)  # the files (and the removal of their old markers) are durable
        stop = len(group)
        if self.kill_after and self.committed < self.kill_after <= self.committed + len(group):
            stop = self.kill_after - self.committed
        for m in markers[:stop]:
            m.created = time.time()
            mpath = marker_path(dst, m.index)
            _write_synced(_tmp(mpath), m.to_json().encode())
            os.replace(_tmp(mpath), mpath)
        fsync_dir(dst)
        self.committed += stop
        if stop < len(group) or (self.kill_after and self.committed >= self.kill_after):
            os.kill(os.getpid(), signal.SIGKILL)
