"""Review of the ingest readers (CSV, JSON, encodings, metadata): each test is a defect found on a
plausible input, reproduced small."""
from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guidealign.core.ids import prompt_hash
from guidealign.ingest.metadata import meta_json, metadata_column
from guidealign.ingest.csvrows import read_csv
from guidealign.ingest.jsonarray import read_json
from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import iter_tables, read_quarantine


def _ingest(path: Path, workdir: Path, **cfg) -> tuple[list[dict], list[dict]]:
    ingest([str(path)], workdir, IngestConfig(**cfg), progress=False)
    q = read_quarantine(workdir / "prompts")
    rows = [r for t in iter_tables(workdir / "prompts") for r in t.to_pylist()]
    return rows, (q.to_pylist() if q is not None else [])


# --- --encoding utf-16 / utf-32 on a file with its byte-order mark ---------------------------------

@pytest.mark.parametrize("codec,data", [
    ("utf-16", lambda t: t.encode("utf-16")),                                   # BOM + native (LE)
    ("utf-16", lambda t: codecs.BOM_UTF16_BE + t.encode("utf-16-be")),
    ("UTF16", lambda t: codecs.BOM_UTF16_LE + t.encode("utf-16-le")),
    ("utf-32", lambda t: t.encode("utf-32")),
    ("utf-16", lambda t: t.encode("utf-16-le")),                                # no BOM at all
    ("utf-16", lambda t: t.encode("utf-16-be")),
])
def test_explicit_utf16_or_utf32_encoding_reads_a_file_with_or_without_its_bom(tmp_path, codec, data):
    # the unknown-encoding message itself suggests "utf-16"; an Excel "Unicode Text" export
    # (UTF-16 with a BOM) was refused as "a utf-16-le byte-order mark but --encoding utf-16"
    text = "prompt\ttopic\ncafé crème\tx\nnaïve\ty\n"
    f = tmp_path / "export.tsv"
    f.write_bytes(data(text))
    rows, q = _ingest(f, tmp_path / "w", encoding=codec)
    assert q == []
    assert [(r["prompt"], json.loads(r["metadata"])) for r in rows] == \
        [("café crème", {"topic": "x"}), ("naïve", {"topic": "y"})]
    assert [r["id"] for r in rows] == [prompt_hash(p).hex() for p in ("café crème", "naïve")]


def test_explicit_encoding_that_contradicts_the_bom_is_still_refused(tmp_path):
    from guidealign.ingest.readers import IngestError

    f = tmp_path / "a.csv"
    f.write_bytes("prompt\nx\n".encode("utf-16"))
    with pytest.raises(IngestError, match="byte-order mark"):
        ingest([str(f)], tmp_path / "w", IngestConfig(encoding="cp1252"), progress=False)
    with pytest.raises(IngestError, match="byte-order mark"):
        ingest([str(f)], tmp_path / "w", IngestConfig(encoding="utf-32"), progress=False)


# --- a JSON object record holding an empty array ---------------------------------------------------

def test_json_single_record_with_an_empty_list_is_not_dropped(tmp_path):
    # {"prompt": ..., "tags": []} was taken for a container of (no) records: no row, no quarantine
    f = tmp_path / "one.json"
    f.write_text(json.dumps({"prompt": "What is the capital of France?", "tags": [], "n": 1}))
    assert list(read_json(f)) == [(1, {"prompt": "What is the capital of France?", "tags": [], "n": 1}, None)]
    rows, q = _ingest(f, tmp_path / "w")
    assert [(r["prompt"], json.loads(r["metadata"])) for r in rows] == \
        [("What is the capital of France?", {"n": 1, "tags": []})]
    assert q == []


def test_json_object_of_empty_or_non_empty_arrays_is_still_a_container(tmp_path):
    f = tmp_path / "empty.json"
    f.write_text(json.dumps({"train": [], "test": []}))
    assert list(read_json(f)) == []
    g = tmp_path / "split.json"
    g.write_text(json.dumps({"train": [], "test": [{"prompt": "a"}, {"prompt": "b"}]}))
    assert list(read_json(g)) == [(1, {"prompt": "a"}, None), (2, {"prompt": "b"}, None)]
    h = tmp_path / "wrapped.json"
    h.write_text(json.dumps({"version": 2, "data": [{"prompt": "a"}], "notes": []}))
    assert list(read_json(h)) == [(1, {"prompt": "a"}, None)]


# --- a CSV field longer than Python's default csv limit (131072 chars) ----------------------------

@pytest.mark.parametrize("block_bytes", [4096, 4 << 20])
def test_csv_long_quoted_field_does_not_corrupt_the_rows_after_it(tmp_path, block_bytes):
    # a pandas/Excel export with a long document beside the prompt: past 131072 chars Python's
    # csv module stopped mid-field, and the rest of the field and the next rows were read as
    # new records (a garbage prompt ingested, a real row's prompt lost inside another)
    long = ("word " * 20 + "\n") * 2000  # ~200k chars over 2000 lines
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["prompt", "context"])
    w.writerow(["first q", "short"])
    w.writerow(["second q", long])
    for i in range(5):
        w.writerow([f"q{i}", 'ctx, "quoted"'])
    f = tmp_path / "long.csv"
    f.write_text(buf.getvalue(), newline="")
    want = ["first q", "second q"] + [f"q{i}" for i in range(5)]
    assert [rec["prompt"] for _, rec, err in read_csv(f) if err is None] == want
    rows, q = _ingest(f, tmp_path / "w", block_bytes=block_bytes)
    assert q == []
    assert [r["prompt"] for r in rows] == want
    assert json.loads(rows[1]["metadata"]) == {"context": long}
    assert [int(r["source"].rsplit(":", 1)[1]) for r in rows] == [2, 3, 2004, 2005, 2006, 2007, 2008]


# --- metadata JSON: the same text on the columnar and the row path ---------------------------------

def test_metadata_with_an_undecodable_binary_value_is_the_same_text_on_both_paths(tmp_path):
    # a Parquet binary column with a byte that is not UTF-8 beside a non-ASCII string column:
    # the row path escaped every non-ASCII character of the row ("\\u00e9"), the columnar one
    # only the undecodable byte, so the same row's metadata differed by path
    table = pa.table({"prompt": ["a"], "blob": pa.array([b"\xff"], pa.binary()), "note": ["é"]})
    col = metadata_column(table, "prompt").to_pylist()
    rec = {"prompt": "a", "blob": b"\xff".decode("utf-8", "surrogateescape"), "note": "é"}
    assert col == [meta_json(rec, "prompt")]
    assert json.loads(col[0]) == {"blob": "\udcff", "note": "é"}

    out = []
    for i, prompt_type in enumerate([pa.string(), pa.binary()]):  # columnar, then row by row
        f = tmp_path / f"b{i}.parquet"
        prompts = ["a", "b"] if prompt_type == pa.string() else [b"a", b"b"]
        pq.write_table(pa.table({"prompt": pa.array(prompts, prompt_type),
                                 "blob": pa.array([b"\xff", b"ok"], pa.binary()),
                                 "note": ["é", "ü"]}), f)
        rows, q = _ingest(f, tmp_path / f"w{i}")
        assert q == []
        out.append([r["metadata"] for r in rows])
    assert out[0] == out[1]
    assert json.loads(out[0][0]) == {"blob": "\udcff", "note": "é"}
