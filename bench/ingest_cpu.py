"""Where ingest's CPU goes: seconds of thread CPU per part of the JSONL path, as shares of the run.

    .venv/bin/python bench/ingest_cpu.py              # 1M rows of bench/ingest.py's file
    .venv/bin/python bench/ingest_cpu.py --rows 200000
    .venv/bin/python bench/ingest_cpu.py --shard-rows 100000   # 10x fewer shards than the default

Runs ``ingest()`` in this process on the same file as ``bench/ingest.py`` (one untimed run
first), with each part wrapped to add up the CPU time of the thread it runs on
(``time.thread_time``), and prints each part's seconds and its share of the process's CPU for
the timed run. Threads share the work (see ``guidealign/ingest/run.py``): the parse thread
(read, the block scan, the compiled flat-JSON reader or pyarrow.json), the caller's (checks,
hashes, de-duplication), the encoder threads (shard tables, each block's metadata JSON made by
the encoder of its first shard, Parquet encoding), the writer (files) and the sync thread
(fsyncs, markers). The parts nest (indented under their caller);
what is not listed (thread switches, fsyncs, markers) is the rest of the process's CPU.
Then each whole thread's CPU seconds (the caller's, and each thread ingest started, by name).
Wrapping costs a few microseconds a call (a few hundred calls in all).
"""
from __future__ import annotations

import argparse
import collections
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ingest import make_input  # noqa: E402  (the same generated rows as bench/ingest.py)

import guidealign.ingest.batch as batch  # noqa: E402
import guidealign.ingest.commit as commit  # noqa: E402
import guidealign.ingest.dedup as dedup  # noqa: E402
import guidealign.ingest.jsonl as jsonl  # noqa: E402
import guidealign.ingest.run as run  # noqa: E402
from guidealign.config.ingest import IngestConfig  # noqa: E402

# (module or class, function name, label, thread): the parts timed, in the order printed
PARTS = [
    (jsonl, "_parse_block", "parse a block (beside the caller)", "parse"),
    (jsonl, "scan_lines", "  block scan: line ends and screens", "parse"),
    (jsonl, "flat_table", "  compiled flat-JSON reader", "parse"),
    (jsonl, "_read_json_block", "  pyarrow.json", "parse"),
    (jsonl, "hashes_ahead", "  prompts normalized, hashed ahead", "parse"),
    (jsonl, "_finish_block", "check, normalize, hash a block", "caller"),
    (batch, "hash_spans", "  hash (blake2b)", "caller"),
    (run._Shards, "add", "de-duplicate and cut shards", "caller"),
    (dedup.HashSet, "add_new", "  de-duplication set", "caller"),
    (commit, "_encode", "build and encode shards", "encode"),
    (run, "shard_table", "  build shard tables", "encode"),
    (batch, "metadata_column", "    metadata JSON (a block's)", "encode"),
    (commit, "parquet_bytes", "  Parquet encoding", "encode"),
    (commit.ShardWriter, "_write_group", "write shard files (writer thread)", "writer"),
]


def _wrap(owner, name: str, label: str, totals: collections.Counter) -> None:
    fn = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.thread_time() - t

    setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/tmp/ga-bench-ingest-cpu")
    ap.add_argument("--shard-rows", type=int, default=None,
                    help="ingest.shard_rows (default: the config's); each shard costs its files, "
                         "syncs and marker")
    a = ap.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    src = d / f"rows-{a.rows}.jsonl"
    if not src.exists():
        make_input(src, a.rows)
    totals: collections.Counter = collections.Counter()
    for owner, name, label, _ in PARTS:
        _wrap(owner, name, label, totals)
    by_thread = _time_threads()
    for timed in (False, True):
        shutil.rmtree(d / "work", ignore_errors=True)
        totals.clear()
        by_thread.clear()
        t, c, main_t = time.perf_counter(), time.process_time(), time.thread_time()
        cfg = IngestConfig() if a.shard_rows is None else IngestConfig(shard_rows=a.shard_rows)
        rep = run.ingest([str(src)], d / "work", cfg, progress=False)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        by_thread["caller (this thread)"] = time.thread_time() - main_t
    print(f"ingest of {a.rows:,} JSONL rows in this process: {wall:.2f} s wall, {cpu:.2f} s CPU "
          f"({rep.rows:,} kept, {rep.duplicates:,} duplicates, {rep.quarantined:,} quarantined)")
    print(f"{'part':40s} {'thread':>7s} {'CPU s':>7s} {'share':>6s}")
    for _, _, label, thread in PARTS:
        print(f"{label:40s} {thread:>7s} {totals[label]:7.3f} {totals[label] / cpu:6.1%}")
    print(f"{'whole thread':48s} {'CPU s':>7s} {'share':>6s}")
    for name, sec in sorted(by_thread.items(), key=lambda kv: -kv[1]):
        print(f"{name:48s} {sec:7.3f} {sec / cpu:6.1%}")


def _time_threads() -> collections.Counter:
    """CPU seconds of each thread started from now on, by name (the shard writer's, the sync
    thread's, the parse thread's...), added up when each thread ends."""
    import threading

    out: collections.Counter = collections.Counter()
    run_thread = threading.Thread.run

    def timed_run(self):
        t = time.thread_time()
        try:
            run_thread(self)
        finally:
            out[self.name] += time.thread_time() - t

    threading.Thread.run = timed_run
    return out


if __name__ == "__main__":
    main()
