"""s55: a shard whose file does not match its marker (cut short, grown, missing) is damaged,
not stale. `show` skipped such a shard without a word (or, when it was the only one, said the
stage had no committed shard yet), and `status` counted it as "stale", the word for a shard
committed under another config or input. Both now name it and point to `verify --repair`."""
from __future__ import annotations

import json

import pyarrow as pa
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.shards import write_manifest, write_shard
from synthetic import write_respond_shards


def _cut(dst, i: int) -> None:
    """Cut shard ``i``'s Parquet file in half; its marker still records the old size."""
    f = dst / f"shard-{i:05d}.parquet"
    b = f.read_bytes()
    f.write_bytes(b[: len(b) // 2])


def _status(run) -> dict:
    r = CliRunner().invoke(cli, ["status", "--json", str(run)])
    assert r.exit_code == 0, r.output
    return next(row for row in json.loads(r.output) if row["stage"] == "respond")


def test_show_names_a_damaged_shard_it_skipped_among_good_ones(tmp_path):
    _cut(write_respond_shards(tmp_path, shards=2, rows=50), 0)
    r = CliRunner().invoke(cli, ["show", str(tmp_path), "-n", "1"])
    assert r.exit_code == 0, r.output
    assert "answer 1-0" in r.output, r.output  # the good shard is shown
    lines = [ln for ln in r.output.splitlines() if "damaged" in ln]
    assert len(lines) == 1, f"show skipped damaged shard 0 without a one-line note:\n{r.output}"
    assert "shard 0" in lines[0] and f"guidealign verify {tmp_path} --repair" in lines[0], lines[0]


def test_show_with_only_a_damaged_shard_says_so_and_points_to_verify(tmp_path):
    _cut(write_respond_shards(tmp_path, shards=1, rows=50), 0)
    r = CliRunner().invoke(cli, ["show", str(tmp_path), "-n", "1"])
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert "no committed shard of its current config yet" not in r.output, r.output
    assert "damaged" in r.output and "shard 0" in r.output, r.output
    assert f"guidealign verify {tmp_path} --repair" in r.output, r.output


def test_status_counts_cut_and_missing_shard_files_as_damaged_not_stale(tmp_path):
    dst = write_respond_shards(tmp_path, shards=3, rows=50)
    _cut(dst, 0)
    (dst / "shard-00002.parquet").unlink()  # its marker still there
    row = _status(tmp_path)
    assert (row["shards_done"], row["shards_stale"], row["shards_damaged"], row["shards_total"],
            row["rows"]) == (1, 0, 2, 3, 50), row
    r = CliRunner().invoke(cli, ["status", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "1/3 (2 damaged)" in r.output and "stale" not in r.output, r.output
    assert f"guidealign verify {tmp_path} --repair" in r.output, r.output


def test_a_shard_of_another_config_stays_stale_beside_a_damaged_one(tmp_path):
    """respond shard 0 committed under an earlier config (stale), shard 1 cut short (damaged),
    shard 2 current."""
    from guidealign.shards.stage import shard_fingerprint

    src, dst = tmp_path / "retrieve", tmp_path / "respond"
    write_manifest(src, stage="retrieve", num_shards=3, fingerprint="r")
    for i in range(3):
        write_shard(src, i, pa.table({"id": [f"p{i}"], "prompt": [f"q{i}"]}), f"r{i}")
    write_manifest(dst, stage="respond", num_shards=3, fingerprint="NEW", input=str(src))
    for i, fp in enumerate(("OLD", "NEW", "NEW")):
        write_shard(dst, i, pa.table({"id": [f"p{i}"], "prompt": [f"q{i}"], "response": [f"a{i}" * 200]}),
                    shard_fingerprint(fp, src, i))
    row = _status(tmp_path)
    assert (row["shards_done"], row["shards_stale"], row["shards_damaged"]) == (2, 1, 0), row
    _cut(dst, 1)
    row = _status(tmp_path)
    assert (row["shards_done"], row["shards_stale"], row["shards_damaged"], row["rows"]) == (1, 1, 1, 1), row
    r = CliRunner().invoke(cli, ["status", str(tmp_path)])
    assert "1/3 (1 stale, 1 damaged)" in r.output, r.output
