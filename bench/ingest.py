"""Ingest throughput against pyarrow's own read-JSON-and-write-Parquet, and peak memory at two sizes.

    .venv/bin/python bench/ingest.py                 # 1M rows (ratio) and 10M rows (memory)
    .venv/bin/python bench/ingest.py --short         # 200k and 1M rows, a couple of minutes
    .venv/bin/python bench/ingest.py --rows 1000000 --mem-rows 10000000 --shard-rows 10000

For the first size it times, in one run and on the same file, (a) pyarrow: ``pyarrow.json.read_json``
then ``pyarrow.parquet.write_table`` and (b) ``guidealign ingest`` (the CLI, default config unless
``--shard-rows``; the same ``ingest.hash_kernel`` at both sizes, numba when installed), each in its own subprocess so that each peak RSS (VmHWM) is its own, and prints
both rates and their ratio. The second size is ingested too, to show peak RSS is flat in the row
count. Prompts are ~190 characters of ASCII text, with 1% exact duplicates and 0.5% bad rows.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("alpha beta gamma delta model data prompt safety guideline answer question user "
         "assistant careful helpful honest harmless review policy example detail context").split()


def make_input(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        buf = []
        for i in range(n):
            r = rng.random()
            if r < 0.005:
                buf.append('{"prompt": ""}\n')
            else:
                k = rng.randrange(i) if (r < 0.015 and i) else i
                words = " ".join(WORDS[(k * 7 + j * 13 + k // 19) % len(WORDS)] for j in range(28))
                buf.append(json.dumps({"prompt": f"#{k} {words}"[:190], "n": i}) + "\n")
            if len(buf) >= 100_000:
                f.writelines(buf)
                buf = []
        f.writelines(buf)


PYARROW = """
import sys, time, json
import pyarrow.json as pj, pyarrow.parquet as pq
t = time.perf_counter()
table = pj.read_json(sys.argv[1])
pq.write_table(table, sys.argv[2], compression="zstd")
dt = time.perf_counter() - t
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(json.dumps({"rows_in": table.num_rows, "seconds": dt, "peak_rss_mib": int(hwm) / 1024}))
"""

INGEST = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run([sys.executable, "-m", "guidealign", "ingest", sys.argv[1], "-w", sys.argv[2],
                    "--no-progress", *sys.argv[3:]], capture_output=True, text=True)
dt = time.perf_counter() - t
if p.returncode:
    sys.exit(p.stderr)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"summary": p.stdout.strip().splitlines()[-1], "seconds": dt, "peak_rss_mib": peak}))
"""


def run_child(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ingest_once(src: Path, work: Path, shard_rows: int | None, kernel: str) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    extra = ["--set", f"ingest.hash_kernel={kernel}"]
    extra += ["--set", f"ingest.shard_rows={shard_rows}"] if shard_rows else []
    r = run_child(INGEST, src, work, *extra)
    m = re.search(r"(\d+) rows read -> (\d+) prompts.*?(\d+) duplicates dropped, (\d+) quarantined", r["summary"])
    r.update(rows_in=int(m[1]), rows=int(m[2]), dups=int(m[3]), quarantined=int(m[4]),
             inner_rate=float(re.search(r"([\d,]+) rows/s", r["summary"])[1].replace(",", "")))
    shutil.rmtree(work, ignore_errors=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000, help="size for the speed ratio (and memory)")
    ap.add_argument("--mem-rows", type=int, default=10_000_000, help="second size, for memory (0: skip)")
    ap.add_argument("--short", action="store_true", help="--rows 200000 --mem-rows 1000000")
    ap.add_argument("--shard-rows", type=int, default=None, help="ingest.shard_rows (default: the config's)")
    ap.add_argument("--hash-kernel", default=None, choices=["numba", "hashlib"],
                    help="ingest.hash_kernel for every size (default: numba when installed), so that "
                         "the sizes compare like with like")
    ap.add_argument("--dir", default="/tmp/ga-bench-ingest")
    a = ap.parse_args()
    if a.hash_kernel is None:
        from importlib.util import find_spec

        a.hash_kernel = "numba" if find_spec("numba") else "hashlib"
    print(f"ingest.hash_kernel={a.hash_kernel}", flush=True)
    if a.short:
        a.rows, a.mem_rows = 200_000, 1_000_000
    base = Path(a.dir)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    try:
        src = base / f"in-{a.rows}.jsonl"
        t = time.perf_counter()
        make_input(src, a.rows)
        mib = src.stat().st_size / 2**20
        print(f"generated {a.rows:,} rows ({mib:.0f} MiB) in {time.perf_counter() - t:.1f}s", flush=True)
        pa_r = run_child(PYARROW, src, base / "pyarrow.parquet")
        (base / "pyarrow.parquet").unlink()
        ing = ingest_once(src, base / "w", a.shard_rows, a.hash_kernel)
        pa_rate, ing_rate = pa_r["rows_in"] / pa_r["seconds"], ing["rows_in"] / ing["seconds"]
        print(f"pyarrow read_json + write_parquet {a.rows:>11,} rows: {pa_rate:>10,.0f} rows/s "
              f"({pa_r['seconds']:.2f}s, peak RSS {pa_r['peak_rss_mib']:.0f} MiB)")
        print(f"guidealign ingest (CLI)           {a.rows:>11,} rows: {ing_rate:>10,.0f} rows/s "
              f"({ing['seconds']:.2f}s incl. interpreter start, peak RSS {ing['peak_rss_mib']:.0f} MiB; "
              f"{ing['rows']:,} kept, {ing['dups']:,} duplicates, {ing['quarantined']:,} quarantined)")
        print(f"ratio ingest / pyarrow: {ing_rate / pa_rate:.2f}x (target >= 0.5x); inside the process "
              f"(without interpreter start and imports) {ing['inner_rate']:,.0f} rows/s, "
              f"{ing['inner_rate'] / pa_rate:.2f}x", flush=True)
        if a.mem_rows:
            src.unlink()
            big = base / f"in-{a.mem_rows}.jsonl"
            t = time.perf_counter()
            make_input(big, a.mem_rows)
            print(f"generated {a.mem_rows:,} rows ({big.stat().st_size / 2**20:.0f} MiB) in "
                  f"{time.perf_counter() - t:.1f}s", flush=True)
            ing2 = ingest_once(big, base / "w2", a.shard_rows, a.hash_kernel)
            print(f"guidealign ingest (CLI)           {a.mem_rows:>11,} rows: "
                  f"{ing2['rows_in'] / ing2['seconds']:>10,.0f} rows/s ({ing2['seconds']:.1f}s, "
                  f"peak RSS {ing2['peak_rss_mib']:.0f} MiB)")
            print(f"peak RSS {a.mem_rows:,} / {a.rows:,} rows: {ing2['peak_rss_mib'] / ing['peak_rss_mib']:.2f}x "
                  f"(+{ing2['peak_rss_mib'] - ing['peak_rss_mib']:.0f} MiB; de-dup set: 8 bytes a distinct prompt)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
