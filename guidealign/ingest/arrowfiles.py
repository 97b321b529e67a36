"""Parquet files and saved ``datasets`` datasets, as Arrow batches (row group by row group; the
rows of a row group that cannot be decoded are quarantined, each with the group's reason) and
as rows."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from guidealign.ingest.keys import unique_names
from guidealign.ingest.metadata import py_records
from guidealign.ingest.rows import Row

log = logging.getLogger(__name__)


def decode_bytes(rec: dict) -> dict:
    # binary columns: decode here so that invalid UTF-8 is caught by the row check
    return {k: (v.decode("utf-8", errors="surrogateescape") if isinstance(v, bytes) else v)
            for k, v in rec.items()}


def text_as_binary(table: pa.Table) -> pa.Table:
    """``table`` with each string column that holds invalid UTF-8 (Parquet and ``datasets``
    readers do not check it) viewed as binary, whose values every path decodes as
    ``decode_bytes`` does: a prompt with a bad byte is quarantined (its block is checked row by
    row), a metadata value is written with the byte escaped. Nested columns need no view:
    ``metadata.py_values`` reads their bad text the same way."""
    cols = None
    for i, c in enumerate(table.columns):
        t = c.type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            continue
        try:
            c.validate(full=True)  # the UTF-8 check: one pass over the column's bytes
        except pa.ArrowInvalid:
            b = pa.large_binary() if pa.types.is_large_string(t) else pa.binary()
            cols = cols or list(table.columns)
            cols[i] = pa.chunked_array([ch.view(b) for ch in c.chunks], b)
    return table if cols is None else pa.Table.from_arrays(cols, names=table.column_names)


def _load_hf(path: Path):
    import datasets

    return datasets.load_from_disk(str(path))


def _unique_columns(batch):
    """``batch`` with repeated column names made unique (``unique_names``): a Parquet file may
    repeat a name, and neither a record nor a table lookup by name can hold both columns."""
    names = batch.schema.names
    fixed = unique_names(names)
    return batch if fixed == names else pa.RecordBatch.from_arrays(batch.columns, names=fixed)


class UnreadRows:
    """Rows of an input that cannot be decoded (the rest of a damaged Parquet row group): ``n``
    rows from row number ``first`` (from 1), each a quarantine entry with ``reason`` (so rows read
    = kept + duplicates + quarantined holds), or one entry when the failure lost no row. The rows
    after them keep their numbers."""
    __slots__ = ("first", "n", "reason")

    def __init__(self, first: int, n: int, reason: str):
        self.first, self.n, self.reason = first, n, reason

    def rows(self) -> list[Row]:
        return [(self.first + k, None, self.reason) for k in range(max(self.n, 1))]


def iter_parquet_tables(path: Path, batch_rows: int = 65536):
    """The record batches of a Parquet file, ``batch_rows`` rows each across its row groups (as
    ``ParquetFile.iter_batches`` cuts them: the same blocks, so the same shards), read one row
    group at a time: ``check_readable`` reads only the footer, so a damaged page shows only here,
    and then the rest of its row group comes as one ``UnreadRows`` (its rows quarantined) and
    reading goes on with the next row group."""
    f = pq.ParquetFile(path)
    md = f.metadata
    held: list = []  # batches read and not yet given out as one of batch_rows
    n_held = 0
    row = 1  # the number of the row group's first row
    for g in range(md.num_row_groups):
        want, got, err = md.row_group(g).num_rows, 0, None
        batches = f.iter_batches(batch_size=batch_rows, row_groups=[g])
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # noqa: BLE001 - whatever a damaged page raises: quarantined
                err = f"{type(e).__name__}: {e}"
                break
            if batch is None:
                if got < want:
                    err = f"only {got} of its {want} rows decode"
                break
            got += batch.num_rows
            held.append(batch)
            n_held += batch.num_rows
            while n_held >= batch_rows:
                out, held = _cut_batches(held, batch_rows)
                n_held -= batch_rows
                yield _unique_columns(out)
        if err is not None:
            if held:  # the rows read before the failure come first
                out, held = _cut_batches(held, n_held)
                n_held = 0
                yield _unique_columns(out)
            lost = max(want - got, 0)
            rows = f"rows {row + got}-{row + got + lost - 1}" if lost else "after its last row"
            reason = (f"Parquet row group cannot be decoded ({path}: row group {g + 1} of {md.num_row_groups}, "
                      f"{rows}): {err}"[:2000])
            log.warning("%s; the %d row(s) are quarantined, the other row groups read", reason, lost)
            yield UnreadRows(row + got, lost, reason)
        row += max(want, got)
    if held:
        yield _unique_columns(_cut_batches(held, n_held)[0])


def _cut_batches(held: list, k: int) -> tuple:
    """(the first ``k`` rows of the batches ``held`` as one batch, the rest as a list)."""
    if len(held) == 1 and held[0].num_rows == k:
        return held[0], []
    joined = pa.Table.from_batches(held).combine_chunks().to_batches()[0] if len(held) > 1 else held[0]
    rest = joined.slice(k)
    return joined.slice(0, k), ([rest] if rest.num_rows else [])


def hf_splits(path: Path, batch_rows: int = 65536) -> list:
    """[(split name or None, its record batches)] of a saved ``datasets`` dataset: a
    ``DatasetDict``'s splits in its order, each numbered from row 1 and named in ``source``
    (``DIR/train:12``), so that a row says which split it came from."""
    import datasets

    ds = _load_hf(path)
    splits = list(ds.items()) if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    return [(name, (_unique_columns(b) for b in split.data.to_batches(max_chunksize=batch_rows)))
            for name, split in splits]


def iter_hf_tables(path: Path, batch_rows: int = 65536):
    """Every split's record batches, one after the other."""
    for _, batches in hf_splits(path, batch_rows):
        yield from batches


def _rows_of(batches) -> Iterator[Row]:
    n = 0
    for batch in batches:
        if isinstance(batch, UnreadRows):  # a damaged row group: later rows keep their numbers
            yield from batch.rows()
            n += batch.n
            continue
        for rec in py_records(batch):
            n += 1
            yield n, decode_bytes(rec), None


def read_parquet(path: Path, encoding: str = "auto") -> Iterator[Row]:
    return _rows_of(iter_parquet_tables(path))


def read_hf_dataset(path: Path, encoding: str = "auto") -> Iterator[Row]:
    return _rows_of(iter_hf_tables(path))


# row-by-row readers by format (ingest itself reads JSONL, CSV, Parquet and datasets in columnar
# batches, with these as the reference and the fallback)
