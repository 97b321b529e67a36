"""A worker process for tests/test_claims.py: a cheap real map stage with dynamic claiming.

``python tests/claim_worker.py SRC DST JOURNAL TTL`` with RANK/WORLD_SIZE set. Each shard's
function appends ``start <shard> <pid>`` and ``finish <shard> <pid>`` to JOURNAL and adds a
``worker`` column. Test hooks (environment):

- ``CLAIM_TEST_DIE_AT=k``: this worker SIGKILLs itself inside its k-th shard (after claiming
  it, before committing it), first creating the file ``CLAIM_TEST_GATE``.
- ``CLAIM_TEST_GATE=path`` (other workers): wait for that file before processing any shard,
  so the doomed worker always gets its k shards, whatever the timing.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pyarrow as pa

from guidealign.shards import map_shards


def main(src: str, dst: str, journal: str, ttl: float) -> None:
    die_at = int(os.environ.get("CLAIM_TEST_DIE_AT", "0"))
    gate = os.environ.get("CLAIM_TEST_GATE")
    seen = []

    def log(word: str, i: int) -> None:
        with open(journal, "a") as f:
            f.write(f"{word} {i} {os.getpid()}\n")

    def fn(table: pa.Table, i: int):
        seen.append(i)
        log("start", i)
        if die_at and len(seen) == die_at:
            Path(gate).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        if gate and not die_at:
            while not os.path.exists(gate):
                time.sleep(0.02)
        out = table.append_column("worker", pa.array([os.getpid()] * table.num_rows, pa.int64()))
        log("finish", i)
        return out, None, {"pid": os.getpid()}

    map_shards("claimtest", src, dst, "claimtest-v1", fn=fn, rank=int(os.environ["RANK"]),
               world_size=int(os.environ["WORLD_SIZE"]), progress=False, assign="dynamic",
               claim_ttl_s=ttl)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
