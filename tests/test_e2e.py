"""End to end: the whole demo pipeline on 16 sample prompts with the embedded models, through
the CLI, as two workers of one run (rank 0 and rank 1 of 2, as two GPUs or two SLURM tasks would
start them: each runs its half of the per-prompt stages with its own engine, rank 0 runs the
reduce stages and SFT), then checks of every stage's output. (That an SFT checkpoint loads in
vLLM and answers is tested once, in tests/test_sft.py, and with a saved chat template in
tests/test_paper_twin.py.)"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guidealign.shards import iter_tables, read_manifest, read_marker

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PROMPTS, SHARDS = 16, 4


def _rows(d: Path) -> list[dict]:
    return [r for t in iter_tables(d) for r in t.to_pylist()]


def _cli(*args, timeout=1500):
    return subprocess.run([sys.executable, "-m", "guidealign", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def demo_run(module_tmp):
    """(run dir, rank 0's stdout, rank 1's stdout) of one finished two-worker demo run."""
    tmp = module_tmp.mktemp("e2e")
    src = tmp / "prompts.jsonl"
    lines = (REPO / "data/samples/prompts.jsonl").read_text().splitlines()
    src.write_text("\n".join(lines[:PROMPTS]) + "\n")
    w = tmp / "run"
    # one core each for the two engines' threads (both binding both cores would run 4 threads
    # on 2 cores); threads are a performance setting, outside every fingerprint
    procs = [subprocess.Popen([sys.executable, "-m", "guidealign", "run", "-c", "configs/demo.yaml",
                               "-w", str(w), "--no-progress", "--rank", str(r), "--world-size", "2",
                               *_SETS(src), "--set", f"engine.cpu_threads_bind={r}",
                               "--set", "executor.stall_timeout_s=1200"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=2400) for p in procs]  # a hang guard, not a timing check
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}:\n{out[-3000:]}\n{err[-5000:]}"
    return w, outs[0][0], outs[1][0]


def _SETS(src):  # noqa: N802 - the overrides every run of this module uses
    # Greedy decoding (float32, so the output does not depend on batching or order), short
    # outputs, 2 SFT steps; SFT keeps answers cut at the cap too, so the training set is never
    # empty whatever the model says.
    sets = [f"inputs=[{src}]", f"ingest.shard_rows={PROMPTS // SHARDS}", "engine.cpu_kvcache_gib=1",
            "detect.sampling.temperature=0", "detect.sampling.max_tokens=64",
            "guidelines.sampling.temperature=0", "guidelines.sampling.max_tokens=128",
            "respond.sampling.max_tokens=96", "sft.max_steps=2", "sft.keep_finish_reasons=[stop,length]"]
    return [a for s in sets for a in ("--set", s)]


def test_every_stage_has_its_outputs(demo_run):
    w, _, _ = demo_run
    prompts = _rows(w / "prompts")
    assert len(prompts) == PROMPTS and read_manifest(w / "prompts")["num_shards"] == SHARDS
    ids = {p["id"] for p in prompts}

    detect = _rows(w / "detect")
    assert {r["id"] for r in detect} == ids
    assert all(r["risky"] in (True, False, None) and r["raw"] for r in detect)
    # every verdict that did not parse says so
    no_verdict = {"missing", "empty", "skipped", "error"}
    assert all((r["risky"] is None) == (r["parse_status"] in no_verdict) for r in detect)

    guides = _rows(w / "guidelines")
    assert {r["id"] for r in guides} == ids
    with_guidelines = [r for r in guides if r["guidelines"]]
    assert with_guidelines
    assert all(g["text"] for r in with_guidelines for g in r["guidelines"])
    # a prompt without guidelines carries the reason
    assert all(r["parse_status"] != "ok" or r["skip_reason"] for r in guides if not r["guidelines"])

    library = _rows(w / "library")
    report = json.loads((w / "library" / "report.json").read_text())
    exploded = sum(len(r["guidelines"]) for r in guides)
    assert 0 < len(library) <= exploded
    assert len({g["guideline_id"] for g in library}) == len(library)
    assert all(set(g["prompt_ids"]) <= ids and g["members"] >= 1 for g in library)
    # sizes before/after each step are reported, and they add up
    assert report["prompts"] == PROMPTS
    assert report["exploded"] == exploded
    assert report["exploded"] - report["empty_dropped"] >= report["after_exact"] >= report["after_near"]
    assert report["after_near"] == len(library)
    assert report["safety"] + report["quality"] == len(library)

    metrics = json.loads((w / "retriever" / "metrics.json").read_text())
    for system in ("base", "fine-tuned", "bm25"):
        assert 0.0 <= metrics["systems"][system]["recall@20"] <= 1.0
    assert (w / "index" / "_done.json").exists()

    # retrieved texts are "title: text" as the library holds them (the title once when a
    # guideline was written as a title alone: its text is its title)
    from guidealign.retrieval.embed import doc_text

    lib_text = {g["guideline_id"]: doc_text(g["title"], g["text"]) for g in library}
    retrieved = {r["id"]: r for r in _rows(w / "retrieve")}
    assert set(retrieved) == ids
    for r in retrieved.values():
        assert 1 <= len(r["guideline_ids"]) <= 6
        assert r["scores"] == sorted(r["scores"], reverse=True)
        assert [lib_text[g] for g in r["guideline_ids"]] == r["guideline_texts"]

    responses = _rows(w / "respond")
    assert {r["id"] for r in responses} == ids
    for r in responses:
        assert r["guideline_ids"] == retrieved[r["id"]]["guideline_ids"]
        assert r["finish_reason"] in ("stop", "length")

    # SFT trains on every non-empty answer (both finish reasons are kept in this run)
    done = json.loads((w / "sft" / "_done.json").read_text())
    assert done["rows"] == sum(bool(r["response"].strip()) for r in responses) > 0
    model = w / "sft" / "model"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (model / f).exists(), f
    card = (model / "README.md").read_text()
    assert "smollm2" in card.lower()


def test_two_ranks_split_every_per_prompt_stage(demo_run):
    w, out0, out1 = demo_run
    # each per-prompt stage: every shard committed, half by each rank, every prompt exactly once
    for stage in ("detect", "guidelines", "retrieve", "respond"):
        assert all(read_marker(w / stage, i) is not None for i in range(SHARDS)), stage
        ids = [i for t in iter_tables(w / stage) for i in t.column("id").to_pylist()]
        assert len(ids) == len(set(ids)) == PROMPTS, stage
    for r, out in enumerate((out0, out1)):
        assert out.count(f"respond: {SHARDS // 2} shard(s) written") == 1, f"rank {r}:\n{out[-3000:]}"
    # every rank runs every stage function; only rank 0 trains (TRL logs its train_loss)
    assert "'train_loss'" in out0 and "'train_loss'" not in out1


def test_engine_processes_end_before_sft_trains(demo_run):
    # the run stops its vLLM engine (dropping the LLM object would leave its processes
    # holding their memory, or a GPU's, while SFT trains) and checks that they exited
    _, out, _ = demo_run
    lines = out.splitlines()
    stopped = lines.index("engine stopped before sft: its processes have exited")
    assert lines[stopped + 1] == "== sft"
    assert sum(ln.startswith("engine stopped") for ln in lines) == 1


@pytest.mark.parametrize("where", ["same", "moved"])
def test_rerun_does_nothing(demo_run, tmp_path, where):
    """A rerun of a finished run, in place or after copying the run directory under another
    name (another filesystem, another mount point), writes nothing and starts no engine:
    fingerprints depend on content and config, never on paths."""
    w = demo_run[0]
    if where == "moved":
        w2 = tmp_path / "elsewhere" / "renamed-run"
        shutil.copytree(w, w2, copy_function=shutil.copy2)
        w = w2
    artifacts = ("library", "retriever", "index", "sft")
    before = {st: [m.stat().st_mtime for m in sorted((w / st).glob("shard-*.done.json"))]
              for st in ("prompts", "detect", "guidelines", "retrieve", "respond")}
    done_before = {a: (w / a / "_done.json").read_text() for a in artifacts}
    r = _cli("-v", "run", "-c", "configs/demo.yaml", "-w", str(w), "--no-progress",
             *_SETS(demo_run[0].parent / "prompts.jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 shard(s) written" in r.stdout
    after = {st: [m.stat().st_mtime for m in sorted((w / st).glob("shard-*.done.json"))]
             for st in before}
    assert after == before
    assert {a: (w / a / "_done.json").read_text() for a in artifacts} == done_before
    assert "INFO guidealign.ingest" in r.stderr  # -v logging is on ...
    assert "starting vLLM" not in r.stderr  # ... and no engine started for a run with nothing to do


def test_status_and_show(demo_run):
    w = demo_run[0]
    r = _cli("status", str(w), "--json")
    rows = {s["stage"]: s for s in json.loads(r.stdout)}
    for st in ("prompts", "detect", "guidelines", "retrieve", "respond"):
        assert rows[st]["shards_done"] == rows[st]["shards_total"] == SHARDS
    r = _cli("show", str(w), "-n", "2")
    # one heading line per prompt shown (generated answers, indented, may contain "###" too)
    headings = [ln for ln in r.stdout.splitlines() if ln.startswith("### ")]
    assert r.returncode == 0 and len(headings) == 2 and "retrieved guidelines" in r.stdout
