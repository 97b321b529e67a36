"""JSON (not JSON Lines) inputs and nested binary metadata, as a Stop 54 review found them: an item
whose brackets do not close took every item after it with it; scalars before an array's first
object made a container one record; a number cut by the read size changed what was a record; JSON
Lines saved as .json with a long first line lost rows; a one-record object holding records two
levels down said only "missing prompt"; a binary value inside a list or struct was written as
Python's b'...' repr."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guidealign.ingest import jsonarray
from guidealign.ingest.jsonarray import read_json
from guidealign.ingest.arrowfiles import read_parquet
from guidealign.ingest.jsonrows import JSON_LINES_SNIFF
from guidealign.ingest.metadata import meta_json
from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import iter_tables, read_quarantine


def _ingest(tmp_path: Path, name: str, data: str | bytes):
    f = tmp_path / name
    f.write_bytes(data if isinstance(data, bytes) else data.encode())
    rep = ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    kept = [(r["prompt"], r["source"].rsplit(":", 1)[1], r["metadata"])
            for t in iter_tables(tmp_path / "w" / "prompts") for r in t.to_pylist()]
    q = read_quarantine(tmp_path / "w" / "prompts")
    return rep, kept, ([(r["row"], r["reason"], r["raw"]) for r in q.to_pylist()] if q is not None else [])


def _items(n: int, bad: int, bad_text: str) -> str:
    return "[" + ", ".join(bad_text if i == bad else json.dumps({"prompt": f"question {i}"})
                           for i in range(1, n + 1)) + "]"


# --- an item whose brackets do not close ---------------------------------------------------------

@pytest.mark.parametrize("bad_text", [
    '{"prompt": "question 3", "tags": ["a"]',        # its '}' left out
    '{"prompt": "question 3, "tags": 1}',             # a closing quote left out
    '{"prompt": "question 3", "tags": ["a"}',         # a ']' left out
    '{"prompt": "question 3", "turns": [{"a": 1}, {"b": 2}]',  # '}' left out after records of its own
])
def test_an_item_that_does_not_close_is_quarantined_alone(tmp_path, bad_text):
    rep, kept, quarantined = _ingest(tmp_path, "in.json", _items(200, 3, bad_text))
    assert [(p, row) for p, row, _ in kept] == [(f"question {i}", str(i)) for i in range(1, 201) if i != 3]
    assert len(quarantined) == 1
    row, reason, raw = quarantined[0]
    assert row == 3 and reason.startswith("array item 3 is not JSON") and raw == bad_text
    assert rep.rows_in == 200


def test_an_unclosed_item_in_an_object_of_records_is_quarantined_alone(tmp_path):
    text = '{"train": ' + _items(5, 2, '{"prompt": "question 2"') + ', "test": [{"prompt": "t"}]}'
    _, kept, quarantined = _ingest(tmp_path, "in.json", text)
    assert [p for p, _, _ in kept] == ["question 1", "question 3", "question 4", "question 5", "t"]
    assert [(r, raw) for r, _, raw in quarantined] == [(2, '{"prompt": "question 2"')]


def test_a_last_item_cut_off_by_the_files_end_still_says_so(tmp_path):
    _, kept, quarantined = _ingest(tmp_path, "in.json", '[{"prompt": "a"}, {"prompt": "b"')
    assert [p for p, _, _ in kept] == ["a"]
    assert [(r, "cut off" in why and "truncated" in why) for r, why, _ in quarantined] == [(2, True)]


def test_a_string_that_holds_json_text_is_not_split(tmp_path):
    """A long item that reads is not cut at an object inside its text (the look-out for the next
    item runs only for an item that is not JSON)."""
    inner = ', {"prompt": "inside"}, ' * 50_000  # ~1.2 MB of object-looking text in one string
    text = json.dumps([{"prompt": "a", "note": inner}, {"prompt": "b"}])
    rep, kept, quarantined = _ingest(tmp_path, "in.json", text)
    assert ([p for p, _, _ in kept], quarantined, rep.rows_in) == (["a", "b"], [], 2)


# --- scalars before an array's first object ------------------------------------------------------

@pytest.mark.parametrize("lead", ['"header row"', "1", "true", 'null, "x"'])
def test_scalars_before_the_first_object_do_not_hide_the_records(tmp_path, lead):
    text = '{"version": "1.0", "data": [' + lead + ', {"prompt": "p1"}, {"prompt": "p2"}]}'
    _, kept, quarantined = _ingest(tmp_path, "in.json", text)
    assert [(p, row) for p, row, _ in kept] == [("p1", str(lead.count(",") + 2)), ("p2", str(lead.count(",") + 3))]
    assert len(quarantined) == lead.count(",") + 1 and all("not an object" in why for _, why, _ in quarantined)


def test_an_array_of_scalars_stays_a_field_of_its_record(tmp_path):
    text = json.dumps({"tags": ["a", "b", 3], "prompt": "p", "more": [1, {"k": "v"}]})
    _, kept, quarantined = _ingest(tmp_path, "in.json", text)
    assert [(p, json.loads(m)) for p, _, m in kept] == [("p", {"more": [1, {"k": "v"}], "tags": ["a", "b", 3]})]
    assert quarantined == []


# --- a number cut by the read size ----------------------------------------------------------------

DOCS = [
    '{"turns": [{"text": "hi"}, "pad", 1.5, -2e3, 12345], "prompt": "What is 2+2?"}',
    '{"data": [1.25, {"prompt": "a"}, {"prompt": "b", "score": 0.5}]}',
    '[{"prompt": "a", "x": [1.5, 2.75e-3]}, 3.5, {"prompt": "b"}]',
    '{"prompt": "one", "vals": [10.5, 20.25, 30], "nested": {"v": [1.5]}}',
    # a signed exponent: a read cut after "e+" or "e-" left a number that reads without it
    '{"turns": [{"text": "hi"}, "pad", 1.5, 2.5e-3, 7E+2, 12345], "prompt": "What is 2+2?"}',
    '{"data": [1.5e+7, -3.25E-2, {"prompt": "a"}]}',
]


@pytest.mark.parametrize("doc", DOCS)
def test_the_rows_do_not_depend_on_where_the_reads_cut_the_text(tmp_path, monkeypatch, doc):
    f = tmp_path / "in.json"
    f.write_text(doc)
    whole = list(read_json(f))
    for size in (1, 2, 3, 5, 7):
        monkeypatch.setattr(jsonarray, "_JSON_CHUNK", size)
        assert list(read_json(f)) == whole, size


def test_a_number_cut_at_the_four_mib_read_keeps_the_record(tmp_path):
    head = '{"turns": [{"text": "hi"}, "'
    cut = '", 1.'
    pad = "x" * (jsonarray._JSON_CHUNK - len(head) - len(cut))  # "1." ends the first read
    _, kept, quarantined = _ingest(tmp_path, "in.json", head + pad + cut + '5], "prompt": "What is 2+2?"}')
    assert ([p for p, _, _ in kept], quarantined) == (["What is 2+2?"], [])


def test_a_signed_exponent_cut_at_the_four_mib_read_keeps_the_records(tmp_path):
    head = '{"data": ["'
    cut = '", 1.5e+'
    pad = "x" * (jsonarray._JSON_CHUNK - len(head) - len(cut))  # "1.5e+" ends the first read
    _, kept, quarantined = _ingest(tmp_path, "in.json", head + pad + cut + '7, {"prompt": "a"}]}')
    assert [p for p, _, _ in kept] == ["a"]
    # (the reasons without the hint on how to write a record, Stop 57)
    assert [(r, why.split(" (")[0]) for r, why, _ in quarantined] == [(1, "array item 1 is a JSON string, not an object"),
                                                       (2, "array item 2 is a JSON number, not an object")]


# --- a bad item whose own records look like items ------------------------------------------------

@pytest.mark.parametrize("wrap", ["top", "inside"])
def test_objects_nested_in_a_bad_item_are_never_rows(tmp_path, wrap):
    """A quote left out in an item holding a list of objects: the objects of that list read and are
    followed by ',' or ']', as the next item is; they stay in the bad item, and every item after
    it is read."""
    bad = '{"prompt": "a, "turns": [{"text": "t1"}, {"text": "t2"}, {"text": "t3"}], "n": 1}'
    items = "[" + ",\n ".join([bad] + [json.dumps({"prompt": f"q{i}"}) for i in range(50)]) + "]"
    text = items if wrap == "top" else '{"data": ' + items + ', "note": "x"}'
    rep, kept, quarantined = _ingest(tmp_path, "in.json", text)
    assert [(p, row) for p, row, _ in kept] == [(f"q{i}", str(i + 2)) for i in range(50)]
    assert [(r, raw) for r, _, raw in quarantined] == [(1, bad)]
    assert rep.rows_in == 51


def test_many_items_left_open_take_time_in_proportion_to_the_file(tmp_path, monkeypatch):
    """Each item left without its '}' was scanned bracket by bracket to the array's end (or 16 Mi
    characters): time grew with bad items x file size (here ~6,000 steps a bad item). The scan
    now stops ``SETTLE`` characters after the text cannot be JSON (a ',' in an object followed
    by '{')."""
    steps = []

    class Counting:
        def search(self, text, pos=0):
            steps.append(pos)
            return real.search(text, pos)

    real = jsonarray._JSON_SYNTAX
    monkeypatch.setattr(jsonarray, "_JSON_SYNTAX", Counting())
    items = ['{"prompt": "bad %d", "k": 1' % i if i % 10 == 0 else json.dumps({"prompt": f"good {i}"})
             for i in range(2000)]
    f = tmp_path / "in.json"
    f.write_text("[" + ",\n".join(items) + "]")
    rows = list(read_json(f))
    assert len(rows) == 2000 and sum(why is not None for _, _, why in rows) == 200
    assert 200 <= len(steps) < 200 * 1000


# --- JSON Lines saved as .json, its first line longer than the sniff ------------------------------

def _lines(first: str, *rest: str) -> str:
    return first + "\n" + "".join(r + "\n" for r in rest) + "".join(
        json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(2, 6))


def test_a_long_broken_first_line_is_quarantined_and_the_lines_after_it_read(tmp_path):
    first = json.dumps({"prompt": "long one", "context": "x" * JSON_LINES_SNIFF})[:-1] + ", oops}"
    rep, kept, quarantined = _ingest(tmp_path, "in.json", _lines(first))
    assert [(p, row) for p, row, _ in kept] == [(f"question {i}", str(i)) for i in range(2, 6)]
    assert [(r, why.startswith("line 1 is not JSON")) for r, why, _ in quarantined] == [(1, True)]
    assert rep.rows_in == 5


def test_a_long_first_line_then_null_reads_every_line(tmp_path):
    first = json.dumps({"prompt": "long one", "context": "x" * JSON_LINES_SNIFF})
    rep, kept, quarantined = _ingest(tmp_path, "in.json", _lines(first, "null"))
    assert [(p, row) for p, row, _ in kept] == [("long one", "1")] + [(f"question {i}", str(i + 1)) for i in range(2, 6)]
    assert [(r, why) for r, why, _ in quarantined] == [(2, "line 2 is a JSON null, not an object")]


def test_a_broken_one_line_object_is_not_said_to_be_truncated(tmp_path):
    for text in ('{"meta" 1, "prompt": "x"}\n', '{"meta" 1, "prompt": "x"}\nnot json\n'):
        f = tmp_path / "in.json"
        f.write_text(text)
        [(row, rec, why)] = list(read_json(f))
        assert why.startswith("the JSON object is not valid JSON (expected ':' after the key \"meta\")"), why
        assert "truncated" not in why


def test_the_line_after_a_broken_first_line_is_read_only_so_far(tmp_path, monkeypatch):
    """Whether JSON Lines follow a broken first line is told from a bounded stretch of the next
    line: a second line of the whole file's size was read whole into memory."""
    monkeypatch.setattr(jsonarray, "LOOKAHEAD", 1000)
    monkeypatch.setattr(jsonarray, "_JSON_CHUNK", 100)
    held = []
    real = jsonarray._JsonItems._more

    def more(self):
        held.append(len(self.buf))
        return real(self)

    monkeypatch.setattr(jsonarray._JsonItems, "_more", more)
    f = tmp_path / "in.json"
    f.write_text('{"meta": oops}\n' + "x" * 100_000 + "\n")
    rows = list(read_json(f))
    assert [(row, why.split(":")[0]) for row, _, why in rows] == [
        (1, "array item 1 is not JSON"), (0, "more text after the JSON value ends (after item 1), not read")]
    assert max(held) < 1000 + 3 * 100


def test_a_broken_pretty_printed_object_is_not_read_as_lines(tmp_path):
    text = '{\n  "data": [\n    {"prompt": "a"}\n  ],\n  oops: 1,\n  "more": [\n    {"prompt": "b"}\n  ]\n}\n'
    _, kept, quarantined = _ingest(tmp_path, "in.json", text)
    assert [p for p, _, _ in kept] == ["a"]
    assert len(quarantined) == 1 and "not valid JSON" in quarantined[0][1]


# --- records two levels down ------------------------------------------------------------------------

def test_an_object_with_records_two_levels_down_says_so(tmp_path):
    _, kept, quarantined = _ingest(tmp_path, "in.json", json.dumps({"splits": {"train": [{"prompt": "a"}]}}))
    assert kept == []
    assert [(r, "holding arrays of records" in why and "no prompt field" in why) for r, why, _ in quarantined] \
        == [(1, True)]


def test_a_record_with_a_prompt_and_records_inside_is_kept_without_a_note(tmp_path):
    text = json.dumps({"prompt": "p", "meta": {"train": [{"prompt": "a"}]}})
    _, kept, quarantined = _ingest(tmp_path, "in.json", text)
    assert ([p for p, _, _ in kept], quarantined) == (["p"], [])


# --- binary values inside lists and structs -------------------------------------------------------

def test_nested_binary_metadata_is_written_as_a_binary_columns_is(tmp_path):
    t = pa.table({"prompt": ["a", "b"], "raw": pa.array([b"ok", b"\x89PNG\xff"]),
                  "image": pa.array([{"bytes": b"ok"}, {"bytes": b"\x89PNG\xff"}]),
                  "blobs": pa.array([[b"ok"], [b"\x89PNG\xff"]], pa.list_(pa.binary()))})
    f = tmp_path / "in.parquet"
    pq.write_table(t, f)
    ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    written = [r["metadata"] for t in iter_tables(tmp_path / "w" / "prompts") for r in t.to_pylist()]
    metas = [json.loads(m) for m in written]
    for m in metas:
        assert m["image"]["bytes"] == m["raw"] == m["blobs"][0]
    assert metas[0]["raw"] == "ok" and metas[1]["raw"] == "\udc89PNG\udcff"
    # the row reader (a block that goes row by row) writes the same
    assert [meta_json(rec, "prompt") for _, rec, _ in read_parquet(f)] == written
