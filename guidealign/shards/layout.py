"""File names inside a dataset directory."""
from __future__ import annotations

import re
from pathlib import Path

_SHARD_RE = re.compile(r"^shard-(\d{5,})\.done\.json$")


def shard_path(dataset: str | Path, index: int, suffix: str = ".parquet") -> Path:
    """Shard ``index``'s data file (``suffix`` ".jsonl" for an export's)."""
    return Path(dataset) / f"shard-{index:05d}{suffix}"


def marker_path(dataset: str | Path, index: int) -> Path:
    return Path(dataset) / f"shard-{index:05d}.done.json"


def quarantine_path(dataset: str | Path, index: int) -> Path:
    """Rejected rows of shard ``index``, with their reasons (written with the shard)."""
    return Path(dataset) / "quarantine" / f"shard-{index:05d}.parquet"


def shard_indices(dataset: str | Path) -> list[int]:
    """Indices of the shards that carry a commit marker, sorted."""
    d = Path(dataset)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def file_indices(dataset: str | Path, suffix: str = ".parquet") -> list[int]:
    """Indices of the shard and quarantine files present, with a marker or not, sorted."""
    d = Path(dataset)
    name = re.compile(r"^shard-(\d{5,})" + re.escape(suffix) + "$")
    out = set()
    for sub in (d, d / "quarantine"):
        if sub.is_dir():
            out.update(int(m.group(1)) for p in sub.iterdir() if (m := name.match(p.name)))
    return sorted(out)
