"""A downstream shard is current only while the input shard it was made from is.

With static assignment each rank redoes its own shards, stage after stage. After a config
change upstream, a rank that has not yet redone its upstream shard still holds downstream
shards that match that (old) upstream shard. A rank waiting for the whole downstream stage
(library, SFT, push, `status`) must not take them: it took a mix of old and new outputs.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from guidealign.shards import map_shards, wait_complete, write_manifest, write_shard
from guidealign.shards.manifest import current_marker, shard_states


def _prompts(d: Path, n: int = 2) -> None:
    for i in range(n):
        write_shard(d, i, pa.table({"id": [f"p{i}"], "x": [i]}), "ingest")
    write_manifest(d, stage="prompts", num_shards=n, fingerprint="ingest")


def _stage(name: str, tag: str):
    def fn(table, i):
        return table.append_column(name, pa.array([tag] * table.num_rows))
    return fn


def _run(w: Path, detect_cfg: str, rank: int) -> None:
    """One rank of a two-rank static run: detect, then guidelines, on its own shards."""
    map_shards("detect", w / "prompts", w / "detect", detect_cfg, fn=_stage("d", detect_cfg),
               rank=rank, world_size=2, assign="static", progress=False)
    map_shards("guidelines", w / "detect", w / "guidelines", "g-cfg", fn=_stage("g", "g"),
               rank=rank, world_size=2, assign="static", progress=False)


def test_a_rank_waiting_downstream_does_not_take_shards_made_from_a_stale_upstream_shard(tmp_path):
    w = tmp_path
    _prompts(w / "prompts")
    for r in (0, 1):
        _run(w, "detect-v1", r)
    wait_complete(w / "guidelines", timeout=0)  # the first run: complete
    # detect's config changes; rank 0 redoes its shards, rank 1 has not started yet
    _run(w, "detect-v2", 0)
    assert shard_states(w / "detect") == ([], [1])
    # guidelines shard 1 still matches detect shard 1 as rank 1 left it: it was made with v1
    assert shard_states(w / "guidelines") == ([], [1])
    assert current_marker(w / "guidelines", 1) is None and current_marker(w / "guidelines", 0) is not None
    with pytest.raises(RuntimeError, match="stale"):
        wait_complete(w / "guidelines", timeout=0)
    _run(w, "detect-v2", 1)  # rank 1 catches up: everything current again
    wait_complete(w / "guidelines", timeout=0)
    assert shard_states(w / "guidelines") == ([], [])


def test_a_shard_written_whole_does_not_look_at_the_input_shard_of_its_index(tmp_path):
    """An artifact table written whole (the library: fingerprint = the config's) is not made
    from input shard i: a stale input shard i does not make it stale (its own check is its
    fingerprint, which covers every input shard)."""
    w = tmp_path
    _prompts(w / "prompts")
    for r in (0, 1):
        _run(w, "detect-v1", r)
    write_shard(w / "lib", 0, pa.table({"t": ["x"]}), "lib-cfg")
    write_manifest(w / "lib", stage="library", num_shards=1, fingerprint="lib-cfg", input=str(w / "guidelines"))
    _run(w, "detect-v2", 0)
    assert shard_states(w / "lib") == ([], [])


def test_a_reingest_killed_midway_leaves_no_manifest_calling_the_mix_complete(tmp_path):
    """Ingest's shards cannot be checked against an input, so its manifest is what says they
    are complete. A second ingest of other files into the same run, killed after its first
    shards, left the first ingest's manifest beside a mix of new and old shards."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from guidealign.ingest.run import KILL_AFTER_ENV
    from guidealign.shards import read_manifest

    w = tmp_path / "w"
    args = ["--set", "ingest.shard_rows=2", "--no-progress", "-w", str(w)]
    for name, tag in (("a.jsonl", "first"), ("b.jsonl", "second")):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": f"{tag} prompt {i}"}) + "\n" for i in range(8)))

    def ingest(name, env=None):
        return subprocess.run([sys.executable, "-m", "guidealign", "ingest", str(tmp_path / name), *args],
                              capture_output=True, text=True, env={**os.environ, **(env or {})})

    assert ingest("a.jsonl").returncode == 0
    assert read_manifest(w / "prompts")["num_shards"] == 4
    p = ingest("b.jsonl", {KILL_AFTER_ENV: "2"})  # SIGKILLed right after its 2nd shard
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert read_manifest(w / "prompts") is None
    with pytest.raises(RuntimeError, match="no manifest"):
        wait_complete(w / "prompts", timeout=0)
    assert ingest("b.jsonl").returncode == 0  # the rerun finishes it, and says so
    assert read_manifest(w / "prompts")["num_shards"] == 4
    wait_complete(w / "prompts", timeout=0)


def test_rank_0_does_not_train_or_index_a_library_of_another_config(tmp_path):
    """``--stages train-retriever,index`` after a library config change: rank 0 took whatever
    library was there (the other ranks then waited for an index they would never accept)."""
    from guidealign.config import load_config
    from guidealign.retrieval.library import run_library
    from guidealign.retrieval.library_store import wait_library
    from synthetic import coded_guideline_rows, write_guideline_shards

    wd = tmp_path / "run"
    write_guideline_shards(wd / "guidelines", coded_guideline_rows(4, 3, seed=2), shard_rows=8)
    cfg = load_config(overrides=["library.threads=1"])
    run_library(cfg, wd, progress=False)
    version = wait_library(cfg, wd, wd / "index", rank=0, world_size=1)
    from guidealign.shards.artifact import read_done

    assert version == read_done(wd / "library")["version"]
    changed = load_config(overrides=["library.threads=1", "library.fuzzy_threshold=0.8"])
    with pytest.raises(RuntimeError, match="another library config"):
        wait_library(changed, wd, wd / "index", rank=0, world_size=1)
    # new guidelines upstream, library not rebuilt yet: refused too
    write_guideline_shards(wd / "guidelines", coded_guideline_rows(5, 3, seed=3), shard_rows=8)
    with pytest.raises(RuntimeError, match="other guidelines"):
        wait_library(cfg, wd, wd / "index", rank=0, world_size=1)
    run_library(cfg, wd, progress=False)
    assert wait_library(cfg, wd, wd / "index", rank=0, world_size=1)


def test_claims_left_on_committed_shards_go_when_the_stage_is_complete(tmp_path):
    """A worker killed between its commit and its claim's release left ``_claims/shard-N.claim``
    (and a stealer killed mid-steal a ``.stale-`` file): nobody claims a committed shard again,
    so they stayed for good. A dynamic run that finds every shard committed removes them."""
    from guidealign.shards.claims import CLAIMS_DIR

    w = tmp_path
    _prompts(w / "prompts", 3)
    fn = _stage("d", "x")
    map_shards("detect", w / "prompts", w / "detect", "cfg", fn=fn, assign="dynamic", progress=False)
    left = w / "detect" / CLAIMS_DIR
    left.mkdir()
    (left / "shard-00001.claim").write_text('{"owner": "killed-worker", "nonce": "n1"}')
    (left / "shard-00002.claim.stale-n2").write_text('{"owner": "killed-stealer", "nonce": "n0"}')
    live = left / "shard-00000.claim"  # a live worker's, about to release it: stays
    live.write_text('{"owner": "live-worker", "nonce": "n3"}')
    old = time.time() - 120  # no heartbeat for longer than the TTL: their owners are gone
    for p in ("shard-00001.claim", "shard-00002.claim.stale-n2"):
        os.utime(left / p, (old, old))
    rep = map_shards("detect", w / "prompts", w / "detect", "cfg", fn=fn, assign="dynamic", progress=False,
                     claim_ttl_s=60)
    assert (rep.processed, rep.skipped) == (0, 3)
    assert sorted(p.name for p in left.iterdir()) == ["shard-00000.claim"]
    live.unlink()
    map_shards("detect", w / "prompts", w / "detect", "cfg", fn=fn, assign="dynamic", progress=False)
    assert not left.exists()


def test_an_artifact_rename_is_made_durable_before_its_done_marker(tmp_path, monkeypatch):
    """After a power loss (not a SIGKILL) the old artifact folder could come back with its old
    ``_done.json``: the marker's removal and the renames were not synced to the directory."""
    import guidealign.shards.artifact as art

    events = []
    monkeypatch.setattr(art, "fsync_dir", lambda d: events.append(("fsync_dir", Path(d))))
    real_replace = art.os.replace
    monkeypatch.setattr(art.os, "replace", lambda a, b: (events.append(("replace", Path(b))), real_replace(a, b)))
    final = tmp_path / "library"
    for build in range(2):  # a first build, then a rebuild over it
        with art.build_dir(final) as tmp:
            (tmp / "x").write_text(str(build))
        events.append(("mark_done",))
        art.mark_done(final, fingerprint=f"f{build}", rows=1, seconds=0.0)
    # the folder's renames and syncs (not the atomic writes of _done.json inside it)
    seen = [e for e in events if e == ("mark_done",) or e[1] in (final, tmp_path)]
    cut = seen.index(("mark_done",)) + 1
    assert seen[:cut] == [("replace", final), ("fsync_dir", tmp_path), ("mark_done",)]
    # the rebuild: the old marker's removal synced before the folder moves; the new folder's
    # rename synced before the new marker
    assert seen[cut:] == [("fsync_dir", final), ("replace", final), ("fsync_dir", tmp_path), ("mark_done",)]
