"""The ingest de-dup set (``guidealign.ingest.dedup.HashSet``) alone: time and memory for N hashes.

    .venv/bin/python bench/dedup.py                  # 10M hashes, 1% repeats
    .venv/bin/python bench/dedup.py --hashes 1000000

Feeds blocks of 19,000 uniform 64-bit hashes (about one 4 MiB JSONL block of ~190-char prompts)
with 1% repeats of earlier ones, twice in one run: with ingest's default budget
(``ingest.dedup_memory_mib``: older hashes in temp files) and with every hash in memory (a budget
past N), and prints each one's seconds, its memory at the end (filter, runs, fences) and the
ratio. Each in its own process, its peak RSS reset (``/proc/self/clear_refs``) after the hashes
are made, so that the peak printed is the set's own (with its temporaries).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time, numpy as np
from guidealign.ingest.dedup import HashSet
n, budget, spill = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
h = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
rep = np.flatnonzero(rng.random(n) < 0.01)
rep = rep[rep > 0]
h[rep] = h[(rng.random(rep.size) * rep).astype(np.int64)]
def status(key):
    return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) / 1024
del rep
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # peak RSS := RSS now (Linux), so the peak below is the set's own
base = status('VmRSS')
t = time.perf_counter()
kept = 0
with HashSet(memory_hashes=budget, spill_dir=spill) as s:
    for i in range(0, n, 19000):
        kept += int(s.add_new(h[i:i + 19000]).sum())
    out = {"seconds": time.perf_counter() - t, "kept": kept, "memory_mib": s.memory_bytes() / 2**20,
           "disk_mib": s.disk_bytes() / 2**20, "peak_over_mib": status('VmHWM') - base}
print(json.dumps(out))
"""


def run(n: int, budget: int, spill: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(n), str(budget), spill],
                       check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    from guidealign.config.ingest import IngestConfig
    from guidealign.ingest.dedup import hashes_in_mib

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hashes", type=int, default=10_000_000)
    a = ap.parse_args()
    budget = hashes_in_mib(IngestConfig().dedup_memory_mib)
    with tempfile.TemporaryDirectory() as spill:
        spilled = run(a.hashes, budget, spill)
        whole = run(a.hashes, a.hashes + 1, spill)
    assert spilled["kept"] == whole["kept"]
    for name, r in (("default budget", spilled), ("all in memory", whole)):
        print(f"{name:15s} {a.hashes:,} hashes: {r['seconds']:.2f} s, {r['kept']:,} new; the set holds "
              f"{r['memory_mib']:.1f} MiB in memory, {r['disk_mib']:.1f} MiB in temp files; "
              f"peak RSS +{r['peak_over_mib']:.0f} MiB while it ran")
    print(f"time, default budget / all in memory: {spilled['seconds'] / whole['seconds']:.2f}x; "
          f"memory held: {spilled['memory_mib'] / whole['memory_mib']:.2f}x")


if __name__ == "__main__":
    main()
