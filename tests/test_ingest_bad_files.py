"""Inputs that once killed an ingest job or mixed its output: a row nested too deeply to write,
a Parquet file damaged past its footer, another spelling of an input's path on resume, a
pattern that matched the run directory's own output. Each is a quarantine row or a clear error,
and the job goes on."""
from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_ingest import _all_rows, _big_input, _reference_ingest, _run_cli

from guidealign.ingest.batch import Spec, arrow_batches, rows_batch
from guidealign.ingest.arrowfiles import _rows_of, iter_parquet_tables
from guidealign.ingest.readers import IngestError
from guidealign.ingest.fingerprint import files_fingerprint as _fingerprint
from guidealign.ingest.run import KILL_AFTER_ENV, IngestConfig, ingest, run_fingerprint
from guidealign.shards import fingerprint, iter_tables, read_manifest, read_quarantine

SPEC = Spec("prompt", (), 100_000, "hashlib")


def _quarantine(workdir) -> list[dict]:
    t = read_quarantine(Path(workdir) / "prompts")
    return t.to_pylist() if t is not None else []


# --- values nested too deeply to write -----------------------------------------------------------

def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [600, 980])
def test_deeply_nested_jsonl_row_is_quarantined_on_every_path(tmp_path, depth):
    """980 levels killed the job (RecursionError: pyarrow parsed the line, the type check and
    the JSON writer recursed on the caller's stack); 600 was kept or not by the stack's depth.
    Past 500 levels a row is quarantined, whether its block went columnar (one line a block) or
    row by row (a block with a bad line), and the rows around it are kept."""
    f = tmp_path / "deep.jsonl"
    f.write_text('{"prompt": "x", "k": [[1]]}\n{"prompt": "a", "m": ' + _nested(depth) + '}\n'
                 '{"prompt": "y"}\n{broken\n')
    runs = []
    for block_bytes in (1, 4 << 20):
        w = tmp_path / f"w{block_bytes}"
        ingest([str(f)], w, IngestConfig(block_bytes=block_bytes), progress=False)
        rows = [(r["prompt"], r["source"], r["metadata"]) for r in _all_rows(w)]
        assert rows == [("x", f"{f}:1", '{"k": [[1]]}'), ("y", f"{f}:3", "{}")]
        q = _quarantine(w)
        assert [r["row"] for r in q] == [2, 4]
        assert "nested too deeply" in q[0]["reason"]
        if depth == 600:  # read back by json, refused by the limit (not by the stack)
            assert q[0]["reason"] == "row 2 has a value nested too deeply to write as JSON (deeper than 500 levels)"
        runs.append(q)
    assert runs[0] == runs[1]  # reasons and raw records alike


def test_deeply_nested_row_does_not_kill_the_cli_job(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"prompt": "first"}\n{"prompt":"a","m":' + _nested(980) + '}\n{"prompt": "last"}\n')
    p = _run_cli(["ingest", str(f), "-w", str(tmp_path / "w"), "--no-progress"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert "2 prompts" in out and "1 quarantined" in out
    assert [r["prompt"] for r in _all_rows(tmp_path / "w")] == ["first", "last"]


def test_arrow_column_nested_too_deeply_is_quarantined_row_by_row():
    """A column whose type nests deeper than rows are written (datasets and Parquet stop at ~64
    and ~100 levels, an Arrow table in memory does not): the row that holds such a value is
    quarantined, shallower values of the same column are kept, as the row-by-row path has it."""
    t = pa.int64()
    deep = 1
    for _ in range(980):
        t, deep = pa.list_(t), [deep]
    table = pa.table({"prompt": ["a", "b", "c"], "m": pa.array([None, deep, [[]]], type=t)})
    b = next(arrow_batches("s", table.to_batches(), SPEC))
    assert b.prompt.take(pa.array(b.at)).to_pylist() == ["a", "c"]
    assert b.metadata.take(pa.array(b.at)).to_pylist() == ["{}", '{"m": [[]]}']
    assert b.lineno.tolist() == [1, 3]
    assert b.bad_row == [2] and "deeper than 500 levels" in b.bad_reason[0]
    ref = rows_batch("s", [(i + 1, r, None) for i, r in enumerate(table.to_pylist())], SPEC)
    assert ref.metadata.to_pylist() == ["{}", '{"m": [[]]}']
    assert (ref.bad_row, ref.bad_reason, ref.bad_raw) == (b.bad_row, b.bad_reason, b.bad_raw)


# --- Parquet damaged past its footer ---------------------------------------------------------------

def _damaged_parquet(path: Path, n: int = 30_000, groups: int = 3, bad_group: int = 1,
                     data_pages: bool = False, **opts) -> None:
    """A Parquet file of ``n`` rows in ``groups`` row groups whose footer reads, with 200 bytes
    overwritten in the middle of row group ``bad_group``'s prompt column (``data_pages``: of its
    data pages, past the dictionary)."""
    t = pa.table({"prompt": [f"prompt number {i}" for i in range(n)], "n": list(range(n))})
    pq.write_table(t, path, row_group_size=n // groups, **opts)
    cc = pq.ParquetFile(path).metadata.row_group(bad_group).column(0)
    start = cc.dictionary_page_offset if cc.has_dictionary_page and not data_pages else cc.data_page_offset
    at = start + cc.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[at:at + 200] = b"\xff" * 200
    path.write_bytes(bytes(data))


def test_damaged_row_group_is_one_quarantine_entry_and_the_rest_is_kept(tmp_path):
    good, bad, after = tmp_path / "good.parquet", tmp_path / "corrupt.parquet", tmp_path / "after.parquet"
    pq.write_table(pa.table({"prompt": ["good one", "good two"]}), good)
    pq.write_table(pa.table({"prompt": ["after one"]}), after)
    _damaged_parquet(bad)
    rep = ingest([str(good), str(bad), str(after)], tmp_path / "w", IngestConfig(shard_rows=7000), progress=False)
    rows = _all_rows(tmp_path / "w")
    mine = [r for r in rows if r["source"].startswith(f"{bad}:")]
    numbers = [int(r["source"].rsplit(":", 1)[1]) for r in mine]
    assert numbers == list(range(1, 10_001)) + list(range(20_001, 30_001))
    assert all(r["prompt"] == f"prompt number {k - 1}" for r, k in zip(mine, numbers))  # numbered right
    assert [r["prompt"] for r in rows if not r["source"].startswith(f"{bad}:")] == ["good one", "good two",
                                                                                    "after one"]
    q = _quarantine(tmp_path / "w")
    # each row of the damaged group is an entry: rows read = kept + duplicates + quarantined
    assert [(r["source"], r["row"], r["raw"]) for r in q] == [(str(bad), k, None) for k in range(10_001, 20_001)]
    reason = q[0]["reason"]
    assert reason.startswith(f"Parquet row group cannot be decoded ({bad}: row group 2 of 3, rows 10001-20000): ")
    assert {r["reason"] for r in q} == {reason}
    assert (rep.rows, rep.quarantined, rep.rows_in) == (20_003, 10_000, 30_003)
    assert rep.rows_in == rep.rows + rep.duplicates + rep.quarantined
    # the row-by-row reader says the same
    ref_rows, ref_bad = _reference_ingest(bad, IngestConfig())
    ingest([str(bad)], tmp_path / "alone", IngestConfig(), progress=False)
    assert [(r["id"], r["prompt"], r["source"], r["metadata"]) for r in _all_rows(tmp_path / "alone")] == ref_rows
    assert ref_bad == [(k, reason) for k in range(10_001, 20_001)]


def test_row_group_failing_part_way_keeps_the_rows_before_and_numbers_the_rows_after(tmp_path):
    """A damaged page in the middle of a row group read in small batches: the rows decoded
    before it are kept, the rest of the group is one entry, the next group reads on with its own
    row numbers, the same through the columnar batches and the row reader."""
    p = tmp_path / "mid.parquet"
    _damaged_parquet(p, data_pages=True, data_page_size=4096, compression="none", use_dictionary=False)
    items = list(iter_parquet_tables(p, 1000))
    from guidealign.ingest.arrowfiles import UnreadRows

    lost = [x for x in items if isinstance(x, UnreadRows)]
    assert len(lost) == 1
    u = lost[0]
    assert 10_001 < u.first and u.first + u.n == 20_001 and f"rows {u.first}-20000" in u.reason
    got, bad = [], []
    for b in arrow_batches(str(p), iter(items), SPEC):
        got += zip(b.lineno[b.at].tolist() if len(b.at) else [], b.prompt.take(pa.array(b.at)).to_pylist())
        bad += zip(b.bad_row, b.bad_reason)
    assert [k for k, _ in got] == list(range(1, u.first)) + list(range(20_001, 30_001))
    assert all(text == f"prompt number {k - 1}" for k, text in got)
    assert bad == [(k, u.reason) for k in range(u.first, 20_001)]
    ref = list(_rows_of(iter(items)))
    assert [(k, r["prompt"]) for k, r, e in ref if e is None] == got
    assert [(k, e) for k, r, e in ref if e is not None] == bad


# --- another spelling of an input's path -----------------------------------------------------------

def test_another_spelling_of_an_input_is_another_run(tmp_path, monkeypatch):
    """``source`` names an input as it was written: a rerun with another spelling of the same
    file was taken as the same run (nothing rewritten, the old spelling kept, or after a crash
    both mixed). Now it rewrites every shard; the same spelling again does nothing; and a path
    written as it resolves keeps the fingerprint it always had (no re-ingest after the upgrade)."""
    monkeypatch.chdir(tmp_path)
    _big_input(tmp_path / "in.jsonl", 300)
    absolute = str((tmp_path / "in.jsonl").resolve())
    cfg = IngestConfig(shard_rows=100)
    for spelling in ("in.jsonl", absolute, "./in.jsonl"):
        rep = ingest([spelling], "w", cfg, progress=False)
        assert (rep.written, rep.skipped) == (3, 0), spelling
        want = str(Path(spelling))
        assert {r["source"].rsplit(":", 1)[0] for r in _all_rows("w")} == {want}
        assert {r["source"] for r in _quarantine("w")} == {want}
    rep = ingest(["in.jsonl"], "w", cfg, progress=False)
    assert (rep.written, rep.skipped) == (0, 3)
    st = os.stat(absolute)
    old_rule = fingerprint("ingest-v8", cfg.prompt_field, list(cfg.prompt_aliases), cfg.max_chars, cfg.shard_rows,
                           cfg.encoding, cfg.delimiter, list(cfg.instruction_inputs),
                           [(absolute, st.st_size, st.st_mtime_ns)],
                           "metadata-strict-json-v1",  # Stop 50: every input but CSV, once
                           "prompt-has-text-v1",  # Stop 51: every input, once
                           "line-pairing-v1",  # Stop 53: text inputs, once
                           "sniff-whole-file-v1",  # Stop 54: text inputs, once
                           "chat-turns-v1")  # Stop 56: every input but CSV, once
    assert _fingerprint([Path(absolute)], cfg) == old_rule


def test_resume_with_another_spelling_rewrites_every_shard_in_it(tmp_path):
    _big_input(tmp_path / "in.jsonl", 500)
    args = ["-w", "rs", "--set", "ingest.shard_rows=100", "--no-progress"]
    p = _run_cli(["ingest", "in.jsonl", *args], env={KILL_AFTER_ENV: "3"}, cwd=tmp_path)
    assert p.wait(timeout=300) == -signal.SIGKILL
    absolute = str((tmp_path / "in.jsonl").resolve())
    p = _run_cli(["ingest", absolute, *args], cwd=tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert "(5 written, 0 already done)" in out
    rows = _all_rows(tmp_path / "rs")
    assert len(rows) == 500 and {r["source"].rsplit(":", 1)[0] for r in rows} == {absolute}
    assert {r["source"] for r in _quarantine(tmp_path / "rs")} == {absolute}


# --- patterns over the run directory ---------------------------------------------------------------

def test_a_pattern_over_the_run_directory_skips_its_datasets(tmp_path, monkeypatch, caplog):
    """``ingest '**/*.parquet' -w .`` read its own shards back on every rerun (3 -> 6 -> 7 rows,
    every shard rewritten). The run directory's datasets are skipped with a warning: the one
    being written, another stage's (a manifest), one a killed stage left (markers only)."""
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), "data/x.parquet")
    for name, mark in (("responses", "_stage.json"), ("killed", "shard-00000.done.json")):
        Path(name, "quarantine").mkdir(parents=True)
        Path(name, mark).write_text("{}")
        for f in ("shard-00000.parquet", "quarantine/shard-00000.parquet"):
            pq.write_table(pa.table({"prompt": [f"{name} output"]}), Path(name, f))
    cfg = IngestConfig()
    for run in range(3):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="guidealign.ingest.arrowfiles"):
            rep = ingest(["**/*.parquet"], ".", cfg, progress=False)
        assert (rep.files, rep.rows_in, rep.rows, rep.quarantined) == (1, 3, 3, 0), run
        assert (rep.written, rep.skipped) == ((1, 0) if run == 0 else (0, 1)), run
        skipped = 4 if run == 0 else 5  # + the shard of prompts/
        assert f"skipped {skipped} of the {skipped + 1} files" in caplog.text, run
    assert [r["prompt"] for r in _all_rows(".")] == ["a", "b", "c"]
    assert read_manifest("prompts")["files"] == ["data/x.parquet"]
    # another rank, waiting for this very run, computes the same fingerprint
    assert run_fingerprint(["**/*.parquet"], cfg, "prompts") == read_manifest("prompts")["fingerprint"]


def test_a_pattern_over_the_run_directory_skips_its_artifacts_and_records(tmp_path, monkeypatch):
    """Only manifests and shard markers marked the run's output: the index's rows.parquet (an
    artifact, `_done.json`; guideline texts under `text`, a prompt alias) was read back in as
    prompts by ``ingest '**/*.parquet' -w .``, and ``'**/*.json'`` took run.json and push reports."""
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b"]}), "data/x.parquet")
    Path("data/y.json").write_text(json.dumps([{"prompt": "c"}]))
    Path("index").mkdir()
    Path("index/_done.json").write_text("{}")
    pq.write_table(pa.table({"guideline_id": ["g"], "text": ["Refuse weapons help."]}), "index/rows.parquet")
    Path("run.json").write_text(json.dumps({"stages": ["ingest"]}))
    Path("push").mkdir()
    Path("push/respond.json").write_text(json.dumps({"prompt": "not a prompt"}))
    Path("_failed").mkdir()
    Path("_failed/rank-00000.json").write_text(json.dumps({"text": "an error"}))
    rep = ingest(["**/*.parquet", "**/*.json"], ".", IngestConfig(), progress=False)
    assert sorted(r["prompt"] for r in _all_rows(".")) == ["a", "b", "c"]
    assert (rep.files, rep.quarantined) == (2, 0)
    # a user's own folders whose names start with _ or . are input, not the run's output
    for d in ("_data", ".hidden"):
        Path(d).mkdir()
        Path(d, "z.jsonl").write_text(json.dumps({"prompt": f"from {d}"}) + "\n")
    rep = ingest(["_data/*.jsonl", ".hidden/*.jsonl"], ".", IngestConfig(), progress=False, dataset="own")
    assert sorted(r["prompt"] for t in iter_tables(Path("own")) for r in t.to_pylist()) == \
        ["from .hidden", "from _data"]


def test_an_input_inside_the_dataset_being_written_is_an_error(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "q"}) + "\n")
    w = tmp_path / "w"
    ingest([str(src)], w, IngestConfig(), progress=False)
    shard = w / "prompts" / "shard-00000.parquet"
    with pytest.raises(IngestError, match="the dataset this ingest writes"):
        ingest([str(shard)], w, IngestConfig(), progress=False)
    with pytest.raises(IngestError, match="matches only files in datasets of the run directory"):
        ingest([str(w / "prompts" / "*.parquet")], w, IngestConfig(), progress=False)
    assert [r["prompt"] for r in _all_rows(w)] == ["q"]
    # another dataset's shards named as such are input like any file
    rep = ingest([str(shard)], w, IngestConfig(), progress=False, dataset="again")
    assert rep.rows == 1


# --- JSON values that are not objects ------------------------------------------------------------

def test_a_jsonl_block_starting_with_null_is_quarantined_not_a_crash(tmp_path):
    """pyarrow 26's read_json dies with SIGSEGV on a block whose first value is `null`, so such a
    line at the start of a file, or at a block's start anywhere, killed ingest and every rerun."""
    src = tmp_path / "in.jsonl"
    lines = ["null"] + [json.dumps({"prompt": f"p{i}"}) if i % 7 else "null" for i in range(1, 3000)]
    src.write_text("\n".join(lines) + "\n")
    nulls = lines.count("null")
    # small blocks, so that many of them start at a `null` line
    p = _run_cli(["ingest", str(src), "-w", str(tmp_path / "w"), "--set", "ingest.block_bytes=4096",
                  "--no-progress"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    rows = _all_rows(tmp_path / "w")
    assert sorted(r["prompt"] for r in rows) == sorted(f"p{i}" for i in range(1, 3000) if i % 7)
    q = _quarantine(tmp_path / "w")
    assert len(q) == nulls and {r["reason"].split(" is ", 1)[1] for r in q} == {"a JSON null, not an object"}
    assert {r["raw"] for r in q} == {"null"}


def test_json_lines_saved_as_json_whose_first_line_is_no_object_are_read_line_by_line(tmp_path):
    """A .json file of JSON Lines whose first line is `null` or a comment was one quarantine row,
    "not a JSON array or object": its records were never read."""
    for first in ("null", "// exported 2024-01-01"):
        src = tmp_path / "in.json"
        src.write_text(first + '\n{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"}\n')
        w = tmp_path / f"w{len(first)}"
        ingest([str(src)], w, IngestConfig(), progress=False)
        assert [r["prompt"] for r in _all_rows(w)] == ["a", "b", "c"]
        q = _quarantine(w)
        assert [(r["row"], r["raw"]) for r in q] == [(1, first)]
    src = tmp_path / "array.json"  # an array spread over lines stays one JSON value
    src.write_text('[\n{"prompt": "a"},\n{"prompt": "b"}\n]\n')
    ingest([str(src)], tmp_path / "wa", IngestConfig(), progress=False)
    assert [r["prompt"] for r in _all_rows(tmp_path / "wa")] == ["a", "b"] and not _quarantine(tmp_path / "wa")


def test_a_quarantined_json_value_that_is_no_object_keeps_its_text(tmp_path):
    """An array item or a line that is a string (a list of plain prompts) was quarantined with no
    raw text: the prompt was nowhere in the output."""
    (tmp_path / "a.json").write_text('["plain prompt one", {"prompt": "x"}, 7]')
    (tmp_path / "b.jsonl").write_text('{"prompt": "y"}\n"plain prompt two"\n[1, 2]\n')
    w = tmp_path / "w"
    ingest([str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")], w, IngestConfig(), progress=False)
    assert sorted(r["prompt"] for r in _all_rows(w)) == ["x", "y"]
    got = {(r["reason"].split(" (")[0], r["raw"]) for r in _quarantine(w)}  # (Stop 57 adds a hint)
    assert got == {("array item 1 is a JSON string, not an object", '"plain prompt one"'),
                   ("array item 3 is a JSON number, not an object", "7"),
                   ("line 2 is a JSON string, not an object", '"plain prompt two"'),
                   ("line 3 is a JSON array, not an object", "[1, 2]")}


def test_utf8_text_after_a_cp1252_start_is_named_not_garbled_in_silence(tmp_path, caplog):
    """A file whose first 64 KiB are cp1252 (one byte not UTF-8) and whose later rows are UTF-8
    came out with those rows garbled ('cafÃ© crÃ¨me'), no warning, nothing quarantined."""
    src = tmp_path / "mixed.jsonl"
    head = b'{"prompt": "r\xe9sum\xe9 tips"}\n' + b"".join(b'{"prompt": "row %d"}\n' % i for i in range(5000))
    tail = '{"prompt": "café crème"}\n'.encode("utf-8")
    src.write_bytes(head + tail)
    with caplog.at_level(logging.WARNING):
        ingest([str(src)], tmp_path / "w", IngestConfig(), progress=False)
    said = [r.getMessage() for r in caplog.records if "read as cp1252" in r.getMessage()]
    assert len(said) == 1 and str(src) in said[0] and f"from byte {len(head) + 15}" in said[0]
    assert "--encoding utf-8" in said[0]
    caplog.clear()
    clean = tmp_path / "cp1252.jsonl"  # cp1252 all through: nothing to say
    clean.write_bytes(head + '{"prompt": "café"}\n'.encode("cp1252"))
    with caplog.at_level(logging.WARNING):
        ingest([str(clean)], tmp_path / "w2", IngestConfig(), progress=False)
    assert not [r for r in caplog.records if "read as cp1252" in r.getMessage()]
