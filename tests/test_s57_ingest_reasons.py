"""Stop 57 review of ingest's quarantine reasons (CSV and JSON readers): a reason says what is
wrong with the row and how to fix the file. The rows under a CSV header line that names no
prompt column point at that line (not at its values, listed as if they were field names), the
same on the columnar path and the row reader; a JSON string where a record belongs (a list of
plain prompts) says how to write it as a record. Which rows are kept, and their ids, are as
before."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from guidealign.ingest.csvrows import read_csv
from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import iter_tables, read_quarantine

BLOCKS = (16, 4 << 20)  # the row reader for most blocks; the columnar path for the whole file


def _ingest(tmp_path: Path, name: str, text: str, cfg: IngestConfig):
    d = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    f = d / name
    f.write_text(text)
    ingest([str(f)], d / "w", cfg, progress=False)
    rows = [r for t in iter_tables(d / "w" / "prompts") for r in t.to_pylist()]
    q = read_quarantine(d / "w" / "prompts")
    return f, rows, q.to_pylist() if q is not None else []


def _data_rows(quarantined: list[dict]) -> list[dict]:
    return [r for r in quarantined if not r["reason"].startswith("no prompt column in the header")]


HEADERLESS = [  # (file text, the line read as the header)
    ("1,How do I bake bread?\n2,What is 2+2?\n3,Tell me a joke\n", 1),
    ("How do I bake bread?\nWhat is 2+2?\nTell me a joke\n", 1),  # one column
    ("sep=,\n1,How do I bake bread?\n2,What is 2+2?\n3,Tell me a joke\n", 2),  # the row reader alone
    ("\n\n1,How do I bake bread?\n2,What is 2+2?\n", 3),
]


@pytest.mark.parametrize("text,header", HEADERLESS)
def test_csv_rows_under_a_header_naming_no_prompt_column_point_at_the_header_line(tmp_path, text, header):
    """Each data row said "missing prompt field 'prompt' (...; the row has 1, How do I bake
    bread?)": the first line's values, as if they were the row's field names."""
    first = text.splitlines()[header - 1]
    for block in BLOCKS:
        _, rows, quarantined = _ingest(tmp_path, "data.csv", text, IngestConfig(block_bytes=block))
        data = _data_rows(quarantined)
        assert rows == [] and data and len(quarantined) == len(data) + 1
        for r in data:
            assert r["reason"].startswith(f"missing prompt field 'prompt': the header line (line {header}) "
                                          "names no prompt column")
            assert "no header line" in r["reason"] and "add one" in r["reason"]  # how to fix it
            assert first not in r["reason"] and "the row has" not in r["reason"]


def test_csv_reasons_under_a_header_naming_no_prompt_column_are_the_same_on_both_csv_paths(tmp_path):
    """The columnar path (a large block), the row reader by blocks (small ones) and the row
    reader alone (``read_csv``) give each row the same reason and line."""
    text = "id,goal\n" + "".join(f"{i},Write poem {i}\n" for i in range(200))
    got = []
    for block in BLOCKS:
        f, rows, quarantined = _ingest(tmp_path, "adv.csv", text, IngestConfig(block_bytes=block))
        assert rows == []
        got.append(sorted((r["row"], r["reason"], r["raw"]) for r in quarantined))
    assert got[0] == got[1] and len(got[0]) == 201
    by_reader = [(n, why) for n, _, why in read_csv(f)]
    assert sorted(by_reader) == [(n, why) for n, why, _ in got[0]]
    assert all("the header line (line 1) names no prompt column" in why for _, why in by_reader[1:])


def test_a_csv_with_its_prompt_column_keeps_the_same_rows_and_reasons(tmp_path):
    """Only files whose header names no prompt column give the new reason."""
    text = "id,prompt\n1,How do I bake bread?\n2\n3,  \n"
    for block in BLOCKS:
        _, rows, quarantined = _ingest(tmp_path, "data.csv", text, IngestConfig(block_bytes=block))
        assert [(r["prompt"], r["source"].rsplit(":", 1)[1]) for r in rows] == [("How do I bake bread?", "2")]
        assert [(r["row"], r["reason"].split(":")[0]) for r in quarantined] == [
            (3, "missing prompt field 'prompt'"), (4, "empty prompt")]
        assert "past the row's end" in quarantined[0]["reason"]


@pytest.mark.parametrize("name,text,what", [
    ("prompts.json", json.dumps(["How do I bake bread?", {"prompt": "What is 2+2?"}, "Tell me a joke"]),
     "array item"),
    ("prompts.json", json.dumps(["How do I bake bread?", {"prompt": "What is 2+2?"}, "Tell me a joke"], indent=2),
     "array item"),
    ("prompts.jsonl", '"How do I bake bread?"\n{"prompt": "What is 2+2?"}\n"Tell me a joke"\n', "line"),
])
def test_a_json_string_where_a_record_belongs_says_how_to_write_it_as_one(tmp_path, name, text, what):
    """A .json array of plain prompts was quarantined item by item as "a JSON string, not an
    object", with no word on what a record must be."""
    for block in BLOCKS:
        _, rows, quarantined = _ingest(tmp_path, name, text, IngestConfig(block_bytes=block))
        assert [(r["prompt"], r["source"].rsplit(":", 1)[1]) for r in rows] == [("What is 2+2?", "2")]
        assert [r["row"] for r in quarantined] == [1, 3]
        for r in quarantined:
            assert r["reason"].startswith(f"{what} {r['row']} is a JSON string, not an object (")
            assert '{"prompt": "..."}' in r["reason"] and ".jsonl" in r["reason"]  # how to fix it


def test_other_json_values_where_a_record_belongs_keep_their_reasons(tmp_path):
    _, rows, quarantined = _ingest(tmp_path, "x.json", "[7, null, [1], true]", IngestConfig())
    assert rows == [] and [r["reason"] for r in quarantined] == [
        "array item 1 is a JSON number, not an object", "array item 2 is a JSON null, not an object",
        "array item 3 is a JSON array, not an object", "array item 4 is a JSON boolean, not an object"]
