"""The storage layer: atomic commits, resume, ranks, fingerprints, streaming reads."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from guidealign.shards import (committed, fingerprint, is_done, iter_batches, iter_tables, map_shards, read_marker,
                    read_table, resolve_rank, wait_complete, write_manifest, write_shard)
from guidealign.shards.layout import shard_path


def _make_input(d: Path, n_shards: int = 6, rows: int = 5) -> None:
    for i in range(n_shards):
        write_shard(d, i, pa.table({"id": [f"{i}-{j}" for j in range(rows)],
                                    "x": list(range(rows))}), "input")
    write_manifest(d, stage="prompts", num_shards=n_shards, fingerprint="input")


def test_marker_records_rows_bytes_checksum_and_fingerprint(tmp_path):
    m = write_shard(tmp_path, 3, pa.table({"a": [1, 2, 3]}), "fp1", stats={"k": 1})
    assert (m.rows, m.fingerprint, m.stats) == (3, "fp1", {"k": 1})
    assert m.bytes == shard_path(tmp_path, 3).stat().st_size and len(m.sha256) == 64
    assert read_marker(tmp_path, 3) == m
    assert is_done(tmp_path, 3, "fp1") and not is_done(tmp_path, 3, "fp2")


def test_shard_without_marker_or_with_torn_file_is_not_committed(tmp_path):
    write_shard(tmp_path, 0, pa.table({"a": [1]}), "fp")
    write_shard(tmp_path, 1, pa.table({"a": [2]}), "fp")
    # a crash between the shard rename and the marker: the file exists, no marker
    (tmp_path / "shard-00001.done.json").unlink()
    # a shard whose file was truncated after commit
    p = shard_path(tmp_path, 0)
    p.write_bytes(p.read_bytes()[:10])
    assert committed(tmp_path) == []


@pytest.mark.parametrize("damage", ["field renamed", "wrong type", "not an object", "not UTF-8"])
def test_marker_that_parses_but_is_damaged_counts_as_absent(tmp_path, damage):
    """A flipped bit can leave a marker valid JSON ("rows" -> "rowr"): the shard is then not
    committed (resume redoes it), rather than a TypeError for every reader."""
    import json

    write_shard(tmp_path, 0, pa.table({"a": [1]}), "fp")
    mp = tmp_path / "shard-00000.done.json"
    data = json.loads(mp.read_text())
    if damage == "field renamed":
        data["rowr"] = data.pop("rows")
    elif damage == "wrong type":
        data["bytes"] = str(data["bytes"])
    elif damage == "not an object":
        data = [data]
    mp.write_bytes(b"\xff\xfe" if damage == "not UTF-8" else json.dumps(data).encode())
    assert read_marker(tmp_path, 0) is None and not is_done(tmp_path, 0, "fp") and committed(tmp_path) == []


def test_rewrite_removes_old_marker_first(tmp_path, monkeypatch):
    write_shard(tmp_path, 0, pa.table({"a": [1]}), "old")
    import guidealign.shards.write as w

    def boom(*a, **k):
        raise RuntimeError("crash while writing")
    monkeypatch.setattr(w, "_write_parquet_atomic", boom)
    with pytest.raises(RuntimeError):
        write_shard(tmp_path, 0, pa.table({"a": [9]}), "new")
    assert read_marker(tmp_path, 0) is None  # never a stale marker next to a half-new state


def test_map_stage_resume_and_fingerprints(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_input(src)
    calls = []

    def fn(table, i):
        calls.append(i)
        return table.append_column("y", pa.array([v * 2 for v in table["x"].to_pylist()]))

    r1 = map_shards("double", src, dst, "cfg-a", fn=fn, progress=False)
    assert (r1.processed, r1.skipped, r1.rows) == (6, 0, 30)
    r2 = map_shards("double", src, dst, "cfg-a", fn=fn, progress=False)
    assert (r2.processed, r2.skipped) == (0, 6) and len(calls) == 6
    r3 = map_shards("double", src, dst, "cfg-b", fn=fn, progress=False)  # config changed
    assert (r3.processed, r3.skipped) == (6, 0)
    # an input shard that changes invalidates just the matching output shard
    write_shard(src, 2, pa.table({"id": ["new"], "x": [7]}), "input")
    r4 = map_shards("double", src, dst, "cfg-b", fn=fn, progress=False)
    assert r4.processed == 1 and calls[-1] == 2
    assert read_table(dst, 2)["y"].to_pylist() == [14]


@pytest.mark.parametrize("assign", ["static", "dynamic"])
def test_map_stage_over_a_smaller_input_retires_the_extra_shards(tmp_path, assign):
    """The input shrank (re-ingested with fewer prompts): the output shards past its end, from
    the earlier run, are removed, so readers (which take every committed shard) get only the
    new run's rows."""
    import shutil

    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_input(src, 4)
    map_shards("s", src, dst, "c", fn=lambda t, i: t, progress=False, assign=assign)
    shutil.rmtree(src)
    _make_input(src, 2, rows=3)
    map_shards("s", src, dst, "c", fn=lambda t, i: t, progress=False, assign=assign)
    assert committed(dst) == [0, 1]
    assert [r["id"] for t in iter_tables(dst) for r in t.to_pylist()] == [f"{i}-{j}" for i in range(2) for j in range(3)]
    assert sorted(p.name for p in dst.glob("shard-*")) == [f"shard-0000{i}.{e}" for i in range(2) for e in ("done.json", "parquet")]


def test_make_fn_is_lazy(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_input(src, 2)
    built = []

    def make():
        built.append(1)
        return lambda t, i: t
    map_shards("s", src, dst, "c", make_fn=make, progress=False)
    map_shards("s", src, dst, "c", make_fn=make, progress=False)
    assert built == [1]  # nothing to do on the rerun: no engine built


_WORKER = textwrap.dedent("""
    import os, sys, pyarrow as pa
    from guidealign.shards import map_shards
    src, dst = sys.argv[1], sys.argv[2]
    def fn(t, i):
        return t.append_column("worker", pa.array([os.environ["RANK"]] * t.num_rows))
    map_shards("s", src, dst, "cfg", fn=fn, rank=int(os.environ["RANK"]),
               world_size=int(os.environ["WORLD_SIZE"]), progress=False)
""")


def test_two_workers_process_every_shard_exactly_once(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_input(src, n_shards=7)
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(src), str(dst)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"})
             for r in (0, 1)]
    assert [p.wait() for p in procs] == [0, 0]
    assert committed(dst) == list(range(7))
    for i in range(7):
        t = read_table(dst, i)
        assert set(t["worker"].to_pylist()) == {str(i % 2)}
        assert t["id"].to_pylist() == [f"{i}-{j}" for j in range(5)]
    ids = [v for b in iter_batches(dst, columns=["id"], batch_size=3) for v in b["id"].to_pylist()]
    assert len(ids) == len(set(ids)) == 35
    wait_complete(dst)


def test_wait_complete_raises_when_shards_are_missing(tmp_path):
    _make_input(tmp_path / "a", 3)
    (tmp_path / "a" / "shard-00001.done.json").unlink()
    with pytest.raises(RuntimeError, match="misses 1 shard"):
        wait_complete(tmp_path / "a")
    with pytest.raises(RuntimeError, match="no manifest"):
        wait_complete(tmp_path / "nothing")


@pytest.mark.parametrize("env,expected", [
    ({}, (0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),
    ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "4"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, (1, 4)),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (1, 2)),
])
def test_resolve_rank_from_env(env, expected):
    assert resolve_rank(env=env) == expected


def test_resolve_rank_explicit_wins_and_validates():
    assert resolve_rank(1, 2, env={"RANK": "0", "WORLD_SIZE": "8"}) == (1, 2)
    with pytest.raises(ValueError):
        resolve_rank(2, 2, env={})


def test_a_world_size_without_its_rank_is_refused_unless_the_environment_matches():
    """`--world-size 8` alone ran as rank 0 of 8 (no environment) or took a 4-task array's rank
    (0..3 of 8): ranks 4..7 never ran and their shards stayed undone, every task exiting 0."""
    array4 = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    with pytest.raises(ValueError, match="--world-size 8 without --rank: the environment's rank belongs to a world of 4"):
        resolve_rank(None, 8, env=array4)
    with pytest.raises(ValueError, match="rank is unknown"):
        resolve_rank(None, 2, env={})
    with pytest.raises(ValueError, match="--nodes 2 without --node-rank"):
        resolve_rank(None, 2, env={}, names=("--node-rank", "--nodes"))
    assert resolve_rank(None, 4, env=array4) == (1, 4)  # the environment's own size: fine
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert resolve_rank(None, 1, env=batch) == (0, 1)  # one process does it all (the batch script's escape)


def test_fingerprint_is_stable_and_sensitive():
    from dataclasses import dataclass

    @dataclass
    class C:
        a: int = 1
    assert fingerprint(C(), "x") == fingerprint(C(), "x")
    assert fingerprint(C(a=2), "x") != fingerprint(C(), "x")


def test_verify_checks_an_exports_jsonl_shards(tmp_path):
    """An export's JSONL shards (committed with markers like Parquet ones) verify clean; a
    changed byte in one is corrupt, a JSONL shard without a marker an orphan."""
    from guidealign.hub.export import run_export
    from guidealign.shards.verify import verify_run

    _make_input(tmp_path / "respond", 2)
    run_export(None, tmp_path, dataset="respond", progress=False)
    out = tmp_path / "export" / "respond"
    assert sorted(p.name for p in out.glob("shard-*.jsonl")) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    assert verify_run(tmp_path).ok
    p = out / "shard-00001.jsonl"
    p.write_bytes(p.read_bytes().replace(b'"x": 4', b'"x": 5'))
    (out / "shard-00007.jsonl").write_text('{"id": "stray"}\n')
    got = {(q.kind, q.path) for q in verify_run(tmp_path).failing}
    assert got == {("corrupt", "export/respond/shard-00001.jsonl"), ("orphan", "export/respond/shard-00007.jsonl")}


def test_export_refuses_to_write_into_a_dataset_or_from_outside_the_run(tmp_path):
    """`export prompts -o W/prompts` overwrote the dataset's _stage.json with an export's
    (status then called its shards stale), and `export ../other/prompts` read another run."""
    from guidealign.hub.export import run_export

    _make_input(tmp_path / "prompts", 2)
    _make_input(tmp_path / "respond", 2)
    before = (tmp_path / "prompts" / "_stage.json").read_bytes()
    for out in (tmp_path / "prompts", tmp_path / "respond"):
        with pytest.raises(ValueError, match="holds the dataset of stage 'prompts'"):
            run_export(None, tmp_path, dataset="prompts", out=out, progress=False)
    assert (tmp_path / "prompts" / "_stage.json").read_bytes() == before
    with pytest.raises(ValueError, match="name a dataset under the run directory"):
        run_export(None, tmp_path / "prompts", dataset="../respond", progress=False)
    for _ in range(2):  # its own folder, again and again
        assert len(run_export(None, tmp_path, dataset="prompts", progress=False).mine) == 2


def test_an_exports_input_is_its_own_runs_after_a_move_or_a_copy_and_from_any_cwd(tmp_path, monkeypatch):
    """A stage records its input as given (a relative -w: relative to that cwd); status judged
    export/prompts against itself from inside the run (0/2, stale) and a copied run's against
    the original's input. The manifest also records the input relative to the dataset."""
    import shutil

    from guidealign.hub.export import run_export
    from guidealign.status import collect

    def done(w):
        return next(r for r in collect(w) if r["stage"] == "export/prompts")["shards_done"]

    monkeypatch.chdir(tmp_path)
    _make_input(Path("w/prompts"), 2)
    run_export(None, "w", dataset="prompts", progress=False)  # a relative -w
    assert done("w") == 2
    monkeypatch.chdir(tmp_path / "w")
    assert done(".") == 2
    monkeypatch.chdir(tmp_path)
    shutil.move("w", "moved")
    assert done("moved") == 2
    shutil.copytree("moved", "copy")
    write_shard(Path("copy/prompts"), 0, pa.table({"id": ["new"], "x": [9]}), "input")  # the copy's input changes
    assert done("copy") == 1 and done("moved") == 2

def test_jsonl_shard_write_clears_a_killed_writes_temp_and_syncs_the_directory(tmp_path, monkeypatch):
    """An export's JSONL shard is committed like a Parquet shard: the temp file a killed write
    left (any host's, any pid) is removed, the new temp name is one no other writer uses, and
    the directory is synced after the rename, before the marker is written."""
    import guidealign.shards.write as w
    from guidealign.shards.jsonl import jsonl_done, jsonl_path, write_jsonl_shard

    out = tmp_path / "export"
    out.mkdir()
    stale = out / ".shard-00000.jsonl.0123456789ab.4242.tmp"  # a killed writer on another host
    stale.write_text("half a row")
    events = []
    real_fsync_dir = w.fsync_dir
    monkeypatch.setattr(w, "fsync_dir", lambda d: (events.append(("fsync_dir", Path(d))), real_fsync_dir(d)))
    real_replace = os.replace
    monkeypatch.setattr(w.os, "replace", lambda a, b: (events.append(("replace", Path(a).name, Path(b).name)),
                                                       real_replace(a, b)))
    write_jsonl_shard(out, 0, [{"id": "a", "prompt": "p"}], "fp")
    assert not stale.exists()
    assert jsonl_done(out, 0, "fp") and jsonl_path(out, 0) == shard_path(out, 0, ".jsonl")
    data = [e for e in events if e[0] == "replace" and e[2] == "shard-00000.jsonl"]
    assert len(data) == 1 and re.fullmatch(rf"\.shard-00000\.jsonl\.[0-9a-f]{{12}}\.{os.getpid()}\.tmp", data[0][1])
    marker = [e for e in events if e[0] == "replace" and e[2] == "shard-00000.done.json"]
    between = events[events.index(data[0]) + 1:events.index(marker[0])]
    assert ("fsync_dir", out) in between  # the rename is durable before the marker
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.done.json", "shard-00000.jsonl"]


def test_exported_jsonl_is_strict_json_one_line_per_row_for_every_line_splitter(tmp_path):
    """A prompt holding U+2028 / U+2029 / U+0085 (text pasted from a web page) and a float column
    with NaN and infinity: each exported row is one line for ``str.splitlines`` too, each line
    parses as strict JSON (no NaN/Infinity literals), and the strings read back unchanged."""
    import json

    from guidealign.hub.export import run_export

    texts = ["first\u2028second", "a\u2029b\x85c", "plain\nnewline"]
    write_shard(tmp_path / "respond", 0, pa.table({"prompt": texts, "score": [float("nan"), float("inf"), 0.5]}),
                "input")
    write_manifest(tmp_path / "respond", stage="respond", num_shards=1, fingerprint="input")
    run_export(None, tmp_path, dataset="respond", progress=False)
    text = (tmp_path / "export" / "respond" / "shard-00000.jsonl").read_text(encoding="utf-8")

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    lines = text.splitlines()
    assert len(lines) == 3
    rows = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [r["prompt"] for r in rows] == texts
    assert [r["score"] for r in rows] == [None, None, 0.5]


def test_wait_complete_returns_the_manifest_version_it_checked(tmp_path, monkeypatch):
    """Another run replacing the manifest while a rank finds the dataset complete: what it
    returns is the manifest it checked the shards against, not the newer one."""
    import guidealign.shards.manifest as manifest

    _make_input(tmp_path, 2)
    real = manifest.read_manifest
    calls = []

    def read(d):
        calls.append(d)
        man = real(d)
        return man if len(calls) == 1 else {**man, "fingerprint": "a later run", "num_shards": 9}

    monkeypatch.setattr(manifest, "read_manifest", read)
    got = manifest.wait_complete(tmp_path, timeout=0)
    assert got["fingerprint"] == "input" and got["num_shards"] == 2


def test_a_moved_run_directory_keeps_its_map_stage_shards_current(tmp_path):
    """A stage's manifest records its input as an absolute path; after the run directory was
    moved (mv, rsync to another machine) that path is gone, and every shard of the stage was
    judged stale: status showed 0 done, push refused "committed under another config", and
    a wait for the stage never ended. The input is now found beside the dataset."""
    from guidealign.shards.manifest import shard_states, stale_shards

    run = tmp_path / "run"
    src, dst = run / "prompts", run / "double"
    _make_input(src)
    map_shards("double", src.resolve(), dst, "cfg", fn=lambda t, i: t, progress=False)
    assert shard_states(dst) == ([], [])
    moved = tmp_path / "elsewhere" / "run2"
    moved.parent.mkdir()
    run.rename(moved)
    assert shard_states(moved / "double") == ([], [])
    assert not stale_shards(moved / "double")
    wait_complete(moved / "double")
    # an input shard changed after the move still makes its output shard stale
    write_shard(moved / "prompts", 2, pa.table({"id": ["new"], "x": [7]}), "input")
    assert shard_states(moved / "double") == ([], [2])
