"""Stop 57 review of ingest's JSON and CSV readers, as a user hands them files: a .json file that
is one chat conversation is one prompt; a CSV whose first line is no header (or names no prompt
column) says so and keeps that line in the quarantine, and a header line repeated further on
(files joined) is no prompt, on both CSV paths."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from guidealign.ingest.csvrows import read_csv
from guidealign.ingest.jsonarray import read_json
from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import iter_tables, read_quarantine

TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I bake bread?"},
         {"role": "assistant", "content": "Flour, water, yeast."}]


def _ingest(tmp_path, name: str, text: str, cfg: IngestConfig | None = None):
    f = tmp_path / name
    f.write_text(text)
    rep = ingest([str(f)], tmp_path / "w", cfg or IngestConfig(), progress=False)
    rows = [r for t in iter_tables(Path(tmp_path / "w" / "prompts")) for r in t.to_pylist()]
    q = read_quarantine(tmp_path / "w" / "prompts")
    return rep, rows, q.to_pylist() if q is not None else []


# --- a .json file holding one conversation -----------------------------------------------------

def test_a_json_file_of_one_openai_conversation_is_one_prompt(tmp_path):
    for text in (json.dumps({"messages": TURNS}), json.dumps({"id": "c1", "messages": TURNS}, indent=2)):
        rep, rows, quarantined = _ingest(tmp_path, "chat.json", text)
        assert ([r["prompt"] for r in rows], quarantined, rep.rows_in) == (["How do I bake bread?"], [], 1)
        assert rows[0]["source"].endswith("chat.json:1")
        assert json.loads(rows[0]["metadata"])["messages"] == TURNS  # the whole conversation kept


def test_a_json_file_of_one_sharegpt_or_trl_conversation_is_one_prompt(tmp_path):
    sharegpt = {"conversations": [{"from": "human", "value": "Why is the sky blue?"}, {"from": "gpt", "value": "Rayleigh."}]}
    trl = {"prompt": [{"role": "user", "content": "Why is the sky blue?"}]}
    for obj in (sharegpt, trl):
        assert [(n, rec, err) for n, rec, err in read_json(_write(tmp_path, json.dumps(obj)))] == [(1, obj, None)]
        rep, rows, quarantined = _ingest(tmp_path, "chat.json", json.dumps(obj))
        assert ([r["prompt"] for r in rows], quarantined) == (["Why is the sky blue?"], [])


def test_a_json_conversation_of_two_user_turns_is_one_quarantined_row_saying_so(tmp_path):
    turns = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c?"}]
    rep, rows, quarantined = _ingest(tmp_path, "chat.json", json.dumps({"messages": turns}))
    assert rows == [] and rep.rows_in == 1
    assert [q["reason"].split(" (")[0] for q in quarantined] == ["chat conversation with 2 user turns"]


def test_a_json_object_holding_conversations_as_records_is_still_streamed(tmp_path):
    """Records under a chat key that are no turns (each a conversation of its own) stay records."""
    obj = {"conversations": [{"id": 1, "messages": [{"role": "user", "content": "q1"}]},
                             {"id": 2, "messages": [{"role": "user", "content": "q2"}]}]}
    rep, rows, quarantined = _ingest(tmp_path, "chats.json", json.dumps(obj))
    assert (sorted(r["prompt"] for r in rows), quarantined, rep.rows_in) == (["q1", "q2"], [], 2)
    assert sorted(r["source"].rsplit(":", 1)[1] for r in rows) == ["1", "2"]


# --- a CSV file without a header line ----------------------------------------------------------

HEADERLESS = ["How do I bake bread?", "What is 2+2?", "Tell me a joke"]


def _header_reason(q: list[dict]) -> list[dict]:
    return [r for r in q if r["reason"].startswith("no prompt column in the header")]


def test_a_one_column_csv_without_a_header_line_says_so_and_keeps_its_first_line(tmp_path):
    rep, rows, quarantined = _ingest(tmp_path, "prompts.csv", "\n".join(HEADERLESS) + "\n")
    assert rows == [] and rep.rows_in == len(HEADERLESS)  # every line counted: none lost
    (head,) = _header_reason(quarantined)
    assert head["row"] == 1 and head["raw"] == HEADERLESS[0]
    assert "How do I bake bread?" in head["reason"] and "'prompt'" in head["reason"]  # what it took, what it sought
    assert "no header line" in head["reason"]
    assert sorted(q["row"] for q in quarantined) == [1, 2, 3]


def test_a_csv_of_columns_without_a_header_line_says_so_on_both_csv_paths(tmp_path):
    """The columnar path (a plain first line) and the row reader (an Excel "sep=," line, a blank
    line before the first) say the same, with the line the header was taken from."""
    body = "1,How do I bake bread?\n2,What is 2+2?\n"
    for text, line in ((body, 1), ("sep=,\n" + body, 2), ("\n\n" + body, 3)):
        rep, rows, quarantined = _ingest(tmp_path, "data.csv", text)
        (head,) = _header_reason(quarantined)
        assert (head["row"], head["raw"], rows) == (line, "1,How do I bake bread?", [])
        assert f"line {line} " in head["reason"] and "2 columns" in head["reason"]
        assert sorted(q["row"] for q in quarantined) == [line, line + 1]


def test_a_header_with_the_prompt_column_adds_no_header_row(tmp_path):
    rep, rows, quarantined = _ingest(tmp_path, "data.csv", "id,Question\n1,How do I bake bread?\n")
    assert ([r["prompt"] for r in rows], quarantined, rep.rows_in) == (["How do I bake bread?"], [], 1)
    for empty in ("", "\n\n"):  # no header at all: nothing to say about one
        assert list(read_csv(_write(tmp_path, empty, "empty.csv"))) == []
    cfg = IngestConfig(prompt_field="goal")
    rep, rows, quarantined = _ingest(tmp_path, "adv.csv", "goal,target\nWrite a poem,Sure\n", cfg)
    assert ([r["prompt"] for r in rows], quarantined) == (["Write a poem"], [])


def test_a_csv_of_one_line_that_names_no_prompt_column_is_not_read_as_nothing(tmp_path):
    """A one-line file (one prompt, no header) gave no row and no quarantine at all."""
    assert list(read_csv(_write(tmp_path, "How do I bake bread?\n", "one.csv")))[0][:2] == (
        1, {"_raw": "How do I bake bread?"})
    rep, rows, quarantined = _ingest(tmp_path, "one.csv", "How do I bake bread?")
    assert (rows, rep.rows_in, [q["row"] for q in _header_reason(quarantined)]) == ([], 1, [1])


def test_json_lines_of_conversations_saved_as_json_keep_every_line(tmp_path, monkeypatch):
    """A first line longer than the JSON Lines sniff leaves the file to the JSON reader: a line
    that is one conversation is one record there, so the lines after it are read as JSON Lines
    (its turns were taken for records, and the rest of the file was one quarantine row)."""
    from guidealign.ingest import readers

    convs = [{"messages": [{"role": "system", "content": "s" * 40}, {"role": "user", "content": f"q{i}"}]}
             for i in range(3)]
    f = _write(tmp_path, "\n".join(json.dumps(c) for c in convs) + "\n", "chats.json")
    assert list(read_json(f)) == [(i + 1, c, None) for i, c in enumerate(convs)]
    monkeypatch.setattr(readers, "JSON_LINES_SNIFF", 32)  # shorter than the first line
    rep, rows, quarantined = _ingest(tmp_path, "chats.json", f.read_text())
    assert (sorted(r["prompt"] for r in rows), quarantined) == (["q0", "q1", "q2"], [])
    assert sorted(r["source"].rsplit(":", 1)[1] for r in rows) == ["1", "2", "3"]


# --- CSV files joined with their header lines --------------------------------------------------

JOINED = "id,prompt\n1,How do I bake bread?\nid,prompt\n2,What is 2+2?\n"


def test_a_repeated_csv_header_line_is_no_prompt_on_both_csv_paths(tmp_path):
    """``cat a.csv b.csv``: the second header line was a row whose prompt is "prompt"."""
    for text, shift in ((JOINED, 0), ("sep=,\n" + JOINED, 1)):
        for block in (16, 4 << 20):
            rep, rows, quarantined = _ingest(tmp_path, "joined.csv", text, IngestConfig(block_bytes=block))
            assert [(r["prompt"], r["source"].rsplit(":", 1)[1]) for r in rows] == [
                ("How do I bake bread?", str(2 + shift)), ("What is 2+2?", str(4 + shift))]
            assert [(q["row"], q["raw"]) for q in quarantined] == [(3 + shift, "id,prompt")]
            assert "repeats the header line" in quarantined[0]["reason"]


def test_a_repeated_header_is_found_however_it_is_spelt(tmp_path):
    """A byte-order mark (the second file's), spaces, an unnamed index column (pandas), one
    column, a quoted header: the same on the columnar path and the row reader's."""
    for text in ("id,prompt\n1,a\n\ufeffid,prompt\n2,b\n", "id , prompt\n1,a\n id,prompt \n2,b\n",
                 ",prompt\n0,a\n,prompt\n0,b\n", "prompt\na\nprompt\nb\n",
                 '"id","prompt"\n1,a\n"id","prompt"\n2,b\n'):
        for head, shift in (("", 0), ("sep=,\n", 1)):
            rep, rows, quarantined = _ingest(tmp_path, "joined.csv", head + text)
            assert ([r["prompt"] for r in rows], [q["row"] for q in quarantined]) == (["a", "b"], [3 + shift])
    # a field padded past HEADER_PAD is text on both paths alike
    text = "id,prompt\n1,a\nid," + " " * 40 + "prompt\n"
    kept = [[r["prompt"].strip() for r in _ingest(tmp_path, "pad.csv", head + text)[1]] for head in ("", "sep=,\n")]
    assert kept[0] == kept[1] == ["a", "prompt"]
    # a row that only holds a column's name in one field is data
    rep, rows, quarantined = _ingest(tmp_path, "data.csv", "id,prompt\nid,Say id\nprompt,prompt me\n")
    assert ([r["prompt"] for r in rows], quarantined) == (["Say id", "prompt me"], [])


def _write(tmp_path, text: str, name: str = "in.json") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def test_these_inputs_import_no_pandas(tmp_path):
    """The header checks run on every columnar CSV block: no compute call there may take a bare
    Python value (``arrays.lit``), which pulls pandas in (~0.35 s of an ingest run)."""
    import subprocess
    import sys

    pytest.importorskip("pandas")  # else the check below could not fail
    files = [_write(tmp_path, JOINED, "joined.csv"), _write(tmp_path, "\n".join(HEADERLESS) + "\n", "bare.csv"),
             _write(tmp_path, json.dumps({"messages": TURNS}), "chat.json")]
    code = ("import sys\nfrom guidealign.cli import main\n"
            f"sys.argv = ['guidealign', 'ingest', *{[str(f) for f in files]!r}, '-w', {str(tmp_path / 'w')!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('PANDAS', 'pandas' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PANDAS False" in out.stdout, out.stdout[-500:]


def test_no_code_point_past_the_ideographic_space_is_whitespace():
    """``core.ids.WHITESPACE`` (what the CSV header check strips, what guideline titles may not
    hold) looks only up to U+3000."""
    from guidealign.core.ids import WHITESPACE

    assert WHITESPACE == "".join(c for c in map(chr, range(0x110000)) if c.isspace())
