"""A shard's rows as the Arrow table its Parquet file holds (``shard_table``), built in an
encoder thread from the parts the caller's thread cut: each a block's prompts and metadata, the
rows of them kept, their hashes and line numbers.

``Later``: a block's metadata column is made here too, on first use, by the encoder of the
block's first shard (the caller's thread is the pipeline's bottleneck).
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import pyarrow as pa

from guidealign.ingest.arrays import affix, int_arrow

PROMPT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()),
                           ("source", pa.string()), ("metadata", pa.string())])

# more runs than this and a shard's rows are copied (one take) rather than sliced: Parquet
# encodes a column of many chunks slower than the copy costs (1M rows with 1.5% dropped,
# ~150 runs a shard: the take and the encoding 0.23 CPU-s, slices 0.25)
MAX_RUNS = 8


class Later:
    """A column made on first use, once, by whichever thread asks first (``get()``): a block's
    metadata JSON is built by the encoder of its first shard, not by the caller's thread
    (1M rows: ~40 ms of that thread's time)."""

    def __init__(self, make: Callable[[], pa.Array]):
        self._make, self._value, self._lock = make, None, threading.Lock()

    def get(self) -> pa.Array:
        with self._lock:
            if self._make is not None:
                self._value, self._make = self._make(), None
            return self._value


def column(c: "pa.Array | Later") -> pa.Array:
    return c.get() if isinstance(c, Later) else c


def shard_table(parts: list[tuple]) -> pa.Table:
    """The shard's rows from its parts (src, block prompts, block metadata, rows kept, hashes,
    line numbers)."""
    tables = []
    for src, prompt, meta, at, hashes, lineno in parts:
        prompt, meta = rows_at(prompt, at), rows_at(column(meta), at)
        source = affix(int_arrow(lineno).cast(pa.string()), f"{src}:")
        tables.append(pa.table({"id": hex_ids(hashes), "prompt": prompt, "source": source,
                                "metadata": meta}, schema=PROMPT_SCHEMA))
    return pa.concat_tables(tables) if tables else PROMPT_SCHEMA.empty_table()


def rows_at(arr: pa.Array, at: np.ndarray) -> pa.Array | pa.ChunkedArray:
    """``arr.take(at)`` for increasing ``at``; while the rows come in a few runs (a row dropped
    here and there: duplicates, bad rows) as zero-copy slices of ``arr``, one chunk a run, since
    a take copies every kept prompt once more before Parquet encodes it."""
    if not at.size:
        return arr.slice(0, 0)
    breaks = np.flatnonzero(np.diff(at) != 1) + 1
    if not breaks.size:
        return arr.slice(int(at[0]), at.size)
    if breaks.size > MAX_RUNS:  # many runs: one copy costs less than encoding many chunks
        return arr.take(int_arrow(at))
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [at.size]]))
    return pa.chunked_array([arr.slice(int(a), int(n)) for a, n in zip(at[starts].tolist(), lengths.tolist())],
                            type=arr.type)


def hex_ids(h: np.ndarray) -> pa.Array:
    """16-char hex of each hash's little-endian bytes (== ``prompt_hash(p).hex()``)."""
    n = len(h)
    digits = np.ascontiguousarray(h, dtype="<u8").tobytes().hex().encode("ascii")  # 3x a lookup table
    offsets = pa.py_buffer(np.arange(0, 16 * n + 1, 16, dtype=np.int32))
    return pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(digits)])
