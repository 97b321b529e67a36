"""A top-level JSON object that is one record keeps its prompt even when it holds an array of
objects (chat turns), whatever the key order; an object of arrays of records is still streamed."""
from __future__ import annotations

import json
from pathlib import Path

from guidealign.ingest import jsonarray
from guidealign.ingest.jsonarray import read_json
from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import iter_tables, read_quarantine

TURNS = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


def _ingest(tmp_path, text: str, cfg: IngestConfig | None = None):
    f = tmp_path / "in.json"
    f.write_text(text)
    rep = ingest([str(f)], tmp_path / "w", cfg or IngestConfig(), progress=False)
    prompts = [r["prompt"] for t in iter_tables(Path(tmp_path / "w" / "prompts")) for r in t.to_pylist()]
    q = read_quarantine(tmp_path / "w" / "prompts")
    return rep, prompts, [r["reason"] for r in q.to_pylist()] if q is not None else []


def test_prompt_before_the_array_is_one_record(tmp_path):
    rep, prompts, quarantined = _ingest(tmp_path, json.dumps({"prompt": "Tell me a joke", "turns": TURNS}))
    assert (prompts, quarantined, rep.rows_in) == (["Tell me a joke"], [], 1)


def test_prompt_after_the_array_is_one_record(tmp_path):
    text = json.dumps({"prompt": "Tell me a joke", "conversations": TURNS, "id": 7}, sort_keys=True)
    assert text.index('"conversations"') < text.index('"prompt"')
    rep, prompts, quarantined = _ingest(tmp_path, text)
    assert (prompts, quarantined, rep.rows_in) == (["Tell me a joke"], [], 1)


def test_prompt_between_two_arrays_is_one_record(tmp_path):
    text = json.dumps({"a": TURNS, "prompt": "p", "z": TURNS})
    assert list(read_json(_write(tmp_path, text))) == [(1, json.loads(text), None)]


def test_the_configured_field_marks_the_record_an_alias_does_not(tmp_path):
    """The configured field (any case) makes the object one record; an alias at the top level
    does not: a container describing itself under "text" beside its records keeps them."""
    rep, prompts, quarantined = _ingest(tmp_path, json.dumps({"turns": TURNS, "Prompt": "Why?"}))
    assert (prompts, quarantined) == (["Why?"], [])
    f = _write(tmp_path, json.dumps({"turns": TURNS, "query": "q"}))
    assert list(read_json(f, "auto", "query")) == [(1, {"turns": TURNS, "query": "q"}, None)]
    records = [{"prompt": f"p{k}"} for k in range(5)]
    rep, prompts, quarantined = _ingest(tmp_path, json.dumps({"text": "Safety benchmark v1", "data": records}))
    assert (sorted(prompts), quarantined, rep.rows_in) == ([f"p{k}" for k in range(5)], [], 5)


def test_an_object_of_arrays_of_records_is_still_streamed(tmp_path):
    rep, prompts, quarantined = _ingest(tmp_path, json.dumps({"data": [{"prompt": "a"}, {"prompt": "b"}]}))
    assert (sorted(prompts), quarantined, rep.rows_in) == (["a", "b"], [], 2)
    # a prompt field that is itself an array does not make the object one record
    rows = list(read_json(_write(tmp_path, json.dumps({"prompt": [{"x": 1}], "train": [{"prompt": "t"}]}))))
    assert [r[1] for r in rows] == [{"x": 1}, {"prompt": "t"}]


def test_an_array_longer_than_the_lookahead_makes_a_container(tmp_path, monkeypatch):
    text = json.dumps({"turns": TURNS * 20, "prompt": "late"})  # ~1.2 KB before the prompt key
    assert [r[1]["prompt"] for r in read_json(_write(tmp_path, text))] == ["late"]
    monkeypatch.setattr(jsonarray, "LOOKAHEAD", 200)
    rows = list(read_json(_write(tmp_path, text)))
    assert [r[1] for r in rows] == TURNS * 20  # the turns, streamed as records: the prompt key is not reached


def test_a_truncated_object_is_still_reported(tmp_path):
    # cut inside the array before any prompt key: the rows read as before this change
    rows = list(read_json(_write(tmp_path, '{"conversations": [{"role": "user"}, {"ro')))
    assert rows == [(1, {"role": "user"}, None),
                    (2, {"_raw": '{"ro'}, "array item 2 is cut off: the file ends before the JSON does (truncated?)"),
                    (3, None, "the JSON object is cut off after item 2: the file ends before the JSON does (truncated?)")]
    # a record cut off after its prompt: one row, reported as cut off (as {"prompt": "x", "a": ... was)
    for text in ('{"prompt": "x", "turns": [{"role": "user"}, {"ro', '{"turns": [{"role": "user"}], "prompt": "x", '):
        assert list(read_json(_write(tmp_path, text))) == [
            (1, None, "the JSON object is cut off after item 0: the file ends before the JSON does (truncated?)")]
    rep, prompts, quarantined = _ingest(tmp_path, '{"prompt": "x", "turns": [{"role": "user"}, {"ro')
    assert prompts == [] and len(quarantined) == 1 and "truncated" in quarantined[0]


def _write(tmp_path, text: str) -> Path:
    f = tmp_path / "r.json"
    f.write_text(text)
    return f


def test_ingest_and_eval_row_counts_read_a_json_object_with_the_configured_prompt_field(tmp_path):
    """`ingest.prompt_field: query`: the object is one record for ingest (its rows) and for the
    evaluation's row counts of a benchmark file (eval.inputs.row_weights), not a container."""
    from guidealign.eval.inputs import row_weights

    cfg = IngestConfig(prompt_field="query")
    rep, prompts, quarantined = _ingest(tmp_path, json.dumps({"turns": TURNS, "query": "q?"}), cfg)
    assert (prompts, quarantined, rep.rows_in) == (["q?"], [], 1)
    assert list(row_weights(tmp_path / "in.json", cfg).values()) == [1]


def test_records_after_leading_nulls_in_an_array_of_a_container_are_read(tmp_path):
    """{"data": [null, {...}, ...]}: the array was taken for one of no records (its first item is
    no object), so the whole file became one record "missing prompt field", held in memory."""
    records = [{"prompt": f"p{k}"} for k in range(50)]
    rep, prompts, quarantined = _ingest(tmp_path, json.dumps({"data": [None, None] + records}))
    assert sorted(prompts) == sorted(r["prompt"] for r in records) and rep.rows_in == 52
    assert quarantined == ["array item 1 is a JSON null, not an object",
                           "array item 2 is a JSON null, not an object"]
    # an array of nulls only, and a record's own arrays of nulls or numbers, are still no records
    rep, prompts, quarantined = _ingest(tmp_path, json.dumps({"prompt": "x", "tags": [None], "emb": [0.5]}))
    assert (prompts, quarantined, rep.rows_in) == (["x"], [], 1)


def test_an_object_of_arrays_of_records_beside_the_records_is_said_not_dropped(tmp_path):
    """{"data": [...], "more": {"inner": [...]}}: "more"'s records were skipped without a word."""
    text = json.dumps({"data": [{"prompt": "a"}], "more": {"inner": [{"prompt": "b"}]}, "info": {"v": 1},
                       # a schema that names the field in an array of objects holds no records
                       "features": {"columns": [{"name": "prompt", "dtype": "string"}]}})
    rep, prompts, quarantined = _ingest(tmp_path, text)
    assert prompts == ["a"] and len(quarantined) == 1 and 'key "more"' in quarantined[0], quarantined
