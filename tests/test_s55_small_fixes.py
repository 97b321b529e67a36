"""Stop 55, small fixes from reviews: ``ingest --into export`` made the folder that holds the
run's exports a prompt dataset; the dataset card counted a damaged shard as stale."""
from __future__ import annotations

import json

from click.testing import CliRunner

from guidealign.cli import cli


def test_ingest_into_the_folder_of_the_runs_exports_is_refused(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"question {k}"}) + "\n" for k in range(3)))
    run = tmp_path / "run"
    for args in (["ingest", str(f)], ["export", "prompts"]):
        r = CliRunner().invoke(cli, [*args, "-w", str(run), "--no-progress"])
        assert r.exit_code == 0, r.output
    before = sorted(p.relative_to(run).as_posix() for p in (run / "export").rglob("*"))
    r = CliRunner().invoke(cli, ["ingest", str(f), "-w", str(run), "--into", "export", "--no-progress"])
    assert r.exit_code != 0
    assert "holds other datasets (prompts), not prompts" in r.output, r.output
    assert sorted(p.relative_to(run).as_posix() for p in (run / "export").rglob("*")) == before
    # a new name, or the run's own prompt set, is still taken
    r = CliRunner().invoke(cli, ["ingest", str(f), "-w", str(run), "--into", "more", "--no-progress"])
    assert r.exit_code == 0, r.output


def test_the_dataset_cards_stage_counts_say_damaged_shards_apart_from_stale_ones(tmp_path):
    """The card counted a shard whose file was cut short as stale (committed under another
    config or input), as status did before it named such shards damaged."""
    import pyarrow as pa

    from guidealign.hub.card import stage_provenance
    from guidealign.shards import write_manifest, write_shard
    from guidealign.shards.layout import shard_path
    from guidealign.shards.stage import shard_fingerprint

    src, d = tmp_path / "retrieve", tmp_path / "respond"
    write_manifest(src, stage="retrieve", num_shards=3, fingerprint="r")
    for i in range(3):
        write_shard(src, i, pa.table({"id": [f"p{i}"]}), f"r{i}")
    write_manifest(d, stage="respond", num_shards=3, fingerprint="NEW", input=str(src))
    for i, cfg_fp in enumerate(["NEW", "NEW", "OLD"]):  # shard 2: committed under an earlier config
        write_shard(d, i, pa.table({"id": [f"p{i}-{k}" for k in range(50)]}), shard_fingerprint(cfg_fp, src, i))
    p = shard_path(d, 1)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # shard 1: its file cut short
    info = stage_provenance(tmp_path)["respond"]
    assert (info["shards"], info["shards_stale"], info["shards_damaged"], info["rows"]) == (1, 1, 1, 50)
