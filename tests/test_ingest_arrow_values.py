"""Parquet / `datasets` values Python cannot read as they are (invalid UTF-8 in a string column, a
date past year 9999) and prompts with a lone surrogate escape: the job goes on, every committed
shard is valid Arrow, and the columnar and row paths write the same metadata."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import read_quarantine


def _bad_text(*values: bytes, t=pa.string()) -> pa.Array:
    # Parquet writers and readers do not check UTF-8: a string column may hold any bytes
    binary = pa.large_binary() if t == pa.large_string() else pa.binary()
    return pa.array(list(values), binary).view(t)


def _ingest(path: Path, workdir: Path, **cfg) -> tuple[list[dict], list[dict], dict]:
    rep = ingest([str(path)], workdir, IngestConfig(**cfg), progress=False)
    files = sorted((workdir / "prompts").rglob("*.parquet"))
    assert files
    for f in files:  # every committed shard (and quarantine shard) reads back as valid Arrow
        pq.read_table(f).validate(full=True)
    rows = [r for f in files if "quarantine" not in f.parts for r in pq.read_table(f).to_pylist()]
    q = read_quarantine(workdir / "prompts")
    return rows, (q.to_pylist() if q is not None else []), rep.reasons


def _columnar_and_row_path(tmp_path: Path, columns: dict) -> list[list[str]]:
    """The metadata of a Parquet file with ``columns`` ingested with a string prompt column
    (columnar) and with a binary one (row by row): one list of metadata per path."""
    out = []
    for i, t in enumerate([pa.string(), pa.binary()]):
        f = tmp_path / f"p{i}.parquet"
        prompts = [f"prompt {k}" for k in range(len(next(iter(columns.values()))))]
        pq.write_table(pa.table({"prompt": pa.array(prompts if i == 0 else [p.encode() for p in prompts], t),
                                 **columns}), f)
        rows, q, _ = _ingest(f, tmp_path / f"w{i}")
        assert q == []
        assert [r["prompt"] for r in rows] == prompts
        out.append([r["metadata"] for r in rows])
    return out


# --- invalid UTF-8 in a Parquet string column ------------------------------------------------------

def test_parquet_prompt_with_invalid_utf8_is_quarantined_and_the_other_rows_kept(tmp_path):
    for t in (pa.string(), pa.large_string()):
        f = tmp_path / f"bad_{t}.parquet"
        pq.write_table(pa.table({"prompt": _bad_text(b"good one", b"bad \xff byte", b"caf\xc3\xa9", t=t),
                                 "n": [1, 2, 3]}), f)
        rows, q, reasons = _ingest(f, tmp_path / f"w_{t}")
        assert [(r["prompt"], json.loads(r["metadata"])) for r in rows] == [("good one", {"n": 1}),
                                                                           ("café", {"n": 3})]
        assert [(r["row"], r["reason"]) for r in q] == [
            (2, "invalid UTF-8 in the prompt; re-save the file as UTF-8 or pass --encoding")]
        assert reasons == {"invalid UTF-N in the prompt": 1}


def test_saved_dataset_prompt_with_invalid_utf8_is_quarantined(tmp_path):
    import datasets

    table = pa.table({"prompt": _bad_text(b"good one", b"\xfe\xff", b"fine")})
    datasets.Dataset(table).save_to_disk(str(tmp_path / "hf"))
    rows, q, _ = _ingest(tmp_path / "hf", tmp_path / "w")
    assert [r["prompt"] for r in rows] == ["good one", "fine"]
    assert [(r["row"], r["reason"].split(";")[0]) for r in q] == [(2, "invalid UTF-8 in the prompt")]


def test_parquet_metadata_with_invalid_utf8_is_kept_as_valid_json_with_the_byte_escaped(tmp_path):
    # the same text on both paths, and as a binary column with the same bytes is written
    meta = _columnar_and_row_path(tmp_path, {"note": _bad_text(b"m1", b"m\xfe2", "é".encode())})
    assert meta[0] == meta[1]
    assert [json.loads(m) for m in meta[0]] == [{"note": "m1"}, {"note": "m\udcfe2"}, {"note": "é"}]
    assert '"m\\udcfe2"' in meta[0][1]
    f = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"prompt": ["prompt 0", "prompt 1", "prompt 2"],
                             "note": pa.array([b"m1", b"m\xfe2", "é".encode()], pa.binary())}), f)
    rows, _, _ = _ingest(f, tmp_path / "wb")
    assert [r["metadata"] for r in rows] == meta[0]


def test_nested_parquet_metadata_with_invalid_utf8_is_the_same_valid_json_on_both_paths(tmp_path):
    tags = pa.ListArray.from_arrays(pa.array([0, 2, 3, 3], pa.int32()), _bad_text(b"a", b"b\xff", b"c"))
    info = pa.StructArray.from_arrays([_bad_text(b"x", b"y", b"\xc0z"), pa.array([1, 2, 3])], names=["s", "k"])
    meta = _columnar_and_row_path(tmp_path, {"tags": tags, "info": info})
    assert meta[0] == meta[1]
    assert [json.loads(m) for m in meta[0]] == [
        {"tags": ["a", "b\udcff"], "info": {"s": "x", "k": 1}},
        {"tags": ["c"], "info": {"s": "y", "k": 2}},
        {"tags": [], "info": {"s": "\udcc0z", "k": 3}}]


# --- values past Python's date range ---------------------------------------------------------------

def test_parquet_timestamp_out_of_range_is_written_as_text_and_the_job_goes_on(tmp_path):
    f = tmp_path / "ts.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"],
                             "ts": pa.array([0, 1700000000, 1700000000000], pa.timestamp("s"))}), f)
    rows, q, _ = _ingest(f, tmp_path / "w")
    assert q == []
    # in range: as the row reader writes a datetime (str); out of range: Arrow's stored value
    # (Parquet keeps seconds as milliseconds)
    assert [json.loads(r["metadata"]) for r in rows] == [
        {"ts": "1970-01-01 00:00:00"}, {"ts": "2023-11-14 22:13:20"},
        {"ts": "<timestamp[ms] out of range: 1700000000000000>"}]


def test_out_of_range_dates_are_the_same_text_on_the_columnar_and_the_row_path(tmp_path):
    day = pa.array([0, 10 ** 7, None], pa.date32())
    nested = pa.StructArray.from_arrays([pa.array([1, 2, 3]), pa.array([0, -10 ** 14, 5], pa.timestamp("s"))],
                                        names=["k", "at"])
    meta = _columnar_and_row_path(tmp_path, {"day": day, "nested": nested})
    assert meta[0] == meta[1]
    got = [json.loads(m) for m in meta[0]]
    assert got[0] == {"day": "1970-01-01", "nested": {"k": 1, "at": "1970-01-01 00:00:00"}}
    assert got[1]["day"] == "<date32[day] out of range: 10000000>"
    assert got[1]["nested"]["at"].endswith("out of range: -100000000000000000>")
    assert got[2] == {"nested": {"k": 3, "at": "1970-01-01 00:00:05"}}


# --- a lone surrogate from a JSON escape -----------------------------------------------------------

def test_prompt_with_an_unpaired_surrogate_escape_gets_its_own_reason_not_the_encoding_advice(tmp_path):
    for name, text in [("a.jsonl", '{"prompt": "emoji half \\ud83d here"}\n{"prompt": "ok"}\n'),
                       ("b.json", '[{"prompt": "low half \\ude00 here"}, {"prompt": "ok"}]')]:
        f = tmp_path / name
        f.write_text(text, encoding="utf-8")
        rows, q, reasons = _ingest(f, tmp_path / f"w_{name}")
        assert [r["prompt"] for r in rows] == ["ok"]
        assert len(q) == 1 and q[0]["row"] == 1
        reason = q[0]["reason"]
        assert reason.startswith("unpaired surrogate escape in the prompt (\\u")
        assert "UTF-8" not in reason and "--encoding" not in reason
        assert reasons == {"unpaired surrogate escape in the prompt": 1}
