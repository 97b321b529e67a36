"""Commit markers: the proof that a shard was written completely."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guidealign.shards.layout import marker_path, shard_path
from guidealign.shards.nfs import read_text


@dataclass
class Marker:
    index: int
    rows: int
    bytes: int
    sha256: str
    fingerprint: str
    seconds: float = 0.0
    quarantined: int = 0
    created: float = 0.0
    stats: dict = field(default_factory=dict)
    # sha256 of the quarantine file ("" when the shard quarantined nothing); `guidealign verify`
    quarantine_sha256: str = ""
    # torch's intra-op threads when the shard was committed (0: torch was not loaded)
    threads: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def read_marker(dataset: str | Path, index: int) -> Marker | None:
    p = marker_path(dataset, index)
    try:
        data = json.loads(read_text(p))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None  # a torn marker counts as absent: the shard is redone
    if not isinstance(data, dict):
        return None
    known = {k: data[k] for k in Marker.__dataclass_fields__ if k in data}
    # so does one that parses but lacks a field or holds a wrong type (a flipped bit)
    if any(not isinstance(known.get(k), t) or isinstance(known.get(k), bool) for k, t in _REQUIRED.items()):
        return None
    # and one whose optional field holds a wrong type: `status` sums seconds and quarantined
    if any(k in known and (not isinstance(known[k], t) or isinstance(known[k], bool))
           for k, t in _OPTIONAL.items()):
        return None
    if known["index"] != index:  # another shard's marker, copied or moved over this one's
        return None
    return Marker(**known)


_REQUIRED = {"index": int, "rows": int, "bytes": int, "sha256": str, "fingerprint": str}  # no default
_OPTIONAL = {"seconds": (int, float), "quarantined": int, "created": (int, float), "stats": dict,
             "quarantine_sha256": str, "threads": int}  # (JSON writes a whole float as an int)


def intact(m: Marker | None, path: str | Path) -> bool:
    """The one completion check: a marker exists and the file it commits has the marker's size
    (``guidealign verify`` re-checks the content's sha256)."""
    p = Path(path)
    return m is not None and p.exists() and p.stat().st_size == m.bytes


def is_done(dataset: str | Path, index: int, fingerprint: str) -> bool:
    """True when shard ``index`` is committed with this fingerprint and its file is intact in size."""
    m = read_marker(dataset, index)
    return m is not None and m.fingerprint == fingerprint and intact(m, shard_path(dataset, index))
