"""A prompt set with no row (every row quarantined, an empty file) stops the first generation
stage before it starts its engine, with the reason; ingest itself finishes (its quarantine is
what the user reads) and says so."""
from __future__ import annotations

import logging

import pytest

from guidealign.config import load_config
from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards.stage import map_shards


def _all_bad(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": ""}\n{"text": 3}\nnot json\n')
    return f


def test_ingest_of_no_usable_row_finishes_and_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        rep = ingest([str(_all_bad(tmp_path))], tmp_path, IngestConfig(), progress=False)
    assert rep.rows == 0 and rep.quarantined == 3
    assert "ingest kept no prompt" in caplog.text and "quarantine" in caplog.text


def test_a_stage_with_an_engine_refuses_an_empty_input_before_building_it(tmp_path):
    ingest([str(_all_bad(tmp_path))], tmp_path, IngestConfig(), progress=False)
    built = []

    def make_fn():
        built.append(1)
        return lambda table, i: table

    with pytest.raises(RuntimeError, match="holds no rows.*3 row\\(s\\) quarantined"):
        map_shards("detect", tmp_path / "prompts", tmp_path / "detect", "fp", make_fn=make_fn, progress=False)
    assert built == []
    # a cheap function (no make_fn) still writes its empty shard
    rep = map_shards("copy", tmp_path / "prompts", tmp_path / "copy", "fp", fn=lambda t, i: t, progress=False)
    assert rep.processed == 1 and rep.rows == 0


def test_detect_on_an_empty_prompt_set_starts_no_engine(tmp_path, monkeypatch):
    from guidealign.gen import engine
    from guidealign.gen.detect import run_detect

    def no_engine(*a, **k):
        raise AssertionError("the engine was built for an empty prompt set")

    monkeypatch.setattr(engine, "build_llm", no_engine)
    ingest([str(_all_bad(tmp_path))], tmp_path, IngestConfig(), progress=False)
    with pytest.raises(RuntimeError, match="detect: its input .* holds no rows"):
        run_detect(load_config(None, []), tmp_path, progress=False)
