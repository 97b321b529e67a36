"""Atomic shard writes: temp file, fsync, rename, then the commit marker."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from guidealign.shards.layout import (file_indices, marker_path, quarantine_path, shard_indices,
                                      shard_path)
from guidealign.shards.marker import Marker


def torch_threads() -> int:
    """The intra-op threads torch computes with now (0 when this process never loaded torch),
    recorded in markers so a resumed run shows which thread counts made its shards."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else 0


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def temp_path(path: Path) -> Path:
    """A temp name beside ``path`` that no other writer uses: ranks on other hosts (or in other
    containers) can have this process's pid, and a heartbeat thread writes beside the main
    one. The pid stays last (``.NAME.TOKEN.PID.tmp``), where ``guidealign verify`` reads it."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{os.getpid()}.tmp")


def remove_temps(path: Path) -> None:
    """Remove the temp files an interrupted write of ``path`` left (a SIGKILL between the temp
    write and the rename). Only for paths with one writer at a time (a shard: its rank or the
    holder of its claim), never for files several ranks write at once (the manifest)."""
    if path.parent.is_dir():
        for p in path.parent.glob(f".{path.name}.*.tmp"):
            p.unlink(missing_ok=True)


def replace_from_temp(path: Path, write) -> None:
    """``write(tmp)``, fsync, rename onto ``path``; the temp file is removed when that raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    replace_from_temp(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` lands whole at ``path`` (temp file, fsync, rename) or not at all."""
    replace_from_temp(Path(path), lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, obj) -> None:
    """``obj`` as indented JSON (a str is taken as JSON already written), atomically."""
    write_text_atomic(path, obj if isinstance(obj, str)
                      else json.dumps(obj, indent=1, sort_keys=True, default=str))


def write_shard(
    dataset: str | Path,
    index: int,
    table: pa.Table,
    fingerprint: str,
    *,
    quarantine: pa.Table | None = None,
    seconds: float = 0.0,
    stats: dict | None = None,
) -> Marker:
    """Write shard ``index`` of ``dataset`` atomically and commit it.

    Order: any old marker is removed first (so a crash never leaves a stale marker
    beside a new file), then the quarantine table, then the shard (temp, fsync,
    rename), then the marker (temp, fsync, rename). Readers only trust shards with a
    marker, so they never see a partial shard.
    """
    dataset = Path(dataset)
    mpath = marker_path(dataset, index)
    try:
        mpath.unlink()
        fsync_dir(dataset)  # the old marker durably gone before any new file lands beside it
    except FileNotFoundError:
        pass
    qpath = quarantine_path(dataset, index)
    spath = shard_path(dataset, index)
    for p in (mpath, qpath, spath):  # what a killed earlier write of this shard left
        remove_temps(p)
    n_quarantined, q_sha = 0, ""
    if quarantine is not None and quarantine.num_rows:
        _write_parquet_atomic(quarantine, qpath)
        n_quarantined = quarantine.num_rows
        q_sha = file_sha256(qpath)
    else:
        qpath.unlink(missing_ok=True)
    _write_parquet_atomic(table, spath)
    marker = Marker(
        index=index,
        rows=table.num_rows,
        bytes=spath.stat().st_size,
        sha256=file_sha256(spath),
        fingerprint=fingerprint,
        seconds=round(seconds, 4),
        quarantined=n_quarantined,
        created=time.time(),
        stats=stats or {},
        quarantine_sha256=q_sha,
        threads=torch_threads(),
    )
    write_json_atomic(mpath, marker.to_json())
    return marker


def retire_shards_from(dataset: str | Path, n: int, suffix: str = ".parquet") -> list[int]:
    """Remove the shards numbered ``n`` and up (marker first, so none is ever taken half
    removed): what an earlier run over a larger input left. Returns their indices.
    ``suffix``: the data files' (".jsonl" for an export's).

    Shard and quarantine files without a marker count too: a retire killed between a marker
    and its files left them, and nothing else would ever remove them."""
    dataset = Path(dataset)
    gone = sorted({i for i in shard_indices(dataset) + file_indices(dataset, suffix) if i >= n})
    for i in gone:
        for p in (marker_path(dataset, i), shard_path(dataset, i, suffix), quarantine_path(dataset, i)):
            p.unlink(missing_ok=True)
            remove_temps(p)
    return gone
