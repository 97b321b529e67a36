"""Operator commands (Stop 50): card keys, export of stale shards, verify --repair of notes,
verify's per-directory counts, push WHAT with a folder in it."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner

from guidealign.cli import cli

DEAD_PID = 99999999  # above any pid_max (at most 2**22): no such process


def _run(wd: Path, n: int = 3, rows: int = 4) -> Path:
    """prompts -> retrieve -> respond, shard i made from input shard i (the fingerprint chain the
    stages write), so a rewritten retrieve shard makes the respond shard made from it stale."""
    from guidealign.gen.respond import RESPOND_SCHEMA
    from guidealign.shards import write_manifest, write_shard
    from guidealign.shards.stage import shard_fingerprint

    p, r, s = wd / "prompts", wd / "retrieve", wd / "respond"
    write_manifest(p, stage="ingest", num_shards=n, fingerprint="ingfp")
    write_manifest(r, stage="retrieve", num_shards=n, fingerprint="retfp", input=str(p))
    write_manifest(s, stage="respond", num_shards=n, fingerprint="resfp", input=str(r))
    for i in range(n):
        ids = [f"p{i}-{j}" for j in range(rows)]
        write_shard(p, i, pa.table({"id": ids, "prompt": [f"prompt {x}" for x in ids]}), "ingfp")
        write_shard(r, i, pa.table({"id": ids, "g": [["x"]] * rows}), shard_fingerprint("retfp", p, i))
        rr = [dict(id=x, prompt=f"prompt {x}", guideline_ids=["g"], guideline_texts=["gl"],
                   response=f"resp {x}", finish_reason="stop", model="m", prompt_tokens=1,
                   output_tokens=2, note="") for x in ids]
        write_shard(s, i, pa.Table.from_pylist(rr, schema=RESPOND_SCHEMA), shard_fingerprint("resfp", r, i))
    return wd


# --- 1. card keys ------------------------------------------------------------------------------

def test_redact_shortens_path_keys_and_keeps_them_unique():
    from guidealign.hub.card import REDACTED, redact

    token = "hf_" + "A1b2" * 9
    out = redact({"data": {"/home/alice/runB/respond": {"shards": 2}, "respond": {"shards": 3}},
                  "data_paths": {"/home/alice/runB/respond": "/home/alice/runB/respond",
                                 "respond": "respond"},
                  token: 1, "keep/me": 2})
    assert out["data"] == {"respond#2": {"shards": 2}, "respond": {"shards": 3}}
    assert out["data_paths"] == {"respond#2": "respond", "respond": "respond"}
    assert out[REDACTED] == 1 and out["keep/me"] == 2  # no path here: text as it is
    # two outside datasets of one folder name, neither the run's own
    two = redact({"/a/x/respond": 1, "/b/y/respond": 2, "/c/z/respond": 3})
    assert two == {"respond": 1, "respond#2": 2, "respond#3": 3}
    assert "/home" not in yaml.safe_dump(out) and token not in yaml.safe_dump(out)


def test_dataset_card_names_sft_data_outside_the_run_by_base_name(tmp_path):
    from guidealign.config import load_config
    from guidealign.hub.card import dataset_card

    wd = _run(tmp_path / "run", n=1)
    other = tmp_path / "alice" / "runB" / "respond"  # another run's responses, by its full path
    (wd / "sft").mkdir()
    (wd / "sft" / "_done.json").write_text(json.dumps({
        "fingerprint": "f", "rows": 8,
        "data": {"respond": {"shards": 1, "sha256": ["a"]}, str(other): {"shards": 1, "sha256": ["b"]}},
        "data_paths": {"respond": "respond", str(other): str(other)}}))
    card = dataset_card(repo_id="org/x", stage="respond", rows=4, files=1,
                        cfg=load_config(None, []), workdir=wd)
    assert str(tmp_path) not in card and "alice" not in card
    front = card.index("### Stages of the run")
    stages = yaml.safe_load(card[front:].split("```yaml\n", 1)[1].split("```", 1)[0])
    assert stages["sft"]["done"]["data_paths"] == {"respond": "respond", "respond#2": "respond"}


# --- 2. export of a stale input shard ------------------------------------------------------------

def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob("shard-*.jsonl"))
            for line in p.read_text().splitlines()]


def test_export_retires_the_export_of_a_stale_input_shard(tmp_path):
    from guidealign.hub.export import run_export
    from guidealign.shards import write_shard
    from guidealign.shards.layout import marker_path
    from guidealign.shards.stage import shard_fingerprint

    wd = _run(tmp_path / "run")
    out = wd / "export" / "respond"
    rep = run_export(None, wd, dataset="respond", progress=False)
    assert rep.written == [0, 1, 2] and len(_lines(out)) == 12
    # retrieve shard 1 redone: respond shard 1 (made from the old one) is stale
    write_shard(wd / "retrieve", 1, pa.table({"id": ["new"], "g": [["y"]]}),
                shard_fingerprint("retfp", wd / "prompts", 1))
    rep = run_export(None, wd, dataset="respond", progress=False)
    # `cat OUT/shard-*.jsonl` holds no row of the old respond shard 1
    assert sorted(r["id"] for r in _lines(out)) == sorted(f"p{i}-{j}" for i in (0, 2) for j in range(4))
    assert not marker_path(out, 1).exists() and not (out / "shard-00001.jsonl").exists()
    assert rep.stale == [1] and rep.uncommitted == [] and rep.retired == [1]
    assert "stale" in rep.summary() and "not committed" not in rep.summary()

    marker_path(wd / "respond", 2).unlink()  # respond shard 2 being redone: not committed
    r = CliRunner().invoke(cli, ["export", "respond", "-w", str(wd), "--no-progress"])
    assert r.exit_code != 0
    assert "1 input shard(s) of respond are stale" in r.output, r.output
    assert "1 input shard(s) of respond are not committed yet" in r.output, r.output
    assert [x["id"][:2] for x in _lines(out)] == ["p0"] * 4  # shard 2's old export gone too


# --- 3. verify --repair removes a dead writer's record temp file --------------------------------

def test_verify_repair_removes_a_dead_record_temp_on_a_passing_check(tmp_path):
    import os

    wd = _run(tmp_path / "run", n=2)
    dead = wd / "respond" / f".shard-00000.done.json.0123456789ab.{DEAD_PID}.tmp"
    live = wd / "respond" / f".shard-00001.done.json.0123456789ab.{os.getppid()}.tmp"
    dead.write_text("{")
    live.write_text("{")
    r = CliRunner().invoke(cli, ["verify", str(wd), "--repair", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["ok"] and out["removed"] == [dead.relative_to(wd).as_posix()]
    assert not dead.exists() and live.exists()  # a running process's temp is left alone
    r = CliRunner().invoke(cli, ["verify", str(wd), "--json"])  # the data untouched
    out = json.loads(r.output)
    assert r.exit_code == 0 and sum(d["shards_ok"] for d in out["dirs"]) == 6


# --- 4. verify counts temp-file orphans for their directory -----------------------------------

def test_verify_counts_temp_orphans_for_their_directory(tmp_path):
    from guidealign.shards.verify import verify_run

    wd = _run(tmp_path / "run", n=1)
    (wd / "respond" / f".shard-00000.parquet.{DEAD_PID}.tmp").write_bytes(b"x")
    (wd / "respond" / "quarantine").mkdir()
    (wd / "respond" / "quarantine" / f".shard-00000.parquet.{DEAD_PID}.tmp").write_bytes(b"x")
    (wd / f".junk.{DEAD_PID}.tmp").write_bytes(b"x")
    (wd / "sft").mkdir()
    (wd / "sft" / "_done.json").write_text(json.dumps({"fingerprint": "f"}))
    (wd / "sft" / ".tmp-model").mkdir()  # a dead SFT's build folder
    out = verify_run(wd).to_dict()
    assert not out["ok"] and out["counts"]["orphan"] == 4
    rows = {d["path"]: d["problems"] for d in out["dirs"]}
    assert rows["respond"] == 2 and rows["sft"] == 1 and rows["."] == 1
    assert rows["prompts"] == 0 and rows["retrieve"] == 0
    assert sum(rows.values()) == sum(out["counts"][k] for k in ("corrupt", "missing", "orphan"))
    # a build folder is no part of the model: the model is not retrained for it
    tmp = next(p for p in out["problems"] if p["path"] == "sft/.tmp-model")
    assert tmp["remove"] == ["sft/.tmp-model"]
    r = CliRunner().invoke(cli, ["verify", str(wd)])
    assert r.exit_code == 1 and "0/0" not in r.output


# --- 5. push WHAT with a folder in it is under WORKDIR ------------------------------------------

def test_push_what_with_a_folder_resolves_under_the_workdir(tmp_path, monkeypatch):
    from guidealign.hub.export import run_export
    from guidealign.hub.targets import PushError, resolve_target

    wd = _run(tmp_path / "run", n=1)
    run_export(None, wd, dataset="respond", progress=False)
    m = wd / "sft" / "model"
    m.mkdir(parents=True)
    (m / "config.json").write_text("{}")
    (wd / "sft" / "_done.json").write_text(json.dumps({"fingerprint": "f"}))
    here = tmp_path / "elsewhere"
    mine = here / "mine" / "model"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    monkeypatch.chdir(here)
    assert resolve_target(wd, "sft/model") == ("model", m)
    with pytest.raises(PushError, match=r"JSONL export.*guidealign push respond"):
        resolve_target(wd, "export/respond")  # found under WORKDIR; Parquet shards only
    assert resolve_target(wd, "mine/model") == ("model", Path("mine/model"))  # only here: a path of one's own
    assert resolve_target(wd, "./mine/model") == ("model", Path("mine/model"))
    assert resolve_target(wd, str(mine)) == ("model", mine)
    # the CLI gets past the target (to the offline check) from another directory
    r = CliRunner().invoke(cli, ["push", "sft/model", "org/m", "-w", str(wd)])
    assert r.exit_code != 0 and "neither" not in r.output and "HF_HUB_OFFLINE" in r.output, r.output
    r = CliRunner().invoke(cli, ["push", "sft/nothing", "org/m", "-w", str(wd)])
    assert r.exit_code != 0 and "does not exist" in r.output and str(wd) in r.output, r.output
