"""Review s35 (status and verify): a `_done.json` that is not UTF-8 or not an object is corrupt
for `verify` (which repairs it instead of crashing), the library counts done only with its
`_done.json`, and a stage whose `_stage.json` is damaged still has a row in `status`."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.shards import write_manifest, write_shard
from guidealign.shards.artifact import mark_done
from guidealign.shards.manifest import MANIFEST


def _verify(w: Path, *args):
    res = CliRunner().invoke(cli, ["verify", str(w), "--json", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        (res.output, repr(res.exception))
    return res.exit_code, json.loads(res.output)


def _library(w: Path) -> Path:
    """WORKDIR/library as the library stage leaves it: a one-shard dataset with a pairs file,
    then `_done.json` with the checksums of its files."""
    lib = w / "library"
    write_manifest(lib, stage="library", num_shards=1, fingerprint="f", input=str(w / "guidelines"))
    write_shard(lib, 0, pa.table({"guideline_id": ["g0", "g1"], "text": ["a", "b"]}), "f")
    (lib / "pairs").mkdir()
    (lib / "pairs" / "train.parquet").write_bytes(bytes(range(256)) * 4)
    mark_done(lib, fingerprint="f", rows=2, seconds=1.0)
    return lib


def _row(w: Path, stage: str) -> dict:
    from guidealign.status import collect

    return next(r for r in collect(w) if r["stage"] == stage)


# --- 2. verify: a _done.json that does not read as a record is corrupt, and repaired ----------

@pytest.mark.parametrize("content", [b'{"rows": 2, "fingerprint": "f\xff"}', b"[]", b"null"],
                         ids=["not-utf8", "list", "null"])
def test_verify_reports_a_damaged_done_record_as_corrupt_and_repair_removes_it(tmp_path, content):
    lib = _library(tmp_path)
    (lib / "_done.json").write_bytes(content)
    code, out = _verify(tmp_path)
    assert code == 1 and not out["ok"]
    assert [(p["kind"], p["path"]) for p in out["problems"]
            if p["kind"] in ("corrupt", "missing", "orphan")] == [("corrupt", "library/_done.json")]
    code, out = _verify(tmp_path, "--repair")
    assert out["removed"] == ["library/_done.json"]
    assert not (lib / "_done.json").exists()
    assert _row(tmp_path, "library")["shards_done"] == 0  # the next run builds it again


# --- 4. status: the library is done only with its _done.json ---------------------------------

def test_status_counts_the_library_done_only_with_its_done_record(tmp_path):
    lib = _library(tmp_path)
    row = _row(tmp_path, "library")
    assert (row["shards_done"], row["shards_total"], row["rows"]) == (1, 1, 2)
    (lib / "_done.json").unlink()  # as build_dir leaves it before the swap
    row = _row(tmp_path, "library")
    assert (row["shards_done"], row["shards_total"], row["rows"]) == (0, 1, 0)
    assert "_done.json" in row["note"]


def test_status_after_verify_repair_of_a_library_file(tmp_path):
    """The reviewer's reproduction: a flipped byte in a file of the library; `verify --repair`
    removes only its _done.json, and status must no longer say 1/1."""
    from guidealign.status import render

    lib = _library(tmp_path)
    data = bytearray((lib / "pairs" / "train.parquet").read_bytes())
    data[100] ^= 0x01
    (lib / "pairs" / "train.parquet").write_bytes(bytes(data))
    code, out = _verify(tmp_path, "--repair")
    assert code == 1 and out["removed"] == ["library/_done.json"]
    row = _row(tmp_path, "library")
    assert (row["shards_done"], row["shards_total"]) == (0, 1)
    assert "0/1" in render([row])


# --- 6. status: a stage whose _stage.json is damaged keeps its row ----------------------------

@pytest.mark.parametrize("damage", ['{"stage": "detect", "num_sh', "[]", None],
                         ids=["truncated", "not-a-manifest", "removed"])
def test_status_shows_a_stage_whose_manifest_is_damaged(tmp_path, damage):
    from guidealign.status import collect, render

    write_manifest(tmp_path / "prompts", stage="prompts", num_shards=1, fingerprint="p")
    write_shard(tmp_path / "prompts", 0, pa.table({"id": ["a"]}), "p")
    det = tmp_path / "detect"
    write_manifest(det, stage="detect", num_shards=4, fingerprint="d")
    for i in range(4):
        write_shard(det, i, pa.table({"id": [f"p{i}"]}), f"d{i}")
    if damage is None:
        (det / MANIFEST).unlink()  # e.g. `verify --repair` removed a damaged one
    else:
        (det / MANIFEST).write_text(damage)
    rows = {r["stage"]: r for r in collect(tmp_path)}
    assert list(rows) == ["prompts", "detect"]
    row = rows["detect"]
    # null in --json (a number or null for its consumers), "?" in the table
    assert row["shards_total"] is None and row["shards_done"] == 0
    assert "guidealign verify" in row["note"] and "4 shard marker(s)" in row["note"]
    if damage is not None:
        assert "damaged" in row["note"]
    text = render(list(rows.values()))
    assert "detect" in text and "guidealign verify" in text and "0/?" in text
    r = CliRunner().invoke(cli, ["status", str(tmp_path), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)[1]["stage"] == "detect"


def test_verify_and_status_of_a_directory_with_no_run_say_so_instead_of_ok(tmp_path):
    """`verify` of a mistyped directory printed "OK: 0 shard(s)" and exited 0, a clean check."""
    (tmp_path / "notes").mkdir()
    for args in ([], ["--json"]):
        res = CliRunner().invoke(cli, ["verify", str(tmp_path), *args])
        assert res.exit_code == 1 and "no dataset or artifact here; is it a run directory" in res.output
    for args in ([], ["--json"]):  # status exits 1 too: a script must not read it as a fine run
        res = CliRunner().invoke(cli, ["status", str(tmp_path), *args])
        assert res.exit_code == 1 and "no stage has written in" in res.output
    w = tmp_path / "run"  # a run: verify and status as before
    write_shard(w / "prompts", 0, pa.table({"id": ["a"], "prompt": ["p"]}), fingerprint="f")
    assert CliRunner().invoke(cli, ["verify", str(w)]).exit_code == 0
    res = CliRunner().invoke(cli, ["status", str(w)])
    assert res.exit_code == 0 and "no stage has written" not in res.output and "prompts" in res.output


def test_status_show_and_verify_take_the_run_directory_as_the_stages_do(tmp_path):
    """The stages take the run directory as -w/--workdir; status, show and verify took it only as
    an argument, so `guidealign status -w RUN` (as the stages are called) was a usage error."""
    w = tmp_path / "run"
    write_shard(w / "prompts", 0, pa.table({"id": ["a"], "prompt": ["p"]}), fingerprint="f")
    for flag in ("-w", "--workdir"):
        res = CliRunner().invoke(cli, ["status", flag, str(w)])
        assert res.exit_code == 0 and "prompts" in res.output, res.output
        assert CliRunner().invoke(cli, ["verify", flag, str(w)]).exit_code == 0
        res = CliRunner().invoke(cli, ["show", flag, str(w), "--stage", "prompts"])
        assert "No such option" not in res.output
    assert CliRunner().invoke(cli, ["status", str(w), "-w", str(w)]).exit_code == 0  # the same, twice
    res = CliRunner().invoke(cli, ["status", str(w), "-w", str(tmp_path)])
    assert res.exit_code == 2 and "two run directories" in res.output
    res = CliRunner().invoke(cli, ["status"])
    assert res.exit_code == 2 and "give WORKDIR or -w/--workdir" in res.output


def test_status_shows_an_artifact_built_from_changed_input_as_stale(tmp_path):
    """After the guidelines were written again, status still showed the library (and the
    retriever and index built on it) as done, though the next run builds them again; now each
    is stale, and current again once it is built from what is there now."""
    from synthetic import write_guideline_shards

    from guidealign.config import load_config
    from guidealign.retrieval.library import run_library

    def rows(word):
        return [{"id": f"p{i}", "prompt": f"prompt {i}", "risky": bool(i % 2),
                 "guidelines": [{"title": f"T{i}", "text": f"Rule {i} about {word} things"}]}
                for i in range(6)]

    cfg = load_config(None, ["library.use_gpu=false", "library.heldout_fraction=0"])
    write_guideline_shards(tmp_path / "guidelines", rows("careful"), shard_rows=3)
    run_library(cfg, tmp_path, progress=False)
    version = json.loads((tmp_path / "library" / "_done.json").read_text())["version"]
    for name in ("retriever", "index"):
        mark_done(tmp_path / name, fingerprint="f", rows=1, seconds=1.0, library_version=version)
        assert (_row(tmp_path, name)["shards_done"], _row(tmp_path, name).get("note")) == (1, None)
    assert _row(tmp_path, "library")["shards_done"] == 1

    write_guideline_shards(tmp_path / "guidelines", rows("other"), shard_rows=3)  # redone
    row = _row(tmp_path, "library")
    assert (row["shards_done"], row["shards_stale"], row["rows"]) == (0, 1, 0)
    assert "built from other guidelines shards" in row["note"]

    run_library(cfg, tmp_path, progress=False)  # built again: current, and a new version
    assert (_row(tmp_path, "library")["shards_done"], _row(tmp_path, "library").get("note")) == (1, None)
    for name in ("retriever", "index"):
        row = _row(tmp_path, name)
        assert (row["shards_done"], row["shards_stale"]) == (0, 1)
        assert "built from another library" in row["note"]


def test_status_names_a_failed_rank_and_exits_1(tmp_path):
    """A failed rank showed only as "2/3" shards, and status exited 0."""
    from guidealign.shards.failure import clear_failed, mark_failed

    w = tmp_path / "run"
    write_shard(w / "prompts", 0, pa.table({"id": ["a"], "prompt": ["p"]}), fingerprint="f")
    assert CliRunner().invoke(cli, ["status", str(w)]).exit_code == 0
    mark_failed(w, 1, "Traceback ...\nValueError: the engine ran out of memory", stage="detect",
                world_size=2)
    for args in ([], ["--json"]):
        res = CliRunner().invoke(cli, ["status", str(w), *args])
        assert res.exit_code == 1
        assert "FAILED: rank 1 of 2 failed in detect on" in res.output
        assert "ValueError: the engine ran out of memory" in res.output
    clear_failed(w, 1)  # the rank ran again
    assert CliRunner().invoke(cli, ["status", str(w)]).exit_code == 0


def test_show_of_a_stage_without_responses_says_so(tmp_path):
    """`show --stage guidelines` printed "retrieved guidelines: (none)" and "response: (empty)"
    for every prompt, though the stage holds guidelines."""
    w = tmp_path / "run"
    write_shard(w / "guidelines", 0, pa.table({"id": ["a"], "prompt": ["p"], "guidelines": [["g"]]}),
                fingerprint="f")
    res = CliRunner().invoke(cli, ["show", str(w), "--stage", "guidelines"])
    assert res.exit_code == 1 and "holds no responses" in res.output and "guidealign export guidelines" in res.output
    assert "(empty)" not in res.output


def test_export_columns_may_have_spaces_after_their_commas(tmp_path):
    """`export --columns "id, prompt"` was refused: " prompt" is no column."""
    import json as _json

    w = tmp_path / "run"
    write_shard(w / "prompts", 0, pa.table({"id": ["a"], "prompt": ["p"], "source": ["s"]}), fingerprint="f")
    from guidealign.shards import write_manifest

    write_manifest(w / "prompts", stage="ingest", num_shards=1, fingerprint="f", input="x")
    res = CliRunner().invoke(cli, ["export", "prompts", "-w", str(w), "--columns", "id, prompt", "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = [_json.loads(ln) for ln in (w / "export" / "prompts" / "shard-00000.jsonl").read_text().splitlines()]
    assert rows == [{"id": "a", "prompt": "p"}]


def test_a_failure_marker_of_a_stage_finished_since_is_not_reported(tmp_path):
    """A rank left out of a later run's layout (fewer ranks) never clears its marker: status
    kept reporting it, and exiting 1, after that run finished the stage."""
    import os
    import time

    from guidealign.shards.failure import mark_failed
    from guidealign.shards import write_manifest

    w = tmp_path / "run"
    marker = mark_failed(w, 1, "ValueError: out of memory", stage="ingest", world_size=2)
    old = time.time() - 60
    os.utime(marker, (old, old))
    data = __import__("json").loads(marker.read_text())
    data["created"] = old
    marker.write_text(__import__("json").dumps(data))
    write_manifest(w / "prompts", stage="ingest", num_shards=1, fingerprint="f", input="x")
    write_shard(w / "prompts", 0, pa.table({"id": ["a"], "prompt": ["p"]}), fingerprint="f")
    res = CliRunner().invoke(cli, ["status", str(w)])
    assert res.exit_code == 0 and "FAILED" not in res.output
    (w / "prompts" / "shard-00000.done.json").unlink()  # not complete: the failure still counts
    res = CliRunner().invoke(cli, ["status", str(w)])
    assert res.exit_code == 1 and "FAILED: rank 1 of 2 failed in ingest" in res.output


def test_a_failure_marker_of_a_whole_run_or_a_child_stage_finished_since_is_not_reported(tmp_path):
    """Markers of `run` (rank 7 of 8 out of memory, the rerun on 4 ranks finished) and of a stage
    run in a child process ("run_ingest") were reported FAILED, exit 1, for ever."""
    import json
    import time

    from guidealign.shards import write_manifest
    from guidealign.shards.failure import mark_failed

    w = tmp_path / "run"
    old = time.time() - 60
    for rank, stage in ((7, "run"), (6, "run_ingest")):
        marker = mark_failed(w, rank, "CUDA out of memory", stage=stage, world_size=8)
        data = json.loads(marker.read_text())
        data["created"] = old
        marker.write_text(json.dumps(data))
    write_manifest(w / "prompts", stage="ingest", num_shards=1, fingerprint="f", input="x")
    write_shard(w / "prompts", 0, pa.table({"id": ["a"], "prompt": ["p"]}), fingerprint="f")
    res = CliRunner().invoke(cli, ["status", str(w)])
    assert res.exit_code == 1 and "rank 7 of 8 failed in run" in res.output  # no run finished yet
    assert "rank 6 of 8" not in res.output  # its stage (ingest) is complete since
    (w / "run.json").write_text(json.dumps({"stages": ["ingest"], "rank": 0, "world_size": 4}))
    res = CliRunner().invoke(cli, ["status", str(w)])
    assert res.exit_code == 0 and "FAILED" not in res.output, res.output


def test_status_names_the_stage_a_failed_run_was_in(tmp_path):
    """A `run` rank's failure marker names the stage it failed in, beside "run" (in a SLURM
    array every failed rank said only "failed in run")."""
    from guidealign.shards.failure import guard, set_step

    w = tmp_path / "run"
    with pytest.raises(ValueError):
        with guard(w, 3, 8, stage="run"):
            set_step("detect")
            raise ValueError("CUDA out of memory")
    res = CliRunner().invoke(cli, ["status", str(w)])
    assert res.exit_code == 1 and "rank 3 of 8 failed in run (in detect)" in res.output, res.output


def test_status_says_a_model_trained_on_responses_changed_since_is_stale(tmp_path):
    """sft has no manifest, so its recorded training data (the respond shards' checksums in
    _done.json) went unchecked: status showed the model done after respond was redone."""
    from guidealign.shards.marker import read_marker

    w = tmp_path / "run"
    write_manifest(w / "respond", stage="respond", num_shards=2, fingerprint="f", input="x")
    for i in range(2):
        write_shard(w / "respond", i, pa.table({"id": [f"a{i}"], "response": ["r"]}), fingerprint="f")
    data = {"respond": {"shards": 2, "sha256": [read_marker(w / "respond", i).sha256 for i in range(2)]}}
    (w / "sft" / "model").mkdir(parents=True)
    mark_done(w / "sft", fingerprint="sft-fp", rows=2, seconds=1.0, data=data, data_paths={"respond": "respond"})
    res = CliRunner().invoke(cli, ["status", str(w)])
    assert res.exit_code == 0 and "trained on other" not in res.output, res.output
    write_shard(w / "respond", 1, pa.table({"id": ["a1"], "response": ["another answer"]}), fingerprint="f")
    res = CliRunner().invoke(cli, ["status", str(w)])
    assert "trained on other respond shards than those there now" in res.output, res.output


def test_status_notes_a_done_stage_whose_input_has_stale_or_missing_shards(tmp_path):
    """After detect was redone, guidelines showed stale shards while the library and the
    artifacts after it still showed done, with nothing said: a note names the input now."""
    w = tmp_path / "run"
    write_manifest(w / "guidelines", stage="guidelines", num_shards=2, fingerprint="f", input="x")
    write_shard(w / "guidelines", 0, pa.table({"id": ["a"]}), fingerprint="f")
    write_shard(w / "guidelines", 1, pa.table({"id": ["b"]}), fingerprint="f")
    write_manifest(w / "library", stage="library", num_shards=1, fingerprint="lib", input="x")
    write_shard(w / "library", 0, pa.table({"guideline_id": ["g"]}), fingerprint="lib")
    mark_done(w / "library", fingerprint="lib", rows=1, seconds=1.0)
    (w / "retriever").mkdir()
    mark_done(w / "retriever", fingerprint="r", rows=1, seconds=1.0)
    res = CliRunner().invoke(cli, ["status", str(w)])
    assert "which has stale or missing shards" not in res.output, res.output
    (w / "guidelines" / "shard-00001.done.json").unlink()  # a shard missing again (being redone)
    res = CliRunner().invoke(cli, ["status", str(w)])
    assert "library: made from guidelines which has stale or missing shards now" in res.output, res.output
    assert "retriever: made from library, itself made from guidelines, which has stale" in res.output
