"""Ingest: input files -> prompt shards with stable ids, under ``WORKDIR/<dataset>/`` ("prompts").

Output columns: ``id`` (16 hex chars of a hash of the normalized prompt), ``prompt``,
``source`` (file and line/row), ``metadata`` (the input's other non-null columns, as JSON).
Exact duplicates (same normalized prompt) are dropped and counted. Bad rows go to the
quarantine table beside the shard they would have landed in, with file, row and reason.

Rows are read, checked, normalized and hashed in columnar blocks (``ingest_batch``); a block
that does not parse as a whole goes row by row, so quarantine reasons stay exact.

Ingest is deterministic: the same inputs and config give the same shards, so after a
crash it streams the inputs again and only writes the shards that are not committed.
Memory stays flat: one block and one shard of rows, plus 8 bytes per distinct prompt for
de-duplication (sorted uint64 runs).
"""
from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from guidealign.ingest.encodings import EncodingError, open_utf8, read_error
from guidealign.ingest.batch import Batch, Spec, arrow_batches, check_value, hex_ids, rows_batch
from guidealign.ingest.jsonl import jsonl_blocks
from guidealign.core.ids import normalize, prompt_hash  # noqa: F401 - the id rule, re-exported
from guidealign.ingest.readers import (READERS, IngestError, check_readable, expand_inputs, find_prompt_key,
                                iter_hf_tables, iter_parquet_tables)
from guidealign.shards import fingerprint, is_done, write_manifest, write_shard
from guidealign.config.ingest import IngestConfig
from guidealign.shards.layout import marker_path, quarantine_path, shard_indices, shard_path

log = logging.getLogger(__name__)

PROMPT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()),
                           ("source", pa.string()), ("metadata", pa.string())])
QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("row", pa.int64()),
                               ("reason", pa.string()), ("raw", pa.string())])
# Test/chaos hook: the process SIGKILLs itself right after committing this many shards.
KILL_AFTER_ENV = "GUIDEALIGN_INGEST_KILL_AFTER_SHARDS"
_DATASET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    encodings: dict = field(default_factory=dict)
    dataset: str = "prompts"

    def summary(self) -> str:
        rate = self.rows_in / self.seconds if self.seconds else 0.0
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return (f"ingest: {self.files} file(s), {self.rows_in} rows read -> {self.rows} prompts in "
                f"{self.shards} shard(s) of {self.dataset} ({self.written} written, {self.skipped} already "
                f"done); {self.duplicates} duplicates dropped, {self.quarantined} quarantined"
                + (f" ({why})" if why else "") + f"; {rate:,.0f} rows/s")


def _reason_kind(reason: str) -> str:
    kind = reason.split(":")[0].split(" at ")[0].split(" (")[0].split(";")[0]
    return re.sub(r"\d+", "N", kind)


def check_prompt(rec: dict, cfg: IngestConfig) -> str | None:
    """Why ``rec`` has no usable prompt, or None (the row-by-row reference check)."""
    key = find_prompt_key(tuple(rec), cfg.prompt_field, cfg.prompt_aliases)
    return check_value(rec.get(key) if key is not None else None, key, _spec(cfg))


def prompt_of(rec: dict, cfg: IngestConfig) -> str | None:
    key = find_prompt_key(tuple(rec), cfg.prompt_field, cfg.prompt_aliases)
    return rec.get(key) if key is not None else None


def _spec(cfg: IngestConfig, compiled_hash: bool = False) -> Spec:
    return Spec(cfg.prompt_field, tuple(cfg.prompt_aliases), cfg.max_chars, compiled_hash)


def _use_compiled_hash(cfg: IngestConfig, files: list[Path]) -> bool:
    if cfg.hash_kernel not in ("auto", "numba", "hashlib"):
        raise IngestError(f"ingest.hash_kernel must be auto, numba or hashlib, got {cfg.hash_kernel!r}")
    if cfg.hash_kernel == "hashlib":
        return False
    if cfg.hash_kernel == "auto" and sum(p.stat().st_size for p in files if p.is_file()) < 64 << 20:
        return False
    from guidealign.ingest.batch import _numba_kernel

    if _numba_kernel() is None:
        if cfg.hash_kernel == "numba":
            raise IngestError("ingest.hash_kernel=numba needs numba installed (pip install numba)")
        return False
    return True


class HashSet:
    """Set of 64-bit prompt hashes as sorted uint64 runs of halving sizes (8 bytes a prompt).

    Adding a batch appends a sorted run and merges runs while the newest is at least half the
    size of the one before, so there are O(log n) runs and each hash is merged O(log n) times
    (plus one run per 4M hashes once runs reach ``max_run``)."""

    def __init__(self, max_run: int = 1 << 22):
        self.runs: list[np.ndarray] = []
        # runs stop merging at 4M hashes (32 MiB), so a merge never needs more than 64 MiB extra
        self.max_run = max_run

    def __len__(self) -> int:
        return sum(r.size for r in self.runs)

    def contains(self, h: np.ndarray) -> np.ndarray:
        found = np.zeros(h.size, dtype=bool)
        for r in self.runs:
            j = np.searchsorted(r, h)
            j[j == r.size] = 0
            found |= r[j] == h
        return found

    def add_new(self, h: np.ndarray) -> np.ndarray:
        """Mask of the hashes in ``h`` (in order) that were not in the set (first occurrence
        within ``h`` counts as new); adds them."""
        new = np.zeros(h.size, dtype=bool)
        if not h.size:
            return new
        uniq, first = np.unique(h, return_index=True)
        fresh = ~self.contains(uniq) if self.runs else np.ones(uniq.size, dtype=bool)
        new[first[fresh]] = True
        run = uniq[fresh]  # np.unique output is sorted
        if run.size:
            self.runs.append(run)
            while (len(self.runs) > 1 and self.runs[-1].size * 2 >= self.runs[-2].size
                   and self.runs[-2].size < self.max_run):
                b, a = self.runs.pop(), self.runs.pop()
                merged = np.concatenate([a, b])
                del a, b
                merged.sort(kind="stable")  # two sorted runs: timsort merges them in one pass
                self.runs.append(merged)
        return new


class _Shards:
    """Cuts the stream of kept rows into shards of ``shard_rows`` and commits them in order."""

    def __init__(self, dst: Path, run_fp: str, cfg: IngestConfig, rep: IngestReport):
        self.dst, self.run_fp, self.size, self.rep = dst, run_fp, cfg.shard_rows, rep
        self.kept = 0              # rows kept so far (all shards)
        self.parts: list[pa.Table] = []
        self.n_rows = 0
        self.bad: list[pa.Table] = []
        self.dups = 0
        self.t0 = time.perf_counter()
        self.kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
        # shards are written by one background thread (Parquet encoding, fsync and checksums
        # release the GIL), in order, while the next block is parsed; at most 2 wait
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-write")
        self.pending: deque = deque()

    def add(self, b: Batch, seen: HashSet) -> None:
        rep = self.rep
        rep.rows_in += b.n_in
        new = seen.add_new(b.hashes)
        kept_pos = b.pos[new]
        dup_pos = b.pos[~new]
        rep.duplicates += int(dup_pos.size)
        if b.bad_reason:
            rep.quarantined += len(b.bad_reason)
            for r in b.bad_reason:
                k = _reason_kind(r)
                rep.reasons[k] = rep.reasons.get(k, 0) + 1
        # the shard a dropped row belongs to: the one being filled when it was read
        dup_shard = (self.kept + np.searchsorted(kept_pos, dup_pos)) // self.size
        bad_pos = np.asarray(b.bad_pos, dtype=np.int64)
        bad_shard = (self.kept + np.searchsorted(kept_pos, bad_pos)) // self.size
        bad_tab = pa.table({"source": pa.array([b.src] * len(bad_pos), pa.string()),
                            "row": pa.array(b.bad_row, pa.int64()),
                            "reason": pa.array(b.bad_reason, pa.string()),
                            "raw": pa.array(b.bad_raw, pa.string())}, schema=QUARANTINE_SCHEMA)
        rows = None
        if kept_pos.size:
            at = b.at[new]
            if at.size == len(b.prompt) and at[0] == 0 and at[-1] == at.size - 1:
                prompt, meta = b.prompt, b.metadata  # every row kept: no copy
            else:
                sel = pa.array(at)
                prompt, meta = b.prompt.take(sel), b.metadata.take(sel)
            src = pa.scalar(f"{b.src}:", pa.string())
            rows = pa.table({"id": hex_ids(b.hashes[new]), "prompt": prompt,
                             "source": pc.binary_join_element_wise(
                                 src, pa.array(b.lineno[new]).cast(pa.string()), ""),
                             "metadata": meta}, schema=PROMPT_SCHEMA)
        start = 0
        while True:
            cur = self.kept // self.size
            self.dups += int(np.count_nonzero(dup_shard == cur))
            m = bad_shard == cur
            if m.any():
                self.bad.append(bad_tab.filter(pa.array(m)))
            take = min(self.size - self.n_rows, kept_pos.size - start)
            if take > 0:
                self.parts.append(rows.slice(start, take))
                self.n_rows += take
                self.kept += take
                start += take
            if self.n_rows < self.size:
                break
            self.flush()  # full: the rows read after it (kept or not) belong to the next shard

    def flush(self) -> None:
        rep = self.rep
        i = rep.shards
        fp = fingerprint(self.run_fp, i)
        if is_done(self.dst, i, fp):
            rep.skipped += 1
        else:
            table = pa.concat_tables(self.parts) if self.parts else PROMPT_SCHEMA.empty_table()
            quarantine = pa.concat_tables(self.bad) if self.bad else None
            rep.written += 1
            while len(self.pending) >= 2:
                self.pending.popleft().result()
            self.pending.append(self.pool.submit(self._write, i, table, fp, quarantine, self.t0,
                                                 self.dups, rep.written))
        rep.rows += self.n_rows
        rep.shards += 1
        self.parts, self.bad, self.n_rows, self.dups = [], [], 0, 0
        self.t0 = time.perf_counter()
        if rep.shards % 50 == 0:
            # hand freed pages back now and then (every shard cost 20% more CPU in page faults);
            # between times the pool reuses them, so RSS stays flat either way
            pa.default_memory_pool().release_unused()

    def _write(self, i, table, fp, quarantine, t0, dups, n_written) -> None:
        write_shard(self.dst, i, table, fp, quarantine=quarantine,
                    seconds=time.perf_counter() - t0, stats={"duplicates": dups})
        if self.kill_after and n_written >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self) -> None:
        if self.n_rows or self.bad or self.rep.shards == 0:
            self.flush()
        self.close()

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


def _fingerprint(files: list[Path], cfg: IngestConfig) -> str:
    stats = [(str(p.resolve()), p.stat().st_size if p.is_file() else 0,
              int(p.stat().st_mtime)) for p in files]
    return fingerprint("ingest-v2", cfg.prompt_field, list(cfg.prompt_aliases), cfg.max_chars,
                       cfg.shard_rows, cfg.encoding, cfg.delimiter, stats)


def _batches(path: Path, fmt: str, cfg: IngestConfig, rep: IngestReport, spec: Spec):
    src = str(path)
    if fmt == "jsonl":
        stream, enc = open_utf8(path, cfg.encoding)
        rep.encodings[src] = enc
        with stream:
            yield from jsonl_blocks(stream, src, spec, enc, cfg.block_bytes)
            if read_error(stream):
                yield rows_batch(src, [(0, None, read_error(stream))], spec)
    elif fmt == "parquet":
        yield from arrow_batches(src, iter_parquet_tables(path), spec)
    elif fmt == "hf_dataset":
        yield from arrow_batches(src, iter_hf_tables(path), spec)
    else:
        kw = {"delimiter": cfg.delimiter} if fmt == "csv" else {}
        rows = READERS[fmt](path, cfg.encoding, **kw)
        while True:
            chunk = [r for _, r in zip(range(65536), rows)]
            if not chunk:
                break
            yield rows_batch(src, chunk, spec)


def _remove_orphan_temp_files(dst: Path) -> None:
    for d in (dst, dst / "quarantine"):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def ingest(inputs: list[str], workdir: str | Path, cfg: IngestConfig | None = None,
           progress: bool = True, *, dataset: str = "prompts") -> IngestReport:
    """Ingest ``inputs`` (files, globs, saved datasets) into ``workdir/<dataset>`` ("prompts")."""
    cfg = cfg or IngestConfig()
    if cfg.shard_rows < 1:
        raise ValueError("ingest.shard_rows must be >= 1")
    if not _DATASET_RE.match(dataset or ""):
        raise IngestError(f"dataset name {dataset!r}: use letters, digits, '.', '_' or '-' "
                          "(it is a directory under the run directory)")
    files = expand_inputs(list(inputs) or list(cfg.inputs))
    if not files:
        raise IngestError("no input given")
    formats = [check_readable(p, cfg.encoding) for p in files]  # every file checked before any work
    dst = Path(workdir) / dataset
    _remove_orphan_temp_files(dst)  # ingest is one task: a .tmp here is from a killed run
    run_fp = _fingerprint(files, cfg)
    rep = IngestReport(files=len(files), dataset=dataset)
    t0 = time.perf_counter()
    seen = HashSet()
    out = _Shards(dst, run_fp, cfg, rep)
    spec = _spec(cfg, _use_compiled_hash(cfg, files))
    bar = tqdm(unit="rows", desc="ingest", disable=not progress, mininterval=1.0)
    try:
        for path, fmt in zip(files, formats):
            try:
                for b in _batches(path, fmt, cfg, rep, spec):
                    out.add(b, seen)
                    bar.update(b.n_in)
            except EncodingError as e:
                raise IngestError(f"{path}: {e}") from e
        out.finish()
    finally:
        out.close()
        bar.close()
    # a previous run with other inputs may have left more shards: retire them
    for i in shard_indices(dst):
        if i >= rep.shards:
            for p in (marker_path(dst, i), shard_path(dst, i), quarantine_path(dst, i)):
                p.unlink(missing_ok=True)
    rep.seconds = time.perf_counter() - t0
    write_manifest(dst, stage=dataset, num_shards=rep.shards, fingerprint=run_fp,
                   rows=rep.rows, duplicates=rep.duplicates, quarantined=rep.quarantined,
                   reasons=rep.reasons, files=[str(p) for p in files], encodings=rep.encodings)
    log.info(rep.summary())
    return rep
