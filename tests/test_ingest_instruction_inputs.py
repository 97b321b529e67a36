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
