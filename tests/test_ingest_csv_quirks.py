"""CSV/TSV quirks that lost or cut rows silently: a quote never closed (it took in the rest of
the file as one prompt), a row with more fields than the header (the prompt cut at the first
delimiter, the rest kept as metadata), a one-column file (a prompt with a comma cut there), a
row too short to reach the prompt column. Each file is read at two block sizes (columnar blocks
through pyarrow.csv, and one block) and row by row, and all must give the same rows, sources,
metadata and quarantine reasons."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_ingest import count_csv_paths, record_block_sizes

from guidealign.ingest.readers import read_rows
from guidealign.ingest.run import IngestConfig, check_prompt, ingest, prompt_of
from guidealign.shards import iter_tables, read_quarantine


def _out(path: Path, workdir: Path, **cfg) -> tuple[list[tuple], list[tuple]]:
    """(prompt, line, metadata) of each row ingested, (line, reason, raw) of each quarantined."""
    ingest([str(path)], workdir, IngestConfig(**cfg), progress=False)
    rows = [(r["prompt"], int(r["source"].rsplit(":", 1)[1]), json.loads(r["metadata"]))
            for t in iter_tables(workdir / "prompts") for r in t.to_pylist()]
    q = read_quarantine(workdir / "prompts")
    return rows, [(r["row"], r["reason"], r["raw"]) for r in (q.to_pylist() if q is not None else [])]


def _row_reader(path: Path, **cfg) -> tuple[list[tuple], list[tuple]]:
    """The row-by-row reader alone: (prompt, line) of the good rows, (line, reason) of the bad."""
    cfg = IngestConfig(**cfg)
    good, bad = [], []
    for line, rec, err in read_rows(path, "csv", cfg):
        err = err or check_prompt(rec, cfg)
        if err:
            bad.append((line, err))
        else:
            good.append((prompt_of(rec, cfg), line))
    return good, bad


def _every_way(path: Path, tmp_path: Path, monkeypatch, **cfg) -> tuple[list[tuple], list[tuple]]:
    """The file ingested at two block sizes and with every block row by row: all the same, and
    the same as the row reader alone. Returns the ingest of one block."""
    from guidealign.ingest import csvcol

    outs = {bb: _out(path, tmp_path / f"w{bb}", block_bytes=bb, **cfg) for bb in (64, 4 << 20)}
    with monkeypatch.context() as m:
        m.setattr(csvcol, "_parse", lambda *a, **k: None)
        outs["rows"] = _out(path, tmp_path / "wrows", block_bytes=64, **cfg)
    rows, bad = outs[4 << 20]
    assert outs[64] == outs["rows"] == (rows, bad)
    assert _row_reader(path, **cfg) == ([(p, line) for p, line, _ in rows], [(line, why) for line, why, _ in bad])
    return rows, bad


# --- a quote that is never closed ---------------------------------------------------------------

@pytest.mark.parametrize("name, text, want, bad_line, bad_raw", [
    ("unq.tsv", 'prompt\tlabel\n"Hi there\t1\nSecond prompt\t0\nThird prompt\t1\n',
     [("Second prompt", 3, {"label": "0"}), ("Third prompt", 4, {"label": "1"})], 2, '"Hi there\t1'),
    ("unq.csv", 'id,prompt\n1,first\n2,"second\n3,third\n',
     [("first", 2, {"id": "1"}), ("third", 4, {"id": "3"})], 3, '2,"second'),
    # the quote on the last line, with no line end after it
    ("last.csv", 'prompt,n\nfirst,1\n"second,2', [("first", 2, {"n": "1"})], 3, '"second,2'),
    # the record starts with a closed multi-line field (line 2); the quote of its next field,
    # on line 3, never closes: the row is numbered by the record's first line
    ("second-field.csv", 'prompt,n\n"two\nlines","open\nnext,5\n',
     [("next", 4, {"n": "5"})], (2, 3), '"two\nlines","open'),
])
def test_a_quote_never_closed_is_quarantined_and_the_lines_after_it_read(tmp_path, monkeypatch, name, text,
                                                                         want, bad_line, bad_raw):
    """Python's csv (non-strict) hands out a quoted field still open at the end of the file:
    "1 rows read -> 1 prompts, 0 quarantined", the prompt being the rest of the file."""
    f = tmp_path / name
    f.write_text(text)
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    row_line, quote_line = bad_line if isinstance(bad_line, tuple) else (bad_line, bad_line)
    assert rows == want
    assert [(line, raw) for line, _, raw in bad] == [(row_line, bad_raw)]
    assert bad[0][1].startswith(f"a quote opened on line {quote_line} is never closed (it took in the rest of the file")


def test_a_quote_never_closed_in_a_large_file_is_read_on_streaming(tmp_path, monkeypatch):
    """Past csvcol.MAX_RECORD_BYTES the row reader takes over, streaming (no block holds the
    rest of the file); it then quarantines the line with the quote and reads the lines after."""
    from guidealign.ingest import csvcol

    monkeypatch.setattr(csvcol, "MAX_RECORD_BYTES", 2048)
    held = record_block_sizes(monkeypatch)
    f = tmp_path / "big.csv"
    lines = [f"prompt number {i},t{i}\n" for i in range(3000)]
    lines[50] = '"a quote never closed,x\n'
    f.write_text("prompt,topic\n" + "".join(lines))
    rows, bad = _out(f, tmp_path / "w", block_bytes=256, shard_rows=500)
    assert [(line, why.split(" (")[0]) for line, why, _ in bad] == [(52, "a quote opened on line 52 is never closed")]
    assert len(rows) == 2999 and [line for _, line, _ in rows] == [i + 2 for i in range(3000) if i != 50]
    assert rows[50] == ("prompt number 51", 53, {"topic": "t51"})
    assert f.stat().st_size > 50_000 and max(held) <= 2048 + 2 * 256


@pytest.mark.parametrize("block_bytes", [64, 4 << 20])
def test_a_quote_not_closed_within_the_field_limit_loses_no_row(tmp_path, block_bytes):
    """Past csv.field_size_limit() (64 MiB in ingest) Python's csv raised mid-field and read on
    from the middle of it: every line from the quote to there was lost in one quarantine row."""
    f = tmp_path / "limit.csv"
    lines = [f"prompt number {i},t{i}\n" for i in range(500)]
    lines[10] = '"a quote never closed,x\n'
    f.write_text("prompt,topic\n" + "".join(lines))
    old = csv.field_size_limit(2000)
    try:
        rows, bad = _out(f, tmp_path / "w", block_bytes=block_bytes)
    finally:
        csv.field_size_limit(old)
    assert [(line, why.split(" (")[0]) for line, why, _ in bad] == \
        [(12, "a quote opened on line 12 is not closed within 2,000 characters")]
    assert [line for _, line, _ in rows] == [i + 2 for i in range(500) if i != 10]


def test_a_header_whose_quote_is_never_closed_is_reported(tmp_path, monkeypatch):
    """The header's quote took in the whole file: no row and no quarantine row at all."""
    f = tmp_path / "head.csv"
    f.write_text('"prompt,n\nfirst,1\nsecond,2\n')
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert rows == []
    assert [(line, why.split(" (")[0]) for line, why, _ in bad] == \
        [(1, "the header line cannot be read as CSV: a quote opened on line 1 is never closed")]


# --- more fields than the header ------------------------------------------------------------------

def test_a_row_with_more_fields_than_the_header_is_quarantined_unless_they_are_empty(tmp_path, monkeypatch):
    """`1,hello, world,n` under `id,prompt,note` came out as the prompt "hello" (note " world",
    _extra_fields ["n"]). Trailing delimiters (empty extra fields) stay as they were."""
    f = tmp_path / "more.csv"
    f.write_text('id,prompt,note\n1,hello, world,n\n2,ok,\n3,trailing,x,,\n4,"quoted, fine",y\n5,spaces,z, \n')
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert rows == [("ok", 3, {"id": "2", "note": ""}),
                    ("trailing", 4, {"id": "3", "note": "x", "_extra_fields": ["", ""]}),
                    ("quoted, fine", 5, {"id": "4", "note": "y"}),
                    ("spaces", 6, {"id": "5", "note": "z", "_extra_fields": [" "]})]
    assert bad == [(2, "line 2 has 4 fields, the header 3: quote the fields that contain the delimiter ','",
                    "1,hello, world,n")]


def test_a_tsv_row_with_more_fields_than_the_header_is_quarantined(tmp_path, monkeypatch):
    f = tmp_path / "more.tsv"
    f.write_text("prompt\tlabel\nfirst\t1\nsecond\tpart\t0\n")
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert rows == [("first", 2, {"label": "1"})]
    assert [(line, why) for line, why, _ in bad] == \
        [(3, "line 3 has 3 fields, the header 2: quote the fields that contain the delimiter '\\t'")]


# --- one column -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["one.csv", "one.tsv"])
def test_a_one_column_file_reads_a_line_as_one_prompt(tmp_path, monkeypatch, name):
    """`prompt\\nhello, world\\n` gave the prompt "hello" with metadata {"_extra_fields": [" world"]}."""
    f = tmp_path / name
    f.write_text('prompt\nhello, world\n"quoted, with ""quotes""\nand a line end"\nplain\na;b|c\td\n'
                 'say "hi", then go\n"x", y\n')
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert bad == []
    # `"x", y` is not one quoted field: taken as written (it was `x, y`, the quotes dropped)
    assert rows == [("hello, world", 2, {}), ('quoted, with "quotes"\nand a line end', 3, {}), ("plain", 5, {}),
                    ("a;b|c\td", 6, {}), ('say "hi", then go', 7, {}), ('"x", y', 8, {})]


def test_a_one_column_file_goes_through_the_columnar_path(tmp_path, monkeypatch):
    """Prompts with commas in a one-column file still parse in columnar blocks (the same rows)."""
    used = count_csv_paths(monkeypatch)
    f = tmp_path / "one.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["Prompt"])
        for i in range(400):
            fh.write(f"prompt {i}, with a comma; and more\n" if i % 3 else "")
            if i % 3 == 0:
                w.writerow([f'prompt {i}, "quoted"\nover two lines'])
    rows, bad = _out(f, tmp_path / "w", block_bytes=300)
    assert bad == [] and len(rows) == 400 and used["columnar"] > 10 and used["rows"] == 0
    assert rows[1] == ("prompt 1, with a comma; and more", 4, {})
    assert rows[0] == ('prompt 0, "quoted"\nover two lines', 2, {})


# --- fewer fields than the header ------------------------------------------------------------------

def test_a_row_too_short_to_reach_the_prompt_column_says_so(tmp_path, monkeypatch):
    f = tmp_path / "short.csv"
    f.write_text("id,prompt,note\n1\n2,ok\n3,fine,n\n")
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert rows == [("ok", 3, {"id": "2"}), ("fine", 4, {"id": "3", "note": "n"})]
    assert [(line, why) for line, why, _ in bad] == [
        (2, "missing prompt field 'prompt': line 2 has 1 field, the header 3, and the prompt column is past "
            "the row's end; add the missing fields (or quote fields that hold line breaks)")]
