"""JSONL shards: one JSON object per row, committed like a Parquet shard (temp file, fsync,
rename, directory fsync, then a marker with rows, bytes and sha256).

Each line is strict JSON that every line splitter reads as one line: a float that is NaN or
infinite (JSON has no such number; Python's json would write ``NaN``, which most readers
refuse) is written as null, and the characters other than ``\\n`` that some readers split
lines on (U+0085, U+2028, U+2029: ``str.splitlines``, older JavaScript) are written as
``\\u`` escapes; the control characters are escaped by ``json`` itself. The values read
back are the same strings.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from guidealign.shards.layout import marker_path, shard_path
from guidealign.shards.marker import Marker, intact, read_marker
from guidealign.shards.write import fsync_dir, remove_temps, replace_from_temp, write_json_atomic


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
    try:
        mpath.unlink()
        fsync_dir(Path(out))  # the old marker durably gone before the new file lands (write_shard's order)
    except FileNotFoundError:
        pass
    for p in (mpath, path):  # what a killed earlier write of this shard left
        remove_temps(p)
    h = hashlib.sha256()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for row in rows:
                line = (json_line(row) + "\n").encode("utf-8")
                h.update(line)
                f.write(line)

    replace_from_temp(path, write)
    marker = Marker(index=index, rows=len(rows), bytes=path.stat().st_size, sha256=h.hexdigest(),
                    fingerprint=fingerprint, seconds=round(seconds, 4), created=time.time(),
                    stats=stats or {})
    write_json_atomic(mpath, marker.to_json())
    return marker


# characters outside ASCII that str.splitlines() (and JavaScript before ES2019) take as line
# breaks; json.dumps(ensure_ascii=False) writes them as they are
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def json_line(row: dict) -> str:
    """``row`` as one line of strict JSON (non-finite floats as null, no character that any
    reader splits lines on)."""
    try:
        text = json.dumps(row, ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:  # a NaN or infinite float somewhere in the row
        text = json.dumps(finite(row), ensure_ascii=False, default=str, allow_nan=False)
    return text if text.isascii() else text.translate(_LINE_BREAKS)


def finite(v):
    """``v`` with each float that is not finite (NaN, an infinity) as None, for strict JSON; a
    dict key that is one as the text ``json`` writes for it ("NaN", "Infinity", "-Infinity": a
    key is a JSON string, valid as it was)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {_finite_key(k): finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


def _finite_key(k):
    if isinstance(k, float) and not math.isfinite(k):
        return "NaN" if k != k else "Infinity" if k > 0 else "-Infinity"
    return k
