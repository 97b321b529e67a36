"""Review of the storage layer and orchestration: claims judged by the clock that stamps them,
and artifact files on disk before the ``_done.json`` that commits them.

No timed assertions: clocks are replaced, never waited for."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import guidealign.shards.artifact as artifact
from guidealign.shards import claims


def _claim_of_another_node(dst, index: int):
    path = claims.claim_path(dst, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written just now (a fresh heartbeat) by a live worker on another machine
    path.write_text(json.dumps({**claims.owner_record("elsewhere"), "host": "another-node",
                                "boot": "another-boot-id"}))
    return path


def test_a_node_whose_clock_runs_ahead_does_not_take_a_live_claim(tmp_path, monkeypatch):
    """A claim's heartbeat is its mtime, stamped by the shared file system (an NFS server's
    clock, not the owner's). A worker on a node whose clock runs an hour ahead must not judge
    a claim touched a moment ago stale, and must still take one whose heartbeat stopped."""
    fresh = _claim_of_another_node(tmp_path, 0)
    real = time.time
    monkeypatch.setattr(claims, "time", SimpleNamespace(time=lambda: real() + 3600))
    assert not claims.is_stale(fresh, ttl_s=120), "a fresh claim judged stale by a clock 1 h ahead"
    assert claims.try_claim(tmp_path, 0, ttl_s=120, owner="me") is None
    assert json.loads(fresh.read_text())["owner"] == "elsewhere"

    old = _claim_of_another_node(tmp_path, 1)
    t = os.stat(old).st_mtime - 600  # its last heartbeat 10 minutes ago, by the file system
    os.utime(old, (t, t))
    assert claims.is_stale(old, ttl_s=120)
    c = claims.try_claim(tmp_path, 1, ttl_s=120, owner="me")
    assert c is not None and c.held()
    c.release()


def test_an_artifacts_files_are_on_disk_before_its_done_record(tmp_path, monkeypatch):
    """faiss.write_index, torch and pyarrow write an artifact's files without fsync;
    ``_done.json`` is fsynced. After a power loss it must not commit files whose data (or
    directory entries) were still only in the page cache: each is synced before it."""
    real, synced = os.fsync, []

    def spy(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    final = (tmp_path / "index").resolve()
    with artifact.build_dir(final) as d:
        (d / "model").mkdir()
        with open(d / "model" / "weights.bin", "wb") as f:  # as the libraries write: no fsync
            f.write(b"w" * 4096)
    monkeypatch.setattr(os, "fsync", spy)
    done = artifact.mark_done(final, fingerprint="f", rows=1, seconds=0)
    assert "model/weights.bin" in done["files"]
    first_done = next(k for k, p in enumerate(synced) if artifact.DONE in p.name)
    before = set(synced[:first_done])
    assert final / "model" / "weights.bin" in before, f"synced before {artifact.DONE}: {sorted(before)}"
    assert final / "model" in before  # the file's directory entry


def test_other_ranks_wait_for_the_ingest_of_this_runs_inputs_not_an_earlier_one(tmp_path):
    """Rank 0 ingests; the others waited only for a complete prompts/ manifest, so on a rerun
    over other inputs in the same run directory they took the previous run's prompts at once
    (and turned them into detect shards) while rank 0 was still re-ingesting."""
    import pytest

    from guidealign.config import load_config
    from guidealign.ingest.run import run_fingerprint
    from guidealign.ingest.stage import run_ingest
    from guidealign.shards import wait_complete

    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text('{"prompt": "an earlier question"}\n')
    new.write_text('{"prompt": "this run\'s question"}\n')
    wd = tmp_path / "run"
    run_ingest(load_config(None, [f"inputs=[{old}]"]), wd, progress=False)  # the earlier run
    cfg = load_config(None, [f"inputs=[{new}]", "executor.wait_timeout_s=0.2"])
    with pytest.raises(RuntimeError, match="no manifest of this run's inputs"):
        run_ingest(cfg, wd, rank=1, world_size=2, progress=False)
    # the earlier run's manifest still satisfies a wait for the earlier inputs
    wait_complete(wd / "prompts", manifest_fp=run_fingerprint([str(old)], cfg.ingest))
    run_ingest(cfg, wd, rank=0, world_size=2, progress=False)             # rank 0 re-ingests
    assert run_ingest(cfg, wd, rank=1, world_size=2, progress=False) is None  # now it goes on


def test_export_killed_while_retiring_a_larger_exports_shards_is_not_complete(tmp_path, monkeypatch):
    """run_export wrote the new (smaller) manifest before removing the shards of a larger earlier
    export: killed in between, the export read as complete with the old extra shards beside it
    (which `cat OUT/shard-*.jsonl` joins). map_shards retires first; so does export now."""
    import pytest

    import guidealign.hub.export as export
    from guidealign.ingest.run import IngestConfig, ingest
    from guidealign.shards.manifest import is_complete

    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    ingest([str(f)], tmp_path, IngestConfig(shard_rows=1), progress=False)
    export.run_export(None, tmp_path, dataset="prompts", progress=False)
    f.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(2)))  # the first two stay
    os.utime(f, (1, 1))
    ingest([str(f)], tmp_path, IngestConfig(shard_rows=1), progress=False)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(export, "retire_shards_from", killed)
    with pytest.raises(KeyboardInterrupt):
        export.run_export(None, tmp_path, dataset="prompts", progress=False)
    out = tmp_path / "export" / "prompts"
    assert (out / "shard-00002.jsonl").exists()
    assert not is_complete(out), "an export with an old extra shard beside it reads as complete"


def test_rewriting_a_shard_syncs_the_old_markers_removal_before_writing_files(tmp_path, monkeypatch):
    """The old marker's unlink was not synced before the new quarantine file was written and
    its directory synced: a power loss there could keep the old marker beside the new files."""
    import pyarrow as pa

    from guidealign.shards import write

    t = pa.table({"x": [1]})
    write.write_shard(tmp_path, 0, t, "fp-old")
    events = []
    real_sync, real_write = write.fsync_dir, write._write_parquet_atomic
    monkeypatch.setattr(write, "fsync_dir", lambda d: (events.append(("sync", Path(d))), real_sync(d))[1])
    monkeypatch.setattr(write, "_write_parquet_atomic",
                        lambda table, p: (events.append(("write", Path(p).name)), real_write(table, p))[1])
    write.write_shard(tmp_path, 0, t, "fp-new", quarantine=pa.table({"reason": ["bad"]}))
    first_write = next(i for i, e in enumerate(events) if e[0] == "write")
    assert ("sync", tmp_path) in events[:first_write], events


def test_rewriting_a_jsonl_shard_syncs_the_old_markers_removal_before_writing_it(tmp_path, monkeypatch):
    """write_jsonl_shard unlinked the old marker without syncing the directory before the new
    file was renamed in (write_shard syncs there): after a power loss the old marker could
    stand beside the new file."""
    from guidealign.shards import jsonl

    jsonl.write_jsonl_shard(tmp_path, 0, [{"a": 1}], "fp-old")
    events = []
    real_sync, real_replace = jsonl.fsync_dir, jsonl.replace_from_temp
    monkeypatch.setattr(jsonl, "fsync_dir", lambda d: (events.append(("sync", Path(d))), real_sync(d))[1])
    monkeypatch.setattr(jsonl, "replace_from_temp",
                        lambda p, w: (events.append(("write", Path(p).name)), real_replace(p, w))[1])
    jsonl.write_jsonl_shard(tmp_path, 0, [{"a": 2}], "fp-new")
    first_write = next(i for i, e in enumerate(events) if e[0] == "write")
    assert ("sync", tmp_path) in events[:first_write], events


def test_verify_names_the_jsonl_file_of_a_missing_export_shard(tmp_path):
    from guidealign.shards import jsonl, write_manifest
    from guidealign.shards.verify import verify_run

    out = tmp_path / "run" / "export" / "respond"
    write_manifest(out, stage="export", num_shards=1, fingerprint="f", input="x", format="jsonl")
    jsonl.write_jsonl_shard(out, 0, [{"a": 1}], "f")
    jsonl.jsonl_path(out, 0).unlink()
    problems = [p for p in verify_run(tmp_path / "run").failing if p.kind == "missing"]
    assert [p.path for p in problems] == ["export/respond/shard-00000.jsonl"], problems


def test_export_takes_only_current_intact_input_shards(tmp_path):
    """export checked only that an input marker existed: a shard committed under an earlier
    config was written out (and, its export fingerprint built from that marker, counted as
    done), and a marker whose Parquet file was gone stopped the export with FileNotFoundError.
    Both are pending now, as an uncommitted shard is."""
    import pyarrow as pa

    import guidealign.hub.export as export
    from guidealign.shards import map_shards, write_manifest, write_shard
    from guidealign.shards.layout import shard_path

    src, dst = tmp_path / "prompts", tmp_path / "respond"
    for i in range(3):
        write_shard(src, i, pa.table({"id": [f"p{i}"]}), "input")
    write_manifest(src, stage="prompts", num_shards=3, fingerprint="input")
    map_shards("respond", src, dst, "cfg-new", fn=lambda t, i: t, progress=False)
    write_shard(dst, 1, pa.table({"id": ["OLD-CONFIG-ROW"]}), "cfg-old")  # an earlier config's
    shard_path(dst, 2).unlink()  # committed, then its file lost
    rep = export.run_export(None, tmp_path, dataset="respond", progress=False)
    assert rep.written == [0] and sorted(rep.pending) == [1, 2]
    out = tmp_path / "export" / "respond"
    assert not (out / "shard-00001.jsonl").exists() and not (out / "shard-00002.jsonl").exists()
