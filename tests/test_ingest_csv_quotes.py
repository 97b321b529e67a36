"""A CSV field that starts with a quote and has text after its closing quote: Python's csv
(non-strict) dropped the quotes and joined the rest (`"To be" - who?` -> `To be - who?`), so the
prompt, and its id, silently differed from the file. Now a one-column file takes such a line as
written, and a file with columns quarantines the row with a reason that says how to fix it. Each
file is read at several block sizes, with every block row by row, and by the row reader alone:
all must agree."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_ingest import count_csv_paths
from test_ingest_csv_quirks import _out, _row_reader

BLOCKS = (16, 64, 300, 4 << 20)


def _every_way(path: Path, tmp_path: Path, monkeypatch) -> tuple[list[tuple], list[tuple]]:
    """The file ingested at each of BLOCKS and with every block row by row: all the same, and the
    same as the row reader alone."""
    from guidealign.ingest import csvcol

    outs = {bb: _out(path, tmp_path / f"w{bb}", block_bytes=bb) for bb in BLOCKS}
    with monkeypatch.context() as m:
        m.setattr(csvcol, "_parse", lambda *a, **k: None)
        outs["rows"] = _out(path, tmp_path / "wrows", block_bytes=64)
    rows, bad = outs[4 << 20]
    for k, got in outs.items():
        assert got == (rows, bad), k
    assert _row_reader(path) == ([(p, line) for p, line, _ in rows], [(line, why) for line, why, _ in bad])
    return rows, bad


def _write(tmp_path: Path, name: str, text: str, eol: str = "\n") -> Path:
    f = tmp_path / name
    f.write_bytes(text.replace("\n", eol).encode())
    return f


def _reason(line: int, field: str, hint: str = "") -> str:
    return (f"text after the closing quote on line {line} of field {field!r} (quote the whole field and "
            f"double the quotes inside it{hint})")


# --- one column ------------------------------------------------------------------------------------

@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_a_one_column_line_with_text_after_a_closing_quote_is_taken_as_written(tmp_path, monkeypatch, eol):
    f = _write(tmp_path, "quotes.csv",
               'prompt\n"To be or not to be" - who wrote this line?\n'
               '"Hello," she said. "How are you?" Translate to French.\n'
               '"Hello, world"\n"say ""hi"""\n"Hi" he said "bye\nplain, with a comma\n', eol)
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert bad == []
    assert rows == [('"To be or not to be" - who wrote this line?', 2, {}),
                    ('"Hello," she said. "How are you?" Translate to French.', 3, {}),
                    ("Hello, world", 4, {}), ('say "hi"', 5, {}),  # one well-formed quoted field: unquoted
                    ('"Hi" he said "bye', 6, {}), ("plain, with a comma", 7, {})]


def test_a_one_column_prompt_quoted_over_lines_keeps_working_and_text_after_it_is_quarantined(tmp_path,
                                                                                               monkeypatch):
    """Which lines were meant is unclear (one prompt over lines, or a line each): not joined (it
    was `a\\nb c`). A line a prompt (Stop 54): the quote's line is quarantined, and the lines after
    it are read, each as written."""
    f = _write(tmp_path, "lines.csv", 'prompt\n"two\nlines, ""quoted"""\n"a\nb" c\nafter\n')
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert rows == [('two\nlines, "quoted"', 2, {}), ('b" c', 5, {}), ("after", 6, {})]
    assert bad == [(4, "a quote opened on line 4 closes on line 5 with text after it (taken as a quote left "
                       "open; the lines after line 4 are read again as rows): close the quote, or double a "
                       'quote inside a field ("")', '"a')]


def test_a_large_one_column_file_of_quotations_reads_the_same_at_every_block_size(tmp_path, monkeypatch):
    used = count_csv_paths(monkeypatch)
    lines = [f'"Quote {i}" - said by person {i}' if i % 50 == 7 else f"prompt {i}, plain" for i in range(600)]
    f = _write(tmp_path, "many.csv", "prompt\n" + "\n".join(lines) + "\n")
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert bad == [] and [p for p, _, _ in rows] == lines
    assert used["columnar"] > 0  # the blocks before the first quotation still go the columnar way


# --- several columns --------------------------------------------------------------------------------

def test_a_field_with_text_after_its_closing_quote_is_quarantined(tmp_path, monkeypatch):
    f = _write(tmp_path, "multi.csv",
               'prompt,n\n"abc"def,2\n"He said \\"hi\\" to me",1\nok,3\n"a, ""b""",4\nx,"5"y\n'
               '"two\nlines" z,6\n"fine\nover lines",7\nlast,8\n')
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert rows == [("ok", 4, {"n": "3"}), ('a, "b"', 5, {"n": "4"}), ("fine\nover lines", 9, {"n": "7"}),
                    ("last", 11, {"n": "8"})]
    assert bad == [(2, _reason(2, "prompt"), '"abc"def,2'),
                   (3, _reason(3, "prompt", ': "" for ", not \\"'), '"He said \\"hi\\" to me",1'),
                   (6, _reason(6, "n"), 'x,"5"y'),
                   (7, _reason(8, "prompt"), '"two\nlines" z,6')]  # lines 7-8: row 7, quote on 8


def test_a_tsv_field_with_text_after_its_closing_quote_is_quarantined(tmp_path, monkeypatch):
    f = _write(tmp_path, "t.tsv", 'prompt\tlabel\n"Hi" he said\t1\n"quoted\tfine"\t2\nplain\t3\n')
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert rows == [("quoted\tfine", 3, {"label": "2"}), ("plain", 4, {"label": "3"})]
    assert bad == [(2, _reason(2, "prompt"), '"Hi" he said\t1')]


def test_a_bad_quote_deep_in_a_large_file_reads_the_same_at_every_block_size(tmp_path, monkeypatch):
    used = count_csv_paths(monkeypatch)
    body = [f'"p{i}"x,{i}' if i == 250 else f'"p{i}, quoted",{i}' if i % 3 else f"p{i},{i}" for i in range(500)]
    f = _write(tmp_path, "big.csv", "prompt,n\n" + "\n".join(body) + "\n")
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert len(rows) == 499 and bad == [(252, _reason(252, "prompt"), '"p250"x,250')]
    assert used["columnar"] > 0


def test_spaces_between_a_closing_quote_and_the_delimiter_are_not_text_after_it(tmp_path):
    """`"hi" ,1` is sloppy, not a quote with text after it: read as csv reads it, not quarantined."""
    from guidealign.ingest.run import ingest
    from guidealign.shards import iter_tables

    f = tmp_path / "a.csv"
    f.write_text('prompt,n\n"hi" ,1\n"abc"def,2\n"ok", 3\n')
    rep = ingest([str(f)], tmp_path / "w", progress=False)
    assert rep.quarantined == 1
    assert [r["prompt"] for t in iter_tables(tmp_path / "w" / "prompts") for r in t.to_pylist()] == ["hi ", "ok"]
