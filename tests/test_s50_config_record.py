"""The config each stage ran with is recorded in the run (WORKDIR/_configs/<stage>.json, secrets
out), and a dataset card shows that one: the config given to `push` (the defaults, on a login
node without the run's -c) was published as the run's, with other models and sampling settings
than the run's own."""
from __future__ import annotations

import json

import pyarrow as pa
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.config import load_config
from guidealign.gen.respond import RESPOND_SCHEMA
from guidealign.shards import write_manifest, write_shard
from guidealign.shards.config_record import config_record_path, read_stage_config


def _respond(workdir):
    rows = [dict(id="a", prompt="p", guideline_ids=[], guideline_texts=[], response="r",
                 finish_reason="stop", model="org/resp", prompt_tokens=1, output_tokens=1, note="")]
    d = workdir / "respond"
    write_manifest(d, stage="respond", num_shards=1, fingerprint="t", model="org/resp")
    write_shard(d, 0, pa.Table.from_pylist(rows, schema=RESPOND_SCHEMA), "fp0")


def test_a_stage_command_records_its_config_without_secrets(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    w = tmp_path / "run"
    r = CliRunner().invoke(cli, ["ingest", str(src), "-w", str(w), "--no-progress",
                                 "--set", "ingest.shard_rows=7", "--set", "sft.trainer_args={hub_token: hf_abcdefghijklmnopqrstuvwxyz0123}"])
    assert r.exit_code == 0, r.output
    rec = read_stage_config(w, "ingest")
    assert rec["ingest"]["shard_rows"] == 7
    text = config_record_path(w, "ingest").read_text()
    assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in text and rec["sft"]["trainer_args"]["hub_token"] == "(redacted)"


def test_run_records_each_stage_it_ran(tmp_path):
    from guidealign.pipeline import run_pipeline

    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "one"}\n')
    cfg = load_config(overrides=[f"inputs=[{src}]", "ingest.shard_rows=9"])
    run_pipeline(cfg, tmp_path / "run", stages=["ingest"], progress=False, echo=lambda *_: None)
    assert read_stage_config(tmp_path / "run", "ingest")["ingest"]["shard_rows"] == 9


def test_the_card_shows_the_config_the_stage_ran_with_not_pushs(tmp_path):
    from guidealign.executors import record_config
    from guidealign.hub.card import dataset_card

    w = tmp_path / "run"
    _respond(w)
    ran = load_config(overrides=["respond.sampling.temperature=0.3", f"engine.model={tmp_path}/models/resp"])
    record_config(ran, w, "respond")
    given = load_config()  # push without the run's -c: the defaults
    card = dataset_card(repo_id="org/x", stage="respond", rows=1, files=1, cfg=given, workdir=w)
    config = card.split("### Config", 1)[1]
    assert "The config the `respond` stage last ran with" in config
    assert "temperature: 0.3" in config
    assert str(tmp_path) not in card  # a local path by its base name only, as before
    # a run that recorded none: push's config, said so
    config_record_path(w, "respond").unlink()
    card = dataset_card(repo_id="org/x", stage="respond", rows=1, files=1, cfg=given, workdir=w)
    assert "No record of the config `respond` ran with" in card.split("### Config", 1)[1]


def test_the_card_of_prompts_shows_ingests_config(tmp_path):
    from guidealign.hub.card import dataset_card

    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "one"}\n')
    w = tmp_path / "run"
    assert CliRunner().invoke(cli, ["ingest", str(src), "-w", str(w), "--no-progress", "--set",
                                    "ingest.shard_rows=5"]).exit_code == 0
    card = dataset_card(repo_id="org/x", stage="prompts", rows=1, files=1, cfg=load_config(), workdir=w)
    config = card.split("### Config", 1)[1]
    assert "The config the `ingest` stage last ran with" in config and "shard_rows: 5" in config
    assert json.loads(config_record_path(w, "ingest").read_text())["stage"] == "ingest"
