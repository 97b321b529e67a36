"""Ingest throughput against pyarrow's own read-and-write-Parquet, and peak memory at two sizes.

    .venv/bin/python bench/ingest.py                 # 1M rows (JSONL and CSV ratios), 10M rows (memory)
    .venv/bin/python bench/ingest.py --short         # 1M rows, 3M rows for memory: about a minute
    .venv/bin/python bench/ingest.py --rows 1000000 --mem-rows 4000000 --shard-rows 10000 --repeats 3

For the first size it times, in one run and on the same file, (a) pyarrow: ``pyarrow.json.read_json``
(``pyarrow.csv.read_csv`` for the CSV copy) then ``pyarrow.parquet.write_table`` and (b)
``guidealign ingest`` (the CLI, default config unless ``--shard-rows``/``--hash-kernel``), each in
its own subprocess, so that each peak RSS (VmHWM) is its own, and prints both rates and their ratio
(ours / pyarrow; after one untimed run of each, the two alternate ``--repeats`` times and the
median ratio is printed; on a shared machine the figures swing, the ratio within one run less);
then each runs twice back to back and the ratio of the second runs is printed too ("back to
back": memory just freed by the same tool is cheap to touch again, which favours pyarrow; no
memory is touched between the two runs of a pair), and the ratio of CPU seconds (pyarrow's /
ingest's, both whole processes, interpreter start and imports included in both; steadier than
wall time when other work shares the cores, but blind to how well each uses them). The pyarrow time excludes its
interpreter start and imports, ingest's includes them (the "inside the process" figure does not;
"both as whole processes" times pyarrow's process from the outside too, start and imports included).
The second size is ingested too (JSONL), to show peak RSS is flat in the row count: the
de-duplication set keeps at most ``ingest.dedup_memory_mib`` of hashes in memory (older ones in
temp files) and a bit filter of 1-3 bytes a distinct prompt. Prompts are ~190 characters of ASCII text, with
1% exact duplicates and 0.5% bad (empty) rows.

Memory is touched before each timed run (``--prefault-mib``, 1 GiB by default; ``--cold``: not):
on a VM whose balloon reports freed pages to the host (virtio-balloon free page reporting, as on
the machine these figures come from), memory a process touches a few seconds after other
processes freed it is backed again page by page, and a tool that holds the whole input (pyarrow:
~560 MiB for 1M rows) then pays seconds for it: pyarrow's process took 3.8-5.3 s that way and
1.0 s with its memory touched just before. Touching it first times both tools as on a machine
without that cost.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("alpha beta gamma delta model data prompt safety guideline answer question user "
         "assistant careful helpful honest harmless review policy example detail context").split()


def _rows(n: int, seed: int = 0):
    """(prompt or "" for a bad row, n or None) for each row."""
    rng = random.Random(seed)
    for i in range(n):
        r = rng.random()
        if r < 0.005:
            yield "", None
        else:
            k = rng.randrange(i) if (r < 0.015 and i) else i
            words = " ".join(WORDS[(k * 7 + j * 13 + k // 19) % len(WORDS)] for j in range(28))
            yield f"#{k} {words}"[:190], i


def make_input(path: Path, n: int, seed: int = 0) -> None:
    """JSONL (``.jsonl``) or CSV (``.csv``, columns prompt,n) with the same rows."""
    csv_ = path.suffix == ".csv"
    with open(path, "w") as f:
        buf = ["prompt,n\n"] if csv_ else []
        for p, i in _rows(n, seed):  # plain words: no character needs quoting or escaping
            if csv_:
                buf.append(f"{p},{'' if i is None else i}\n")
            else:
                buf.append('{"prompt": ""}\n' if i is None else f'{{"prompt": "{p}", "n": {i}}}\n')
            if len(buf) >= 100_000:
                f.writelines(buf)
                buf = []
        f.writelines(buf)


PYARROW = """
import sys, time, json, resource
import pyarrow.json as pj, pyarrow.csv as pc, pyarrow.parquet as pq
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t, c = time.perf_counter(), cpu()
table = (pc.read_csv if sys.argv[1].endswith(".csv") else pj.read_json)(sys.argv[1])
pq.write_table(table, sys.argv[2], compression="zstd")
dt, dc = time.perf_counter() - t, cpu() - c
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
# cpu: the read and write alone; cpu_process: the whole process (interpreter start and imports
# included), what ingest's figure (RUSAGE_CHILDREN of the whole CLI process) counts
print(json.dumps({"rows_in": table.num_rows, "seconds": dt, "cpu": dc, "cpu_process": cpu(),
                  "peak_rss_mib": int(hwm) / 1024}))
"""

INGEST = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run([sys.executable, "-m", "guidealign", "ingest", sys.argv[1], "-w", sys.argv[2],
                    "--no-progress", *sys.argv[3:]], capture_output=True, text=True)
dt = time.perf_counter() - t
if p.returncode:
    sys.exit(p.stderr)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"summary": p.stdout.strip().splitlines()[-1], "seconds": dt, "cpu": r.ru_utime + r.ru_stime,
                  "peak_rss_mib": r.ru_maxrss / 1024}))
"""


PREFAULT_MIB = 1024  # set by --prefault-mib (0: --cold)
PREFAULT = "import sys, numpy as np; np.ones(int(sys.argv[1]) << 20, dtype=np.uint8).sum()"


def run_child(code: str, *args, prefault: bool = True) -> dict:
    """The child's JSON line, plus ``process_seconds``: its wall time as a whole process
    (interpreter start and imports included). Memory is touched first (see the module doc)
    unless ``prefault`` is false."""
    if PREFAULT_MIB and prefault:
        subprocess.run([sys.executable, "-c", PREFAULT, str(PREFAULT_MIB)], check=True)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True,
                         capture_output=True, text=True)
    dt = time.perf_counter() - t
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_seconds": dt}


def ingest_once(src: Path, work: Path, extra: list[str], prefault: bool = True) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    r = run_child(INGEST, src, work, *extra, prefault=prefault)
    m = re.search(r"(\d+) rows read -> (\d+) prompts.*?(\d+) duplicates dropped, (\d+) quarantined", r["summary"])
    d = re.search(r"de-dup set ([\d.]+) MiB in memory, ([\d.]+) MiB on disk", r["summary"])
    r.update(rows_in=int(m[1]), rows=int(m[2]), dups=int(m[3]), quarantined=int(m[4]),
             dedup_mib=float(d[1]), dedup_disk_mib=float(d[2]),
             inner_rate=float(re.search(r"([\d,]+) rows/s", r["summary"])[1].replace(",", "")))
    shutil.rmtree(work, ignore_errors=True)
    return r


def pair_ratios(pa_r: dict, ing: dict) -> dict:
    """Ingest / pyarrow for one pyarrow run and one ingest run (rates: higher is ingest faster).

    ratio:   ingest's whole CLI process (start and imports included) vs pyarrow's read + write alone
    inner:   both without interpreter start and imports (ingest's own rows/s)
    process: both as whole processes
    cpu:     CPU seconds, both whole processes (pyarrow's ``cpu_process``, ingest's RUSAGE_CHILDREN)
    """
    pa_rate, ing_rate = pa_r["rows_in"] / pa_r["seconds"], ing["rows_in"] / ing["seconds"]
    return {"ratio": ing_rate / pa_rate, "inner": ing["inner_rate"] / pa_rate,
            "process": (pa_r["process_seconds"] / pa_r["rows_in"]) / (ing["seconds"] / ing["rows_in"]),
            "cpu": (pa_r["cpu_process"] / pa_r["rows_in"]) / (ing["cpu"] / ing["rows_in"])}


def compare(src: Path, base: Path, extra: list[str], repeats: int, label: str) -> dict:
    """pyarrow and ingest on ``src``, alternating ``repeats`` times; prints each and the median."""
    ratios, inner, cpu, procs, runs = [], [], [], [], []
    # one untimed run of each first: the first process to touch this much memory after the
    # input was written pays for it (on a VM, seconds), and that is neither tool's speed
    run_child(PYARROW, src, base / "pyarrow.parquet")
    ingest_once(src, base / "w", extra)
    for _ in range(repeats):
        pa_r = run_child(PYARROW, src, base / "pyarrow.parquet")
        (base / "pyarrow.parquet").unlink()
        ing = ingest_once(src, base / "w", extra)
        pa_rate, ing_rate = pa_r["rows_in"] / pa_r["seconds"], ing["rows_in"] / ing["seconds"]
        r = pair_ratios(pa_r, ing)
        ratios.append(r["ratio"])
        cpu.append(r["cpu"])
        procs.append(r["process"])
        inner.append(r["inner"])
        runs.append((pa_r, ing))
        n = ing["rows_in"]
        print(f"  {label}: pyarrow {pa_rate:>10,.0f} rows/s ({pa_r['seconds']:.2f}s, peak RSS "
              f"{pa_r['peak_rss_mib']:.0f} MiB) | guidealign ingest (CLI) {ing_rate:>10,.0f} rows/s "
              f"({ing['seconds']:.2f}s incl. interpreter start, peak RSS {ing['peak_rss_mib']:.0f} MiB; "
              f"{ing['rows']:,} kept, {ing['dups']:,} duplicates, {ing['quarantined']:,} quarantined of {n:,}); "
              f"pyarrow as a whole process {pa_r['process_seconds']:.2f}s; "
              f"CPU seconds (whole processes): pyarrow {pa_r['cpu_process']:.2f} ({pa_r['cpu']:.2f} in its "
              f"read + write), ingest {ing['cpu']:.2f}", flush=True)
    # and each tool twice in a row: the second run reuses the memory the first just freed, which
    # on a VM is much cheaper to touch (pyarrow, holding the whole file, gains the most); no
    # throwaway process touches memory between the two, or the second run would not be "back to back"
    pa_warm = [run_child(PYARROW, src, base / "pyarrow.parquet", prefault=k == 0) for k in range(2)][-1]
    (base / "pyarrow.parquet").unlink()
    ing_warm = [ingest_once(src, base / "w", extra, prefault=k == 0) for k in range(2)][-1]
    warm = (ing_warm["rows_in"] / ing_warm["seconds"]) / (pa_warm["rows_in"] / pa_warm["seconds"])
    print(f"  {label}: back to back, second runs: pyarrow {pa_warm['seconds']:.2f}s, ingest "
          f"{ing_warm['seconds']:.2f}s (inside the process {ing_warm['rows_in'] / ing_warm['inner_rate']:.2f}s)",
          flush=True)
    return {"ratio": statistics.median(ratios), "inner": statistics.median(inner), "warm": warm,
            "cpu": statistics.median(cpu), "process": statistics.median(procs),
            "warm_inner": (ing_warm["inner_rate"] * pa_warm["seconds"]) / pa_warm["rows_in"],
            "rss": max(i["peak_rss_mib"] for _, i in runs), "rows": runs[-1][1]["rows"],
            "dedup_mib": runs[-1][1]["dedup_mib"]}


def main() -> None:
    global PREFAULT_MIB
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000, help="size for the speed ratios (and memory)")
    ap.add_argument("--mem-rows", type=int, default=10_000_000, help="second size, for memory (0: skip)")
    ap.add_argument("--short", action="store_true", help="--mem-rows 3000000 --repeats 1 (about a minute)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating pyarrow/ingest runs per format")
    ap.add_argument("--shard-rows", type=int, default=None, help="ingest.shard_rows (default: the config's)")
    ap.add_argument("--hash-kernel", default=None, choices=["auto", "llvm", "hashlib"],
                    help="ingest.hash_kernel for every run (default: the config's, auto)")
    ap.add_argument("--no-csv", action="store_true", help="skip the CSV comparison")
    ap.add_argument("--dir", default="/tmp/ga-bench-ingest")
    ap.add_argument("--prefault-mib", type=int, default=PREFAULT_MIB,
                    help="MiB of memory touched (by a throwaway process) just before each timed run")
    ap.add_argument("--cold", action="store_true", help="no touching first (--prefault-mib 0)")
    a = ap.parse_args()
    PREFAULT_MIB = 0 if a.cold else a.prefault_mib
    if a.short:
        a.mem_rows, a.repeats = min(a.mem_rows, 3_000_000), 1
    extra = ["--set", f"ingest.hash_kernel={a.hash_kernel}"] if a.hash_kernel else []
    extra += ["--set", f"ingest.shard_rows={a.shard_rows}"] if a.shard_rows else []
    print(f"ingest settings: {' '.join(extra[1::2]) or 'the defaults'}; memory touched before each "
          f"timed run: {f'{PREFAULT_MIB} MiB' if PREFAULT_MIB else 'no (--cold)'}", flush=True)
    base = Path(a.dir)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    try:
        src = base / f"in-{a.rows}.jsonl"
        t = time.perf_counter()
        make_input(src, a.rows)
        print(f"generated {a.rows:,} rows ({src.stat().st_size / 2**20:.0f} MiB JSONL) in "
              f"{time.perf_counter() - t:.1f}s", flush=True)
        js = compare(src, base, extra, a.repeats, "JSONL")
        src.unlink()
        if not a.no_csv:
            csv_src = base / f"in-{a.rows}.csv"
            make_input(csv_src, a.rows)
            cs = compare(csv_src, base, extra, a.repeats, "CSV  ")
            csv_src.unlink()
            print(f"ratio ingest / pyarrow (CSV: read_csv + write_parquet): {cs['ratio']:.2f}x "
                  f"(target >= 0.5x); inside the process {cs['inner']:.2f}x; both as whole processes "
                  f"{cs['process']:.2f}x; back to back "
                  f"{cs['warm']:.2f}x, inside the process {cs['warm_inner']:.2f}x; CPU seconds "
                  f"(both whole processes) {cs['cpu']:.2f}x", flush=True)
        print(f"ratio ingest / pyarrow: {js['ratio']:.2f}x (JSONL: read_json + write_parquet, "
              f"target >= 0.5x); inside the process (without interpreter start and imports) "
              f"{js['inner']:.2f}x; both as whole processes (each with its interpreter start and "
              f"imports) {js['process']:.2f}x; back to back {js['warm']:.2f}x, inside the process "
              f"{js['warm_inner']:.2f}x; CPU seconds (both whole processes) {js['cpu']:.2f}x", flush=True)
        if a.mem_rows:
            big = base / f"in-{a.mem_rows}.jsonl"
            t = time.perf_counter()
            make_input(big, a.mem_rows)
            print(f"generated {a.mem_rows:,} rows ({big.stat().st_size / 2**20:.0f} MiB) in "
                  f"{time.perf_counter() - t:.1f}s", flush=True)
            ing2 = ingest_once(big, base / "w2", extra)
            print(f"guidealign ingest (CLI)           {a.mem_rows:>11,} rows: "
                  f"{ing2['rows_in'] / ing2['seconds']:>10,.0f} rows/s ({ing2['seconds']:.1f}s, "
                  f"peak RSS {ing2['peak_rss_mib']:.0f} MiB)")
            print(f"peak RSS {a.mem_rows:,} / {a.rows:,} rows: {ing2['peak_rss_mib'] / js['rss']:.2f}x "
                  f"(+{ing2['peak_rss_mib'] - js['rss']:.0f} MiB; the de-duplication set in memory: "
                  f"{ing2['dedup_mib']:.1f} vs {js['dedup_mib']:.1f} MiB, and "
                  f"{ing2['dedup_disk_mib']:.0f} MiB in temp files; all in memory it would be "
                  f"{8 * ing2['rows'] / 2**20:.0f} MiB)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
