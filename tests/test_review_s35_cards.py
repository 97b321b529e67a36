"""Review s35 (cards and the eval summary): a damaged `_done.json` does not stop the dataset
card, cards publish no local paths nor the Ray address, the card's stage counts leave out stale
shards as `status` does, and the eval summary says n/a (and names both conditions) when a
condition has no judged answer."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from guidealign.shards import map_shards, write_manifest, write_shard

PRIVATE = ("/home", "/scratch", "alice", "ray://", "10.1.2.3")


def _block(card: str, title: str):
    return yaml.safe_load(card.split(f"### {title}\n\n```yaml\n", 1)[1].split("```", 1)[0])


def _card(cfg, workdir):
    from guidealign.hub.card import dataset_card

    return dataset_card(repo_id="org/x", stage="respond", rows=1, files=1, cfg=cfg, workdir=workdir)


# --- 2. push: a damaged _done.json in the run does not stop the card --------------------------

@pytest.mark.parametrize("content", [b'{"rows": 7, "base_model": "org/enc\xff"}', b"[1, 2]"],
                         ids=["not-utf8", "not-an-object"])
def test_dataset_card_survives_a_damaged_done_record(tmp_path, content):
    from guidealign.config import load_config

    (tmp_path / "retriever").mkdir()
    (tmp_path / "retriever" / "_done.json").write_bytes(content)
    card = _card(load_config(None, ["retriever.base_model=org/configured-encoder"]), tmp_path)
    models = _block(card, "Models")
    assert models["retriever_base"] == "org/configured-encoder"  # no record: from the config
    assert "retriever_base" in models["from_config"]


# --- 3. cards publish no local paths and no executor section ----------------------------------

def test_cards_publish_no_local_paths_nor_the_ray_address(tmp_path):
    from guidealign.config import load_config
    from guidealign.hub.card import model_card

    cfg = load_config(None, [
        "inputs=[/home/alice/private/customer_prompts.jsonl]",
        "engine.model=/scratch/alice/models/vicuna-13b", "executor.ray_address=ray://10.1.2.3:10001",
        "sft.base_model=/scratch/alice/models/llama2-13b", "retriever.base_model=org/encoder"])
    # a stage that recorded a local model (its manifest also records its input's absolute path)
    src = tmp_path / "prompts"
    write_manifest(src, stage="ingest", num_shards=1, fingerprint="p")
    write_shard(src, 0, pa.table({"id": ["a"], "prompt": ["hi"]}), "p0")
    map_shards("respond", src, tmp_path / "respond", "fr", fn=lambda t, i: (t, None, {}),
               progress=False, record={"model": "/scratch/alice/models/responder-7b"})
    card = _card(cfg, tmp_path)
    assert not [s for s in PRIVATE if s in card], card
    models = _block(card, "Models")
    assert models["generator"] == "vicuna-13b" and models["responder"] == "responder-7b"
    assert models["retriever_base"] == "org/encoder"  # a Hub id stays
    config = _block(card, "Config")
    assert "executor" not in config
    assert config["inputs"] == ["customer_prompts.jsonl"]
    assert config["sft"]["base_model"] == "llama2-13b"
    assert _block(card, "Stages of the run")["respond"]["model"] == "responder-7b"

    mcard = model_card(base_model="/scratch/alice/models/llama2-13b",
                       data={"datasets": ["/home/alice/runs/r1/respond"], "examples": 3},
                       hyperparameters={"lr": 1e-5}, metrics={}, mode="full", merged=True)
    assert not [s for s in PRIVATE if s in mcard], mcard
    assert "`llama2-13b`" in mcard and "- respond" in mcard
    assert "`embedded:smollm2-135m-instruct`" in model_card(
        base_model="embedded:smollm2-135m-instruct", data={}, hyperparameters={}, metrics={},
        mode="full", merged=True)


# --- 5. the card's stage counts leave out stale shards, as status does -------------------------

def test_card_stage_counts_leave_out_stale_shards_and_markers_beyond_the_manifest(tmp_path):
    from guidealign.config import load_config
    from guidealign.shards.stage import shard_fingerprint
    from guidealign.status import collect

    src, dst = tmp_path / "retrieve", tmp_path / "respond"
    write_manifest(src, stage="retrieve", num_shards=2, fingerprint="r")
    for i in range(2):
        write_shard(src, i, pa.table({"id": [f"p{i}"]}), f"r{i}")
    write_manifest(dst, stage="respond", num_shards=2, fingerprint="NEW", input=str(src))
    write_shard(dst, 0, pa.table({"id": ["p0"]}), shard_fingerprint("NEW", src, 0), stats={"n": 1})
    # shard 1: committed under an earlier config; shard 2: left by an earlier, larger plan
    write_shard(dst, 1, pa.table({"id": [f"old{k}" for k in range(5)]}),
                shard_fingerprint("OLD", src, 1), stats={"n": 5})
    write_shard(dst, 2, pa.table({"id": ["x", "y", "z"]}), "NEW", stats={"n": 3})
    stages = _block(_card(load_config(None, []), tmp_path), "Stages of the run")
    info = stages["respond"]
    assert (info["shards"], info["shards_total"], info["shards_stale"], info["rows"]) == (1, 2, 1, 1)
    assert info["stats"] == {"n": 1}
    row = next(r for r in collect(tmp_path) if r["stage"] == "respond")
    assert (row["shards_done"], row["rows"]) == (info["shards"], info["rows"])


# --- 7. the eval summary: n/a, never None%, and both conditions named -------------------------

def test_eval_summary_says_n_a_and_names_a_condition_without_judged_answers(tmp_path):
    from guidealign.eval.aggregate import aggregate_harm
    from guidealign.eval.report import write_report
    from guidealign.eval.run import EvalReport

    harm = aggregate_harm([{"condition": "unguided", "category": "c", "verdict": None}] * 2)
    assert set(harm) == {"guided", "unguided"}
    assert harm["guided"]["overall"] == {"n": 0, "harmless": 0, "harmful": 0, "unparsed": 0,
                                         "judged": 0, "pct_harmless": None}
    rep = EvalReport(name="t", dir=str(tmp_path), benchmark="do-not-answer", harm=harm,
                     risk_identification={"overall": {"pct": None, "n": 0}, "top_k": 3,
                                          "paper_pct": 94.7})
    text = rep.summary()
    assert "None" not in text, text
    assert "unguided: n/a harmless (0/0, 2 unparsed)" in text and "guided: n/a harmless (0/0" in text
    assert "risk identification (top 3): n/a of 0" in text
    md = Path(write_report(tmp_path / "r", title="t", benchmark="do-not-answer", meta={},
                           harm=harm, pairwise=None)["markdown"]).read_text()
    head = next(line for line in md.splitlines() if line.startswith("| risk area"))
    assert "guided: % harmless" in head and "unguided: % harmless" in head
    overall = next(line for line in md.splitlines() if line.startswith("| **Overall**"))
    assert overall.count("n/a (0/0,") == 2, overall


def test_redaction_keeps_text_that_is_no_local_path():
    """Stop strings, templates and Hub ids stay as written (the first version cut "</s>" to "s>"
    and "{a}/{b}" to "{b}"); absolute, ./ and existing relative paths lose their folders."""
    from guidealign.hub.card import redact

    got = redact({"stop": ["</s>", "USER:", "/>", "/"], "system": "/no_think Answer briefly.",
                  "fmt": "{a}/{b}", "ratio": "1/2", "hub": "meta-llama/Llama-2-13b-hf",
                  "abs": "/home/alice/p.jsonl", "rel": "./models/m", "here": "configs/demo.yaml",
                  "embedded": "embedded:smollm2-135m-instruct", "executor": {"ray_address": "ray://10.0.0.1:1"}})
    assert got == {"stop": ["</s>", "USER:", "/>", "/"], "system": "/no_think Answer briefly.", "fmt": "{a}/{b}", "ratio": "1/2", "hub": "meta-llama/Llama-2-13b-hf",
                   "abs": "p.jsonl", "rel": "m", "here": "demo.yaml", "embedded": "embedded:smollm2-135m-instruct"}
