"""Ingest: input files -> prompt shards with stable ids, under ``WORKDIR/<dataset>/`` ("prompts").

Output columns: ``id`` (16 hex chars of a hash of the normalized prompt), ``prompt``,
``source`` (file and line/row), ``metadata`` (the input's other non-null columns, as JSON with its keys sorted).
Exact duplicates (same normalized prompt) are dropped and counted. Bad rows go to the
quarantine table beside the shard they would have landed in, with file, row and reason.

Rows are read, checked, normalized and hashed in columnar blocks (``batch``: JSONL via
``jsonl``, CSV via ``csvcol``, Parquet and `datasets` as they come); a block that does not parse
as a whole goes row by row (``readers``), so quarantine reasons stay exact. Threads share the
work, each mostly in code that releases the GIL: one reads and parses the next blocks
(``flatjson_llvm`` or pyarrow), the caller's checks, hashes (``blake2_llvm``) and de-duplicates
this one, and the writer's (``commit``) build and encode the finished shards (two or more at
once) and commit them in order (Parquet, checksums, fsyncs, markers).

Ingest is deterministic: the same inputs and config give the same shards (whatever the block
size, thread timing or hash kernel), so after a crash it streams the inputs again and only
writes the shards that are not committed. Memory stays flat: a few blocks and shards of rows in
flight, plus the de-duplication set (``dedup``): a bit filter of 1-3 bytes a distinct prompt and
at most ``ingest.dedup_memory_mib`` of hashes, the older ones in temp files.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, get_args

import numpy as np
import pyarrow as pa

from guidealign.ingest.arrays import bool_arrow, int_arrow, str_arrow
from guidealign.ingest.encodings import EncodingError, open_utf8, read_error
from guidealign.ingest.batch import (Batch, Spec, arrow_batches, check_value, prompt_keys,
                                    prompt_value, rows_batch)
from guidealign.ingest.commit import Pending, ShardWriter, default_encoders
from guidealign.ingest.shard_table import PROMPT_SCHEMA, shard_table  # noqa: F401 - PROMPT_SCHEMA re-exported
from guidealign.ingest.cuts import cut_ends, shard_cuts
from guidealign.ingest.dedup import HashSet, hashes_in_mib
from guidealign.ingest.fingerprint import files_fingerprint
from guidealign.ingest.jsonl import jsonl_blocks
from guidealign.ingest.keys import norm_key
from guidealign.core.ids import normalize, prompt_hash  # noqa: F401 - the id rule, re-exported
from guidealign.ingest.arrowfiles import hf_splits, iter_parquet_tables
from guidealign.ingest.readers import IngestError, check_readable, expand_inputs, read_rows
from guidealign.shards import fingerprint, is_done, read_manifest, wait_complete, write_manifest
from guidealign.shards.manifest import remove_manifest
from guidealign.config.ingest import HashKernel, IngestConfig, ShardCut
from guidealign.shards.write import retire_shards_from

log = logging.getLogger(__name__)

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
    dedup_memory_mib: float = 0.0  # the de-dup set at the end: in memory, and in temp files
    dedup_disk_mib: float = 0.0

    def summary(self) -> str:
        rate = self.rows_in / self.seconds if self.seconds else 0.0
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return (f"ingest: {self.files} file(s), {self.rows_in} rows read -> {self.rows} prompts in "
                f"{self.shards} shard(s) of {self.dataset} ({self.written} written, {self.skipped} already "
                f"done); {self.duplicates} duplicates dropped, {self.quarantined} quarantined"
                + (f" ({why})" if why else "") + f"; {rate:,.0f} rows/s; de-dup set "
                f"{self.dedup_memory_mib:.1f} MiB in memory, {self.dedup_disk_mib:.1f} MiB on disk")


def _reason_kind(reason: str) -> str:
    kind = reason.split(":")[0].split(" at ")[0].split(" (")[0].split(";")[0]
    return re.sub(r"\d+", "N", kind)


def check_prompt(rec: dict, cfg: IngestConfig) -> str | None:
    """Why ``rec`` has no usable prompt, or None (the row-by-row reference check)."""
    spec = _spec(cfg)
    key, ikeys = prompt_keys(tuple(rec), spec)
    return check_value(prompt_value(rec, key, ikeys), key, spec, tuple(rec))


def prompt_of(rec: dict, cfg: IngestConfig) -> str | None:
    """The prompt of a record as ingest takes it (an instruction with its input joined)."""
    return prompt_value(rec, *prompt_keys(tuple(rec), _spec(cfg)))


def _spec(cfg: IngestConfig, hash_kernel: str = "hashlib") -> Spec:
    return Spec(cfg.prompt_field, tuple(cfg.prompt_aliases), cfg.max_chars, hash_kernel,
                tuple(cfg.instruction_inputs))


# inputs smaller than this are hashed with hashlib under hash_kernel=auto: loading the
# compiled kernels (~3 ms as shared libraries, ~35 ms through llvmlite's JIT where no linker
# made them, the first run on a machine ~0.5 s) costs more than they save
AUTO_KERNEL_BYTES = 16 << 20


def _hash_kernel(cfg: IngestConfig, files: list[Path]) -> str:
    """The hash kernel this run uses: "hashlib" or "llvm" (both give the same ids)."""
    want = cfg.hash_kernel
    if want not in get_args(HashKernel):
        raise IngestError(f"ingest.hash_kernel must be auto, llvm or hashlib, got {want!r}")
    if want == "hashlib":
        return "hashlib"
    if want == "auto" and sum(p.stat().st_size for p in files if p.is_file()) < AUTO_KERNEL_BYTES:
        return "hashlib"
    from guidealign.ingest.blake2_llvm import available

    if not available():
        if want == "llvm":
            raise IngestError("ingest.hash_kernel=llvm needs llvmlite installed (pip install llvmlite)")
        return "hashlib"
    # load (or the first time on this machine, compile) the kernel while the first block is read;
    # not a daemon: a process that ends before its first hash (an input that fails early) waits
    # for it instead of tearing LLVM down under a thread that is still inside it
    from guidealign.ingest.blake2_llvm import kernel as blake2_kernel
    from guidealign.ingest.flatjson_llvm import kernels as json_kernels
    from guidealign.ingest.scan_llvm import kernel as scan_kernel

    def load():  # the hash's first: the JSONL parse does not wait for its two (``jsonl_blocks``)
        blake2_kernel()
        scan_kernel()
        json_kernels()

    threading.Thread(target=load, name="ingest-kernel").start()
    return "llvm"


class _Shards:
    """Cuts the stream of kept rows into shards of ``shard_rows`` and commits them in order.

    A shard's rows stay as references into their blocks (``parts``) until the writer thread
    builds the table (ids, sources, the kept prompts) and commits it (``commit.ShardWriter``)."""

    def __init__(self, dst: Path, run_fp: str, cfg: IngestConfig, rep: IngestReport):
        self.dst, self.run_fp, self.size, self.rep = dst, run_fp, cfg.shard_rows, rep
        self.cuts = shard_cuts(cfg.shard_rows, cfg.shard_cut)
        self.parts: list[tuple] = []
        self.n_rows = 0
        self.bad: list[pa.Table] = []
        self.dups = 0
        self.t0 = time.perf_counter()
        self.kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
        self.writer: ShardWriter | None = None  # started with the first shard to write

    def add(self, b: Batch, seen: HashSet) -> None:
        rep = self.rep
        rep.rows_in += b.n_in
        new = seen.add_new(b.hashes)
        all_new = bool(new.all())
        kept_pos = b.pos if all_new else b.pos[new]
        dup_pos = b.pos[~new]
        rep.duplicates += int(dup_pos.size)
        if b.bad_reason:
            rep.quarantined += len(b.bad_reason)
            for r, n in collections.Counter(b.bad_reason).items():  # (a block's reasons: a few kinds)
                k = _reason_kind(r)
                rep.reasons[k] = rep.reasons.get(k, 0) + n
        at = b.at if all_new else b.at[new]
        hashes = b.hashes if all_new else b.hashes[new]
        lineno = b.lineno if all_new else b.lineno[new]
        # the kept rows after which a shard ends; a dropped row belongs to the shard being
        # filled when it was read (after an end: the next one)
        ends = cut_ends(self.cuts, hashes, self.n_rows)
        first = rep.shards
        dup_shard = first + np.searchsorted(ends, np.searchsorted(kept_pos, dup_pos))
        bad_tab = bad_shard = None
        if b.bad_pos:
            bad_pos = np.asarray(b.bad_pos, dtype=np.int64)
            bad_shard = first + np.searchsorted(ends, np.searchsorted(kept_pos, bad_pos))
            bad_tab = pa.table({"source": str_arrow([b.src] * len(bad_pos)),
                                "row": int_arrow(b.bad_row),
                                "reason": str_arrow(b.bad_reason),
                                "raw": str_arrow(b.bad_raw)}, schema=QUARANTINE_SCHEMA)
        start = 0
        for j, stop in enumerate([*(ends + 1).tolist(), kept_pos.size]):
            cur = first + j
            if dup_shard.size:
                self.dups += int(np.count_nonzero(dup_shard == cur))
            if bad_shard is not None:
                m = bad_shard == cur
                if m.any():
                    self.bad.append(bad_tab.filter(bool_arrow(m)))
            if stop > start:
                sl = slice(start, stop)
                self.parts.append((b.src, b.prompt, b.metadata, at[sl], hashes[sl], lineno[sl]))
                self.n_rows += stop - start
                start = stop
            if j < ends.size:
                self.flush()  # ended: the rows read after it (kept or not) belong to the next shard

    def flush(self) -> None:
        rep = self.rep
        i = rep.shards
        fp = fingerprint(self.run_fp, i)
        if is_done(self.dst, i, fp):
            rep.skipped += 1
        else:
            rep.written += 1
            if self.writer is None:
                # shards queue up (and are then committed as one group) only while the writer is
                # behind, e.g. on a file system with slow fsyncs; at most ~100k rows wait
                pending = max(2, min(8, 100_000 // self.size))
                self.writer = ShardWriter(self.dst, max_pending=pending, max_group=pending + 1,
                                          kill_after=self.kill_after, encoders=default_encoders())
            parts, bad = self.parts, self.bad
            self.writer.submit(Pending(i, fp, lambda: (shard_table(parts), _concat(bad)),
                                       time.perf_counter() - self.t0, {"duplicates": self.dups}))
        rep.rows += self.n_rows
        rep.shards += 1
        self.parts, self.bad, self.n_rows, self.dups = [], [], 0, 0
        self.t0 = time.perf_counter()
        if rep.shards % 50 == 0:
            # hand freed pages back now and then (every shard cost 20% more CPU in page faults);
            # between times the pool reuses them, so RSS stays flat either way
            pa.default_memory_pool().release_unused()

    def finish(self) -> None:
        if self.n_rows or self.bad or self.rep.shards == 0:
            self.flush()
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _concat(tables: list[pa.Table]) -> pa.Table | None:
    return pa.concat_tables(tables) if tables else None


def _delimiter_ok(d) -> bool:
    """What ``readers.sniff_delimiter`` and both CSV parsers take: "auto", "tab"/"\\t", or one
    character that cannot be part of a quoted field's syntax or a line end."""
    if d in ("auto", "tab", "\\t"):
        return True
    return isinstance(d, str) and len(d) == 1 and d not in '"\r\n\0'


def _check_field_names(cfg: IngestConfig) -> None:
    """Each field name the prompt is looked up by must be text with a character in it: a blank
    ``prompt_field`` (``--set ingest.prompt_field=$UNSET_VAR``) matched no column, so every
    row without an alias was quarantined as having no prompt field."""
    names = [("ingest.prompt_field", cfg.prompt_field)]
    for key in ("prompt_aliases", "instruction_inputs"):
        names += [(f"ingest.{key}", v) for v in getattr(cfg, key)]
    for key, v in names:
        if not isinstance(v, str) or not norm_key(v):
            raise IngestError(f"{key}: a field name must be text that is not blank, got {v!r}")


def run_fingerprint(inputs: list[str], cfg: IngestConfig, dataset: str | Path | None = None) -> str:
    """What an ingest of ``inputs`` with ``cfg`` (into ``dataset``, WORKDIR/<name>: the files its
    patterns match there are skipped, as ``ingest`` skips them) writes in its manifest: the other
    ranks wait for it (an earlier run's complete prompts, over other files, are not this run's)."""
    return files_fingerprint(expand_inputs(list(inputs) or list(cfg.inputs), dataset), cfg)


def wait_ingested(dataset: str | Path, inputs: list[str], cfg: IngestConfig, timeout: float) -> dict:
    """On a rank other than 0: wait until rank 0's ingest of these very ``inputs`` with ``cfg``
    is complete in ``dataset`` (its manifest fingerprint, :func:`run_fingerprint`), not a finished
    ingest of other files under the same name; returns that manifest."""
    try:
        want = run_fingerprint(inputs, cfg, dataset)
    except (IngestError, OSError):  # rank 0 reports the unreadable input and fails: the wait
        want = "unreadable inputs"  # ends on its failure, not on this rank's own
    return wait_complete(dataset, timeout=timeout, manifest_fp=want)


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
        for split, batches in hf_splits(path):
            yield from arrow_batches(f"{src}/{split}" if split else src, batches, spec)
    elif fmt == "csv":
        from guidealign.ingest.csvcol import csv_batches  # (loaded for the first CSV file)

        yield from csv_batches(path, src, spec, cfg.encoding, cfg.delimiter, cfg.block_bytes, encodings=rep.encodings)
    else:
        rows = read_rows(path, fmt, cfg)
        while True:
            chunk = [r for _, r in zip(range(65536), rows)]
            if not chunk:
                break
            yield rows_batch(src, chunk, spec)


# the longest a thread holds the GIL while another waits for it, during an ingest (Python's
# default: 5 ms). The caller's thread is the pipeline's bottleneck and gives the GIL up at
# every numpy or Arrow call; a background thread that takes it then (for its own few lines of
# Python) is made to hand it back sooner: 1M rows, 2-3% less time
SWITCH_INTERVAL = 0.001
_SWITCHES = {"lock": threading.Lock(), "runs": 0, "before": 0.005}


def _shorter_switches() -> Callable[[], None]:
    """Set ``SWITCH_INTERVAL`` (where it is shorter) for as long as an ingest runs in this
    process; the function returned gives the interval back when the last one running ends."""
    with _SWITCHES["lock"]:
        if not _SWITCHES["runs"]:
            _SWITCHES["before"] = sys.getswitchinterval()
            sys.setswitchinterval(min(_SWITCHES["before"], SWITCH_INTERVAL))
        _SWITCHES["runs"] += 1

    def restore() -> None:
        with _SWITCHES["lock"]:
            _SWITCHES["runs"] -= 1
            if not _SWITCHES["runs"]:
                sys.setswitchinterval(_SWITCHES["before"])
    return restore


# input bytes a row, to size the de-dup filter up front: prompts with their JSON run ~100-300
# bytes; fewer rows than guessed cost filter memory, more cost its rebuilds, as without a guess
BYTES_A_ROW = 256


def _expected_rows(files: list[Path]) -> int:
    """About how many rows ``files`` hold (for the de-dup filter's size; 0 where unknown)."""
    return sum(p.stat().st_size for p in files if p.is_file()) // BYTES_A_ROW


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
    if not isinstance(cfg.dedup_memory_mib, int) or cfg.dedup_memory_mib < 1:
        raise ValueError(f"ingest.dedup_memory_mib must be a whole number of MiB >= 1, got {cfg.dedup_memory_mib!r}")
    # (the config loader checks these too; a caller of this function may pass any IngestConfig,
    # and block_bytes=0 read no row of any file, saying only "0 rows read")
    for name in ("block_bytes", "max_chars"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise IngestError(f"ingest.{name} must be a whole number >= 1, got {v!r}")
    _check_field_names(cfg)
    if cfg.shard_cut not in get_args(ShardCut):
        raise IngestError(f"ingest.shard_cut must be position or content, got {cfg.shard_cut!r}")
    if not _delimiter_ok(cfg.delimiter):
        raise IngestError(f"ingest.delimiter must be auto, tab (or \\t) or one character other than a quote "
                          f"or a line break, not {cfg.delimiter!r}")
    if not _DATASET_RE.match(dataset or ""):
        raise IngestError(f"dataset name {dataset!r}: use letters, digits, '.', '_' or '-' "
                          "(it is a directory under the run directory)")
    dst = Path(workdir) / dataset
    # (a pattern skips the run directory's datasets: this one, written now, and the others)
    files = expand_inputs(list(inputs) or list(cfg.inputs), dst)
    if not files:
        raise IngestError("no input given: name files (or globs, saved datasets), or set inputs / "
                          "inputs_sft in the config")
    formats = [check_readable(p, cfg.encoding) for p in files]  # every file checked before any work
    _remove_orphan_temp_files(dst)  # ingest is one task: a .tmp here is from a killed run
    run_fp = files_fingerprint(files, cfg)
    if (read_manifest(dst) or {}).get("fingerprint") not in (None, run_fp):
        # other inputs or settings than the last finished ingest here: its manifest goes before
        # any shard is rewritten, so a run killed midway leaves none that calls the mix of its
        # new shards and the old ones complete (readers find no manifest until this one ends)
        remove_manifest(dst)
    rep = IngestReport(files=len(files), dataset=dataset)
    t0 = time.perf_counter()
    # the de-dup set's older hashes go to temp files beside the shards (gone with the process)
    seen = HashSet(memory_hashes=hashes_in_mib(cfg.dedup_memory_mib), spill_dir=Path(workdir),
                   expected=_expected_rows(files))
    out = _Shards(dst, run_fp, cfg, rep)
    spec = _spec(cfg, _hash_kernel(cfg, files))
    bar = None
    if progress:  # (tqdm: ~15 ms of import, which a run without a bar skips)
        from tqdm import tqdm

        bar = tqdm(unit="rows", desc="ingest", mininterval=1.0)
    restore_switches = _shorter_switches()
    try:
        for path, fmt in zip(files, formats):
            try:
                for b in _batches(path, fmt, cfg, rep, spec):
                    out.add(b, seen)
                    if bar is not None:
                        bar.update(b.n_in)
            except EncodingError as e:
                raise IngestError(f"{path}: {e}") from e
        out.finish()
    finally:
        restore_switches()
        rep.dedup_memory_mib, rep.dedup_disk_mib = seen.memory_bytes() / 2**20, seen.disk_bytes() / 2**20
        out.close()
        seen.close()
        if bar is not None:
            bar.close()
    if rep.rows == 0:  # the stages after it refuse an empty set before they start an engine
        log.warning("ingest kept no prompt: %d row(s) read, %d quarantined (%s; each row's reason in %s), "
                    "%d duplicate(s)", rep.rows_in, rep.quarantined,
                    ", ".join(f"{k}: {v}" for k, v in sorted(rep.reasons.items())) or "none",
                    dst / "quarantine", rep.duplicates)
    retire_shards_from(dst, rep.shards)  # what a previous run with more input left
    rep.seconds = time.perf_counter() - t0
    write_manifest(dst, stage=dataset, num_shards=rep.shards, fingerprint=run_fp,
                   rows=rep.rows, duplicates=rep.duplicates, quarantined=rep.quarantined,
                   reasons=rep.reasons, files=[str(p) for p in files], encodings=rep.encodings)
    log.info(rep.summary())
    return rep
