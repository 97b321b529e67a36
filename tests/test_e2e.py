"""End to end: the whole demo pipeline on 24 sample prompts with the embedded models, through
the CLI, then checks of every stage's output and of the final model (loaded in vLLM)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guidealign.shards import iter_tables, read_manifest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _rows(d: Path) -> list[dict]:
    return [r for t in iter_tables(d) for r in t.to_pylist()]


def _cli(*args, timeout=1500):
    return subprocess.run([sys.executable, "-m", "guidealign", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    src = tmp / "prompts.jsonl"
    lines = (REPO / "data/samples/prompts.jsonl").read_text().splitlines()
    src.write_text("\n".join(lines[:24]) + "\n")
    w = tmp / "run"
    r = _cli("run", "-c", "configs/demo.yaml", "-w", str(w), "--no-progress", *_SETS(src))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return w, r.stdout


def _SETS(src):  # noqa: N802 - the overrides every run of this module uses
    # Greedy decoding (float32, so the output does not depend on batching or order), and SFT
    # keeps answers cut at the cap too, so the training set is never empty whatever the model says.
    return ["--set", f"inputs=[{src}]", "--set", "respond.sampling.max_tokens=192",
            "--set", "detect.sampling.temperature=0", "--set", "guidelines.sampling.temperature=0",
            "--set", "sft.keep_finish_reasons=[stop,length]"]


def test_every_stage_has_its_outputs(demo_run):
    w, out = demo_run
    prompts = _rows(w / "prompts")
    assert len(prompts) == 24 and read_manifest(w / "prompts")["num_shards"] == 3
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
    assert report["prompts"] == 24
    assert report["exploded"] == exploded
    assert report["exploded"] - report["empty_dropped"] >= report["after_exact"] >= report["after_near"]
    assert report["after_near"] == len(library)
    assert report["safety"] + report["quality"] == len(library)

    metrics = json.loads((w / "retriever" / "metrics.json").read_text())
    for system in ("base", "fine-tuned", "bm25"):
        assert 0.0 <= metrics["systems"][system]["recall@20"] <= 1.0
    assert (w / "index" / "_done.json").exists()

    # retrieved texts are "title: text" as the library holds them
    lib_text = {g["guideline_id"]: f"{g['title']}: {g['text']}" if g["title"] else g["text"]
                for g in library}
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


def test_engine_processes_end_before_sft_trains(demo_run):
    # the run stops its vLLM engine (dropping the LLM object would leave its processes
    # holding their memory, or a GPU's, while SFT trains) and checks that they exited
    _, out = demo_run
    lines = out.splitlines()
    stopped = lines.index("engine stopped before sft: its processes have exited")
    assert lines[stopped + 1] == "== sft"
    assert sum(ln.startswith("engine stopped") for ln in lines) == 1


@pytest.mark.parametrize("where", ["same", "moved"])
def test_rerun_does_nothing(demo_run, tmp_path, where):
    """A rerun of a finished run, in place or after copying the run directory under another
    name (another filesystem, another mount point), writes nothing and starts no engine:
    fingerprints depend on content and config, never on paths."""
    w, _ = demo_run
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
    w, _ = demo_run
    r = _cli("status", str(w), "--json")
    rows = {s["stage"]: s for s in json.loads(r.stdout)}
    for st in ("prompts", "detect", "guidelines", "retrieve", "respond"):
        assert rows[st]["shards_done"] == rows[st]["shards_total"] == 3
    r = _cli("show", str(w), "-n", "2")
    # one heading line per prompt shown (generated answers, indented, may contain "###" too)
    headings = [ln for ln in r.stdout.splitlines() if ln.startswith("### ")]
    assert r.returncode == 0 and len(headings) == 2 and "retrieved guidelines" in r.stdout


_ANSWER = """
import sys
from guidealign.gen.engine import EngineConfig, Sampling, build_llm, generate, sampling_params
llm = build_llm(EngineConfig(model=sys.argv[1], dtype="float32", max_model_len=1024))
tok = llm.get_tokenizer()
p = tok.apply_chat_template([{"role": "user", "content": "Name a color of the sky."}],
                            tokenize=False, add_generation_prompt=True)
[g] = generate(llm, [p], sampling_params(Sampling(temperature=0.0, max_tokens=32)))
print("ANSWER:", g.output_tokens, g.finish_reason, repr(g.text))
"""


def test_final_model_loads_in_vllm_and_answers(demo_run):
    w, _ = demo_run
    r = subprocess.run([sys.executable, "-c", _ANSWER, str(w / "sft" / "model")], capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("ANSWER:"))
    n_tokens = int(line.split()[1])
    assert n_tokens > 0
