"""Review s49 (CLI): ingest --into another stage's dataset, show on a damaged shard, a mapping
--set after a dotted one, export into the run directory, a model-only push in `run`."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.config import Whole, load_config, parse_overrides
from guidealign.shards import committed, read_manifest
from synthetic import write_respond_shards


def _prompts_file(tmp_path):
    f = tmp_path / "tiny.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"a new question {k}"}) + "\n" for k in range(3)))
    return f


# --- 1. ingest --into a dataset of another stage ----------------------------------------------

def test_ingest_into_a_respond_dataset_is_refused_and_leaves_it(tmp_path):
    run = tmp_path / "run"
    dst = write_respond_shards(run)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    r = CliRunner().invoke(cli, ["ingest", str(_prompts_file(tmp_path)), "-w", str(run),
                                 "--into", "respond", "--no-progress"])
    assert r.exit_code == 2, r.output
    assert "--into respond" in r.output and "'respond'" in r.output and "overwrite" in r.output
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before


def test_ingest_into_an_artifact_or_a_shards_only_dataset_of_another_stage_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "retriever").mkdir(parents=True)
    (run / "retriever" / "_done.json").write_text("{}")
    dst = write_respond_shards(run)
    (dst / "_stage.json").unlink()  # a respond killed before its manifest: shards only
    for into in ("retriever", "respond"):
        r = CliRunner().invoke(cli, ["ingest", str(_prompts_file(tmp_path)), "-w", str(run),
                                     "--into", into, "--no-progress"])
        assert r.exit_code == 2 and f"--into {into}" in r.output, r.output
    assert committed(dst) == [0]


def test_ingest_again_into_an_ingested_dataset_still_works(tmp_path):
    run = tmp_path / "run"
    src = _prompts_file(tmp_path)
    for into in ("prompts", "prompts", "mine", "mine"):
        r = CliRunner().invoke(cli, ["ingest", str(src), "-w", str(run), "--into", into, "--no-progress"])
        assert r.exit_code == 0, r.output
        assert read_manifest(run / into)["rows"] == 3
    (run / "mine" / "_stage.json").unlink()  # an ingest killed before its manifest
    r = CliRunner().invoke(cli, ["ingest", str(src), "-w", str(run), "--into", "mine", "--no-progress"])
    assert r.exit_code == 0, r.output


# --- 2. show on a damaged shard -----------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "scramble"])
def test_show_on_a_damaged_shard_is_one_line_pointing_at_verify(tmp_path, damage):
    dst = write_respond_shards(tmp_path, rows=200, shards=2)
    f = dst / "shard-00001.parquet"
    b = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(b[: len(b) // 2])
    else:  # the footer intact, the data pages before it garbled
        end = len(b) - 8 - int.from_bytes(b[-8:-4], "little")
        f.write_bytes(b[:4] + b"\xa5" * (end - 4) + b[end:])
    r = CliRunner().invoke(cli, ["show", str(tmp_path), "--shard", "1"])
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    assert f"guidealign verify {tmp_path} --repair" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


# --- 3. a mapping --set after dotted ones ---------------------------------------------------------

def test_a_section_mapping_override_keeps_earlier_dotted_overrides():
    cfg = load_config(None, ["engine.model=/my/model", "engine={dtype: float32}"])
    assert (cfg.engine.model, cfg.engine.dtype) == ("/my/model", "float32")
    cfg = load_config(None, ["engine.dtype=float16", "engine.model=/a", "engine={dtype: float32}"])
    assert (cfg.engine.model, cfg.engine.dtype) == ("/a", "float32")  # the later value wins its key


def test_a_free_mapping_override_merges_with_earlier_overrides_and_stays_whole():
    got = parse_overrides(["respond.engine.dtype=float32", "respond.engine={model: /m}"])
    assert isinstance(got["respond"]["engine"], Whole)
    assert got["respond"]["engine"] == {"dtype": "float32", "model": "/m"}
    assert parse_overrides(["respond.engine.dtype=float32", "respond.engine={}"])["respond"]["engine"] == {}
    # a whole mapping after another whole one replaces it, as written (a wrapper's default
    # `--set 'respond.engine={...}'` and the user's own after it: the user's, alone)
    got = parse_overrides(["respond.engine={model: /m/llama, chat_template: llama-2}", "respond.engine={model: /m/qwen}"])
    assert got["respond"]["engine"] == {"model": "/m/qwen"}
    got = parse_overrides(["sft.trainer_args={fsdp: full_shard}", "sft.trainer_args={deepspeed: ds.json}"])
    assert got["sft"]["trainer_args"] == {"deepspeed": "ds.json"}


# --- 4. export into the run directory ----------------------------------------------------------

def test_export_into_the_run_directory_or_another_run_is_refused(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    write_respond_shards(run)
    write_respond_shards(other)
    before = sorted(p.name for p in run.iterdir())
    for out in (run, other):
        r = CliRunner().invoke(cli, ["export", "respond", "-w", str(run), "-o", str(out), "--no-progress"])
        assert r.exit_code == 1 and "export to a folder of its own" in r.output, r.output
        assert not list(out.glob("shard-*.jsonl")) and read_manifest(out) is None
    assert sorted(p.name for p in run.iterdir() if p.name not in ("_failed", "_ranks")) == before
    r = CliRunner().invoke(cli, ["export", "respond", "-w", str(run), "-o", str(tmp_path / "new"), "--no-progress"])
    assert r.exit_code == 0, r.output
    # the default folder, and one beside earlier exports, are fine
    r = CliRunner().invoke(cli, ["export", "respond", "-w", str(run), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["export", "respond", "-w", str(run), "-o", str(run / "export" / "b"),
                                 "--no-progress"])
    assert r.exit_code == 0, r.output


# --- 5. push.model_repo_id alone --------------------------------------------------------------

def test_run_stages_take_push_when_only_the_model_repo_is_set():
    from guidealign.stages import run_stages

    assert "push" in [s.name for s in run_stages(load_config(None, ["push.model_repo_id=org/m"]))]
    assert "push" not in [s.name for s in run_stages(load_config(None, []))]


def test_run_with_only_a_model_repo_runs_push(tmp_path, monkeypatch):
    """push.model_repo_id alone was skipped without a word (run pushed only with push.repo_id);
    now push is among run's stages and pushes the model alone (tests/test_push.py)."""
    import guidealign.pipeline as pipeline

    ran = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: ran.append(k))
    r = CliRunner().invoke(cli, ["run", "-w", str(tmp_path), "--no-check", "--set", "push.model_repo_id=org/m"])
    assert r.exit_code == 0 and ran, r.output
