"""ingest.shard_cut=content: shards end after rows chosen by their content, so a row kept or
dropped anew changes only its own shard, and a map stage after ingest redoes only that shard."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from guidealign.config import ConfigError, load_config
from guidealign.ingest.cuts import ShardCuts, cut_ends, shard_cuts
from guidealign.ingest.run import IngestConfig, IngestError, ingest
from guidealign.shards import read_manifest
from guidealign.shards.marker import read_marker
from guidealign.shards.stage import map_shards


def _write(path, n, bad=(), dup_of=None):
    """n JSONL lines; the lines in ``bad`` are not JSON; ``dup_of`` {line: earlier line}."""
    dup_of = dup_of or {}
    with open(path, "w") as f:
        for i in range(n):
            if i in bad:
                f.write('{"prompt": "row %d", broken\n' % i)
            else:
                f.write(json.dumps({"prompt": f"row {dup_of.get(i, i)} of the content-cut test"}) + "\n")


def _shas(dst) -> list[str]:
    man = read_manifest(dst)
    return [read_marker(dst, i).sha256 for i in range(man["num_shards"])]


def _rows(dst) -> list[str]:
    man = read_manifest(dst)
    out = []
    for i in range(man["num_shards"]):
        out += pq.read_table(dst / f"shard-{i:05d}.parquet").column("prompt").to_pylist()
    return out


def test_position_cut_ends_every_shard_rows():
    cuts = shard_cuts(4, "position")
    h = np.arange(10, dtype=np.uint64)
    assert cut_ends(cuts, h, 0).tolist() == [3, 7]
    assert cut_ends(cuts, h, 3).tolist() == [0, 4, 8]  # one row fills the shard begun earlier
    assert cut_ends(cuts, None, 0).tolist() == []


def test_content_cut_bounds_and_marks():
    cuts = ShardCuts(min_rows=3, max_rows=5, period=10)
    # marks (multiples of 10) at rows 1, 4 and 12; row 1 is too early (under min_rows)
    h = np.array([7, 10, 3, 5, 20, 1, 2, 3, 4, 6, 7, 8, 30, 9], dtype=np.uint64)
    # shard 1 ends at the mark of row 4 (5 rows); then no mark in rows 5..9: max_rows ends it
    # at row 9; then row 12's mark (3 rows)
    assert cut_ends(cuts, h, 0).tolist() == [4, 9, 12]
    # 2 rows already in the shard: row 1's mark is past min_rows now, and the next shard ends
    # at row 4's mark again (3 rows): the cuts are back in step with the first case's
    assert cut_ends(cuts, h, 2).tolist() == [1, 4, 9, 12]
    c = shard_cuts(10_000, "content")
    assert (c.min_rows, c.max_rows, c.period) == (5_000, 40_000, 5_001)
    assert shard_cuts(1, "content") == ShardCuts(1, 4, 1)  # every row ends a shard


def test_content_cut_sizes_blocks_and_fixing_a_line_keeps_later_shards(tmp_path):
    n, size = 6000, 200
    f = tmp_path / "in.jsonl"
    _write(f, n, bad={150, 3000}, dup_of={40: 7})
    cfg = IngestConfig(shard_rows=size, shard_cut="content")
    a = tmp_path / "a"
    rep = ingest([str(f)], a, cfg, progress=False)
    assert (rep.rows, rep.quarantined, rep.duplicates) == (n - 3, 2, 1)
    sizes = [read_marker(a / "prompts", i).rows for i in range(rep.shards)]
    assert min(sizes[:-1]) >= size // 2 and max(sizes) <= 4 * size
    assert 0.6 * size < sum(sizes) / len(sizes) < 1.4 * size, sizes
    print(f"{rep.shards} shards, sizes {min(sizes)}-{max(sizes)}, mean {sum(sizes) / len(sizes):.0f}")
    # each dropped row sits in the quarantine or the count of the shard it was read in
    bad_in = [i for i in range(rep.shards) if read_marker(a / "prompts", i).quarantined]
    assert sum(read_marker(a / "prompts", i).quarantined for i in bad_in) == 2
    first_rows = np.cumsum([0] + sizes)
    line150_shard = int(np.searchsorted(first_rows, 150 - 1, side="right") - 1)  # 149 kept before it
    assert bad_in[0] == line150_shard

    # the same input in small blocks (cuts span blocks): the same shards
    b = tmp_path / "b"
    ingest([str(f)], b, IngestConfig(shard_rows=size, shard_cut="content", block_bytes=4096), progress=False)
    assert _shas(b / "prompts") == _shas(a / "prompts")

    # line 150 fixed in place: the shards before it and every shard after its own are the same
    before = _shas(a / "prompts")
    _write(f, n, bad={3000}, dup_of={40: 7})
    rep2 = ingest([str(f)], a, cfg, progress=False)
    after = _shas(a / "prompts")
    assert rep2.rows == n - 2 and "row 150 of the content-cut test" in _rows(a / "prompts")
    changed = [i for i in range(max(len(before), len(after)))
               if i >= min(len(before), len(after)) or before[i] != after[i]]
    assert changed and len(changed) <= 2 and changed[0] == line150_shard, (changed, line150_shard)
    assert len(after) == len(before) or changed == [line150_shard, line150_shard + 1]


def test_position_cut_rewrites_every_later_shard(tmp_path):
    """The control: the same fix with the cut by position shifts every later shard (line 150
    is in shard 0, so all ten change)."""
    f = tmp_path / "in.jsonl"
    _write(f, 2000, bad={150})
    cfg = IngestConfig(shard_rows=200)
    ingest([str(f)], tmp_path, cfg, progress=False)
    before = _shas(tmp_path / "prompts")
    _write(f, 2000)
    ingest([str(f)], tmp_path, cfg, progress=False)
    after = _shas(tmp_path / "prompts")
    assert len(before) == len(after) == 10 and all(x != y for x, y in zip(before, after))


def test_a_map_stage_redoes_only_the_fixed_shard(tmp_path):
    f = tmp_path / "in.jsonl"
    _write(f, 3000, bad={1200})
    cfg = IngestConfig(shard_rows=150, shard_cut="content")
    ingest([str(f)], tmp_path, cfg, progress=False)
    seen = []

    def fn(table, i):
        seen.append(i)
        return table.select(["id"])

    def run():
        seen.clear()
        map_shards("stand-in", tmp_path / "prompts", tmp_path / "out", "cfg", fn=fn, progress=False)
        return list(seen)

    total = read_manifest(tmp_path / "prompts")["num_shards"]
    assert len(run()) == total
    _write(f, 3000)
    ingest([str(f)], tmp_path, cfg, progress=False)
    redone = run()
    assert 1 <= len(redone) <= 2 and total > 10, (redone, total)


def test_shard_cut_is_checked(tmp_path):
    with pytest.raises(IngestError, match="ingest.shard_cut must be position or content"):
        ingest([str(tmp_path / "x.jsonl")], tmp_path, IngestConfig(shard_cut="rows"), progress=False)
    with pytest.raises(ConfigError):
        load_config(None, ["ingest.shard_cut=rows"])


def test_content_cut_changes_the_fingerprint_position_keeps_it(tmp_path):
    from guidealign.ingest.run import run_fingerprint

    f = tmp_path / "in.jsonl"
    _write(f, 3)
    pos = run_fingerprint([str(f)], IngestConfig())
    assert run_fingerprint([str(f)], IngestConfig(shard_cut="position")) == pos
    assert run_fingerprint([str(f)], IngestConfig(shard_cut="content")) != pos
