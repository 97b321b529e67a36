"""Ingest: formats, stable ids, duplicates, quarantine, crash-resume, config changes."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guidealign.ingest import IngestConfig, ingest, prompt_hash
from guidealign.readers import IngestError
from shards import committed, iter_tables, read_manifest, read_marker, read_quarantine


def _all_rows(workdir) -> list[dict]:
    return [r for t in iter_tables(Path(workdir) / "prompts") for r in t.to_pylist()]


def test_formats_ids_metadata_and_duplicates(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"prompt": "Hello  world", "lang": "en"}\n{"prompt": "second"}\n')
    js = tmp_path / "b.json"
    js.write_text(json.dumps([{"prompt": "from json"}, {"prompt": "hello world"}]))
    cs = tmp_path / "c.csv"
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "topic"])
        w.writerow(["from, csv", "t1"])
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["from parquet"], "n": [3]}), pqf)
    import datasets

    datasets.Dataset.from_dict({"prompt": ["from datasets", "second"]}).save_to_disk(str(tmp_path / "hf"))

    rep = ingest([str(jl), str(js), str(cs), str(pqf), str(tmp_path / "hf")], tmp_path / "w",
                 IngestConfig(shard_rows=2), progress=False)
    rows = _all_rows(tmp_path / "w")
    prompts = [r["prompt"] for r in rows]
    # de-duplication normalizes whitespace but keeps case: "hello world" stays, the 2nd "second" goes
    assert prompts == ["Hello  world", "second", "from json", "hello world", "from, csv",
                       "from parquet", "from datasets"]
    assert rep.duplicates == 1
    assert rep.rows == len(rows) and rep.quarantined == 0
    assert len({r["id"] for r in rows}) == len(rows)
    assert rows[0]["id"] == prompt_hash("Hello world").hex()  # whitespace-normalized id
    assert json.loads(rows[0]["metadata"]) == {"lang": "en"}
    assert json.loads(rows[4]["metadata"]) == {"topic": "t1"}
    assert rows[4]["source"].endswith("c.csv:2")
    man = read_manifest(tmp_path / "w" / "prompts")
    assert man["num_shards"] == 4 and man["rows"] == len(rows)


def test_exact_duplicates_dropped_and_counted(tmp_path):
    f = tmp_path / "dup.jsonl"
    lines = [json.dumps({"prompt": p}) for p in ["a b", "a  b ", "c", "a b", "c", "d"]]
    f.write_text("\n".join(lines) + "\n")
    rep = ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    assert [r["prompt"] for r in _all_rows(tmp_path / "w")] == ["a b", "c", "d"]
    assert rep.duplicates == 3


def test_every_bad_row_kind_is_quarantined_and_good_rows_arrive(tmp_path):
    f = tmp_path / "bad.jsonl"
    good = [f"good prompt {i}" for i in range(5)]
    with open(f, "wb") as fh:
        fh.write(json.dumps({"prompt": good[0]}).encode() + b"\n")
        fh.write(b'{"text": "no prompt field"}\n')                       # missing
        fh.write(b'{"prompt": null}\n')                                   # null
        fh.write(b'{"prompt": 42}\n')                                     # non-string
        fh.write(json.dumps({"prompt": good[1]}).encode() + b"\n")
        fh.write(b'{"prompt": ""}\n')                                     # empty
        fh.write(b'{"prompt": "   \\t\\n "}\n')                           # whitespace only
        fh.write(b'{"prompt": "caf\xe9 latin-1"}\n')                      # invalid UTF-8
        fh.write(b"this is not json\n")                                   # not JSON
        fh.write(json.dumps({"prompt": good[2]}).encode() + b"\n")
        fh.write(json.dumps({"prompt": "x" * 101}).encode() + b"\n")      # too long
        fh.write(b"[1, 2]\n")                                             # not an object
        fh.write(json.dumps({"prompt": good[3]}).encode() + b"\n")
        fh.write(json.dumps({"prompt": good[4]}).encode() + b"\n")
        fh.write(b'{"prompt": "truncated last li')                        # truncated last line
    rep = ingest([str(f)], tmp_path / "w", IngestConfig(max_chars=100, shard_rows=2), progress=False)
    assert [r["prompt"] for r in _all_rows(tmp_path / "w")] == good
    q = read_quarantine(tmp_path / "w" / "prompts").to_pylist()
    by_row = {r["row"]: r["reason"] for r in q}
    assert set(by_row) == {2, 3, 4, 6, 7, 8, 9, 11, 12, 15}
    assert "missing prompt field" in by_row[2]
    assert by_row[3] == "null prompt"
    assert "not a string" in by_row[4]
    assert by_row[6] == by_row[7] == "empty prompt"
    assert "invalid UTF-8" in by_row[8]
    assert "not JSON" in by_row[9]
    assert "too long" in by_row[11]
    assert "not an object" in by_row[12]
    assert by_row[15].startswith("truncated last line")
    assert all(r["source"] == str(f) for r in q)
    assert rep.quarantined == 10 and rep.rows == 5
    # the raw text of an undecodable line is kept for inspection
    assert "latin-1" in next(r["raw"] for r in q if r["row"] == 8)


def test_bad_rows_in_csv_parquet_and_json(tmp_path):
    cs = tmp_path / "x.csv"
    cs.write_bytes(b"prompt,other\nfine one,1\n,2\nbad \xff byte,3\nfine two,4\n")
    pqf = tmp_path / "y.parquet"
    pq.write_table(pa.table({"prompt": ["ok parquet", None, "  "]}), pqf)
    js = tmp_path / "z.json"
    js.write_text(json.dumps([{"prompt": "ok json"}, {"prompt": 1.5}, "str"]))
    rep = ingest([str(cs), str(pqf), str(js)], tmp_path / "w", progress=False)
    assert [r["prompt"] for r in _all_rows(tmp_path / "w")] == ["fine one", "fine two", "ok parquet", "ok json"]
    reasons = sorted(r["reason"].split(" (")[0] for r in read_quarantine(tmp_path / "w" / "prompts").to_pylist())
    assert reasons == ["array item is a JSON str, not an object", "empty prompt", "empty prompt",
                       "invalid UTF-8 in column 'prompt'", "null prompt", "prompt is not a string"]
    assert rep.quarantined == 6


def test_unreadable_input_fails_before_any_work(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "x"}\n')
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    for bad, needle in [(broken, "broken.parquet"), (tmp_path / "missing.jsonl", "missing.jsonl"),
                        (tmp_path / "notes.txt", "unknown format")]:
        if bad.suffix == ".txt":
            bad.write_text("hi")
        with pytest.raises(IngestError, match=needle.replace(".", r"\.")):
            ingest([str(good), str(bad)], tmp_path / "w", progress=False)
        assert not (tmp_path / "w" / "prompts").exists()


def test_prompt_field_is_configurable(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "what?", "prompt": "not this"}\n')
    ingest([str(f)], tmp_path / "w", IngestConfig(prompt_field="question"), progress=False)
    rows = _all_rows(tmp_path / "w")
    assert rows[0]["prompt"] == "what?" and json.loads(rows[0]["metadata"]) == {"prompt": "not this"}


def _big_input(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"synthetic prompt number {i} " + "lorem ipsum " * 15}) + "\n")
            if i % 97 == 0:
                f.write('{"prompt": ""}\n')


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "guidealign", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, **kw)


def test_sigkill_mid_run_then_resume_gives_exactly_the_uninterrupted_rows(tmp_path):
    src = tmp_path / "in.jsonl"
    _big_input(src, 120_000)
    args = ["ingest", str(src), "--set", "ingest.shard_rows=2000", "--no-progress"]
    clean = tmp_path / "clean"
    assert _run_cli([*args, "-w", str(clean)]).wait() == 0

    crashed = tmp_path / "crashed"
    proc = _run_cli([*args, "-w", str(crashed)])
    deadline = time.time() + 120
    while len(committed(crashed / "prompts")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = committed(crashed / "prompts")
    n_total = read_manifest(clean / "prompts")["num_shards"]
    assert 3 <= len(done_before) < n_total, "the kill must land mid-run"
    created = {i: read_marker(crashed / "prompts", i).created for i in done_before}

    p = _run_cli([*args, "-w", str(crashed)])
    assert p.wait() == 0, p.stderr.read()
    a, b = _all_rows(clean), _all_rows(crashed)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert len({r["id"] for r in b}) == len(b) == 120_000
    # shards committed before the crash were not written again
    assert all(read_marker(crashed / "prompts", i).created == c for i, c in created.items())
    assert read_quarantine(crashed / "prompts").num_rows == read_quarantine(clean / "prompts").num_rows
    # no temp files left behind
    assert not [f for f in (crashed / "prompts").rglob("*.tmp")]


def test_rerun_same_config_does_nothing_changed_config_redoes(tmp_path):
    f = tmp_path / "in.jsonl"
    _big_input(f, 500)
    r1 = ingest([str(f)], tmp_path / "w", IngestConfig(shard_rows=100), progress=False)
    assert r1.written == 5
    r2 = ingest([str(f)], tmp_path / "w", IngestConfig(shard_rows=100), progress=False)
    assert (r2.written, r2.skipped) == (0, 5)
    r3 = ingest([str(f)], tmp_path / "w", IngestConfig(shard_rows=250), progress=False)
    assert (r3.written, r3.skipped) == (2, 0)
    assert committed(tmp_path / "w" / "prompts") == [0, 1]  # stale shards 2..4 retired
    assert len(_all_rows(tmp_path / "w")) == 500
