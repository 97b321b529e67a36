"""Shards encoded by several threads at once (``commit.ShardWriter``'s encoders) are committed in
order, with the same bytes as one encoder writes."""
from __future__ import annotations

import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq

from guidealign.config.ingest import IngestConfig
from guidealign.ingest import run
from guidealign.ingest.commit import Pending, ShardWriter
from guidealign.shards.marker import read_marker


def _ingest(tmp_path, name, encoders, monkeypatch):
    monkeypatch.setattr(run, "default_encoders", lambda: encoders)
    src = tmp_path / "in.jsonl"
    if not src.exists():
        rows = [{"prompt": f"question {i % 700} about {i % 13}", "n": i} for i in range(3000)]
        rows[5]["prompt"] = ""  # a quarantined row
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = run.ingest([str(src)], tmp_path / name, IngestConfig(shard_rows=97), progress=False)
    dst = tmp_path / name / "prompts"
    files = {p.name: p.read_bytes() for p in sorted(dst.rglob("*.parquet"))}
    shas = [read_marker(dst, i).sha256 for i in range(rep.shards)]
    return rep.shards, files, shas


def test_several_encoders_write_what_one_writes(tmp_path, monkeypatch):
    one = _ingest(tmp_path, "one", 1, monkeypatch)
    four = _ingest(tmp_path, "four", 4, monkeypatch)
    assert one[0] > 5  # enough shards for the encoders to overlap
    assert one == four


def test_shards_encoded_out_of_order_are_committed_in_order(tmp_path):
    """The second shard's build finishes first (the first waits on an event it sets): the
    markers still come in index order, each with its own shard's rows."""
    first_may_finish = threading.Event()
    order = []

    def build(i):
        def make():
            if i == 0:
                assert first_may_finish.wait(10)
            order.append(i)
            if i == 1:
                first_may_finish.set()
            return pa.table({"id": [f"{i:016x}"], "prompt": [f"p{i}"], "source": ["s"], "metadata": ["{}"]}), None
        return make

    dst = tmp_path / "d"
    writer = ShardWriter(dst, max_pending=4, max_group=4, encoders=2)
    for i in range(3):
        writer.submit(Pending(i, f"fp{i}", build(i), 0.0, {}))
    writer.close()
    assert order[:2] == [1, 0]
    assert [read_marker(dst, i).fingerprint for i in range(3)] == ["fp0", "fp1", "fp2"]
    assert [pq.read_table(dst / f"shard-{i:05d}.parquet")["prompt"].to_pylist() for i in range(3)] == \
        [["p0"], ["p1"], ["p2"]]
