"""Row-by-row input readers for ingest: each yields (locator, record-or-None, error-or-None).

This module finds the inputs, tells their format and checks each can be read; the readers are
``jsonrows`` (JSON Lines), ``jsonarray`` (JSON arrays and objects), ``csvrows`` (CSV/TSV) and
``arrowfiles`` (Parquet, saved datasets). A record is a dict; an error is a reason string for the quarantine table, worded so that the
user knows how to fix the file. Readers never raise on a bad row, only on a file that cannot
be read at all (checked up front by ``check_readable``). Text inputs go through
``guidealign.encodings.open_utf8`` (compression, byte-order marks, encodings, line ends).
The columnar fast path (``guidealign.ingest.batch``) falls back to these for blocks it
cannot parse, so quarantine reasons are the same on both paths.
"""
from __future__ import annotations

import glob
import logging
import os
import re
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from guidealign.ingest.arrowfiles import _load_hf, read_hf_dataset, read_parquet
from guidealign.ingest.encodings import EncodingError, inner_suffix, open_utf8
from guidealign.ingest.jsonrows import JSON_LINES_SNIFF, is_json_lines, json_array_start, read_jsonl
from guidealign.ingest.rows import IngestError, Row

log = logging.getLogger(__name__)


FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet", ".pq": "parquet"}



def expand_inputs(inputs: list[str], dataset: Path | None = None) -> list[Path]:
    """The files ``inputs`` name, each pattern's matches sorted. An item that names an existing
    path is that path, whatever its characters (``data[1].jsonl`` is a file name, not a pattern
    matching ``data1.jsonl``); so is a pattern's leading directory part that exists as written
    (``run[2]/*.jsonl``). With ``dataset`` (the directory an ingest writes, WORKDIR/<name>): a
    pattern skips, with a warning, what lies in a dataset of the run directory (``dataset``
    itself, or a directory under WORKDIR holding a manifest or shard markers; e.g.
    ``**/*.parquet`` with ``-w .`` read the run's own shards back in on the next run), and a file
    named inside ``dataset`` is an error."""
    inside = _in_run_datasets(Path(dataset)) if dataset is not None else None
    out: list[Path] = []
    for item in inputs:
        if _is_pattern(item) and not os.path.lexists(item):
            hits = sorted(glob.glob(_literal_dirs(item), recursive=True))
            if not hits:
                raise IngestError(f"{item}: the pattern matches no file")
            kept = [h for h in hits if inside is None or not inside(Path(h))]
            if len(kept) < len(hits):
                where = f"in datasets of the run directory {Path(dataset).parent} (its output, not input)"
                if not kept:
                    raise IngestError(f"{item}: the pattern matches only files {where}")
                log.warning("%s: skipped %d of the %d files the pattern matches, %s", item,
                            len(hits) - len(kept), len(hits), where)
            out.extend(Path(h) for h in kept)
        else:
            others = sorted(h for h in glob.glob(item, recursive=True) if os.path.normpath(h)
                            != os.path.normpath(item)) if _is_pattern(item) else []
            if others:  # the name was taken over the pattern: say what the pattern would have read
                log.warning("%s: read as the file of that name, not as a pattern (which would match %s)",
                            item, ", ".join(others[:3]) + (", ..." if len(others) > 3 else ""))
            if inside is not None and inside(Path(item), only_dataset=True):
                raise IngestError(f"{item}: inside {dataset}, the dataset this ingest writes (its "
                                  "output cannot be its input); copy it elsewhere or ingest into another "
                                  "run directory or dataset")
            out.append(Path(item))
    return out


def _is_pattern(item: str) -> bool:
    return any(c in item for c in "*?[")


def _literal_dirs(pattern: str) -> str:
    """``pattern`` with its longest leading directory part that exists as written escaped: that
    directory is meant, not a pattern over its siblings."""
    parts = pattern.split(os.sep)
    for k in range(len(parts) - 1, 0, -1):
        head = os.sep.join(parts[:k])
        if head and _is_pattern(head) and os.path.isdir(head):
            return glob.escape(head) + os.sep + os.sep.join(parts[k:])
    return pattern


# what a run writes beside its datasets, directly under WORKDIR: its record, push reports, the
# ranks' failure markers and heartbeats; and artifacts being built or replaced (.index.tmp-*,
# .library.old-*)
_RUN_FILES = ("run.json", "push", "_failed", "_ranks", "_configs")
_RUN_HIDDEN = re.compile(r"^\.[\w-]+\.(?:tmp|old)-")


def _in_run_datasets(dataset: Path):
    """A test: does a path lie in ``dataset`` or (not only_dataset) in another output of its run
    directory (under WORKDIR, a directory holding a manifest, shard markers or an artifact's
    ``_done.json`` (the index's rows.parquet holds guideline texts under ``text``, a prompt
    alias), or one of the run's own files: run.json, push/, _failed/, _ranks/, an artifact
    being built)?"""
    from guidealign.shards.manifest import MANIFEST

    ds = dataset.resolve()
    workdir = ds.parent
    seen: dict = {}

    def is_dataset(d: Path) -> bool:
        if d not in seen:
            seen[d] = ((d / MANIFEST).is_file() or (d / "_done.json").is_file()
                       or next(d.glob("shard-*.done.json"), None) is not None)
        return seen[d]

    def inside(p: Path, only_dataset: bool = False) -> bool:
        r = p.resolve()
        if r == ds or ds in r.parents:
            return True
        if only_dataset or workdir not in r.parents:
            return False
        top = r.relative_to(workdir).parts[0]
        if top in _RUN_FILES or _RUN_HIDDEN.match(top):
            return True
        d = r if r.is_dir() else r.parent
        while d != workdir:
            if is_dataset(d):
                return True
            d = d.parent
        return False

    return inside


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
                # .json: is it JSON Lines? .jsonl: does it open with "[" (past any blanks)?
                head = stream.read({"json": JSON_LINES_SNIFF, "jsonl": 4096}.get(fmt, 1))
                array = fmt == "jsonl" and head.lstrip().startswith(b"[")
                if array:
                    head += stream.read(JSON_LINES_SNIFF + 1 - len(head))
            if fmt == "json" and is_json_lines(head):
                log.warning("%s: one JSON object per line (JSON Lines, not one JSON value): read as "
                            ".jsonl", path)
                fmt = "jsonl"
            elif array:
                fmt = _jsonl_or_array(path, head[:JSON_LINES_SNIFF], len(head) > JSON_LINES_SNIFF)
    except IngestError:
        raise
    except EncodingError as e:
        raise IngestError(f"{path}: {e}") from e
    except Exception as e:  # noqa: BLE001 - any failure here makes the input unreadable
        raise IngestError(f"{path}: cannot be read as {fmt}: {type(e).__name__}: {e}") from e
    return fmt


def _jsonl_or_array(path: Path, head: bytes, cut: bool) -> str:
    """The format of a JSON Lines file that starts with "[": one JSON array saved as .jsonl is
    read as .json (as JSON Lines, only its items on one line each came through)."""
    kind = json_array_start(head, cut)
    if kind:
        log.warning("%s: one JSON array (not one JSON object per line): read as .json", path)
        return "json"
    if kind is None:
        raise IngestError(f"{path}: starts with '[' but is neither one JSON array (its start does not "
                          "read as one) nor JSON Lines (one JSON object per line); if it is a JSON array, "
                          "rename it to .json (a bad item is then quarantined alone), else fix its first lines")
    return "jsonl"


# (the CSV and JSON-document readers load with the first file that needs them: ~10 ms of imports
# that an ingest of JSONL or Parquet files does not pay at its start)
def read_json(path: Path, *args) -> Iterator[Row]:
    from guidealign.ingest.jsonarray import read_json as read

    return read(path, *args)


def read_csv(path: Path, *args) -> Iterator[Row]:
    from guidealign.ingest.csvrows import read_csv as read

    return read(path, *args)


READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv,
           "parquet": read_parquet, "hf_dataset": read_hf_dataset}


def read_rows(path: Path, fmt: str, cfg) -> Iterator[Row]:
    """The rows of ``path`` (format ``fmt``) read row by row as ingest with ``cfg`` (an
    IngestConfig) reads them: its encoding and CSV delimiter, and, for a JSON object, its prompt
    field (which decides whether the object is one record or holds records)."""
    if fmt == "json":
        return read_json(path, cfg.encoding, cfg.prompt_field, tuple(cfg.prompt_aliases))
    if fmt == "csv":
        return read_csv(path, cfg.encoding, cfg.delimiter, (cfg.prompt_field, tuple(cfg.prompt_aliases)))
    return READERS[fmt](path, cfg.encoding)
