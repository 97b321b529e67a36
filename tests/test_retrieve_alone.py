"""`retrieve` run alone by several workers (`launch retrieve`, a SLURM array of map stages, a
Ray pool): no rank of that command builds the index, so a missing one fails at once with the
stage to run, instead of every worker waiting out the stall clock and blaming a dead rank."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_several_workers_without_an_index_fail_at_once_naming_the_missing_stage(tmp_path):
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt": "first"}\n{"prompt": "second"}\n')
    wd = tmp_path / "wd"
    subprocess.run([sys.executable, "-m", "guidealign", "ingest", str(inp), "-w", str(wd), "--no-progress"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    # the stall clock at 10 minutes: before the fix rank 0 waited for the index that long
    # (timeout below: the test fails with TimeoutExpired instead of hanging)
    p = subprocess.run([sys.executable, "-m", "guidealign", "retrieve", "-w", str(wd), "--rank", "0",
                        "--world-size", "2", "--no-progress", "--set", "executor.stall_timeout_s=600"],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode != 0
    assert "NotReady" in p.stderr and "run the stage that builds it first" in p.stderr, p.stderr[-2000:]
    assert "Stalled" not in p.stderr
