"""Ingest's sniffing of what a text input is: compression by magic bytes (not the suffix alone),
UTF-16 without a byte-order mark, JSON Lines saved as .json. Misread, such a file gave no rows
or gibberish with a misleading reason; read right, every row arrives or is quarantined with how
to fix the file."""
from __future__ import annotations

import gzip
import json
import logging
import zlib

import pytest
from test_ingest import _ingested

from guidealign.ingest.jsonrows import is_json_lines
from guidealign.ingest.readers import IngestError
from guidealign.ingest.run import IngestConfig, ingest

ZH = [f"请解释一下量子力学的基本原理和它的应用场景以及未来的发展方向和挑战是什么样的，"
      f"再举几个日常生活中的例子说明这些原理怎样影响我们使用的电子设备和通信技术 {i}" for i in range(20)]


def _jsonl(prompts) -> bytes:
    return "".join(json.dumps({"prompt": p, "n": i}, ensure_ascii=False) + "\n"
                   for i, p in enumerate(prompts)).encode()


# --- compression: the magic bytes, not the suffix --------------------------------------------

@pytest.mark.parametrize("name", ["plain.jsonl.gz", "plain.jsonl.zst", "plain.csv.bz2", "plain.jsonl.xz",
                                  "gzipped.jsonl.zst"])
def test_a_file_not_compressed_as_its_suffix_says_is_read_by_its_magic_bytes(tmp_path, caplog, name):
    """A browser saves a decompressed download under its .gz name: read as gzip it gave 0 prompts
    and a quarantine row saying the rows above it were kept."""
    prompts = [f"prompt {i}" for i in range(5)]
    data = ("prompt\n" + "".join(p + "\n" for p in prompts)).encode() if ".csv" in name else _jsonl(prompts)
    f = tmp_path / name
    f.write_bytes(gzip.compress(data) if name.startswith("gzipped") else data)
    with caplog.at_level(logging.WARNING):
        rows, q, rep = _ingested([f], tmp_path / "w")
    assert q == []
    assert [r["prompt"] for r in rows] == prompts
    said = "gzip-compressed" if name.startswith("gzipped") else "not compressed"
    assert any(str(f) in m and said in m for m in caplog.messages), caplog.messages


@pytest.mark.parametrize("data", [b"\x1f\x8b" + bytes(range(200)), gzip.compress(_jsonl(["a", "b"]))[:6]],
                         ids=["garbage", "cut-in-header"])
def test_a_compressed_file_damaged_from_its_first_byte_fails_up_front(tmp_path, data):
    """No row can be read from it: a clear error naming the file before any work, not a quarantine
    row saying that "the rows above" were kept."""
    f = tmp_path / "bad.jsonl.gz"
    f.write_bytes(data)
    with pytest.raises(IngestError, match=r"bad\.jsonl\.gz: cannot be decompressed from its first byte"):
        ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    assert not (tmp_path / "w" / "prompts").exists()


def test_rows_are_said_kept_only_when_some_were_read_before_the_damage(tmp_path):
    """A .jsonl.gz cut inside its first (long) line: no row was read, and the reason must not say
    that the rows above were kept; a one-line JSON array cut after some items still says it."""
    line = json.dumps({"prompt": "long", "doc": "".join(f"{i:x}" for i in range(100_000))}) + "\n"
    packed = gzip.compress((line * 2).encode())
    cut = packed[: len(packed) // 4]
    assert b"\n" not in zlib.decompressobj(31).decompress(cut)
    f = tmp_path / "cut.jsonl.gz"
    f.write_bytes(cut)
    rows, q, _ = _ingested([f], tmp_path / "w")
    assert rows == []
    damage = [r["reason"] for r in q if "truncated or corrupt" in r["reason"]]
    assert len(damage) == 1 and "they were kept" not in damage[0] and "rows above" not in damage[0]
    assert "before its first whole row" in damage[0] and "re-download or re-compress" in damage[0]

    items = json.dumps([{"prompt": f"prompt number {i}"} for i in range(20_000)]).encode()
    g = tmp_path / "cut.json.gz"
    packed = gzip.compress(items)
    g.write_bytes(packed[: len(packed) // 2])
    rows, q, _ = _ingested([g], tmp_path / "w2")
    assert len(rows) > 100
    assert "they were kept" in q[-1]["reason"]


# --- UTF-16 without a byte-order mark, mostly not ASCII --------------------------------------

@pytest.mark.parametrize("order", ["le", "be"])
@pytest.mark.parametrize("kind", ["csv", "jsonl", "crlf.csv"])
def test_utf16_without_bom_in_a_non_latin_script_is_read_as_utf16(tmp_path, order, kind):
    """Chinese in UTF-16 has too few zero bytes for the ASCII test: it was read as UTF-8 (every
    row quarantined, "pass --encoding cp1252") or as cp1252 gibberish."""
    nl = "\r\n" if kind.startswith("crlf") else "\n"
    text = ("prompt" + nl + "".join(p + nl for p in ZH)) if kind.endswith("csv") \
        else _jsonl(ZH).decode()
    f = tmp_path / f"zh.{kind}"
    f.write_bytes(text.encode(f"utf-16-{order}"))
    rows, q, rep = _ingested([f], tmp_path / "w")
    assert q == []
    assert [r["prompt"] for r in rows] == ZH
    # --encoding utf-16 (no byte order given) finds big-endian too
    rows, q, _ = _ingested([f], tmp_path / "w2", encoding="utf-16")
    assert q == [] and [r["prompt"] for r in rows] == ZH


def test_zero_bytes_that_do_not_read_as_utf16_are_quarantined_with_the_utf16_hint(tmp_path):
    """UTF-16 that does not decode cleanly (a byte lost): every row is quarantined saying to pass
    --encoding utf-16 (it was read as cp1252 gibberish, or told to pass --encoding cp1252)."""
    data = "".join(p + "\n" for p in ["prompt"] + ZH).encode("utf-16-be")
    f = tmp_path / "damaged.csv"
    f.write_bytes(data[:3] + data[4:])  # one byte lost: the code units after it are out of step
    rows, q, _ = _ingested([f], tmp_path / "w")
    assert rows == []
    reasons = [r["reason"] for r in q if r["row"] > 1]
    assert len(reasons) == len(ZH) and all("--encoding utf-16" in r for r in reasons), reasons[:2]

    # a UTF-8 file with a stray zero byte is still UTF-8: only that line is quarantined
    g = tmp_path / "nul.jsonl"
    g.write_bytes(_jsonl(ZH).replace(b"\n", b"\n\x00", 1))
    rows, q, _ = _ingested([g], tmp_path / "w2")
    assert [r["prompt"] for r in rows] == ZH[:1] + ZH[2:]
    assert [r["row"] for r in q] == [2]


@pytest.mark.parametrize("extra", [b"", b"x"], ids=["even-length", "odd-length"])
def test_cp1252_with_a_stray_zero_byte_after_a_line_end_stays_cp1252(tmp_path, extra):
    """One "\n\x00" in 8-bit text made it UTF-16 (found in review): every row mojibake (one
    quarantine row for the file) or, at an odd length, a crash mid-ingest. Before this round's
    sniffing, such a file read as cp1252, and it still does; only the line with the zero byte
    has it."""
    prompts = ["Café au lait?", "Crème brûlée, how?", "Naïve question", "Über alles"]
    data = ("prompt\n" + "".join(p + "\n" for p in prompts)).encode("cp1252")
    cut = data.index(b"\n", data.index(b"\n") + 1) + 1  # after the first row's line end
    data = data[:cut] + b"\x00" + data[cut:] + extra
    if len(data[:cut]) % 2:  # keep the zero byte at an even offset (a UTF-16-LE code unit)
        data = b" " + data
    f = tmp_path / "cp.csv"
    f.write_bytes(data)
    rows, q, _ = _ingested([f], tmp_path / "w")
    assert q == []
    assert [r["prompt"] for r in rows] == [prompts[0], "\x00" + prompts[1], *prompts[2:]] + (["x"] if extra else [])


def test_utf16_cut_inside_its_last_code_unit_is_damage_not_a_crash(tmp_path):
    """A UTF-16 file with a BOM whose last byte is missing raised UnicodeDecodeError mid-ingest
    (the job died); now its rows are kept and the cut is one quarantine row."""
    data = ("prompt\n" + "".join(p + "\n" for p in ZH)).encode("utf-16")
    f = tmp_path / "cut.csv"
    f.write_bytes(data[:-1])
    rows, q, _ = _ingested([f], tmp_path / "w")
    assert [r["prompt"] for r in rows] == ZH[:-1]
    # the last row lost its line end with the cut: quarantined as maybe cut off, with the cause
    assert [r["row"] for r in q] == [len(ZH) + 1, 0] and "may be cut off" in q[0]["reason"]
    assert all("ends inside a character" in r["reason"] for r in q), q


# --- JSON Lines saved as .json ---------------------------------------------------------------

def test_json_lines_with_a_first_line_longer_than_the_sniff_are_read_line_by_line(tmp_path):
    f = tmp_path / "long-first.json"
    first = json.dumps({"prompt": "first", "doc": "x" * (1 << 20)})
    f.write_text(first + "\n" + "".join(json.dumps({"prompt": f"s{i}"}) + "\n" for i in range(5)))
    rows, q, _ = _ingested([f], tmp_path / "w")
    assert q == []
    assert [r["prompt"] for r in rows] == ["first"] + [f"s{i}" for i in range(5)]
    assert [r["source"] for r in rows] == [f"{f}:{i}" for i in range(1, 7)]


def test_json_lines_with_a_broken_first_line_keep_every_good_line(tmp_path):
    f = tmp_path / "broken-first.json"
    f.write_text('{"prompt": "broken"\n' + "".join(json.dumps({"prompt": f"s{i}"}) + "\n" for i in range(5)))
    rows, q, _ = _ingested([f], tmp_path / "w")
    assert [r["prompt"] for r in rows] == [f"s{i}" for i in range(5)]
    assert [r["row"] for r in q] == [1] and "line 1" in q[0]["reason"]
    # a pretty-printed JSON object whose arrays end in one-line objects is still one JSON value
    pretty = b'{"train": [\n {"prompt": "a"},\n {"prompt": "b"}\n],\n"test": [\n {"prompt": "c"}\n]}\n'
    assert not is_json_lines(pretty)
