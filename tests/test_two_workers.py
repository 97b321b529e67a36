"""Two workers of one `guidealign run` (rank 0 and rank 1 of 2, as two GPUs or two SLURM tasks
would start them) over the demo config: each runs its half of the per-prompt stages with its
own engine, rank 0 runs the reduce stages and SFT, and the run ends with a trained model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from guidealign.shards import iter_tables, read_manifest, read_marker

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_two_worker_run_of_the_demo_ends_with_a_trained_model(tmp_path):
    src = tmp_path / "prompts.jsonl"
    lines = (REPO / "data/samples/prompts.jsonl").read_text().splitlines()
    src.write_text("\n".join(lines[:8]) + "\n")
    w = tmp_path / "run"
    sets = [f"inputs=[{src}]", "ingest.shard_rows=2", "engine.cpu_kvcache_gib=1",
            "detect.sampling.temperature=0", "detect.sampling.max_tokens=24",
            "guidelines.sampling.temperature=0", "guidelines.sampling.max_tokens=96",
            "respond.sampling.max_tokens=48", "retriever.epochs=1", "sft.max_steps=2",
            "sft.keep_finish_reasons=[stop,length]", "executor.stall_timeout_s=1200"]
    args = [a for s in sets for a in ("--set", s)]
    procs = [subprocess.Popen([sys.executable, "-m", "guidealign", "run", "-c", "configs/demo.yaml",
                               "-w", str(w), "--no-progress", "--rank", str(r), "--world-size", "2",
                               *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=2400) for p in procs]  # a hang guard, not a timing check
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}:\n{out[-3000:]}\n{err[-5000:]}"
    # each per-prompt stage: 4 shards, 2 written by each rank, every prompt exactly once
    assert read_manifest(w / "prompts")["num_shards"] == 4
    for stage in ("detect", "guidelines", "retrieve", "respond"):
        assert all(read_marker(w / stage, i) is not None for i in range(4)), stage
        ids = [i for t in iter_tables(w / stage) for i in t.column("id").to_pylist()]
        assert len(ids) == len(set(ids)) == 8, stage
    for r, (out, _) in enumerate(outs):
        assert out.count("respond: 2 shard(s) written") == 1, f"rank {r}:\n{out[-3000:]}"
    done = json.loads((w / "sft" / "_done.json").read_text())
    responses = [r for t in iter_tables(w / "respond") for r in t.to_pylist()]
    assert done["rows"] == sum(bool(r["response"].strip()) for r in responses) > 0
    assert (w / "sft" / "model" / "model.safetensors").exists()
    # every rank runs every stage function; only rank 0 trains (TRL logs its train_loss)
    assert "'train_loss'" in outs[0][0] and "'train_loss'" not in outs[1][0]
