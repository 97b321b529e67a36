"""Where ingest's shards end: every ``shard_rows`` kept rows, or after rows chosen by content.

A content cut ends a shard after a kept row whose prompt hash is a multiple of ``period``, once
the shard holds at least ``min_rows`` (and at ``max_rows`` at the latest). Which rows end
shards then depends on the rows themselves, not on how many came before, so a row kept or
dropped anew moves no later boundary: the shards after it come out the same (the idea of
content-defined chunking, applied to rows). With ``min_rows = max_rows`` and no period it is
the plain cut by position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# a content-cut shard holds at least half and at most this many times `shard_rows` rows
MAX_FACTOR = 4


@dataclass(frozen=True)
class ShardCuts:
    min_rows: int
    max_rows: int
    period: int = 0  # 0: no content boundaries


def shard_cuts(shard_rows: int, how: str) -> ShardCuts:
    """The cut rule for ``ingest.shard_cut`` ("position" or "content") at ``shard_rows`` rows.

    Content: a shard is ``min_rows - 1`` rows plus a geometric run whose mean is ``period``, so
    ``shard_rows`` rows on average (a little less: the ~2% of shards that reach ``max_rows``)."""
    if how == "position":
        return ShardCuts(shard_rows, shard_rows)
    if how != "content":
        raise ValueError(f"ingest.shard_cut must be position or content, got {how!r}")
    lo = max(1, shard_rows // 2)
    return ShardCuts(lo, MAX_FACTOR * shard_rows, shard_rows - lo + 1)


def cut_ends(cuts: ShardCuts, hashes: np.ndarray | None, filled: int) -> np.ndarray:
    """The indices into ``hashes`` (a block's kept rows, in order) of the rows after which a
    shard ends, when the shard being filled already holds ``filled`` rows (< ``max_rows``)."""
    n = 0 if hashes is None else hashes.size
    marks = (np.flatnonzero(hashes % np.uint64(cuts.period) == 0) if cuts.period and n
             else np.empty(0, dtype=np.int64))
    ends = []
    start = 0  # the block's first row in the shard being filled
    while start < n:
        first = start + max(cuts.min_rows - filled, 1) - 1  # the first row that may end it
        end = start + cuts.max_rows - filled - 1             # the row that must end it
        k = int(np.searchsorted(marks, first))
        if k < marks.size:
            end = min(end, int(marks[k]))
        if end >= n:
            break
        ends.append(end)
        start, filled = end + 1, 0
    return np.asarray(ends, dtype=np.int64)
