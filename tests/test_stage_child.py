"""The encoder stages in a child process of their own (executor.stage_process), so that the
rank process never holds a CUDA context on a GPU node; and EXCLUSIVE_PROCESS GPUs seen."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from guidealign.config import load_config

TESTS = Path(__file__).parent
SETS = ["library.heldout_fraction=0.25", "retriever.epochs=1", "retriever.batch_size=16",
        "retriever.max_seq_length=32", "retriever.threads=1", "index.threads=1", "index.use_gpu=false",
        "retrieve.threads=1", "retrieve.batch_size=16", "library.threads=1"]

RUN = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[3])
    from guidealign.config import load_config
    from guidealign.pipeline import run_pipeline
    from synthetic import coded_guideline_rows, write_guideline_shards, write_prompt_shards

    wd = sys.argv[1]
    write_guideline_shards(wd + "/guidelines", coded_guideline_rows(4, 3, seed=2), shard_rows=8)
    write_prompt_shards(wd + "/prompts", [{"id": f"q{i}", "prompt": f"case question {i}"} for i in range(6)],
                        shard_rows=3)
    cfg = load_config(overrides=json.loads(sys.argv[2]))
    lines = []
    run_pipeline(cfg, wd, stages=["library", "train-retriever", "index", "retrieve"], progress=False,
                 echo=lines.append)
    print(json.dumps({"encoder_loaded_here": "sentence_transformers" in sys.modules,
                      "faiss_loaded_here": "faiss" in sys.modules, "lines": lines}))
""")


def _run(tmp_path, mode: str) -> dict:
    wd = tmp_path / mode
    out = subprocess.run([sys.executable, "-c", RUN, str(wd), json.dumps(SETS + [f"executor.stage_process={mode}"]),
                          str(TESTS)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wd"] = wd
    return res


def test_encoder_stages_run_in_child_processes_and_the_rank_never_loads_the_encoder(tmp_path):
    from guidealign.shards.manifest import is_complete

    child = _run(tmp_path, "child")
    assert not child["encoder_loaded_here"] and not child["faiss_loaded_here"], child
    assert is_complete(child["wd"] / "retrieve")
    # the reports came back from the children (the run's echo of each stage's summary)
    assert any(ln.startswith("== index") for ln in child["lines"])
    assert len([ln for ln in child["lines"] if not ln.startswith("==")]) >= 4, child["lines"]
    # the same run inline loads them here: what the first assertion tells apart
    inline = _run(tmp_path, "inline")
    assert inline["encoder_loaded_here"] and inline["faiss_loaded_here"]
    assert is_complete(inline["wd"] / "retrieve")


def test_a_stage_that_fails_in_its_child_raises_its_own_error_here(tmp_path):
    from guidealign.retrieval.index import EmptyLibraryError
    from guidealign.core.stage_child import run_in_child
    from synthetic import write_guideline_shards

    wd = tmp_path / "run"
    cfg = load_config(overrides=SETS + ["index.model=embedded:all-minilm-l6-v2"])
    write_guideline_shards(wd / "guidelines", [{"id": "p0", "prompt": "hi", "risky": False, "guidelines": []}])
    run_in_child("guidealign.retrieval.library:run_library", cfg, wd, progress=False)
    with pytest.raises(EmptyLibraryError, match="has no guidelines to index") as e:
        run_in_child("guidealign.retrieval.index:run_index", cfg, wd, progress=False)
    assert any("child process" in n for n in getattr(e.value, "__notes__", []))


def report_where(cfg, workdir, *, rank=0, world_size=1, progress=True):
    """A stage function for the test below (imported by the child from this module)."""
    from guidealign.shards.claims import current_assignment

    return {"pid": os.getpid(), "assign": current_assignment().kind, "ttl": current_assignment().ttl_s,
            "rank": rank, "world_size": world_size, "workdir": workdir}


def test_the_child_runs_under_the_ranks_shard_assignment(tmp_path):
    """Map stages read the shard assignment (executor.assign) from a context the rank's run
    enters; a child process starts without it, so it is handed over."""
    from guidealign.shards.claims import assignment
    from guidealign.core.stage_child import run_in_child

    with assignment("dynamic", 45.0):
        got = run_in_child("test_stage_child:report_where", load_config(), tmp_path, rank=1, world_size=3)
    assert got == {"pid": got["pid"], "assign": "dynamic", "ttl": 45.0, "rank": 1, "world_size": 3,
                   "workdir": str(tmp_path)}
    assert got["pid"] != os.getpid()
    assert run_in_child("test_stage_child:report_where", load_config(), tmp_path)["assign"] == "static"


def wait_for_nothing(cfg, workdir, *, rank=0, world_size=1, progress=True):
    """A stage function that waits for a dataset no rank will ever write."""
    from guidealign.shards import wait_complete

    wait_complete(Path(workdir) / "never", timeout=120, poll=0.2)


def check_failures(cfg, workdir, *, rank=0, world_size=1, progress=True):
    from guidealign.shards.failure import raise_if_failed

    raise_if_failed(workdir, "the test")
    return "no failure seen"


def test_a_wait_in_the_child_ends_on_the_ranks_stall_clock(tmp_path):
    """The rank's heartbeats said "working" while its child waited, so no wait (the child's
    or another rank's) ever saw a stall, and the child's clock was the 1800 s default instead
    of executor.stall_timeout_s: a run whose other rank died hung. The child now beats for the
    rank (waiting when it waits) under the rank's stall clock."""
    from guidealign.shards.failure import Stalled, guard, heartbeats
    from guidealign.core.stage_child import run_in_child

    with guard(tmp_path, rank=0, world_size=2, stall_timeout_s=2.0):
        with pytest.raises(Stalled, match="no progress on .*never for 2s"):
            run_in_child("test_stage_child:wait_for_nothing", load_config(), tmp_path, world_size=2)
        assert heartbeats(tmp_path)["rank-00000.json"]["pid"] == os.getpid()  # the rank beats again


def test_the_child_sees_failure_markers_written_since_the_rank_started(tmp_path, monkeypatch):
    """Without a run id a failure marker counts when written after "this process started": in
    the child that was its own start, so another rank's failure from before it was missed."""
    from guidealign.shards.failure import RankFailed, guard, mark_failed
    from guidealign.core.stage_child import run_in_child

    for k in ("GUIDEALIGN_RUN_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    with guard(tmp_path, rank=0, world_size=2):
        assert run_in_child("test_stage_child:check_failures", load_config(), tmp_path) == "no failure seen"
        mark_failed(tmp_path, 1, "CUDA out of memory", stage="guidelines", world_size=2)
        # a process's start time reads ~1 s early (the kernel's boot time is in whole seconds):
        # the child starts well after the marker, as a child of a long stage would
        time.sleep(2.5)
        with pytest.raises(RankFailed, match="rank 1 failed in guidelines"):
            run_in_child("test_stage_child:check_failures", load_config(), tmp_path)


class Odd(Exception):
    """Pickles, but does not unpickle (its __init__ takes two arguments, its args hold one)."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def raise_unpicklable(cfg, workdir, *, rank=0, world_size=1, progress=True):
    raise Odd("this", "that")


def test_an_error_that_does_not_cross_the_process_boundary_still_says_what_it_was(tmp_path):
    from guidealign.core.stage_child import run_in_child

    with pytest.raises(RuntimeError, match="Odd: this and that"):
        run_in_child("test_stage_child:raise_unpicklable", load_config(), tmp_path)


def test_stage_process_modes():
    from guidealign.core.stage_child import wanted

    asked = []
    gpus = lambda: asked.append(1) or ["0"]  # noqa: E731
    assert wanted("child", gpus) and not wanted("inline", gpus) and not asked
    assert wanted("auto", gpus) and asked == [1]
    assert not wanted("auto", lambda: [])
    with pytest.raises(ValueError, match="auto, child or inline"):
        wanted("sometimes", gpus)
    with pytest.raises(Exception, match="stage_process"):
        load_config(overrides=["executor.stage_process=sometimes"])


NVIDIA_SMI = """#!/bin/sh
case "$1" in
  --query-gpu=index,uuid,compute_mode) printf '0, GPU-aaaa, Default\\n1, GPU-bbbb, Exclusive_Process\\n2, GPU-cccc, [N/A]\\n' ;;
  -L) printf 'GPU 0: NVIDIA H200 (UUID: GPU-aaaa)\\nGPU 1: NVIDIA H200 (UUID: GPU-bbbb)\\n' ;;
  *) exit 1 ;;
esac
"""


def test_exclusive_process_gpus_are_seen_and_stop_the_engine_before_the_encoder_stages(tmp_path, monkeypatch):
    from guidealign import pipeline
    from guidealign.core.gpu import exclusive_gpus, parse_compute_modes
    from guidealign.stages import get

    assert parse_compute_modes("0, GPU-aaaa, Default\n1, GPU-bbbb, Exclusive_Process\n2, GPU-c, [N/A]\n") == {
        "0": "Default", "GPU-aaaa": "Default", "1": "Exclusive_Process", "GPU-bbbb": "Exclusive_Process"}
    smi = tmp_path / "bin" / "nvidia-smi"  # a stand-in: no GPU on this machine
    smi.parent.mkdir()
    smi.write_text(NVIDIA_SMI)
    smi.chmod(0o755)
    env = {"PATH": f"{smi.parent}:{os.environ['PATH']}"}
    assert exclusive_gpus(["0", "1"], env=env) == ["1"]
    assert exclusive_gpus(["GPU-bbbb", "2"], env=env) == ["GPU-bbbb"]
    assert exclusive_gpus(["0"], env=env) == [] and exclusive_gpus(["1"], env={"PATH": "/nonexistent"}) == []

    monkeypatch.setenv("PATH", env["PATH"])
    chosen = [get(n) for n in ("guidelines", "library", "index", "respond")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert pipeline._gpu_placement(load_config(), chosen) == (True, True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert pipeline._gpu_placement(load_config(), chosen) == (True, False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pipeline._gpu_placement(load_config(), chosen) == (False, False)
    assert pipeline._gpu_placement(load_config(overrides=["executor.stage_process=child"]), chosen) == (True, False)
    assert pipeline._gpu_placement(load_config(), [get("detect")]) == (False, False)


def test_the_shared_engine_goes_before_an_encoder_stage_only_on_exclusive_gpus():
    from guidealign.pipeline import engine_goes_before
    from guidealign.stages import get

    chosen = [get(n) for n in ("detect", "guidelines", "library", "train-retriever", "index", "retrieve",
                               "respond", "sft")]
    shared = [s for s in chosen if s.engine]
    for name in ("library", "train-retriever", "index", "retrieve"):
        i = [s.name for s in chosen].index(name)
        assert not engine_goes_before(chosen[i], chosen[i:], shared, exclusive=False)  # kept for respond
        assert engine_goes_before(chosen[i], chosen[i:], shared, exclusive=True)
    assert engine_goes_before(get("sft"), [get("sft")], shared, exclusive=False)  # none left uses it


EVAL_RETRIEVE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[3])
    from pathlib import Path
    from guidealign.config import load_config
    from guidealign.eval.generate import run_retrieval
    from guidealign.pipeline import run_pipeline
    from synthetic import coded_guideline_rows, write_guideline_shards, write_prompt_shards

    wd = Path(sys.argv[1])
    cfg = load_config(overrides=json.loads(sys.argv[2]))
    write_guideline_shards(wd / "guidelines", coded_guideline_rows(4, 3, seed=2), shard_rows=8)
    run_pipeline(load_config(overrides=json.loads(sys.argv[2])[:-1] + ["executor.stage_process=child"]), wd,
                 stages=["library", "train-retriever", "index"], progress=False, echo=lambda *a: None)
    sub = wd / "eval" / "bench"
    write_prompt_shards(sub / "prompts", [{"id": f"b{i}", "prompt": f"case question {i}"} for i in range(4)],
                        shard_rows=2)
    out = run_retrieval(cfg, wd, sub, 0, 1, progress=False)
    print(json.dumps({"encoder_loaded_here": "sentence_transformers" in sys.modules, "out": str(out)}))
""")


def test_eval_retrieves_for_the_benchmark_in_a_child_process(tmp_path):
    """eval's guided condition retrieves for the benchmark prompts before the responder's engine
    starts; it called the retrieve stage in its own process, which then held the encoder's CUDA
    context next to the engine (EXCLUSIVE_PROCESS GPUs: the engine's workers could not open
    them). Under ``executor.stage_process`` it runs in a child, as ``run``'s encoder stages do."""
    from guidealign.shards.manifest import is_complete

    seen = {}
    for mode in ("child", "inline"):
        wd = tmp_path / mode
        out = subprocess.run([sys.executable, "-c", EVAL_RETRIEVE, str(wd),
                              json.dumps(SETS + [f"executor.stage_process={mode}"]), str(TESTS)],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert out.returncode == 0, out.stderr[-3000:]
        seen[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        assert is_complete(Path(seen[mode]["out"]))
    assert not seen["child"]["encoder_loaded_here"]
    assert seen["inline"]["encoder_loaded_here"]  # what the first assertion tells apart
