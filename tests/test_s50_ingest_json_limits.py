"""JSON that Python or pyarrow cannot take as it is: a value nested thousands deep (pyarrow.json
died on it), an integer of more digits than Python reads, NaN and infinities (not JSON when
written back), undecodable bytes in a quarantined Parquet row."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guidealign.ingest.metadata import MAX_DEPTH, dumps
from guidealign.ingest.fingerprint import files_fingerprint as _fingerprint
from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import fingerprint, iter_tables, read_quarantine

BIG = "9" * 5000  # past Python's 4300-digit limit for int("...")


def _ingest(paths, workdir: Path, **cfg) -> tuple[list[dict], list[dict]]:
    ingest([str(p) for p in paths], workdir, IngestConfig(**cfg), progress=False)
    rows = [r for t in iter_tables(workdir / "prompts") for r in t.to_pylist()]
    q = read_quarantine(workdir / "prompts")
    return rows, (q.to_pylist() if q is not None else [])


def _strict(text: str):
    """``json.loads`` as a strict JSON parser (jq, JavaScript) reads: no NaN or Infinity."""
    def refuse(word):
        raise ValueError(f"not JSON: {word}")
    return json.loads(text, parse_constant=refuse)


# --- 1. a deeply nested JSONL row ---------------------------------------------------------------

_DEEP_SCRIPT = """
import json, sys
from guidealign.ingest.run import IngestConfig, ingest
from guidealign.shards import iter_tables, read_quarantine
w = sys.argv[2]
ingest([sys.argv[1]], w, IngestConfig(block_bytes=int(sys.argv[3])), progress=False)
rows = [r["prompt"] for t in iter_tables(w + "/prompts") for r in t.to_pylist()]
q = read_quarantine(w + "/prompts")
print(json.dumps({"rows": rows, "q": [(r["row"], r["reason"]) for r in q.to_pylist()]}))
"""


@pytest.mark.parametrize("block_bytes", [1 << 20, 64])
def test_a_row_nested_20000_deep_is_quarantined_and_the_rest_kept(tmp_path, block_bytes):
    # pyarrow.json overran its thread's stack on such a line (SIGSEGV: the whole job died);
    # in a subprocess, so that a crash fails this test and not the test run
    f = tmp_path / "deep.jsonl"
    f.write_bytes(b'{"prompt":"ok1"}\n{"prompt":"deep","n":' + b"[" * 20000 + b"]" * 20000 + b'}\n'
                  + b'{"prompt":"ok2"}\n')
    p = subprocess.run([sys.executable, "-c", _DEEP_SCRIPT, str(f), str(tmp_path / "w"), str(block_bytes)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["rows"] == ["ok1", "ok2"]
    assert [(row, "nested too deeply" in why) for row, why in out["q"]] == [(2, True)]


@pytest.mark.parametrize("shape", ["one_per_line", "unclosed_then_closed", "objects_per_line"])
def test_nesting_that_goes_on_across_short_lines_is_quarantined_not_a_crash(tmp_path, shape):
    # pyarrow.json reads a line end inside a value as blank space: 20,000 levels opened over
    # short lines killed ingest (SIGSEGV) though no line was long enough to be looked at
    n = 20000
    deep = {"one_per_line": b'{"prompt":"deep","n":\n' + b"[\n" * n + b"]\n" * n + b"}\n",
            "unclosed_then_closed": b'{"prompt":"deep","n":' + b"[" * n + b"\n" + b"]" * n + b"}\n",
            "objects_per_line": b'{"prompt":"deep","n":[' + b'{"a":[' * 400 + b"\n"
            + (b'{"a":[' * 400 + b"\n") * (n // 400) + b"]}" * (400 * (n // 400 + 1)) + b"]}\n"}[shape]
    f = tmp_path / "deep.jsonl"
    f.write_bytes(b'{"prompt":"ok1"}\n' + deep + b'{"prompt":"ok2"}\n')
    p = subprocess.run([sys.executable, "-c", _DEEP_SCRIPT, str(f), str(tmp_path / "w"), str(1 << 20)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["rows"][0] == "ok1" and out["rows"][-1] == "ok2" and "deep" not in out["rows"]
    assert out["q"]  # the deep value's lines, each with its reason


def test_lines_are_objects():
    import numpy as np

    from guidealign.ingest.jsonl import scan_lines

    def ok(b):
        got = {scan_lines(np.frombuffer(b, np.uint8), step).objects for step in (1, 2, 3, 5, 1 << 16)}
        assert len(got) == 1, b  # the same in any step size
        return got.pop()

    assert ok(b'{"a":1}\n{"b":[1]}\n') and ok(b'{"a":1}\r\n{"b":2}\r\n') and ok(b'{"a":1}') and ok(b"")
    for bad in (b'{"a":1}\n[\n]\n', b'{"a":[\n1]}\n', b'{"a":1}\n\n{"b":2}\n', b'{"a":1}\r\n{"b":[1]\r\n',
                b'{"a":1} \n', b' {"a":1}\n', b'{"a":[{"b":1}\n,{"c":2}]}\n'):
        assert not ok(bad), bad


def test_the_screen_finds_deep_lines_and_passes_ordinary_ones():
    from guidealign.ingest.jsonl import LONG_LINE, has_deep_line

    deep = b'{"prompt":"d","n":' + b"[" * 3000 + b"]" * 3000 + b"}"
    ok = b'{"prompt":"a plain row"}'
    assert has_deep_line(ok + b"\n" + deep + b"\n" + ok + b"\n")
    assert has_deep_line(deep)  # the last line, unterminated
    pad = b'"' + b"x" * 20000 + b'"'
    assert has_deep_line(b'{"prompt":"d","n":' + b"[" * 600 + b"]" * 600 + b',"pad":' + pad + b"}\n")
    assert has_deep_line(b'{"prompt":"d","pad":' + pad + b',"n":' + b"[" * 600 + b"]" * 600 + b"}\n")
    # closing brackets inside a string do not hide a deep value after them on the line
    assert has_deep_line(b'{"a":"' + b"]" * 5000 + b'","n":' + b"[" * 600 + b"]" * 600 + b"}\n")
    # nor does an earlier line whose brackets do not balance (depth counts from each line's start)
    assert has_deep_line(b'{"a":' + b"]" * 6000 + b"\n" + deep + b"\n")
    # long lines that are not deep: text, many shallow lists, brackets inside a string
    assert not has_deep_line((b'{"prompt":"' + b"word " * 3000 + b'"}\n') * 3)
    assert not has_deep_line(b'{"prompt":"x","n":[' + b"[1,{\"a\":[2]}]," * 2000 + b"[]]}\n")
    assert not has_deep_line(b'{"prompt":"' + b"[{" * 4000 + b'\\"[[["}\n')
    # short lines are not looked at (they cannot hold LONG_LINE / 2 levels)
    assert not has_deep_line(b'{"prompt":"d","n":' + b"[" * 900 + b"]" * 900 + b"}\n")
    assert 2 * 900 < LONG_LINE


def test_line_depth_counts_brackets_outside_strings():
    from guidealign.ingest.jsonl import line_depth

    cases = {b'{"a":[1,{"b":[]}]}': 4, b'{"a":"]]]","b":[[1]]}': 3, b'{"a":"\\\\","b":[1]}': 2,
             b'{"a":"\\"]]","b":[[[1]]]}': 4, b'{"a":"\\\\\\"[","b":[[1]]}': 3, b'{"a":"[[[["}': 1,
             b'[' * (MAX_DEPTH + 1): MAX_DEPTH + 1}
    for line, want in cases.items():
        for chunk in (1 << 20, 1, 2, 3):  # the depth counted a piece at a time
            assert line_depth(line, chunk) == want, (line, chunk)


# --- 2. an integer of more than 4300 digits -------------------------------------------------------

def test_an_integer_of_too_many_digits_quarantines_its_row_jsonl(tmp_path):
    f = tmp_path / "big.jsonl"
    f.write_text('{"prompt":"a1"}\n{"prompt":"big","n":%s}\n{"prompt":"a2","m":[%s]}\n'
                 '{"prompt":%s}\n{"prompt":"a3","k":1.5}\n' % (BIG, BIG, BIG))
    for bb in (1 << 20, 32):  # the columnar path (one block, or a line a block)
        rows, q = _ingest([f], tmp_path / f"w{bb}", block_bytes=bb)
        assert [r["prompt"] for r in rows] == ["a1", "a3"]
        assert [r["row"] for r in q] == [2, 3, 4]
        for r in q:
            assert "a number with more than 4300 digits" in r["reason"] and "as a string" in r["reason"]
            assert r["raw"].startswith('{"prompt":')


def test_an_integer_of_too_many_digits_quarantines_its_item_json(tmp_path):
    arr = tmp_path / "big.json"
    arr.write_text('[{"prompt":"j1"}, {"prompt":"big","n":%s}, {"prompt":"j2"}]' % BIG)
    rows, q = _ingest([arr], tmp_path / "w1")
    assert [r["prompt"] for r in rows] == ["j1", "j2"]
    assert [(r["row"], "more than 4300 digits" in r["reason"]) for r in q] == [(2, True)]
    # an object: its records (read ahead past the array, for a prompt field), or itself as one record
    obj = tmp_path / "obj.json"
    obj.write_text('{"data": [{"prompt":"o1","n":%s}, {"prompt":"o2"}], "note": "x"}' % BIG)
    rows, q = _ingest([obj], tmp_path / "w2")
    assert [r["prompt"] for r in rows] == ["o2"] and [r["row"] for r in q] == [1]
    one = tmp_path / "one.json"
    one.write_text('{"turns": [{"n": %s}], "prompt": "one record"}' % BIG)
    rows, q = _ingest([one], tmp_path / "w3")
    assert rows == [] and len(q) == 1 and "more than 4300 digits" in q[0]["reason"]
    # a JSON array saved as .jsonl is still told from JSON Lines, and read as JSON
    jl = tmp_path / "arr.jsonl"
    jl.write_text('[\n{"prompt":"k1"},\n{"prompt":"big","n":%s},\n{"prompt":"k2"}\n]\n' % BIG)
    rows, q = _ingest([jl], tmp_path / "w4")
    assert [r["prompt"] for r in rows] == ["k1", "k2"] and [r["row"] for r in q] == [2]


# --- 3. undecodable bytes in a quarantined Parquet row --------------------------------------------

def test_a_quarantined_parquet_row_shows_its_undecodable_bytes_escaped(tmp_path):
    f = tmp_path / "bad.parquet"
    prompts = pa.array([b"good", b"bad \xff byte"], pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"prompt": prompts, "note": ["n1", "n2"]}), f)
    rows, q = _ingest([f], tmp_path / "w")
    assert [r["prompt"] for r in rows] == ["good"]
    assert len(q) == 1 and q[0]["row"] == 2
    assert "bad \\udcff byte" in q[0]["raw"] and "?" not in q[0]["raw"]


# --- 4. NaN and infinities in metadata ------------------------------------------------------------

def test_jsonl_and_json_non_finite_numbers_are_written_as_strict_json(tmp_path):
    lines = ['{"prompt":"n1","x":NaN}', '{"prompt":"n2","x":1e99999}',
             '{"prompt":"n3","x":[-Infinity,1.5],"y":{"z":Infinity}}', '{"prompt":"n4","x":2.5}']
    want = [{"x": None}, {"x": None}, {"x": [None, 1.5], "y": {"z": None}}, {"x": 2.5}]
    jl = tmp_path / "nan.jsonl"
    jl.write_text("\n".join(lines) + "\n")
    js = tmp_path / "nan.json"
    js.write_text("[" + ",\n".join(lines) + "]")
    for i, f in enumerate([jl, js]):
        rows, q = _ingest([f], tmp_path / f"w{i}")
        assert q == []
        assert [_strict(r["metadata"]) for r in rows] == want


def test_parquet_non_finite_floats_same_strict_json_on_both_paths(tmp_path):
    vals = [float("nan"), float("inf"), float("-inf"), 0.5, None]
    metas = []
    for i, t in enumerate([pa.string(), pa.binary()]):  # columnar; a binary prompt: row by row
        f = tmp_path / f"p{i}.parquet"
        prompts = [f"p{k}" for k in range(len(vals))]
        pq.write_table(pa.table({"prompt": pa.array(prompts if i == 0 else [p.encode() for p in prompts], t),
                                 "x": pa.array(vals, pa.float64()),
                                 "v": pa.array([[v] for v in vals], pa.list_(pa.float32()))}), f)
        rows, q = _ingest([f], tmp_path / f"w{i}")
        assert q == []
        metas.append([r["metadata"] for r in rows])
    assert metas[0] == metas[1]
    # null, as exported JSONL writes them; the key stays (a null value leaves it out)
    assert [_strict(m) for m in metas[0]] == [
        {"x": None, "v": [None]}, {"x": None, "v": [None]}, {"x": None, "v": [None]}, {"x": 0.5, "v": [0.5]},
        {"v": [None]}]


def test_dumps_writes_non_finite_floats_as_null_and_the_rest_as_before():
    v = {"b": [1, 2.5, None, True, "NaN"], "a": {"z": 1e300}}
    assert dumps(v) == json.dumps(v, ensure_ascii=False, sort_keys=True)
    inf = float("inf")
    assert dumps({"n": float("nan"), "k": [-inf, {"i": inf}]}) == '{"k": [null, {"i": null}], "n": null}'
    assert dumps({float("nan"): [float("nan")]}) == '{"NaN": [null]}'  # a key is a string: as before


# --- the run's fingerprint ------------------------------------------------------------------------

def test_runs_with_input_other_than_csv_are_ingested_once_more(tmp_path):
    c = IngestConfig()

    def before(p, *extra):  # the rule up to Stop 49, for a plain file
        st = p.stat()
        return fingerprint("ingest-v8", c.prompt_field, list(c.prompt_aliases), c.max_chars, c.shard_rows,
                           c.encoding, c.delimiter, list(c.instruction_inputs),
                           [(str(p.resolve()), st.st_size, st.st_mtime_ns)], *extra)

    jl = tmp_path / "in.jsonl"
    jl.write_text('{"prompt": "x"}\n')
    assert _fingerprint([jl.resolve()], c) != before(jl)
    assert _fingerprint([jl.resolve()], c) == before(jl, "metadata-strict-json-v1", "prompt-has-text-v1", "line-pairing-v1",
                                               "sniff-whole-file-v1", "chat-turns-v1")
    cs = tmp_path / "in.csv"
    cs.write_text("prompt\nx\n")
    assert _fingerprint([cs.resolve()], c) == before(cs, "csv-first-line", "prompt-has-text-v1", "line-pairing-v1", "csv-v3",
                                               "sniff-whole-file-v1", "csv-header-v1")  # values: text
