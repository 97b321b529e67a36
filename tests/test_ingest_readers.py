"""Ingest readers other than JSONL (JSON, CSV, Parquet), compressed inputs, export and verify:
bad input is quarantined with its reason or reported, never dropped silently or fatal."""
from __future__ import annotations

import gzip
import json
import lzma
import os
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guidealign.ingest.csvrows import read_csv
from guidealign.ingest.jsonarray import read_json
from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import iter_tables, read_quarantine, read_table


def _rows(workdir) -> list[dict]:
    return [r for t in iter_tables(Path(workdir) / "prompts") for r in t.to_pylist()]


def _quarantine(workdir) -> list[dict]:
    t = read_quarantine(Path(workdir) / "prompts")
    return t.to_pylist() if t is not None else []


# --- compressed files cut off mid-stream -------------------------------------------------------

@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_truncated_gzip_keeps_every_complete_row_before_the_cut(tmp_path, kind):
    # ~400 KB of text: more than the 64 KiB sniffed up front, less than one 4 MiB read
    n = 12000
    if kind == "jsonl":
        text = "".join(json.dumps({"prompt": f"prompt {i} " + "x" * 20}) + "\n" for i in range(n))
    else:
        text = "prompt,n\n" + "".join(f"prompt {i} {'x' * 20},{i}\n" for i in range(n))
    packed = gzip.compress(text.encode())
    cut = packed[: len(packed) * 7 // 10]
    f = tmp_path / f"in.{kind}.gz"
    f.write_bytes(cut)
    recoverable = zlib.decompressobj(31).decompress(cut)
    complete = recoverable.count(b"\n") - (kind == "csv")  # lines with their end (less the header)
    assert 0 < complete < n

    rep = ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    # every complete line arrives, but (CSV) the last one, held back as maybe cut off
    assert rep.rows >= complete - 1
    reasons = [q["reason"] for q in _quarantine(tmp_path / "w")]
    assert any("truncated or corrupt" in r for r in reasons)


def test_small_truncated_xz_keeps_what_decompresses(tmp_path):
    text = "prompt,topic\n" + "".join(f"p{i},t\n" for i in range(2000))
    packed = lzma.compress(text.encode())
    f = tmp_path / "in.csv.xz"
    f.write_bytes(packed[: len(packed) // 2])
    rep = ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    assert rep.rows > 100  # the decompressed start is kept, not dropped with the failed read
    assert rep.quarantined >= 1


# --- JSON arrays and objects -------------------------------------------------------------------

def test_json_array_reads_big_ints_nan_and_a_bad_item_alone(tmp_path):
    f = tmp_path / "a.json"
    f.write_bytes(b'[{"prompt": "a", "n": 123456789012345678901234567890},\n'
                  b' {"prompt": "b", "x": NaN, "y": Infinity, "z": 1e400},\n'
                  b' {"prompt": "c" "broken"},\n'
                  b' 7,\n'
                  b' {"prompt": "d ] } [ {", "w": "\\"q\\""}]\n')
    rows = list(read_json(f))
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0][1] == {"prompt": "a", "n": 123456789012345678901234567890}
    assert rows[1][1]["prompt"] == "b" and rows[1][1]["y"] == float("inf")
    assert rows[2][2].startswith("array item 3 is not JSON") and rows[2][1] == {"_raw": '{"prompt": "c" "broken"}'}
    assert rows[3][2] == "array item 4 is a JSON number, not an object"
    assert rows[4][1] == {"prompt": "d ] } [ {", "w": '"q"'}

    rep = ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    out = _rows(tmp_path / "w")
    assert [r["prompt"] for r in out] == ["a", "b", "d ] } [ {"]
    assert json.loads(out[0]["metadata"]) == {"n": 123456789012345678901234567890}
    assert rep.quarantined == 2


def test_json_metadata_equals_the_same_records_as_jsonl(tmp_path):
    recs = [b'{"prompt": "a", "n": 123456789012345678901234567890, "f": 1.0}',
            b'{"prompt": "b", "x": NaN, "l": [1, {"k": null}]}']
    (tmp_path / "a.json").write_bytes(b"[" + b",\n".join(recs) + b"]")
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(recs) + b"\n")
    ingest([str(tmp_path / "a.json")], tmp_path / "w1", IngestConfig(), progress=False)
    ingest([str(tmp_path / "a.jsonl")], tmp_path / "w2", IngestConfig(), progress=False)
    strip = lambda rows: [(r["id"], r["prompt"], r["metadata"]) for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "w1")) == strip(_rows(tmp_path / "w2"))


def test_json_object_with_several_arrays_reads_them_all(tmp_path):
    f = tmp_path / "splits.json"
    f.write_text(json.dumps({"version": {"major": [1, 2]}, "train": [{"prompt": "t1"}],
                             "labels": ["x", "y"], "test.v2": [{"prompt": "s1"}, {"prompt": "s2"}]}))
    rows = list(read_json(f))
    assert [r[1]["prompt"] for r in rows if r[1]] == ["t1", "s1", "s2"]
    notes = [r[2] for r in rows if r[2]]
    assert len(notes) == 1 and '"labels"' in notes[0]  # the array of non-records is named, not dropped silently


def test_json_single_object_is_one_record(tmp_path):
    f = tmp_path / "one.json"
    f.write_text(json.dumps({"prompt": "only one", "tags": ["a", "b"]}))
    assert list(read_json(f)) == [(1, {"prompt": "only one", "tags": ["a", "b"]}, None)]


def test_json_cut_off_and_trailing_text_are_reported(tmp_path):
    f = tmp_path / "cut.json"
    f.write_text('[{"prompt": "a"}, {"prompt": "b"}, {"pro')
    rows = list(read_json(f))
    assert [r[1]["prompt"] for r in rows[:2]] == ["a", "b"]
    assert rows[2][0] == 3 and "cut off" in rows[2][2]
    g = tmp_path / "two.json"
    g.write_text('[{"prompt": "a"}]\n[{"prompt": "b"}]\n')
    rows = list(read_json(g))
    assert rows[0][1] == {"prompt": "a"} and rows[1][0] == 0 and "more text after" in rows[1][2]


def test_json_item_with_bytes_that_are_not_utf8_is_quarantined_alone(tmp_path):
    f = tmp_path / "bad.json"
    f.write_bytes('[{"prompt": "naïve"}, {"prompt": "x\xff"}, {"prompt": "after"}]'.encode("utf-8")
                  .replace(b"x\xc3\xbf", b"x\xff"))
    rows = list(read_json(f))
    assert rows[0][1] == {"prompt": "naïve"} and rows[2][1] == {"prompt": "after"}
    assert rows[1][2].startswith("array item 2 is not valid UTF-8")


# --- repeated column names ---------------------------------------------------------------------

def test_unique_names():
    from guidealign.ingest.keys import unique_names

    assert unique_names(["a", "b"]) == ["a", "b"]
    assert unique_names(["a", "a", "a"]) == ["a", "a.1", "a.2"]
    assert unique_names(["a", "a", "a.1"]) == ["a", "a.2", "a.1"]


@pytest.mark.parametrize("block_bytes", [64, 4 << 20])
def test_csv_repeated_header_name_keeps_both_columns(tmp_path, block_bytes):
    f = tmp_path / "dup.csv"
    f.write_text("prompt,topic,prompt\n" + "".join(f"first {i},t{i},second {i}\n" for i in range(50)))
    assert list(read_csv(f))[0] == (2, {"prompt": "first 0", "topic": "t0", "prompt.1": "second 0"}, None)
    ingest([str(f)], tmp_path / "w", IngestConfig(block_bytes=block_bytes), progress=False)
    rows = _rows(tmp_path / "w")
    assert len(rows) == 50 and rows[0]["prompt"] == "first 0"
    assert json.loads(rows[0]["metadata"]) == {"prompt.1": "second 0", "topic": "t0"}


def test_parquet_repeated_column_name_is_read_not_fatal(tmp_path):
    f = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a", "b"]), pa.array(["x", "y"])],
                                        names=["prompt", "prompt"]), f)
    ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    rows = _rows(tmp_path / "w")
    assert [r["prompt"] for r in rows] == ["a", "b"]
    assert json.loads(rows[0]["metadata"]) == {"prompt.1": "x"}


# --- export ------------------------------------------------------------------------------------

def test_export_of_a_smaller_dataset_removes_the_shards_of_the_larger_one(tmp_path):
    from guidealign.hub.export import run_export
    from guidealign.shards.verify import verify_run

    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    ingest([str(f)], tmp_path, IngestConfig(shard_rows=1), progress=False)
    run_export(None, tmp_path, dataset="prompts", progress=False)
    f.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(2)))
    os.utime(f, (1, 1))
    ingest([str(f)], tmp_path, IngestConfig(shard_rows=1), progress=False)
    run_export(None, tmp_path, dataset="prompts", progress=False)
    out = tmp_path / "export" / "prompts"
    joined = [json.loads(line)["prompt"] for p in sorted(out.glob("shard-*.jsonl")) for line in open(p)]
    assert joined == ["q0", "q1"]
    assert verify_run(tmp_path).ok


def test_export_unknown_column_fails_before_writing(tmp_path):
    from guidealign.hub.export import run_export

    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"prompt": "p"}) + "\n")
    ingest([str(f)], tmp_path, IngestConfig(), progress=False)
    with pytest.raises(ValueError, match="nope"):
        run_export(None, tmp_path, dataset="prompts", columns=["prompt", "nope"], out=tmp_path / "x",
                   progress=False)
    assert not (tmp_path / "x").exists()  # no manifest, no shard


# --- verify ------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ['{"stage": "prompts"}', "[1, 2]", '{"num_shards": "3x"}',
                                    '{"num_shards": null}', '{"num_shards": -1}'])
def test_verify_reports_a_damaged_manifest_instead_of_raising(tmp_path, damage):
    from guidealign.shards.verify import verify_run

    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    ingest([str(f)], tmp_path / "run", IngestConfig(shard_rows=1), progress=False)
    (tmp_path / "run" / "prompts" / "_stage.json").write_text(damage)
    rep = verify_run(tmp_path / "run")
    assert not rep.ok
    assert [(p.kind, p.path) for p in rep.failing] == [("corrupt", "prompts/_stage.json")]


@pytest.mark.parametrize("block_bytes", [64, 4 << 20])
def test_csv_blank_lines_before_the_header(tmp_path, block_bytes):
    f = tmp_path / "lead.csv"
    f.write_text("\n  \nprompt,topic\nfirst question,a\n\nsecond question,b\n")
    rep = ingest([str(f)], tmp_path / "run", IngestConfig(shard_rows=10, block_bytes=block_bytes),
                 progress=False)
    rows = read_table(tmp_path / "run" / "prompts", 0).to_pylist()
    assert [(r["prompt"], json.loads(r["metadata"])) for r in rows] == \
        [("first question", {"topic": "a"}), ("second question", {"topic": "b"})]
    assert rep.quarantined == 0
    # row numbers are the file's lines: a bad row after the blank lead-in is named by its line
    g = tmp_path / "bad.csv"
    g.write_text("\nprompt,topic\n,a\n")
    ingest([str(g)], tmp_path / "run2", IngestConfig(shard_rows=10, block_bytes=block_bytes), progress=False)
    q = read_quarantine(tmp_path / "run2" / "prompts").to_pylist()
    assert [r["row"] for r in q] == [3]


def test_a_saved_dataset_dict_names_the_split_of_each_row(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": ["t1", "t2", ""]}),
        "test": datasets.Dataset.from_dict({"prompt": ["s1"]}),
    }).save_to_disk(str(tmp_path / "hf"))
    ingest([str(tmp_path / "hf")], tmp_path / "run", IngestConfig(shard_rows=10), progress=False)
    rows = read_table(tmp_path / "run" / "prompts", 0).to_pylist()
    hf = str(tmp_path / "hf")
    assert sorted((r["prompt"], r["source"]) for r in rows) == \
        [("s1", f"{hf}/test:1"), ("t1", f"{hf}/train:1"), ("t2", f"{hf}/train:2")]
    q = read_quarantine(tmp_path / "run" / "prompts").to_pylist()
    assert [(r["source"], r["row"]) for r in q] == [(f"{hf}/train", 3)]


@pytest.mark.parametrize("opener", [open, gzip.open])
def test_json_lines_saved_as_json_are_read_line_by_line(tmp_path, opener):
    """A .json file holding one object per line (JSON Lines under the wrong name) gave its
    first record and one quarantine row for all the rest; it is read as JSON Lines now, every
    row with its line number, a bad line quarantined alone."""
    name = "mislabelled.json" + (".gz" if opener is gzip.open else "")
    f = tmp_path / name
    with opener(f, "wt", encoding="utf-8") as fh:
        fh.write('{"prompt": "first"}\n{"prompt": "second", "n": 2}\n\n{"prompt": \n{"prompt": "fourth"}\n')
    rep = ingest([str(f)], tmp_path / "run", IngestConfig(), progress=False)
    assert (rep.rows, rep.quarantined) == (3, 1)
    t = read_table(tmp_path / "run" / "prompts", 0)
    assert t.column("prompt").to_pylist() == ["first", "second", "fourth"]
    assert t.column("source").to_pylist() == [f"{f}:1", f"{f}:2", f"{f}:5"]
    q = read_quarantine(tmp_path / "run" / "prompts")
    assert q.column("row").to_pylist() == [4] and "not JSON" in q.column("reason")[0].as_py()


@pytest.mark.parametrize("text, prompts", [
    ('{\n  "prompt": "pretty printed"\n}\n', ["pretty printed"]),
    ('{"prompt": "one line"}\n', ["one line"]),
    ('[{"prompt": "a"},\n{"prompt": "b"}]\n', ["a", "b"]),
    ('{"data": [{"prompt": "a"}]}\n', ["a"]),
])
def test_a_json_value_is_still_read_as_json(tmp_path, text, prompts):
    f = tmp_path / "ok.json"
    f.write_text(text)
    rep = ingest([str(f)], tmp_path / "run", IngestConfig(), progress=False)
    assert rep.quarantined == 0
    assert read_table(tmp_path / "run" / "prompts", 0).column("prompt").to_pylist() == prompts
