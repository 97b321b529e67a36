"""`guidealign verify`: finds corrupt, missing and orphaned files; --repair makes a rerun redo
exactly the bad shards. The run directory is built with the real shard writer and map stage."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.shards import map_shards, read_marker, write_manifest, write_shard
from guidealign.shards.artifact_files import file_checksums
from guidealign.shards.layout import marker_path, quarantine_path, shard_path

N_SHARDS = 4
CONFIG_FP = "upper-v1"


def _upper(table: pa.Table, index: int):
    """A trivial map stage: upper-case the prompt; prompts with "bad" go to quarantine."""
    bad = pc.match_substring(table["prompt"], "bad")
    keep = table.filter(pc.invert(bad))
    quarantine = table.filter(bad).append_column(
        "reason", pa.array(["contains bad"] * pc.sum(bad.cast("int32")).as_py(), pa.string()))
    return keep.set_column(1, "prompt", pc.utf8_upper(keep["prompt"])), quarantine


def _run_upper(w: Path):
    return map_shards("upper", w / "prompts", w / "upper", CONFIG_FP, fn=_upper, progress=False)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """prompts (4 shards) -> upper (4 shards, one with quarantined rows) + one artifact."""
    w = tmp_path / "run"
    src = w / "prompts"
    write_manifest(src, stage="prompts", num_shards=N_SHARDS, fingerprint="p")
    for i in range(N_SHARDS):
        ids = [f"p{i}-{j}" for j in range(5)]
        texts = [f"prompt {i}.{j} {'bad' if (i, j) == (2, 1) else 'fine'}" for j in range(5)]
        write_shard(src, i, pa.table({"id": ids, "prompt": texts}), f"p{i}")
    rep = _run_upper(w)
    assert rep.processed == N_SHARDS and rep.quarantined == 1
    art = w / "index"
    (art / "sub").mkdir(parents=True)
    (art / "index.faiss").write_bytes(bytes(range(256)) * 8)
    (art / "sub" / "meta.json").write_text('{"dim": 4}')
    (art / "_done.json").write_text(json.dumps({"fingerprint": "x", "rows": 1,
                                                "files": file_checksums(art)}))
    return w


def _verify(w: Path, *args):
    res = CliRunner().invoke(cli, ["verify", str(w), "--json", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res.exit_code, json.loads(res.output)


def _failing(out) -> list[tuple[str, str]]:
    return sorted((p["kind"], p["path"]) for p in out["problems"]
                  if p["kind"] in ("corrupt", "missing", "orphan"))


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def test_clean_run_passes(run_dir):
    code, out = _verify(run_dir)
    assert code == 0 and out["ok"]
    assert _failing(out) == []
    dirs = {d["path"]: d for d in out["dirs"]}
    assert dirs["prompts"]["shards_ok"] == dirs["upper"]["shards_ok"] == N_SHARDS
    assert dirs["index"]["files_ok"] == dirs["index"]["files_listed"] == 2
    plain = CliRunner().invoke(cli, ["verify", str(run_dir)])
    assert plain.exit_code == 0 and "OK" in plain.output


def test_flipped_byte_in_any_shard_is_found(run_dir, tmp_path):
    """Every shard and quarantine file of both datasets, a byte flipped at the start, in the
    middle (seeded) and at the end: exactly that file is reported corrupt."""
    rng = random.Random(0)
    files = [shard_path(run_dir / ds, i) for ds in ("prompts", "upper") for i in range(N_SHARDS)]
    files.append(quarantine_path(run_dir / "upper", 2))
    assert all(f.exists() for f in files)
    for f in files:
        size = f.stat().st_size
        for pos in (0, rng.randrange(4, size - 4), size - 1):
            w = tmp_path / f"copy-{f.parent.name}-{f.name}-{pos}"
            shutil.copytree(run_dir, w)
            target = w / f.relative_to(run_dir)
            _flip(target, pos)
            code, out = _verify(w)
            assert (code, _failing(out)) == (1, [("corrupt", target.relative_to(w).as_posix())]), \
                (f, pos)


def test_flipped_byte_in_artifact_file_is_found(run_dir):
    _flip(run_dir / "index" / "index.faiss", 100)
    code, out = _verify(run_dir)
    assert code == 1 and _failing(out) == [("corrupt", "index/index.faiss")]


def test_deleted_shard_file_and_artifact_file_are_missing(run_dir):
    shard_path(run_dir / "upper", 1).unlink()
    (run_dir / "index" / "sub" / "meta.json").unlink()
    code, out = _verify(run_dir)
    assert code == 1
    assert _failing(out) == [("missing", "index/sub/meta.json"),
                             ("missing", "upper/shard-00001.parquet")]


def test_orphans_are_listed(run_dir):
    (run_dir / "upper" / ".shard-00003.parquet.999999999.tmp").write_bytes(b"partial")
    tmpdir = run_dir / ".index.tmp-abc"
    tmpdir.mkdir()
    (tmpdir / "index.faiss").write_bytes(b"half")
    marker_path(run_dir / "prompts", 3).unlink()   # shard file left without its marker
    shard_path(run_dir / "upper", 9).write_bytes(b"x")  # uncommitted, beyond everything
    code, out = _verify(run_dir)
    assert code == 1
    assert _failing(out) == [("orphan", ".index.tmp-abc"),
                             ("orphan", "prompts/shard-00003.parquet"),
                             ("orphan", "upper/.shard-00003.parquet.999999999.tmp"),
                             ("orphan", "upper/shard-00009.parquet")]
    assert any(p["kind"] == "pending" and p["path"] == "prompts" for p in out["problems"])


def test_artifact_without_checksums_is_noted_not_failed(run_dir):
    done = run_dir / "index" / "_done.json"
    done.write_text(json.dumps({"fingerprint": "x", "rows": 1}))
    code, out = _verify(run_dir)
    assert code == 0
    notes = [p for p in out["problems"] if p["kind"] == "note" and p["path"] == "index"]
    assert notes and "no checksums recorded" in notes[0]["detail"]


def test_repair_then_rerun_redoes_exactly_the_bad_shard(run_dir):
    upper = run_dir / "upper"
    before = {i: read_marker(upper, i) for i in range(N_SHARDS)}
    original = shard_path(upper, 2).read_bytes()
    _flip(shard_path(upper, 2), len(original) // 2)
    (upper / ".shard-00000.parquet.999999999.tmp").write_bytes(b"partial")

    code, out = _verify(run_dir, "--repair")
    assert code == 1
    assert "upper/shard-00002.done.json" in out["removed"]
    assert "upper/.shard-00000.parquet.999999999.tmp" in out["removed"]
    assert "index/_done.json" not in out["removed"]
    assert read_marker(upper, 2) is None
    assert read_marker(upper, 0) == before[0]

    rep = _run_upper(run_dir)
    assert (rep.processed, rep.skipped) == (1, N_SHARDS - 1)
    after = {i: read_marker(upper, i) for i in range(N_SHARDS)}
    for i in (0, 1, 3):
        assert after[i] == before[i]  # committed shards untouched
    assert after[2].sha256 == before[2].sha256 and after[2].created > before[2].created
    assert shard_path(upper, 2).read_bytes() == original
    code, out = _verify(run_dir)
    assert code == 0 and _failing(out) == []


def test_repair_of_artifact_removes_its_done(run_dir):
    _flip(run_dir / "index" / "sub" / "meta.json", 2)
    code, out = _verify(run_dir, "--repair")
    assert code == 1 and out["removed"] == ["index/_done.json"]
    assert not (run_dir / "index" / "_done.json").exists()


def test_a_shard_and_marker_copied_over_another_shard_are_found_and_not_taken_as_done(run_dir):
    """The marker names its own index, and nothing compared it with the file name: shard 1's
    file and marker copied over shard 2's passed verify, status and the stages (its rows read twice)."""
    from guidealign.shards import is_done

    src = run_dir / "prompts"
    fp = read_marker(src, 2).fingerprint
    for path in (shard_path, marker_path):
        shutil.copyfile(path(src, 1), path(src, 2))
    assert read_marker(src, 2) is None and not is_done(src, 2, fp)
    code, out = _verify(run_dir)
    assert code == 1 and ("corrupt", "prompts/shard-00002.done.json") in _failing(out)
    assert any("marker of shard 1" in p["detail"] for p in out["problems"]), out["problems"]


def test_a_dataset_of_shard_files_alone_has_its_quarantine_checked_once(run_dir):
    """Without a manifest or markers (a first write killed before its markers), the dataset's
    quarantine folder was checked again as a dataset of its own, with nonsense repair paths."""
    up = run_dir / "upper"
    for p in list(up.glob("*.done.json")) + [up / "_stage.json", up / "_manifest.json"]:
        p.unlink(missing_ok=True)
    code, out = _verify(run_dir)
    assert code == 1
    assert not any(d["path"].startswith("upper/quarantine") for d in out["dirs"]), out["dirs"]
    assert not any("quarantine/quarantine" in r for p in out["problems"] for r in p.get("remove", []))


def test_a_dead_writers_temp_of_a_json_record_is_a_note_not_a_failure(tmp_path):
    """A kill while a manifest (or any JSON record) was written left `._stage.json.*.PID.tmp`,
    which nothing removes (a manifest may have writers on other hosts at once): after a clean
    rerun `verify` failed the run until --repair. It is a note now, and --repair removes it."""
    import subprocess
    import sys

    from guidealign.shards.verify import repair, verify_run

    d = tmp_path / "run" / "data"
    write_manifest(d, stage="data", num_shards=1, fingerprint="f", input="x")
    write_shard(d, 0, pa.table({"id": ["a"]}), fingerprint="f")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    leftover = d / f"._stage.json.0123456789ab.{dead}.tmp"
    leftover.write_text("{")
    shard_temp = d / f".shard-00000.parquet.0123456789ab.{dead}.tmp"
    rep = verify_run(tmp_path / "run")
    assert rep.ok and [p.kind for p in rep.problems if p.path.endswith(leftover.name)] == ["note"]
    assert repair(rep) == [f"data/{leftover.name}"] and not leftover.exists()
    # a shard's temp stays a failing orphan (its next write removes it; verify names it)
    shard_temp.write_bytes(b"PAR1")
    assert [p.kind for p in verify_run(tmp_path / "run").failing] == ["orphan"]
