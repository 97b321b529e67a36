"""Review of ingest's columnar fast path and commit path: each test is a defect found by running
the same input through the columnar blocks (of several sizes) and the row-by-row reference."""
from __future__ import annotations

from pathlib import Path

import pytest

from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import iter_tables, read_quarantine


def _ingest(path: Path, workdir: Path, **cfg) -> tuple[list[tuple], list[tuple]]:
    """(id, prompt, source line, metadata) of the kept rows, (row, reason) of the quarantined."""
    ingest([str(path)], workdir, IngestConfig(**cfg), progress=False)
    rows = [(r["id"], r["prompt"], r["source"].rsplit(":", 1)[1], r["metadata"])
            for t in iter_tables(workdir / "prompts") for r in t.to_pylist()]
    q = read_quarantine(workdir / "prompts")
    return rows, [(r["row"], r["reason"]) for r in (q.to_pylist() if q is not None else [])]


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("name,data", [
    # `cat a.jsonl b.jsonl` where b.jsonl was saved with a byte-order mark
    ("cat.jsonl", b'{"prompt": "first"}\n' + BOM + b'{"prompt": "second"}\n{"prompt": "third"}\n'),
    # `cat a.csv b.csv` (b's header line comes through as a row), b saved by Excel with a BOM
    ("cat.csv", b"prompt,n\nfirst,1\n" + BOM + b"prompt,n\n" + BOM + b"second,2\nthird,3\n"),
])
def test_a_line_starting_with_a_bom_reads_the_same_at_a_block_start(tmp_path, name, data):
    """pyarrow's JSON and CSV readers skip a UTF-8 byte-order mark at the start of what they
    parse, i.e. at the start of each block, and nowhere else; Python's readers keep it. So a
    line starting with one (files concatenated) was kept or quarantined (JSONL), or came out
    with another prompt, id or metadata (CSV), depending only on where the blocks were cut."""
    f = tmp_path / name
    f.write_bytes(data)
    whole = _ingest(f, tmp_path / "whole")                  # one block: the reference reading
    for bb in (1, 16):                                       # the BOM line starts a block
        assert _ingest(f, tmp_path / f"w{bb}", block_bytes=bb) == whole, bb


@pytest.mark.parametrize("first", [b"   \n", b"\t\r\n", b"\xc2\xa0\n"])
def test_csv_whitespace_line_before_the_header_is_skipped_as_the_row_reader_skips_it(tmp_path, first):
    """The row reader skips blank lines before the header (a line of spaces is blank); the
    columnar CSV reader took such a line as the header (one unnamed column), so every row of
    the file was quarantined as "missing prompt field 'prompt'" and the header line with them."""
    from guidealign.ingest.csvrows import read_csv

    f = tmp_path / "lead.csv"
    f.write_bytes(first + b"prompt,topic\nfirst,a\nsecond,b\n")
    assert [r[1] for r in read_csv(f)] == [{"prompt": "first", "topic": "a"}, {"prompt": "second", "topic": "b"}]
    rows, bad = _ingest(f, tmp_path / "w")
    assert bad == []
    assert [(p, line, m) for _, p, line, m in rows] == [("first", "3", '{"topic": "a"}'),
                                                        ("second", "4", '{"topic": "b"}')]


def test_the_manifest_names_the_encoding_a_csv_was_read_with(tmp_path):
    """The stage manifest lists each text file's encoding (a cp1252 export read as such is
    worth seeing); CSV files were missing from it, JSONL files were not."""
    from guidealign.shards import read_manifest

    (tmp_path / "excel.csv").write_bytes("prompt,n\nCaf\u00e9 au lait?,1\n".encode("cp1252"))
    (tmp_path / "a.jsonl").write_bytes('{"prompt": "Caf\u00e9?"}\n'.encode("utf-8"))
    ingest([str(tmp_path / "excel.csv"), str(tmp_path / "a.jsonl")], tmp_path / "w",
           IngestConfig(encoding="auto"), progress=False)
    enc = read_manifest(tmp_path / "w" / "prompts")["encodings"]
    assert enc.get(str(tmp_path / "excel.csv")) == "cp1252", enc
    assert enc.get(str(tmp_path / "a.jsonl")) == "utf-8", enc


def test_a_bad_csv_row_reads_only_its_own_record_row_by_row(tmp_path, monkeypatch):
    """A parsed CSV block with one row the row reader must settle (an empty prompt) read the
    whole block again with Python's csv: with 0.5% bad rows, i.e. one in nearly every block,
    all of the file went through it twice (CSV ingest 3x slower). Only that record is read
    now, and the rows and reasons are those of the row-by-row reference (quoted line ends,
    CRLF and blank lines around it)."""
    import csv as csvmod
    import io

    from guidealign.ingest import csvcol

    buf = io.StringIO()
    w = csvmod.writer(buf, lineterminator="\r\n")
    w.writerow(["prompt", "topic"])
    for i in range(400):
        w.writerow(["" if i % 97 == 5 else (f'line one\nline "two" of {i}' if i % 50 == 3 else f"prompt {i}"),
                    f"t{i}"])
        if i % 61 == 0:
            buf.write("\r\n")  # a blank line
    f = tmp_path / "a.csv"
    f.write_text(buf.getvalue(), newline="")
    read = []
    real = csvcol._csv_rows

    def counting(*a, **k):
        for row in real(*a, **k):
            read.append(row)
            yield row

    monkeypatch.setattr(csvcol, "_csv_rows", counting)
    whole = _ingest(f, tmp_path / "w")
    assert len(whole[1]) == 5 and all(r == "empty prompt" for _, r in whole[1])
    assert len(read) == 5, f"{len(read)} records read row by row for 5 bad rows"
    monkeypatch.setattr(csvcol, "_csv_rows", real)
    for bb in (64, 1000):  # other block cuts give the same rows and reasons
        assert _ingest(f, tmp_path / f"w{bb}", block_bytes=bb) == whole, bb
    from guidealign.ingest.csvrows import read_csv

    ref_bad = [(row, "empty prompt") for row, rec, err in read_csv(f) if err is None and not rec["prompt"]]
    assert whole[1] == ref_bad
