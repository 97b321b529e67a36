"""A dataset's manifest (``_stage.json``): how many shards the stage has in all.

Map stages write it before their first shard, so that every rank, and
``guidealign status``, knows the total; completeness is read off the markers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from shards.marker import read_marker
from shards.write import write_json_atomic

MANIFEST = "_stage.json"


def write_manifest(dataset: str | Path, *, stage: str, num_shards: int, fingerprint: str,
                   **extra) -> None:
    write_json_atomic(Path(dataset) / MANIFEST,
                      {"stage": stage, "num_shards": num_shards, "fingerprint": fingerprint, **extra})


def read_manifest(dataset: str | Path) -> dict | None:
    try:
        return json.loads((Path(dataset) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def missing_shards(dataset: str | Path) -> list[int] | None:
    """Shards not yet committed (None when the stage has not been planned)."""
    man = read_manifest(dataset)
    if man is None:
        return None
    return [i for i in range(man["num_shards"]) if read_marker(dataset, i) is None]


def is_complete(dataset: str | Path) -> bool:
    """Every shard named by the manifest has a commit marker."""
    return missing_shards(dataset) == []


def wait_complete(dataset: str | Path, timeout: float = 0, poll: float = 5.0) -> dict:
    """Block until every shard of ``dataset`` is committed (reduce stages need this).

    ``timeout=0`` checks once and raises at once when incomplete.
    """
    deadline = time.monotonic() + timeout
    while True:
        missing = missing_shards(dataset)
        if missing == []:
            return read_manifest(dataset)
        if time.monotonic() >= deadline:
            what = "has no manifest (stage not run)" if missing is None else \
                f"misses {len(missing)} shard(s), e.g. {missing[:5]}"
            raise RuntimeError(f"{dataset} is incomplete: it {what}")
        time.sleep(poll)


__all__ = ["write_manifest", "read_manifest", "missing_shards", "is_complete", "wait_complete"]
