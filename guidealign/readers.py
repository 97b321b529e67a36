"""Input readers for ingest: each yields (locator, record-or-None, error-or-None).

A record is a dict; an error is a reason string for the quarantine table. Readers never
raise on a bad row, only on a file that cannot be read at all (checked up front by
``check_readable``).
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

Row = tuple[int, dict | None, str | None]  # (line or row number, record, error)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
           ".parquet": "parquet", ".pq": "parquet"}


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
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise IngestError(f"{path}: unknown format (expected one of {sorted(FORMATS)} "
                          "or a saved datasets directory)")
    return fmt


def check_readable(path: Path) -> str:
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
            with open(path, "rb") as f:
                f.read(1)
    except IngestError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here makes the input unreadable
        raise IngestError(f"{path}: cannot be read as {fmt}: {type(e).__name__}: {e}") from e
    return fmt


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start}"


def read_jsonl(path: Path) -> Iterator[Row]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        for lineno, raw in enumerate(f, start=1):
            pos += len(raw)
            truncated = not raw.endswith(b"\n") and pos == size
            if not raw.strip():
                continue
            text, err = _decode(raw)
            if err:
                yield lineno, {"_raw": raw.decode("utf-8", "replace")}, err
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                why = "truncated last line" if truncated else "line is not JSON"
                yield lineno, {"_raw": text}, f"{why}: {e.msg}"
                continue
            if not isinstance(rec, dict):
                yield lineno, None, f"line is a JSON {type(rec).__name__}, not an object"
                continue
            yield lineno, rec, None


def read_json(path: Path) -> Iterator[Row]:
    """A JSON array of objects, streamed with ijson (a JSON object with one list is accepted too)."""
    import ijson

    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    prefix = "item" if head.startswith(b"[") else None
    if prefix is None:
        # {"data": [...]} style: take the first key whose value is a list
        with open(path, "rb") as f:
            for key, event, _ in ijson.parse(f):
                if event == "start_array" and key and "." not in key:
                    prefix = f"{key}.item"
                    break
        if prefix is None:
            yield 0, None, "JSON file holds no array of records"
            return
    n = 0
    with open(path, "rb") as f:
        try:
            for n, rec in enumerate(ijson.items(f, prefix, use_float=True), start=1):
                if not isinstance(rec, dict):
                    yield n, None, f"array item is a JSON {type(rec).__name__}, not an object"
                else:
                    yield n, rec, None
        except (ijson.JSONError, UnicodeDecodeError) as e:
            yield n + 1, None, f"invalid JSON after item {n}, rest of file skipped: {e}"


def read_csv(path: Path) -> Iterator[Row]:
    with open(path, "rb") as fb:
        f = io.TextIOWrapper(fb, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(f)
        for rec in reader:
            line = reader.line_num
            bad = [k for k, v in rec.items() if isinstance(v, str) and _has_surrogates(v)]
            if bad:
                yield line, None, f"invalid UTF-8 in column {bad[0]!r}"
                continue
            if None in rec:  # more fields than header
                extra = rec.pop(None)
                rec["_extra_fields"] = extra
            yield line, rec, None


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def read_parquet(path: Path, batch_rows: int = 8192) -> Iterator[Row]:
    f = pq.ParquetFile(path)
    n = 0
    for batch in f.iter_batches(batch_size=batch_rows):
        for rec in batch.to_pylist():
            n += 1
            yield n, _decode_bytes(rec), None


def _decode_bytes(rec: dict) -> dict:
    # binary columns: decode here so that invalid UTF-8 is caught by the row check
    return {k: (v.decode("utf-8", errors="surrogateescape") if isinstance(v, bytes) else v)
            for k, v in rec.items()}


def _load_hf(path: Path):
    import datasets

    return datasets.load_from_disk(str(path))


def read_hf_dataset(path: Path, batch_rows: int = 8192) -> Iterator[Row]:
    import datasets

    ds = _load_hf(path)
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    n = 0
    for _, split in splits:
        for batch in split.data.to_batches(max_chunksize=batch_rows):
            for rec in batch.to_pylist():
                n += 1
                yield n, _decode_bytes(rec), None


READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv,
           "parquet": read_parquet, "hf_dataset": read_hf_dataset}
