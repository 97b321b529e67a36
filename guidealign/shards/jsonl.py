"""JSONL shards: one JSON object per row, committed like a Parquet shard (temp file, fsync,
rename, directory fsync, then a marker with rows, bytes and sha256)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from guidealign.shards.layout import marker_path, shard_path
from guidealign.shards.marker import Marker, intact, read_marker
from guidealign.shards.write import remove_temps, replace_from_temp, write_json_atomic


def jsonl_path(out: str | Path, index: int) -> Path:
    return shard_path(out, index, ".jsonl")


def jsonl_done(out: str | Path, index: int, fingerprint: str) -> bool:
    """Shard ``index`` of ``out`` is committed with this fingerprint and intact in size."""
    m = read_marker(out, index)
    return m is not None and m.fingerprint == fingerprint and intact(m, jsonl_path(out, index))


def write_jsonl_shard(out: str | Path, index: int, rows: list[dict], fingerprint: str, *,
                      seconds: float = 0.0, stats: dict | None = None) -> Marker:
    """Write ``rows`` as shard ``index`` of ``out`` and commit it (the marker last), as a
    Parquet shard is written: a temp name no other writer uses, fsync, rename, the directory
    synced, then the marker."""
    path, mpath = jsonl_path(out, index), marker_path(out, index)
    mpath.unlink(missing_ok=True)
    for p in (mpath, path):  # what a killed earlier write of this shard left
        remove_temps(p)
    h = hashlib.sha256()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for row in rows:
                line = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
                h.update(line)
                f.write(line)

    replace_from_temp(path, write)
    marker = Marker(index=index, rows=len(rows), bytes=path.stat().st_size, sha256=h.hexdigest(),
                    fingerprint=fingerprint, seconds=round(seconds, 4), created=time.time(),
                    stats=stats or {})
    write_json_atomic(mpath, marker.to_json())
    return marker
