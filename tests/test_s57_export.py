"""s57 review of `guidealign export` and the `status` numbers beside it, run as an operator of a
long run would: export a library status does not count done, export with a damaged input shard,
read ingest's numbers in status, and a marker with a field of the wrong type."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.shards import read_marker, write_manifest, write_shard
from guidealign.shards.artifact import mark_done
from guidealign.shards.layout import marker_path, shard_path


def _invoke(*args) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        (res.output, repr(res.exception))
    return res.exit_code, res.output


def _ingest(w: Path, tmp: Path, rows: list, shard_rows: int = 2) -> None:
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out = _invoke("ingest", src, "-w", w, "--set", f"ingest.shard_rows={shard_rows}", "--no-progress")
    assert code == 0, out


def _prompts(w: Path, tmp: Path) -> None:
    """WORKDIR/prompts: 6 prompts in 3 shards of 2."""
    _ingest(w, tmp, [{"prompt": f"How do I bake bread number {i}?"} for i in range(6)])


def _library(w: Path, done: bool) -> Path:
    """WORKDIR/library as the library stage leaves it (``done``) or as a killed build, or
    `verify --repair`, leaves it: its shards committed, no _done.json."""
    lib = w / "library"
    write_manifest(lib, stage="library", num_shards=1, fingerprint="f", input=str(w / "guidelines"))
    write_shard(lib, 0, pa.table({"guideline_id": ["g0", "g1"], "text": ["a", "b"]}), "f")
    if done:
        mark_done(lib, fingerprint="f", rows=2, seconds=1.0)
    return lib


def _status_rows(w: Path) -> dict:
    code, out = _invoke("status", w, "--json")
    assert code == 0, out
    return {r["stage"]: r for r in json.loads(out)}


# --- 1. export took a library that status calls not done ---------------------------------------

def test_export_refuses_a_library_that_status_does_not_count_done(tmp_path):
    _library(tmp_path, done=False)
    assert _status_rows(tmp_path)["library"]["shards_done"] == 0
    code, out = _invoke("export", "library", "-w", tmp_path, "--no-progress")
    assert code != 0 and "_done.json" in out and "not done" in out, out
    assert not list((tmp_path / "export").glob("*/shard-*.jsonl"))


def test_export_takes_a_library_with_its_done_record(tmp_path):
    _library(tmp_path, done=True)
    code, out = _invoke("export", "library", "-w", tmp_path, "--no-progress")
    assert code == 0, out
    lines = (tmp_path / "export" / "library" / "shard-00000.jsonl").read_text().splitlines()
    assert [json.loads(x)["guideline_id"] for x in lines] == ["g0", "g1"]


# --- 2. export's report called a damaged input shard "not committed yet" -----------------------

def test_export_report_calls_a_cut_short_input_shard_damaged_and_points_to_verify_repair(tmp_path):
    from guidealign.config import load_config
    from guidealign.hub.export import run_export

    _prompts(tmp_path, tmp_path)
    p = shard_path(tmp_path / "prompts", 2)
    p.write_bytes(p.read_bytes()[:-10])
    rep = run_export(load_config(None, []), tmp_path, dataset="prompts", progress=False)
    assert (rep.written, rep.pending, rep.uncommitted, rep.stale) == ([0, 1], [2], [], [])
    line = rep.summary()
    assert "not committed yet" not in line, line
    assert "[2] are damaged" in line and f"guidealign verify {tmp_path} --repair" in line, line
    code, out = _invoke("export", "prompts", "-w", tmp_path, "--no-progress")
    assert code != 0 and "not committed yet" not in out and "damaged" in out, out


def test_export_does_not_hand_on_an_input_shard_whose_bytes_differ_from_its_marker(tmp_path):
    """A flipped byte keeps the file's size: export read it as it was (rows changed under a
    marker that commits others, or a pyarrow error for the whole export)."""
    from guidealign.config import load_config
    from guidealign.hub.export import run_export

    _prompts(tmp_path, tmp_path)
    p = shard_path(tmp_path / "prompts", 2)
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0xFF
    p.write_bytes(bytes(data))
    rep = run_export(load_config(None, []), tmp_path, dataset="prompts", progress=False)
    assert (rep.written, rep.damaged, rep.uncommitted) == ([0, 1], [2], [])
    assert not (tmp_path / "export" / "prompts" / "shard-00002.jsonl").exists()
    assert f"guidealign verify {tmp_path} --repair" in rep.summary()


def test_the_export_command_calls_a_shard_with_changed_bytes_damaged_not_uncommitted(tmp_path):
    """The command's own error (after the report line) found damage by file size only."""
    _prompts(tmp_path, tmp_path)
    p = shard_path(tmp_path / "prompts", 2)
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0xFF
    p.write_bytes(bytes(data))
    code, out = _invoke("export", "prompts", "-w", tmp_path, "--no-progress")
    assert code != 0 and "are damaged" in out and "verify" in out, out
    assert "not committed yet" not in out, out


# --- 3. status did not show ingest's dropped duplicates ----------------------------------------

def test_status_shows_ingest_duplicates_so_rows_quarantined_and_duplicates_add_up(tmp_path):
    w = tmp_path / "run"
    rows = [{"prompt": f"How do I bake bread number {i % 20}?"} for i in range(21)]  # 1 duplicate
    rows += [{"prompt": ""}, {"nope": 1}]  # 2 quarantined
    _ingest(w, tmp_path, rows, shard_rows=8)
    r = _status_rows(w)["prompts"]
    assert (r["rows"], r["quarantined"], r["duplicates"]) == (20, 2, 1)
    assert r["rows"] + r["quarantined"] + r["duplicates"] == len(rows)
    assert json.loads((w / "prompts" / "_stage.json").read_text())["duplicates"] == r["duplicates"]
    code, out = _invoke("status", w)
    assert code == 0, out
    header = next(x for x in out.splitlines() if "stage" in x).split()
    line = next(x for x in out.splitlines() if x.split()[:1] == ["prompts"]).split()
    assert "duplicates" in header, out
    assert line[header.index("duplicates")] == "1", out


def test_status_rows_of_other_stages_carry_no_duplicates(tmp_path):
    write_manifest(tmp_path / "detect", stage="detect", num_shards=1, fingerprint="d")
    write_shard(tmp_path / "detect", 0, pa.table({"id": ["a"]}), "d")
    assert _status_rows(tmp_path)["detect"]["duplicates"] is None
    code, out = _invoke("status", tmp_path)
    assert code == 0 and "duplicates" not in out, out


# --- 4. a marker whose optional field has the wrong type crashed status ------------------------

@pytest.mark.parametrize("field,value", [("quarantined", "x"), ("seconds", "slow"), ("stats", [1]),
                                         ("threads", 1.5), ("quarantined", True)])
def test_a_marker_with_a_wrong_type_optional_field_is_damaged_not_a_crash(tmp_path, field, value):
    _prompts(tmp_path, tmp_path)
    mpath = marker_path(tmp_path / "prompts", 1)
    m = json.loads(mpath.read_text())
    m[field] = value
    mpath.write_text(json.dumps(m))
    assert read_marker(tmp_path / "prompts", 1) is None  # as a torn marker: the shard is redone
    r = _status_rows(tmp_path)["prompts"]
    assert (r["shards_done"], r["shards_total"], r["rows"]) == (2, 3, 4)
    code, out = _invoke("status", tmp_path)
    assert code == 0 and "2/3" in out, out
    code, out = _invoke("verify", tmp_path, "--json")
    problems = [(p["kind"], p["path"]) for p in json.loads(out)["problems"]]
    assert code == 1 and ("corrupt", "prompts/shard-00001.done.json") in problems, out


def test_a_marker_with_whole_numbers_for_float_fields_still_reads(tmp_path):
    """JSON writers other than Python's may write 0.0 as 0: still a marker."""
    _prompts(tmp_path, tmp_path)
    mpath = marker_path(tmp_path / "prompts", 0)
    m = json.loads(mpath.read_text())
    m.update(seconds=1, created=2)
    mpath.write_text(json.dumps(m))
    assert read_marker(tmp_path / "prompts", 0).seconds == 1
