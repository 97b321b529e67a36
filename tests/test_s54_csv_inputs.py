"""CSV inputs as a Stop 54 review found them: a one-column file whose header spans lines killed
the job (a replaced reader, collected, closed the file); a quote left open that closed lines
later with text after it took every line between into one quarantine row; a short row took its
prompt from another column than the file's; cp1252 was missed when its only non-ASCII byte ended
the file; Excel's "sep=;" first line was read as the header; a quarantined row's raw text was
rebuilt from its fields. Each file is read at several block sizes, with every block row by row,
and by the row reader alone: all must agree (``_every_way``)."""
from __future__ import annotations

import gc
from pathlib import Path

from test_ingest_csv_quotes import _every_way


def _write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    f = tmp_path / name
    f.write_bytes(data if isinstance(data, bytes) else data.encode())
    return f


def test_a_one_column_file_whose_header_spans_lines_is_read(tmp_path, monkeypatch):
    f = _write(tmp_path, "in.csv", '"prompt\n"\n' + "".join(f"question number {i}?\n" for i in range(3000)))
    # the collector runs during the read (as it does on a long file): it closed the file mid-read
    old = gc.get_threshold()
    gc.set_threshold(1)
    try:
        rows, bad = _every_way(f, tmp_path, monkeypatch)
    finally:
        gc.set_threshold(*old)
    assert [(p, line) for p, line, _ in rows] == [(f"question number {i}?", i + 3) for i in range(3000)]
    assert bad == []


def test_a_quote_left_open_that_closes_lines_later_quarantines_only_its_line(tmp_path, monkeypatch):
    lines = ["prompt", '"Translate to French: good morning'] + [f"Plain prompt {i}" for i in range(300)] \
        + ['What does "carpe diem" mean?', "Last prompt"]
    f = _write(tmp_path, "in.csv", "\n".join(lines) + "\n")
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert [(p, line) for p, line, _ in rows] == [(f"Plain prompt {i}", i + 3) for i in range(300)] \
        + [('What does "carpe diem" mean?', 303), ("Last prompt", 304)]
    assert [(line, why.startswith("a quote opened on line 2 closes on line 303 with text after it"), raw)
            for line, why, raw in bad] == [(2, True, '"Translate to French: good morning')]


def test_the_same_with_columns(tmp_path, monkeypatch):
    body = "".join(f"question {i},{i}\n" for i in range(200))
    f = _write(tmp_path, "in.csv", 'prompt,x\n"Why is the sky blue?,1\n' + body + 'Say "hi" please,2\n')
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert [(p, line, m) for p, line, m in rows[:2]] == [("question 0", 3, {"x": "0"}), ("question 1", 4, {"x": "1"})]
    assert len(rows) == 201 and rows[-1][:2] == ('Say "hi" please', 203)
    assert [(line, raw) for line, _, raw in bad] == [(2, '"Why is the sky blue?,1')]


def test_a_field_over_lines_with_text_after_its_quote_is_not_split_into_rows(tmp_path, monkeypatch):
    """The closing quote's line holds one quote: the end of a field over lines (text after it,
    malformed), not a row of its own; the record is quarantined whole, as before the stray-quote rule."""
    f = _write(tmp_path, "in.csv", 'prompt,source\n"Summarize this, briefly:\nThe quick brown fox" (excerpt),wiki\n'
                                   'next one,web\n')
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert [(p, line) for p, line, _ in rows] == [("next one", 4)]
    assert [(line, why.startswith("text after the closing quote on line 3"), raw) for line, why, raw in bad] \
        == [(2, True, '"Summarize this, briefly:\nThe quick brown fox" (excerpt),wiki')]


def test_a_field_over_three_lines_with_text_after_its_quote_is_not_split_into_rows(tmp_path, monkeypatch):
    """Lines between the quotes are taken for rows only when the closing line could be a row of
    its own (an even number of quotes); an inch mark there (``a 6" sub``) takes the rows between
    into the quarantined record (a known limit: no reader can tell it from this)."""
    f = _write(tmp_path, "in.csv", 'prompt,source\n"Summarize this, briefly:\nThe quick fox, the lazy dog\n'
                                   'The end" (excerpt),wiki\nnext one,web\n')
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert [(p, line) for p, line, _ in rows] == [("next one", 5)]
    assert [(line, why.startswith("text after the closing quote on line 4")) for line, why, _ in bad] == [(2, True)]


def test_a_quoted_field_over_lines_that_closes_cleanly_is_still_one_prompt(tmp_path, monkeypatch):
    f = _write(tmp_path, "in.csv", 'prompt,x\n"line one\nline two",1\n"a ""quoted"" word\nhere",2\nplain,3\n')
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert [(p, line) for p, line, _ in rows] == [("line one\nline two", 2), ('a "quoted" word\nhere', 4),
                                                  ("plain", 6)]
    assert bad == []


def test_a_short_row_is_quarantined_though_it_reaches_another_prompt_alias(tmp_path, monkeypatch):
    f = _write(tmp_path, "in.csv", "text,question,answer\nThe Nile is the longest river\n"
                                   "in Africa.,Which river is longest?,The Nile\n")
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert [(p, line) for p, line, _ in rows] == [("Which river is longest?", 3)]
    assert [(line, why.startswith("missing prompt field 'question': line 2 has 1 field")) for line, why, _ in bad] \
        == [(2, True)]


def test_cp1252_is_sniffed_when_its_only_non_ascii_byte_ends_the_file(tmp_path, monkeypatch):
    f = _write(tmp_path, "in.csv", b"prompt,x\nhello,1\ncaf\xe9")
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert ([(p, line) for p, line, _ in rows], bad) == ([("hello", 2), ("caf\u00e9", 3)], [])


def test_a_utf8_file_cut_inside_its_last_character_past_the_sniff_is_still_utf8(tmp_path, monkeypatch):
    """The sniff's own cut (64 KiB into a longer file) is no reason to leave UTF-8."""
    from guidealign.ingest.encodings import SNIFF_BYTES

    head = b"prompt\n" + b"x" * 99 + b"\n" + b"".join(b"%099d\n" % i for i in range((SNIFF_BYTES - 108) // 100))
    head += b"y" * (SNIFF_BYTES - 1 - len(head) - 1) + b"\n"
    assert len(head) == SNIFF_BYTES - 1  # the sample ends inside the next line's first character
    f = _write(tmp_path, "in.csv", head + "\u00e9t\u00e9 caf\u00e9\n".encode())
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert rows[-1][0] == "\u00e9t\u00e9 caf\u00e9" and bad == []


def test_an_excel_sep_line_names_the_delimiter(tmp_path, monkeypatch):
    f = _write(tmp_path, "in.csv", b"sep=;\r\nprompt;note\r\nHello there, friend;a\r\nHow are you?;b\r\n")
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert rows == [("Hello there, friend", 3, {"note": "a"}), ("How are you?", 4, {"note": "b"})] and bad == []


def test_a_quarantined_rows_raw_text_is_the_line_as_written(tmp_path, monkeypatch):
    f = _write(tmp_path, "in.csv", b'prompt,x\nna\xc3\xafve,1\n"He said ""hi"", caf\xe9",2\n"a,b",1,extra\n')
    rows, bad = _every_way(f, tmp_path, monkeypatch)
    assert [(p, line) for p, line, _ in rows] == [("na\u00efve", 2)]
    assert [(line, raw) for line, _, raw in bad] == [(3, '"He said ""hi"", caf\ufffd",2'), (4, '"a,b",1,extra')]
    assert "at byte 20" in bad[0][1]  # counted on the line as written (the rebuilt text put it at 17)
