"""Ranks started without a run id (by hand, or `launch --node-rank/--nodes` on nodes that start
minutes apart): a rank that failed before another rank's process started wrote its failure
marker, which the fail-fast rule passes over as an earlier run's (only markers written after a
rank started count without run ids). The waiting rank then stalled and said that a rank "died
without a failure marker". It now names the markers it passed over, with their errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from synthetic import write_prompt_shards

TESTS = Path(__file__).resolve().parent

RANK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import pyarrow.compute as pc
    from guidealign.shards import wait_complete
    from guidealign.shards.failure import guard
    from guidealign.shards.stage import map_shards

    wd, rank = Path(sys.argv[1]), int(sys.argv[2])

    def fn(table, i):
        if i == 1:
            raise RuntimeError(f"the input of shard {i} is bad")
        return table.append_column("chars", pc.utf8_length(table["prompt"]))

    with guard(wd, rank, 2, stage="charcount", stall_timeout_s=3):
        map_shards("charcount", wd / "prompts", wd / "charcount", "cc-v1", fn=fn, rank=rank,
                   world_size=2, progress=False, assign="static")
        if rank == 0:
            wait_complete(wd / "charcount", timeout=float("inf"), poll=0.2, workdir=wd)
""")


def test_a_stalled_wait_names_the_failure_markers_written_before_this_rank_started(tmp_path):
    write_prompt_shards(tmp_path / "prompts", [{"id": f"p{i}", "prompt": "x" * (i + 1)} for i in range(8)],
                        shard_rows=2)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GUIDEALIGN_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID")}
    script = tmp_path / "rank.py"
    script.write_text(RANK)

    def rank(r):
        return subprocess.run([sys.executable, str(script), str(tmp_path), str(r)], env=env, cwd=TESTS,
                              capture_output=True, text=True, timeout=300)

    assert rank(1).returncode != 0
    assert (tmp_path / "_failed" / "rank-00001.json").exists()
    time.sleep(1.1)  # this rank's process starts after the marker was written
    out = rank(0)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "Stalled" in last, out.stderr[-3000:]
    assert "Failure markers written before this rank started were passed over" in last, last
    assert "rank 1 on" in last and "the input of shard 1 is bad" in last, last
    assert "died without a failure marker" not in last.split("passed over")[0], last
