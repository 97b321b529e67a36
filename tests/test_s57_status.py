"""s57 review of the commands that say where a run stands (`guidealign status`, `show`, `export`,
`verify`), run as an operator of a long run would: a run half done, a stage rerun, damaged files."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.shards import write_manifest, write_shard
from guidealign.shards.manifest import MANIFEST, remove_manifest


def _ingest(w: Path, tmp: Path, n: int = 6) -> None:
    """WORKDIR/prompts as `guidealign ingest` writes it: ``n`` prompts in shards of 2."""
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"How do I bake bread number {i}?"}) + "\n" for i in range(n)))
    res = CliRunner().invoke(cli, ["ingest", str(src), "-w", str(w), "--set", "ingest.shard_rows=2",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output


def _detect(w: Path) -> None:
    """WORKDIR/detect made from every prompt shard (the rows do not matter here)."""
    shards = json.loads((w / "prompts" / MANIFEST).read_text())["num_shards"]
    write_manifest(w / "detect", stage="detect", num_shards=shards, fingerprint="d", input=str(w / "prompts"))
    for i in range(shards):
        write_shard(w / "detect", i, pa.table({"id": [f"p{i}"], "risky": [True]}), fingerprint="d")


def _status(w: Path, *args) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["status", str(w), *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        (res.output, repr(res.exception))
    return res.exit_code, res.output


# --- 1. status crashed when an input stage had no readable _stage.json -----------------------

def test_status_of_a_run_whose_prompts_are_being_ingested_again_does_not_crash(tmp_path):
    """Ingest drops the manifest before it writes the prompts again (a rerun with more input
    files, killed or still running), and `verify --repair` removes a damaged one: the prompts row
    has no shard total then, and status died with a TypeError as soon as detect was there too."""
    w = tmp_path / "run"
    _ingest(w, tmp_path)
    _detect(w)
    code, out = _status(w)
    assert code == 0 and "which has stale or missing shards" not in out, out
    remove_manifest(w / "prompts")  # what `guidealign ingest` does first when it writes them again
    code, out = _status(w)
    assert code == 0, out
    assert "0/?" in out and "no _stage.json" in out, out
    # detect is current only for the prompts it was made from: said, as for a stale input
    assert "detect: made from prompts which has stale or missing shards now" in out, out
    code, out = _status(w, "--json")
    rows = {r["stage"]: r for r in json.loads(out)}
    assert code == 0 and rows["prompts"]["shards_total"] is None and rows["detect"]["shards_done"] == 3
    # a damaged one (a torn write, a flipped byte), as `verify` reports it
    (w / "prompts" / MANIFEST).write_text('{"stage": "prompts", "num_sh')
    code, out = _status(w)
    assert code == 0 and "_stage.json is damaged" in out, out


# --- 2. a failed rank of eval or export was reported for ever --------------------------------

def _failed_a_minute_ago(w: Path, rank: int, stage: str, world_size: int) -> None:
    import os
    import time

    from guidealign.shards.failure import mark_failed

    marker = mark_failed(w, rank, "CUDA out of memory", stage=stage, world_size=world_size)
    old = time.time() - 60
    data = json.loads(marker.read_text())
    data["created"] = old
    marker.write_text(json.dumps(data))
    os.utime(marker, (old, old))


def _eval_answers(w: Path, bench: str, shards_done: int) -> Path:
    """WORKDIR/eval/BENCH as eval leaves it while it answers: its own datasets inside (the
    benchmark's prompts, the answers), its _done.json only once judged and reported."""
    sub = w / "eval" / bench
    write_manifest(sub / "prompts", stage="prompts", num_shards=1, fingerprint="p")
    write_shard(sub / "prompts", 0, pa.table({"id": ["a", "b"], "prompt": ["q", "r"]}), fingerprint="p")
    write_manifest(sub / "respond_guided", stage="respond", num_shards=2, fingerprint="e")
    for i in range(shards_done):
        write_shard(sub / "respond_guided", i, pa.table({"id": ["ab"[i]], "response": ["r"]}), fingerprint="e")
    return sub


def test_a_failed_rank_of_eval_or_export_finished_since_by_another_layout_is_not_reported(tmp_path):
    """Eval and export write one folder per benchmark (eval/hhh) or exported dataset
    (export/respond), so no row is named "eval" or "export": a rank that failed in them and
    was left out of the rerun that finished them (fewer ranks) was reported FAILED, exit 1, for
    ever, while the map stages' are not once a later commit completes them."""
    from guidealign.shards.artifact import mark_done

    w = tmp_path / "run"
    _failed_a_minute_ago(w, 1, "eval", 2)
    _failed_a_minute_ago(w, 3, "export", 4)
    hhh = _eval_answers(w, "hhh", 1)
    out = w / "export" / "respond"
    write_manifest(out, stage="export", num_shards=1, fingerprint="x")
    write_shard(out, 0, pa.table({"id": ["a"]}), fingerprint="x")
    code, text = _status(w)
    # eval/hhh is not complete: its failure still counts; export's dataset is complete since
    assert code == 1 and "rank 1 of 2 failed in eval" in text, text
    assert "failed in export" not in text, text
    write_shard(hhh / "respond_guided", 1, pa.table({"id": ["b"], "response": ["r"]}), fingerprint="e")
    mark_done(hhh, fingerprint="h", rows=2, seconds=1.0)  # judged and reported
    code, text = _status(w)
    assert code == 0 and "FAILED" not in text, text
    # another benchmark still answering (eval/vicuna, no _done.json): the failure may be its
    _eval_answers(w, "vicuna", 1)
    code, text = _status(w)
    assert code == 1 and "rank 1 of 2 failed in eval" in text, text


# --- 3. show and export of an eval sent the user to run a stage that had run -----------------

def test_show_and_export_of_an_eval_folder_name_the_datasets_inside_it(tmp_path):
    """An eval writes its answers under eval/<benchmark>/ (respond_guided, respond_unguided, its
    prompts), which show's --help called "eval/<benchmark>": `show --stage eval/hhh` said "has
    no committed shard of its current config yet" and `export eval/hhh` "is not a sharded
    dataset: run the stage that writes it first", of an eval that had finished."""
    from guidealign.shards.artifact import mark_done

    w = tmp_path / "run"
    hhh = _eval_answers(w, "hhh", 2)
    mark_done(hhh, fingerprint="h", rows=2, seconds=1.0)
    for stage in ("eval/hhh", "eval"):
        res = CliRunner().invoke(cli, ["show", str(w), "--stage", stage])
        assert res.exit_code == 1, res.output
        assert "holds datasets, not one" in res.output and "eval/hhh/respond_guided" in res.output, res.output
        assert "current config" not in res.output, res.output
    res = CliRunner().invoke(cli, ["export", "eval/hhh", "-w", str(w), "--no-progress"])
    assert res.exit_code == 1 and "eval/hhh/respond_guided" in res.output, res.output
    assert "run the stage that writes it first" not in res.output and not (w / "export").exists(), res.output
    # a misspelt dataset of the benchmark: the ones beside it are named
    res = CliRunner().invoke(cli, ["show", str(w), "--stage", "eval/hhh/respond_guidd"])
    assert res.exit_code == 1 and "does not exist" in res.output, res.output
    assert "eval/hhh/respond_guided" in res.output.split("does not exist", 1)[1], res.output
    # the name it gives is one show reads; and --help names it so
    res = CliRunner().invoke(cli, ["show", str(w), "--stage", "eval/hhh/respond_guided", "-n", "1"])
    assert res.exit_code == 0 and "- response" in res.output, res.output
    res = CliRunner().invoke(cli, ["show", "--help"])
    assert "eval/<benchmark>/respond_guided" in " ".join(res.output.split()), res.output


# --- 4. an eval still answering had no row in status ------------------------------------------

def test_status_shows_an_eval_still_answering_as_not_done(tmp_path):
    """eval/<benchmark> holds no _stage.json of its own and gets its _done.json last: until then
    status showed no row for it (a run with only an eval going said "no stage has written"), and
    once done, 1/1."""
    from guidealign.shards.artifact import mark_done

    w = tmp_path / "run"
    hhh = _eval_answers(w, "hhh", 1)
    code, out = _status(w, "--json")
    rows = {r["stage"]: r for r in json.loads(out)}
    assert code == 0 and "eval/hhh" in rows, out
    assert (rows["eval/hhh"]["shards_done"], rows["eval/hhh"]["shards_total"]) == (0, 1)
    assert "_done.json" in rows["eval/hhh"]["note"]
    code, out = _status(w)
    assert code == 0 and "eval/hhh" in out and "0/1" in out, out
    mark_done(hhh, fingerprint="h", rows=2, seconds=1.0)
    code, out = _status(w, "--json")
    row = next(r for r in json.loads(out) if r["stage"] == "eval/hhh")
    assert (row["shards_done"], row["shards_total"], row["note"]) == (1, 1, None), row


# --- 5. show --shard of a shard with no rows printed an empty line, exit 0 --------------------

def test_show_of_a_shard_asked_for_that_holds_no_rows_says_so(tmp_path):
    """A shard whose prompts were all set aside (quarantined) holds no rows: `show --shard 1`
    printed an empty line and exited 0, as if it had shown it."""
    from synthetic import write_respond_shards

    dst = write_respond_shards(tmp_path, shards=2, rows=2)
    empty = pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string()),
                      "response": pa.array([], pa.string())})
    quarantine = pa.table({"id": ["p1-0"], "prompt": [""], "reason": ["empty prompt"]})
    write_shard(dst, 1, empty, "f1", quarantine=quarantine)
    res = CliRunner().invoke(cli, ["show", str(tmp_path), "--shard", "1"])
    assert res.exit_code == 1 and res.output.strip(), res.output
    assert "shard 1 holds no rows" in res.output and "1 row(s) were set aside" in res.output, res.output
    assert "shards with rows: 0" in res.output, res.output
    res = CliRunner().invoke(cli, ["show", str(tmp_path), "--shard", "0", "-n", "1"])
    assert res.exit_code == 0 and "answer 0-0" in res.output, res.output


# --- 6. verify said OK of a dataset with stale shards, where status said 2/4 -------------------

def _upper(table: pa.Table, index: int):
    import pyarrow.compute as pc

    return table.set_column(1, "prompt", pc.utf8_upper(table["prompt"])), None


def test_verify_counts_stale_shards_as_not_complete_as_status_does(tmp_path):
    """A map stage rerun under another config got through rank 0's shards of two: status shows
    2/4 (2 stale), while verify said "OK: ... match their records" with nothing pending, read
    as a finished run. The stale shards are intact (not failing), but pending, named."""
    from guidealign.shards import map_shards
    from synthetic import write_prompt_shards

    w = tmp_path / "run"
    write_prompt_shards(w / "prompts", [{"id": f"p{i}", "prompt": f"question {i}"} for i in range(8)], 2)
    map_shards("upper", w / "prompts", w / "upper", "v1", fn=_upper, progress=False)
    res = CliRunner().invoke(cli, ["verify", str(w)])
    assert res.exit_code == 0 and "not complete" not in res.output, res.output
    map_shards("upper", w / "prompts", w / "upper", "v2", fn=_upper, rank=0, world_size=2, progress=False)
    code, out = _status(w, "--json")
    row = next(r for r in json.loads(out) if r["stage"] == "upper")
    assert (row["shards_done"], row["shards_stale"]) == (2, 2), row
    res = CliRunner().invoke(cli, ["verify", str(w), "--json"])
    out = json.loads(res.output)
    assert res.exit_code == 0 and out["ok"], out  # intact: nothing for --repair to remove
    pending = [p for p in out["problems"] if p["kind"] == "pending"]
    assert [p["path"] for p in pending] == ["upper"], pending
    assert "2 of 4" in pending[0]["detail"] and "stale" in pending[0]["detail"], pending
    assert pending[0]["remove"] == []
    res = CliRunner().invoke(cli, ["verify", str(w)])
    assert res.exit_code == 0 and "1 dataset(s) not complete yet" in res.output, res.output
    # a dataset with shards both missing and stale is one dataset not complete, not two
    (w / "upper" / "shard-00000.done.json").unlink()
    (w / "upper" / "shard-00000.parquet").unlink()
    res = CliRunner().invoke(cli, ["verify", str(w)])
    assert res.exit_code == 0 and "1 dataset(s) not complete yet" in res.output, res.output
