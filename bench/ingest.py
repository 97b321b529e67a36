"""Ingest throughput and peak memory at two sizes (default 100,000 and 1,000,000 prompts).

    .venv/bin/python bench/ingest.py [--sizes 100000 1000000] [--dir /tmp/ga-bench-ingest]

Each size is ingested in a fresh subprocess, so its peak RSS (VmHWM) is its own. The
synthetic prompts are ~200 characters, with 1% exact duplicates and 0.5% bad rows.
"""
from __future__ import annotations

import argparse
import json
import random
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
        for i in range(n):
            r = rng.random()
            if r < 0.005:
                f.write('{"prompt": ""}\n')
                continue
            k = rng.randrange(i) if (r < 0.015 and i) else i
            words = " ".join(WORDS[(k * 7 + j * 13) % len(WORDS)] for j in range(24))
            f.write(json.dumps({"prompt": f"#{k} {words}"[:200], "n": i}) + "\n")


CHILD = """
import json, sys, time
from guidealign.ingest import ingest, IngestConfig
t = time.perf_counter()
rep = ingest([sys.argv[1]], sys.argv[2], IngestConfig(shard_rows=50_000), progress=False)
dt = time.perf_counter() - t
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(json.dumps({"rows_in": rep.rows_in, "rows": rep.rows, "dups": rep.duplicates,
                  "quarantined": rep.quarantined, "seconds": dt, "peak_rss_mib": int(hwm) / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dir", default="/tmp/ga-bench-ingest")
    a = ap.parse_args()
    base = Path(a.dir)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    results = []
    for n in a.sizes:
        src = base / f"in-{n}.jsonl"
        t = time.perf_counter()
        make_input(src, n)
        print(f"generated {n:,} rows ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f}s",
              flush=True)
        out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(base / f"w-{n}")],
                             check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["n"] = n
        results.append(r)
        print(f"ingest {n:>9,} rows: {r['rows_in'] / r['seconds']:>9,.0f} rows/s, "
              f"{r['seconds']:.1f}s, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"({r['rows']:,} kept, {r['dups']:,} duplicates, {r['quarantined']:,} quarantined)", flush=True)
    if len(results) >= 2:
        a0, a1 = results[0], results[-1]
        print(f"peak RSS ratio {a1['n']:,} / {a0['n']:,} rows: {a1['peak_rss_mib'] / a0['peak_rss_mib']:.2f}x "
              f"(target: about 1x, under 1024 MiB)")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
