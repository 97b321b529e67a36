"""Ingest: file names that look like patterns, a wrong --encoding, a JSON array saved as .jsonl."""
from __future__ import annotations

import codecs
import gzip
import json
import logging
import zlib

import pytest
from test_ingest import _ingested

from guidealign.ingest.readers import IngestError
from guidealign.ingest.run import IngestConfig, ingest, run_fingerprint


# --- a file name with [ ] ? * is that file, not a pattern ---------------------------------------

def test_a_file_named_with_brackets_is_read_not_a_file_its_name_matches_as_a_pattern(tmp_path, caplog):
    named = tmp_path / "data[1].jsonl"
    named.write_text('{"prompt": "from the literal file"}\n')
    (tmp_path / "data1.jsonl").write_text('{"prompt": "from data1.jsonl"}\n')
    with caplog.at_level(logging.WARNING):
        rows, q, rep = _ingested([named], tmp_path / "w")
    assert [r["prompt"] for r in rows] == ["from the literal file"] and q == []
    assert rep.files == 1
    assert any("data[1].jsonl" in m and "data1.jsonl" in m for m in caplog.messages), caplog.messages


def test_a_file_named_with_brackets_is_read_when_its_name_as_a_pattern_matches_no_file(tmp_path):
    named = tmp_path / "what?[draft]*.jsonl"
    named.write_text('{"prompt": "only me"}\n')
    rows, q, _ = _ingested([named], tmp_path / "w")
    assert [r["prompt"] for r in rows] == ["only me"] and q == []
    # the other ranks fingerprint the same file (they failed: "the pattern matches no file")
    cfg = IngestConfig()
    assert run_fingerprint([str(named)], cfg, tmp_path / "w" / "prompts")


def test_a_pattern_under_a_directory_with_brackets_in_its_name_reads_that_directory(tmp_path):
    d = tmp_path / "run[2]"
    d.mkdir()
    (d / "a.jsonl").write_text('{"prompt": "in run[2]"}\n')
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "b.jsonl").write_text('{"prompt": "in run2"}\n')
    rows, q, rep = _ingested([d / "*.jsonl"], tmp_path / "w")
    assert [r["prompt"] for r in rows] == ["in run[2]"] and q == [] and rep.files == 1


# --- a wrong encoding is an encoding mismatch, not damage ------------------------------------

def test_utf16_given_for_utf8_text_names_the_encoding_not_damage(tmp_path):
    f = tmp_path / "even.jsonl"
    f.write_bytes(b'{"prompt":"a"}\n{"prompt":"bb"}\n')  # 31 bytes: ends inside a UTF-16 code unit
    rows, q, _ = _ingested([f], tmp_path / "w", encoding="utf-16")
    assert rows == []
    file_row = [r["reason"] for r in q if r["row"] == 0]
    assert len(file_row) == 1, q
    why = file_row[0]
    assert "utf-16-le" in why and "--encoding" in why and "ingest.encoding" in why, why
    assert "re-download" not in why and "re-compress" not in why and "truncated or corrupt" not in why


def test_utf16_given_for_utf8_text_quarantines_each_line_not_the_rest_of_the_file(tmp_path):
    """Arabic UTF-8 read as UTF-16 holds bad surrogate code units with an ASCII byte: the decoder
    stopped at the first, the rest of the file was lost as "truncated or corrupt"."""
    prompts = ["hello", "مرحبا بالعالم", "world", "שלום", "last one"]
    f = tmp_path / "ar.jsonl"
    f.write_bytes(b"".join(json.dumps({"prompt": p}, ensure_ascii=False).encode() + b"\n" for p in prompts))
    with pytest.raises(UnicodeDecodeError, match="surrogate"):
        f.read_bytes().decode("utf-16-le")
    rows, q, _ = _ingested([f], tmp_path / "w", encoding="utf-16")
    assert rows == []
    assert not any("truncated or corrupt" in r["reason"] for r in q), q
    lines = [r for r in q if r["row"] != 0]
    assert lines and all("utf-16-le" in r["reason"] for r in lines), q


def test_a_cut_gzip_of_utf16_text_is_still_damage_with_the_decompressor_error(tmp_path):
    text = "".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(3000))
    packed = gzip.compress(codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    cut = len(packed) // 2
    while len(zlib.decompressobj(31).decompress(packed[:cut])) % 2 == 0:
        cut += 1  # the bytes that come through end inside a code unit
    f = tmp_path / "cut.jsonl.gz"
    f.write_bytes(packed[:cut])
    rows, q, _ = _ingested([f], tmp_path / "w")
    assert rows
    why = q[-1]["reason"]
    assert q[-1]["row"] == 0 and "truncated or corrupt" in why and "re-download or re-compress" in why
    assert "EOFError" in why and "character" not in why, why


# --- a JSON array saved as .jsonl -------------------------------------------------------------

@pytest.mark.parametrize("name,data", [
    ("pretty.jsonl", b'[\n  {"prompt": "a"},\n  {"prompt": "b",\n   "n": 2}\n]\n'),
    ("one-line.jsonl", b'[{"prompt": "a"}, {"prompt": "b", "n": 2}]\n'),
    ("packed.jsonl.gz", gzip.compress(b'\n[\n  {"prompt": "a"},\n  {"prompt": "b", "n": 2}\n]', mtime=0)),
], ids=["pretty", "one-line", "gzip"])
def test_a_json_array_saved_as_jsonl_is_read_as_json_with_every_item(tmp_path, caplog, name, data):
    f = tmp_path / name
    f.write_bytes(data)
    with caplog.at_level(logging.WARNING):
        rows, q, _ = _ingested([f], tmp_path / "w")
    assert sorted(r["prompt"] for r in rows) == ["a", "b"] and q == []
    assert any(name in m and "JSON array" in m for m in caplog.messages), caplog.messages
    # a JSONL file whose first line is an array (and more lines follow) stays JSON Lines
    g = tmp_path / "lines.jsonl"
    g.write_text('["not", "a record"]\n{"prompt": "c"}\n{"prompt": "d"}\n')
    rows, q, _ = _ingested([g], tmp_path / "w2")
    assert [r["prompt"] for r in rows] == ["c", "d"]
    assert [(r["row"], r["reason"]) for r in q] == [(1, "line 1 is a JSON array, not an object")]


def test_a_jsonl_that_starts_as_an_array_but_does_not_read_as_one_fails_saying_rename_it(tmp_path):
    f = tmp_path / "bad-item.jsonl"
    f.write_text('[\n  {"prompt": "a"},\n  {"prompt": oops},\n  {"prompt": "c"}\n]\n')
    with pytest.raises(IngestError, match=r"bad-item\.jsonl: .*rename it to \.json"):
        ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    assert not (tmp_path / "w" / "prompts").exists()
