"""An instruction and its input are one prompt (Alpaca's `instruction` + `input`, Dolly's
`context`): ingest took the instruction alone, so rows sharing an instruction ("Summarize the
following text.") were dropped as duplicates of the first, whatever their inputs."""
from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_ingest import _all_rows, _ingested

ROWS = [
    {"instruction": "Summarize the following text.", "input": "The cat sat on the mat.", "output": "a"},
    {"instruction": "Summarize the following text.", "input": "Stocks rose sharply today.", "output": "b"},
    {"instruction": "Summarize the following text.", "input": "", "output": "c"},
    {"instruction": "Name a colour.", "input": "  ", "output": "red"},
    {"instruction": "Summarize the following text.", "input": "The cat sat on the mat.", "output": "again"},
]
WANT = ["Summarize the following text.\n\nThe cat sat on the mat.",
        "Summarize the following text.\n\nStocks rose sharply today.",
        "Summarize the following text.", "Name a colour."]


def _write(path, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            w.writeheader()
            w.writerows(ROWS)
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_an_instructions_input_is_part_of_its_prompt_in_every_format(tmp_path, fmt):
    src = tmp_path / f"alpaca.{fmt}"
    _write(src, fmt)
    rows, q, rep = _ingested([src], tmp_path / "w")
    assert [r["prompt"] for r in rows] == WANT  # only the true repeat (row 5) is a duplicate
    assert rep.duplicates == 1 and q == []
    assert json.loads(rows[0]["metadata"])["input"] == "The cat sat on the mat."  # kept as given


def test_instruction_inputs_empty_takes_the_instruction_alone(tmp_path):
    src = tmp_path / "alpaca.jsonl"
    _write(src, "jsonl")
    rows, _, rep = _ingested([src], tmp_path / "w", instruction_inputs=[])
    assert [r["prompt"] for r in rows] == ["Summarize the following text.", "Name a colour."]
    assert rep.duplicates == 3


def test_an_input_joins_only_an_instruction_not_another_prompt_field(tmp_path):
    """`input` beside a `prompt` (or a `question`) is metadata, as before: only an instruction
    is incomplete without it."""
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "Sum up.", "input": "x"}\n{"question": "Why?", "context": "y"}\n')
    rows, _, _ = _ingested([src], tmp_path / "w")
    assert [r["prompt"] for r in rows] == ["Sum up.", "Why?"]


def _both_paths(tmp_path, table_or_lines, name):
    """(rows, quarantine) of the columnar path and of the row-by-row reference."""
    from test_ingest import _reference_ingest
    from guidealign.ingest.run import IngestConfig

    src = tmp_path / name
    if isinstance(table_or_lines, pa.Table):
        pq.write_table(table_or_lines, src)
    else:
        src.write_text("\n".join(table_or_lines) + "\n")
    rows, q, _ = _ingested([src], tmp_path / f"w-{name}")
    ref_rows, ref_bad = _reference_ingest(src, IngestConfig())
    return ([(r["id"], r["prompt"]) for r in rows], [(r["row"], r["reason"]) for r in q],
            [(i, p) for i, p, *_ in ref_rows], ref_bad)


@pytest.mark.parametrize("kind", ["dictionary", "binary", "invalid utf-8"])
def test_an_input_column_of_another_arrow_type_joins_as_the_row_reader_joins_it(tmp_path, kind):
    """A dictionary (pandas categorical) or binary input column was left out by the columnar
    path: rows sharing an instruction were dropped as duplicates again."""
    inputs = [b"x", b"y", b"x"] if kind != "invalid utf-8" else [b"x", b"y\xff", b"z"]
    arr = pa.array(inputs, pa.binary())
    if kind == "dictionary":
        arr = pa.array([v.decode() for v in inputs]).dictionary_encode()
    table = pa.table({"instruction": ["Sum."] * 3, "input": arr})
    got_rows, got_bad, ref_rows, ref_bad = _both_paths(tmp_path, table, f"{kind}.parquet")
    assert got_rows == ref_rows and got_bad == ref_bad
    assert len(got_rows) == (3 - len(ref_bad) if kind == "invalid utf-8" else 2)  # x twice: one
    assert all(p.startswith("Sum.\n\n") for _, p in got_rows)


def test_an_input_spelt_two_ways_and_an_empty_instruction_as_the_row_reader_reads_them(tmp_path):
    lines = ['{"instruction": "S", "input": "a"}', '{"instruction": "S", "Input": "b"}',
             '{"instruction": "S", "input": "  ", "Input": "d"}', '{"instruction": "", "input": "w"}',
             '{"instruction": " ", "input": "w2"}']
    got_rows, got_bad, ref_rows, ref_bad = _both_paths(tmp_path, lines, "spelt.jsonl")
    assert got_rows == ref_rows and got_bad == ref_bad
    assert [p for _, p in got_rows] == ["S\n\na", "S\n\nb", "S"]  # the row's own spelling
    assert [reason for _, reason in got_bad] == ["empty prompt", "empty prompt"]  # not the input alone
