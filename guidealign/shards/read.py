"""Streaming reads over committed shards: memory stays one shard (or one batch) wide."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from guidealign.shards.layout import quarantine_path, shard_indices, shard_path
from guidealign.shards.marker import intact, read_marker


def committed(dataset: str | Path) -> list[int]:
    """Indices of shards whose marker exists and whose file matches the marker's size."""
    out = []
    for i in shard_indices(dataset):
        if intact(read_marker(dataset, i), shard_path(dataset, i)):
            out.append(i)
    return out


def read_table(dataset: str | Path, index: int, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(shard_path(dataset, index), columns=columns)


def iter_tables(dataset: str | Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Yield each committed shard as a table, in shard order."""
    for i in committed(dataset):
        yield read_table(dataset, i, columns)


def iter_batches(
    dataset: str | Path, columns: list[str] | None = None, batch_size: int = 8192
) -> Iterator[pa.RecordBatch]:
    """Yield record batches over all committed shards, never holding a whole shard."""
    for i in committed(dataset):
        f = pq.ParquetFile(shard_path(dataset, i))
        yield from f.iter_batches(batch_size=batch_size, columns=columns)


def read_quarantine(dataset: str | Path) -> pa.Table | None:
    """All quarantined rows of a dataset (for reports and tests)."""
    tables = [pq.read_table(quarantine_path(dataset, i)) for i in committed(dataset)
              if quarantine_path(dataset, i).exists()]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None
