"""Row-by-row input readers for ingest: each yields (locator, record-or-None, error-or-None).

JSON arrays and objects are read by ``guidealign.ingest.jsonarray``. A record is a dict; an error is a reason string for the quarantine table, worded so that the
user knows how to fix the file. Readers never raise on a bad row, only on a file that cannot
be read at all (checked up front by ``check_readable``). Text inputs go through
``guidealign.encodings.open_utf8`` (compression, byte-order marks, encodings, line ends).
The columnar fast path (``guidealign.ingest.batch``) falls back to these for blocks it
cannot parse, so quarantine reasons are the same on both paths.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import logging
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from guidealign.ingest.encodings import (EncodingError, has_surrogates, inner_suffix, open_utf8, read_error,
                                        utf8_error_reason)
from guidealign.ingest.jsonarray import read_json

log = logging.getLogger(__name__)

Row = tuple[int, dict | None, str | None]  # (line or row number, record, error)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet", ".pq": "parquet"}
DELIMITERS = ",;\t|"
# Python's csv module refuses a field over 131072 chars by default and then goes on mid-field, so
# the rest of a long (quoted, multi-line) document column and the rows after it came out as
# made-up records. A field this long is data (pandas has no limit); past it, a runaway quote.
CSV_FIELD_LIMIT = 1 << 26
if csv.field_size_limit() < CSV_FIELD_LIMIT:
    csv.field_size_limit(CSV_FIELD_LIMIT)


class IngestError(Exception):
    """A whole input cannot be read; raised before any work starts."""


def expand_inputs(inputs: list[str]) -> list[Path]:
    out: list[Path] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            hits = sorted(glob.glob(item, recursive=True))
            if not hits:
                raise IngestError(f"{item}: the pattern matches no file")
            out.extend(Path(h) for h in hits)
        else:
            out.append(Path(item))
    return out


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
                or (path / "state.json").exists():
            return "hf_dataset"
        raise IngestError(f"{path}: a directory that is not a saved `datasets` dataset")
    fmt = FORMATS.get(inner_suffix(path))
    if fmt is None:
        raise IngestError(f"{path}: unknown format (expected one of {sorted(FORMATS)}, optionally "
                          "compressed as .gz/.bz2/.xz/.zst, or a saved datasets directory)")
    return fmt


def check_readable(path: Path, encoding: str = "auto") -> str:
    """Fail early, naming the file, when an input cannot be read at all."""
    if not path.exists():
        raise IngestError(f"{path}: no such file or directory")
    fmt = detect_format(path)
    try:
        if fmt == "parquet":
            pq.ParquetFile(path).schema_arrow
        elif fmt == "hf_dataset":
            _load_hf(path)
        else:
            stream, _ = open_utf8(path, encoding)
            with stream:
                head = stream.read(JSON_LINES_SNIFF if fmt == "json" else 1)
            if fmt == "json" and is_json_lines(head):
                log.warning("%s: one JSON object per line (JSON Lines, not one JSON value): read as "
                            ".jsonl", path)
                fmt = "jsonl"
    except IngestError:
        raise
    except EncodingError as e:
        raise IngestError(f"{path}: {e}") from e
    except Exception as e:  # noqa: BLE001 - any failure here makes the input unreadable
        raise IngestError(f"{path}: cannot be read as {fmt}: {type(e).__name__}: {e}") from e
    return fmt


# bytes of a .json file looked at to tell JSON Lines saved as .json (a common mislabel)
JSON_LINES_SNIFF = 1 << 20


def is_json_lines(head: bytes) -> bool:
    """The file starting with ``head`` is JSON Lines: its first line is a whole JSON object and
    more text follows. As one JSON value it would be invalid (text after the value ends); read as
    one, only its first record came through and the rest was quarantined as one row."""
    lines = [ln for ln in head.split(b"\n") if ln.strip()]
    if len(lines) < 2 or not lines[0].lstrip().startswith(b"{"):
        return False
    try:
        first = json.loads(lines[0])
    except (ValueError, RecursionError):  # a pretty-printed object's "{" line, or cut by the sniff
        return False
    return isinstance(first, dict)


# --- row readers --------------------------------------------------------------------------------

def parse_jsonl_line(lineno: int, raw: bytes, last: bool, encoding: str = "utf-8") -> Row | None:
    """One JSONL line -> a Row (None for a blank line). ``last``: the file's final line, unterminated."""
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return lineno, {"_raw": raw.decode("utf-8", "replace")}, utf8_error_reason(lineno, raw, encoding)
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        why = "truncated last line" if last else f"line {lineno} is not JSON"
        return lineno, {"_raw": text}, f"{why}: {e.msg} (column {e.colno})"
    except RecursionError:
        return lineno, {"_raw": text}, f"line {lineno} is JSON nested too deeply to read"
    if not isinstance(rec, dict):
        return lineno, None, f"line {lineno} is a JSON {type(rec).__name__}, not an object"
    return lineno, rec, None


def iter_lines(stream) -> Iterator[tuple[bytes, bool]]:
    """(line, is-final-unterminated-line) for each line of a binary stream."""
    prev = None
    for raw in stream:
        if prev is not None:
            yield prev, False
        prev = raw
    if prev is not None:
        yield prev, not prev.endswith(b"\n")


def read_jsonl(path: Path, encoding: str = "auto") -> Iterator[Row]:
    stream, enc = open_utf8(path, encoding)
    with stream:
        for lineno, (raw, last) in enumerate(iter_lines(stream), start=1):
            # the line without its end, as ingest's blocks cut it (a reason's column, the raw text)
            row = parse_jsonl_line(lineno, raw[:-1] if raw.endswith(b"\n") else raw, last, enc)
            if row is not None:
                yield row
        if read_error(stream):
            yield 0, None, read_error(stream)


def sniff_delimiter(header: str, path: Path, delimiter: str = "auto") -> str:
    if delimiter != "auto":
        return "\t" if delimiter in ("\\t", "tab") else delimiter
    if inner_suffix(path) == ".tsv":
        return "\t"
    counts = {d: _count_outside_quotes(header, d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: (counts[d], d == ","))
    return best if counts[best] else ","


def _count_outside_quotes(line: str, ch: str) -> int:
    n, quoted = 0, False
    for c in line:
        if c == '"':
            quoted = not quoted
        elif c == ch and not quoted:
            n += 1
    return n


def read_csv(path: Path, encoding: str = "auto", delimiter: str = "auto") -> Iterator[Row]:
    stream, enc = open_utf8(path, encoding)
    with stream:
        f = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
        first, skipped = f.readline(), 0
        while first and not first.strip():  # blank lines before the header: the header is next
            first, skipped = f.readline(), skipped + 1
        delim = sniff_delimiter(first.splitlines()[0] if first else "", path, delimiter)
        reader = csv.reader(_chain([first], f), delimiter=delim)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield skipped + 1, None, f"the header line cannot be read as CSV: {e}"
            return
        yield from csv_body(reader, csv_names(header), delim, enc, stream, offset=skipped)


def csv_names(header: list[str]) -> list[str]:
    return unique_names([h.replace("\ufeff", "").strip() for h in header])


def unique_names(names: list[str]) -> list[str]:
    """Column names with each repeat renamed ``name.1``, ``name.2``, ... (as pandas reads
    them): a record is a dict, so a repeated name would keep only its last column's value. The
    first column of a name keeps it (so it is the prompt column when the name is the prompt's)."""
    if len(set(names)) == len(names):
        return list(names)
    taken = set(names)
    seen: set[str] = set()
    out = []
    for name in names:
        new, k = name, 0
        while new in seen:
            k += 1
            new = f"{name}.{k}"
            if new in taken:
                new = name  # another column's own name: try the next number
        seen.add(new)
        out.append(new)
    return out


def csv_body(reader, names, delim, enc, stream, offset: int = 0) -> Iterator[Row]:
    """The rows of ``reader`` up to the end of ``stream`` (``offset``: lines before the reader's
    first line). The last row of a file cut off (``read_error``) is suspect, so it is held back
    and quarantined with the reason."""
    held = None  # each row waits for the next one: the last row of a cut-off file is suspect
    for row in _csv_rows(reader, names, delim, enc, offset):
        if held is not None:
            yield held
        held = row
    err = read_error(stream)
    if err and held is not None and held[2] is None:
        yield held[0], held[1], f"the last row may be cut off: {err}"
    elif held is not None:
        yield held
    if err:
        yield 0, None, err


def _csv_rows(reader, names, delim, enc, offset: int = 0) -> Iterator[Row]:
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            line = offset + reader.line_num
            yield line, None, f"line {line} cannot be read as CSV: {e}"
            continue
        line = offset + reader.line_num
        if not row:
            continue
        rec = dict(zip(names, row))
        if len(row) > len(names):
            rec["_extra_fields"] = row[len(names):]
        bad = [k for k, v in rec.items() if isinstance(v, str) and has_surrogates(v)]
        if bad:
            raw = delim.join(row).encode("utf-8", "surrogateescape")
            reason = utf8_error_reason(line, raw, enc)
            yield line, {"_raw": raw.decode("utf-8", "replace")}, f"{reason} (column {bad[0]!r})"
            continue
        yield line, rec, None


def _chain(first, rest):
    yield from first
    yield from rest


def decode_bytes(rec: dict) -> dict:
    # binary columns: decode here so that invalid UTF-8 is caught by the row check
    return {k: (v.decode("utf-8", errors="surrogateescape") if isinstance(v, bytes) else v)
            for k, v in rec.items()}


def _load_hf(path: Path):
    import datasets

    return datasets.load_from_disk(str(path))


def _unique_columns(batch):
    """``batch`` with repeated column names made unique (``unique_names``): a Parquet file may
    repeat a name, and neither a record nor a table lookup by name can hold both columns."""
    names = batch.schema.names
    fixed = unique_names(names)
    return batch if fixed == names else pa.RecordBatch.from_arrays(batch.columns, names=fixed)


def iter_parquet_tables(path: Path, batch_rows: int = 65536):
    f = pq.ParquetFile(path)
    for batch in f.iter_batches(batch_size=batch_rows):
        yield _unique_columns(batch)


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
        for rec in batch.to_pylist():
            n += 1
            yield n, decode_bytes(rec), None


def read_parquet(path: Path, encoding: str = "auto") -> Iterator[Row]:
    return _rows_of(iter_parquet_tables(path))


def read_hf_dataset(path: Path, encoding: str = "auto") -> Iterator[Row]:
    return _rows_of(iter_hf_tables(path))


# row-by-row readers by format (ingest itself reads JSONL, CSV, Parquet and datasets in columnar
# batches, with these as the reference and the fallback)

READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv,
           "parquet": read_parquet, "hf_dataset": read_hf_dataset}


def read_rows(path: Path, fmt: str, cfg) -> Iterator[Row]:
    """The rows of ``path`` (format ``fmt``) read row by row as ingest with ``cfg`` (an
    IngestConfig) reads them: its encoding and CSV delimiter, and, for a JSON object, its prompt
    field (which decides whether the object is one record or holds records)."""
    if fmt == "json":
        return read_json(path, cfg.encoding, cfg.prompt_field)
    if fmt == "csv":
        return read_csv(path, cfg.encoding, cfg.delimiter)
    return READERS[fmt](path, cfg.encoding)
