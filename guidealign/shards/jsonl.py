"""JSONL shards: one JSON object per row, committed like a Parquet shard (temp file, fsync,
rename, then a marker with rows, bytes and sha256)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from guidealign.shards.layout import marker_path
from guidealign.shards.marker import Marker, intact, read_marker
from guidealign.shards.write import write_json_atomic


def jsonl_path(out: str | Path, index: int) -> Path:
    return Path(out) / f"shard-{index:05d}.jsonl"


def jsonl_done(out: str | Path, index: int, fingerprint: str) -> bool:
    """Shard ``index`` of ``out`` is committed with this fingerprint and intact in size."""
    m = read_marker(out, index)
    return m is not None and m.fingerprint == fingerprint and intact(m, jsonl_path(out, index))


def write_jsonl_shard(out: str | Path, index: int, rows: list[dict], fingerprint: str, *,
                      seconds: float = 0.0, stats: dict | None = None) -> Marker:
    """Write ``rows`` as shard ``index`` of ``out`` and commit it (the marker last)."""
    path = jsonl_path(out, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    marker_path(out, index).unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for row in rows:
            line = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
            h.update(line)
            f.write(line)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    marker = Marker(index=index, rows=len(rows), bytes=path.stat().st_size, sha256=h.hexdigest(),
                    fingerprint=fingerprint, seconds=round(seconds, 4), created=time.time(),
                    stats=stats or {})
    write_json_atomic(marker_path(out, index), marker.to_json())
    return marker
