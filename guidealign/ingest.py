"""Ingest: input files -> prompt shards with stable ids, under ``WORKDIR/prompts/``.

Output columns: ``id`` (16 hex chars of a hash of the normalized prompt), ``prompt``,
``source`` (file and line/row), ``metadata`` (the input's other columns, as JSON).
Exact duplicates (same normalized prompt) are dropped and counted. Bad rows go to the
quarantine table beside the shard they would have landed in, with file, row and reason.

Ingest is deterministic: the same inputs and config give the same shards, so after a
crash it streams the inputs again and only writes the shards that are not committed.
Memory stays flat: one shard of rows plus 8 bytes per distinct prompt for de-duplication.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from guidealign.readers import READERS, IngestError, check_readable, expand_inputs
from shards import fingerprint, is_done, write_manifest, write_shard
from shards.layout import marker_path, quarantine_path, shard_indices, shard_path

log = logging.getLogger(__name__)

PROMPT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()),
                           ("source", pa.string()), ("metadata", pa.string())])
QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("row", pa.int64()),
                               ("reason", pa.string()), ("raw", pa.string())])


@dataclass
class IngestConfig:
    # Name of the field (JSON key or column) that holds the prompt.
    prompt_field: str = "prompt"
    # Prompts longer than this many characters are quarantined.
    max_chars: int = 100_000
    # Rows per output shard: the unit of work, resume and rank split downstream.
    shard_rows: int = 10_000
    # Input files for `guidealign ingest` when none are given on the command line.
    inputs: list[str] = field(default_factory=list)


@dataclass
class IngestReport:
    files: int = 0
    rows_in: int = 0
    rows: int = 0
    duplicates: int = 0
    quarantined: int = 0
    shards: int = 0
    written: int = 0
    skipped: int = 0
    seconds: float = 0.0
    reasons: dict = field(default_factory=dict)

    def summary(self) -> str:
        rate = self.rows_in / self.seconds if self.seconds else 0.0
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return (f"ingest: {self.files} file(s), {self.rows_in} rows read -> {self.rows} prompts in "
                f"{self.shards} shard(s) ({self.written} written, {self.skipped} already done); "
                f"{self.duplicates} duplicates dropped, {self.quarantined} quarantined"
                + (f" ({why})" if why else "") + f"; {rate:,.0f} rows/s")


_WS = re.compile(r"\s+")


def normalize(prompt: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", prompt)).strip()


def prompt_hash(prompt: str) -> bytes:
    return hashlib.blake2b(normalize(prompt).encode("utf-8", "surrogatepass"), digest_size=8).digest()


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" at ")[0].split(" (")[0]


def check_prompt(rec: dict, cfg: IngestConfig) -> str | None:
    f = cfg.prompt_field
    if f not in rec:
        return f"missing prompt field {f!r}"
    p = rec[f]
    if p is None:
        return "null prompt"
    if not isinstance(p, str):
        return f"prompt is not a string ({type(p).__name__})"
    try:
        p.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid UTF-8"
    if not p.strip():
        return "empty prompt"
    if len(p) > cfg.max_chars:
        return f"prompt too long ({len(p)} > {cfg.max_chars} chars)"
    return None


class _Seen:
    """Set of 64-bit prompt hashes: a sorted numpy array plus a small recent set."""

    def __init__(self, merge_every: int = 50_000):
        self.sorted = np.empty(0, dtype=np.uint64)
        self.recent: set[int] = set()
        self.merge_every = merge_every

    def add_if_new(self, h: int) -> bool:
        if h in self.recent:
            return False
        s = self.sorted
        if s.size:
            j = np.searchsorted(s, np.uint64(h))
            if j < s.size and s[j] == h:
                return False
        self.recent.add(h)
        if len(self.recent) >= self.merge_every:
            # recent holds only hashes absent from sorted: concatenate and sort in place,
            # so the peak is two arrays, not union1d's several temporaries
            merged = np.concatenate([s, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))])
            merged.sort()
            self.sorted = merged
            self.recent = set()
        return True


def _raw_repr(rec) -> str:
    if isinstance(rec, dict) and set(rec) == {"_raw"}:
        return rec["_raw"][:2000]
    try:
        s = json.dumps(rec, ensure_ascii=False, default=str)
    except Exception:  # noqa: BLE001
        s = repr(rec)
    return s[:2000].encode("utf-8", "replace").decode("utf-8")


def _fingerprint(files: list[Path], cfg: IngestConfig) -> str:
    stats = [(str(p.resolve()), p.stat().st_size if p.is_file() else 0,
              int(p.stat().st_mtime)) for p in files]
    return fingerprint("ingest-v1", cfg.prompt_field, cfg.max_chars, cfg.shard_rows, stats)


def ingest(inputs: list[str], workdir: str | Path, cfg: IngestConfig | None = None,
           progress: bool = True) -> IngestReport:
    """Ingest ``inputs`` (files, globs, saved datasets) into ``workdir/prompts``."""
    cfg = cfg or IngestConfig()
    if cfg.shard_rows < 1:
        raise ValueError("ingest.shard_rows must be >= 1")
    files = expand_inputs(list(inputs) or list(cfg.inputs))
    if not files:
        raise IngestError("no input given")
    formats = [check_readable(p) for p in files]  # every file checked before any work
    dst = Path(workdir) / "prompts"
    run_fp = _fingerprint(files, cfg)
    rep = IngestReport(files=len(files))
    t0 = time.perf_counter()
    seen = _Seen()
    rows: dict[str, list] = {k: [] for k in PROMPT_SCHEMA.names}
    bad: dict[str, list] = {k: [] for k in QUARANTINE_SCHEMA.names}
    shard_t0 = time.perf_counter()
    shard_dups = 0

    def flush():
        nonlocal shard_t0, shard_dups
        i = rep.shards
        fp = fingerprint(run_fp, i)
        n_bad = len(bad["reason"])
        if is_done(dst, i, fp):
            rep.skipped += 1
        else:
            table = pa.table(rows, schema=PROMPT_SCHEMA)
            quarantine = pa.table(bad, schema=QUARANTINE_SCHEMA) if n_bad else None
            write_shard(dst, i, table, fp, quarantine=quarantine,
                        seconds=time.perf_counter() - shard_t0,
                        stats={"duplicates": shard_dups})
            rep.written += 1
        rep.rows += len(rows["id"])
        rep.shards += 1
        pa.default_memory_pool().release_unused()  # keep RSS flat across shards
        for v in rows.values():
            v.clear()
        for v in bad.values():
            v.clear()
        shard_t0 = time.perf_counter()
        shard_dups = 0

    bar = tqdm(unit="rows", desc="ingest", disable=not progress, mininterval=1.0)
    for path, fmt in zip(files, formats):
        src = str(path)
        for row_no, rec, err in READERS[fmt](path):
            rep.rows_in += 1
            if rep.rows_in % 10_000 == 0:
                bar.update(10_000)
            if err is None:
                err = check_prompt(rec, cfg)
            if err is not None:
                rep.quarantined += 1
                kind = _reason_kind(err)
                rep.reasons[kind] = rep.reasons.get(kind, 0) + 1
                bad["source"].append(src)
                bad["row"].append(row_no)
                bad["reason"].append(err)
                bad["raw"].append(_raw_repr(rec) if rec is not None else None)
                # (readers pass the undecodable line itself as {"_raw": text})
                continue
            prompt = rec[cfg.prompt_field]
            h = prompt_hash(prompt)
            if not seen.add_if_new(int.from_bytes(h, "little")):
                rep.duplicates += 1
                shard_dups += 1
                continue
            meta = {k: v for k, v in rec.items() if k != cfg.prompt_field}
            rows["id"].append(h.hex())
            rows["prompt"].append(prompt)
            rows["source"].append(f"{src}:{row_no}")
            rows["metadata"].append(json.dumps(meta, ensure_ascii=False, default=str) if meta else "{}")
            if len(rows["id"]) >= cfg.shard_rows:
                flush()
    bar.close()
    if rows["id"] or bad["reason"] or rep.shards == 0:
        flush()
    # a previous run with other inputs may have left more shards: retire them
    for i in shard_indices(dst):
        if i >= rep.shards:
            for p in (marker_path(dst, i), shard_path(dst, i), quarantine_path(dst, i)):
                p.unlink(missing_ok=True)
    rep.seconds = time.perf_counter() - t0
    write_manifest(dst, stage="prompts", num_shards=rep.shards, fingerprint=run_fp,
                   rows=rep.rows, duplicates=rep.duplicates, quarantined=rep.quarantined,
                   reasons=rep.reasons, files=[str(p) for p in files])
    log.info(rep.summary())
    return rep
