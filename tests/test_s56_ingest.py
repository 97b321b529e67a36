"""Review s56 (ingest): prompts given as chat conversations, and settings that read no row.

- A row whose prompt is a chat conversation (``messages``, ShareGPT's ``conversations``, TRL's
  ``"prompt": [turns]``) was quarantined as "missing prompt field" (whose fix, naming the
  field, then said "prompt is not a string (list)"): no chat export could be ingested. A
  conversation of one user turn is that turn's prompt now; one of several is quarantined
  saying so.
- ``ingest.block_bytes=0`` read no row of any file ("0 rows read", nothing quarantined), and a
  blank ``ingest.prompt_field`` quarantined every row: both are refused before any work.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guidealign.core.ids import prompt_hash
from guidealign.ingest.readers import IngestError
from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import iter_tables, read_quarantine


def _rows(workdir) -> list[dict]:
    return [r for t in iter_tables(Path(workdir) / "prompts") for r in t.to_pylist()]


def _quarantine(workdir) -> list[dict]:
    t = read_quarantine(Path(workdir) / "prompts")
    return t.to_pylist() if t is not None else []


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ONE_TURN = [  # one user turn each, in the three common chat layouts
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do locks work?"},
                  {"role": "assistant", "content": "Pins."}], "id": 7},
    {"conversations": [{"from": "human", "value": "What is a VPN?"}, {"from": "gpt", "value": "A tunnel."}]},
    {"prompt": [{"role": "user", "content": "Name a prime."}]},
]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_a_chat_conversation_of_one_user_turn_is_ingested_as_that_turns_prompt(tmp_path, fmt):
    records = ONE_TURN + [{"prompt": "A plain prompt."}]
    src = tmp_path / f"chat.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(src, records)
    elif fmt == "json":
        src.write_text(json.dumps(records))
    else:  # each layout a file of its own (one schema a file)
        src = tmp_path / "chat"
        src.mkdir()
        for i, r in enumerate(records):
            pq.write_table(pa.Table.from_pylist([r]), src / f"{i}.parquet")
        src = src / "*.parquet"
    w = tmp_path / "w"
    ingest([str(src)], w, IngestConfig(), progress=False)
    rows = _rows(w)
    want = ["How do locks work?", "What is a VPN?", "Name a prime.", "A plain prompt."]
    assert [r["prompt"] for r in rows] == want and not _quarantine(w)
    assert [r["id"] for r in rows] == [prompt_hash(p).hex() for p in want]
    # the conversation stays whole in the metadata (its other turns are in no other column)
    first = json.loads(rows[0]["metadata"])
    assert first["id"] == 7 and [t["role"] for t in first["messages"]] == ["system", "user", "assistant"]


def test_a_chat_conversation_of_several_or_no_user_turns_is_quarantined_saying_so(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Now write malware"}]},
        {"messages": [{"role": "system", "content": "Be brief."}]},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"prompt": "kept"},
    ]
    w = tmp_path / "w"
    ingest([str(_write_jsonl(tmp_path / "in.jsonl", records))], w, IngestConfig(), progress=False)
    assert [r["prompt"] for r in _rows(w)] == ["kept"]
    q = {r["row"]: r["reason"] for r in _quarantine(w)}
    assert sorted(q) == [1, 2, 3]
    assert q[1].startswith("chat conversation with 2 user turns")
    assert q[2].startswith("chat conversation with 0 user turns")
    assert q[3].startswith("chat conversation with 2 user turns")
    assert all("'prompt' field" in why for why in q.values())


def test_a_conversation_among_plain_rows_comes_out_the_same_whatever_the_block_size(tmp_path):
    """In a block of plain rows the prompt column is text and a conversation's row is a null
    there: the row reader takes it (its turn, its whole conversation in the metadata), as it
    does when the row is a block of its own."""
    records = [{"prompt": f"plain {i}", "n": i} for i in range(5)]
    records.insert(3, {"messages": [{"role": "user", "content": "From a chat"},
                                    {"role": "assistant", "content": "ok"}], "n": 99})
    src = _write_jsonl(tmp_path / "in.jsonl", records)
    got = []
    for block in (16, 1 << 20):
        w = tmp_path / f"w{block}"
        ingest([str(src)], w, IngestConfig(block_bytes=block), progress=False)
        assert not _quarantine(w)
        got.append([(r["id"], r["prompt"], r["source"], r["metadata"]) for r in _rows(w)])
    assert got[0] == got[1]
    chat_row = got[1][3]
    assert chat_row[1] == "From a chat" and json.loads(chat_row[3])["messages"][1]["content"] == "ok"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_chat_field_that_holds_no_conversation_is_no_prompt(tmp_path, fmt):
    """Only a list of turns is read from a chat field: text there (a CSV's JSON dump, a note) is
    not taken for the prompt."""
    if fmt == "jsonl":
        src = _write_jsonl(tmp_path / "in.jsonl", [{"messages": "see the attached file"},
                                                   {"messages": [1, 2]}])
    else:
        src = tmp_path / "in.csv"
        src.write_text('id,messages\n1,"[{""role"": ""user"", ""content"": ""x""}]"\n2,plain words\n')
    w = tmp_path / "w"
    ingest([str(src)], w, IngestConfig(), progress=False)
    q = _quarantine(w)
    if fmt == "csv":  # (Stop 57) a header that names no prompt column is a row of its own
        header, q = q[0], q[1:]
        assert header["reason"].startswith("no prompt column in the header")
    assert not _rows(w) and len(q) == 2
    assert all(r["reason"].startswith("missing prompt field 'prompt'") for r in q)


def test_the_prompt_field_and_its_aliases_win_over_a_conversation(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [
        {"question": "Asked as a question?", "messages": [{"role": "user", "content": "In the chat"}]}])
    w = tmp_path / "w"
    ingest([str(src)], w, IngestConfig(), progress=False)
    assert [r["prompt"] for r in _rows(w)] == ["Asked as a question?"]


@pytest.mark.parametrize("bad", [{"block_bytes": 0}, {"block_bytes": -1}, {"max_chars": 0},
                                 {"prompt_field": ""}, {"prompt_field": "  "},
                                 {"prompt_aliases": ["question", ""]}, {"instruction_inputs": [" "]}])
def test_a_setting_that_would_read_or_keep_no_row_is_refused_before_any_work(tmp_path, bad):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    w = tmp_path / "w"
    key = next(iter(bad))
    with pytest.raises(IngestError, match=f"ingest.{key}"):
        ingest([str(src)], w, IngestConfig(**bad), progress=False)
    assert not (w / "prompts").exists()
