"""Review of the compiled flat-JSON reader (``ingest.flatjson_llvm``): edge cases and a mutation
fuzz against ``jsonl._read_json_block`` (pyarrow.json, date inference undone) and Python's json.

Contract: whenever ``flat_table`` returns a table it equals ``_read_json_block(block).combine_chunks()``
(names, order, types, nulls, values), pyarrow.json reads that block without error, and each row is
what ``json.loads`` reads from its line; an ingest with ``hash_kernel="llvm"`` writes what one with
``hash_kernel="hashlib"`` writes."""
from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("llvmlite")

from guidealign.config.ingest import IngestConfig  # noqa: E402
from guidealign.ingest import flatjson_llvm, jsonl  # noqa: E402
from guidealign.ingest.jsonl import _read_json_block  # noqa: E402
from guidealign.ingest.run import ingest  # noqa: E402


@pytest.fixture(scope="module")
def fns():
    engine, got = flatjson_llvm._build()
    yield got
    del engine


def _flat(fns, data):
    b = data.encode("utf-8") if isinstance(data, str) else data
    arr = np.frombuffer(b, np.uint8)
    return flatjson_llvm.flat_table(arr, np.flatnonzero(arr == 10), fns)


def _want(data):
    b = data.encode("utf-8") if isinstance(data, str) else data
    try:
        t = _read_json_block(b)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        return e
    return t.combine_chunks() if t is not None else None


def _check(fns, text: str, must_take: bool = False):
    """flat_table's table (if any) equals pyarrow.json's and json.loads' per line."""
    got = _flat(fns, text)
    if got is None:
        assert not must_take, f"refused: {text!r}"
        return None
    want = _want(text)
    assert isinstance(want, pa.Table), f"flat_table took a block pyarrow.json does not read: {text!r}: {want!r}"
    assert got.column_names == want.column_names, (text, got.column_names, want.column_names)
    assert got.schema == want.schema, text
    assert got.equals(want), (text, got.to_pydict(), want.to_pydict())
    lines = [x for x in text.split("\n") if x.strip()]
    assert len(lines) == got.num_rows
    for row, line in zip(got.to_pylist(), lines):
        assert {k: v for k, v in row.items() if v is not None} == json.loads(line), line
    return got


# --- defect: columns of date-like strings --------------------------------------------------------

@pytest.mark.parametrize("text", [
    '{"p": "x", "d": "2024-01-02"}',
    '{"a": 1, "d": "2024-01-02T10:00:00"}\n{"a": 2, "d": "1970-01-01T00:00:00+01:00"}\n',
    '{"a": "x"}\n{"b": "2024-01-02", "a": "y"}',
])
def test_a_date_like_column_keeps_the_order_read_json_block_gives(fns, text):
    """pyarrow.json infers a timestamp for the column; ``_read_json_block`` re-reads it with an
    explicit (string) schema, which puts that column FIRST; flat_table keeps first-appearance order.
    (Ingest output is not affected: metadata keys are sorted; the table contract is.)"""
    _check(fns, text, must_take=True)


# --- edge cases that work ------------------------------------------------------------------------

_ESC = ['\\"', '\\\\', '\\/', '\\b', '\\f', '\\n', '\\r', '\\t', '\\u0000', '\\u00e9', '\\uFFFF', '\\u0041',
        '\\ud83d\\ude00', '\\uD83D\\uDE00', '\u00e9', '\U0001F600', '\\\\\\"', '\\\\u0041', '\u2028', '\x7f']


def test_escapes_at_every_offset_around_the_32_byte_scan(fns):
    for k in list(range(0, 40)) + [62, 63, 64, 65, 95, 96, 97]:
        for e in _ESC:
            for m in (0, 1, 31, 32, 33):
                s = '{"a":"' + "x" * k + e + "y" * m + '"}'
                for tail in ("", "\n", "\r\n"):
                    got = _check(fns, s + tail, must_take=True)
                    assert got.column("a").to_pylist() == [json.loads(s)["a"]]


@pytest.mark.parametrize("body", [
    "\\", "\\ud83d", "\\ude00", "\\ud83d\\u0041", "\\ud83d\\\\ude00", "\\ud83dx", "\\u12", "\\u12g4", "\\x41", "\\U0041",
    "\\\u00e9", "\x01", "\t", "\x00", "\\\t", "\\\"\\",
])
def test_strings_that_do_not_decode_are_refused_at_every_offset(fns, body):
    for k in (0, 1, 29, 30, 31, 32, 33, 63):
        for tail in ("", "\n"):
            assert _flat(fns, '{"a":"' + "x" * k + body + '"}' + tail) is None


@pytest.mark.parametrize("text", [
    '{"a": -0}', '{"a": 0}\n{"a": -0}', '{"a": 999999999999999999, "b": -999999999999999999}',
    '{"a":\r1}', '{"a"\r:\t"x"\r,\t"b":2}\r', '\t {"a":"x"} \t\r', '{"a":"x"}\r\n{"a":"y"}\r\n',
    '{"a":"x"}\n{"a":"y"}', '{"":"e", "a":1}\n{"":"f"}',
    '{"ab": 1, "a": 2, "abc": 3}\n{"abc": 4, "a": 5}', '{"k\u00e9": "x", "ke\u0301": "y"}',
    '{"a": "1"}\n{"b": 2}\n{"a": "3", "c": ""}', '{"a": "x"}\n{"b": 1}\n{"a": "y"}\n{"a": "z"}',
    '{"' + "k" * 40 + '": 1, "' + "k" * 39 + '": 2}', '{"a": "\\u0000"}', '{"a": "2024-01-02"}',
])
def test_flat_blocks_that_must_read_as_pyarrow_reads_them(fns, text):
    _check(fns, text, must_take=True)


@pytest.mark.parametrize("text", [
    '{"a": 01}', '{"a": +1}', '{"a": 1.0}', '{"a": 1E5}', '{"a": 1e5}', '{"a": -}', '{"a": -01}', '{"a": 1.}',
    '{"a": 1234567890123456789}', '{"a": -1234567890123456789}', '{"a":\x0c1}', '{"a":\x0b1}',
    '{"a":\u00a01}', '\ufeff{"a": 1}', '{"a": 1}\n\ufeff{"a": 2}', '{"a": 1}\n{"a": "x"}', '{"a": "x"}\n{"a": 1}',
    '{"a": 1}\n   ', '{"a": 1}\n\r\n{"a": 2}', '{"a": 1}\r{"a": 2}', '{"a": 1}{"a": 2}',
    '{"a": 1} , ', '{"a": 1, "a": 1}', '{"a\\u0062": 1}', '{"a": true}', '{"a": "x"', '{"a": "x\n"}',
])
def test_lines_that_are_not_flat_are_refused(fns, text):
    assert _flat(fns, text) is None, text


def test_many_keys_up_to_64_with_order_and_nulls(fns):
    rng = random.Random(5)
    for nk in (8, 9, 17, 63, 64):
        keys = [f"k{i}" for i in range(nk)]
        lines = []
        for i in range(12):
            ks = rng.sample(keys, rng.randrange(1, nk + 1))
            lines.append("{" + ", ".join(f'"{k}": {i}' if int(k[1:]) % 2 else f'"{k}": "v{i}"' for k in ks) + "}")
        _check(fns, "\n".join(lines), must_take=True)
    # spread over lines: 65 keys in all, at most 2 a line: past the most room, refused
    assert _flat(fns, "\n".join(f'{{"k{i}": 1, "k{i + 1}": 2}}' for i in range(0, 65, 2))) is None


def test_a_column_null_but_in_one_row(fns):
    text = "\n".join('{"p": "x%d"%s}' % (i, ', "z": "only"' if i == 37 else "") for i in range(70))
    got = _check(fns, text, must_take=True)
    assert got.column("z").null_count == 69


# --- mutation fuzz --------------------------------------------------------------------------------

_TOK = ['{', '}', '"', '\\', ':', ',', ' ', '\t', '\r', '0', '1', '9', '-', '+', 'u', 'd', '8', 'D', 'c', 'e',
        'E', '.', 'a', '\u00e9', '\n', '\x01', '\\u', '\\"', '"a"', '"a":', '\\ud83d', '\\ude00', '\x0c',
        '\x0b', '\u00a0', '\ufeff', '/', 'null', 'true', '\\\\', '"b":1,']
_PIECES = ['x', 'yz', ' ', '  ', '\\n', '\\"', '\\\\', '\\/', '\\t', '\\u0000', '\\u00e9', '\\u4e2d',
           '\\ud83d\\ude00', '\u00e9', '\U0001F600', ':', ',', '{', '}']


def _line(rng: random.Random, kinds: dict) -> str:
    members = []
    for k in rng.sample(sorted(kinds), rng.randrange(1, len(kinds) + 1)):
        if kinds[k] == "s":
            v = '"' + "".join(rng.choice(_PIECES) for _ in range(rng.choice([0, 1, 3, 12, 30]))) + '"'
        else:
            v = rng.choice(["", "-"]) + rng.choice(["0", "7", "12", "9" * 17, "9" * 18, "1" * 19, "00", "1.0", "1e5"])
        ws = lambda: rng.choice(["", "", " ", "\t", "\r"])  # noqa: E731
        members.append(f'{ws()}"{k}"{ws()}:{ws()}{v}{ws()}')
    s = rng.choice(["", " "]) + "{" + ",".join(members) + "}" + rng.choice(["", "", "\r", " "])
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        i = rng.randrange(len(s) + 1)
        s = s[:i] + rng.choice(_TOK) + s[i + rng.randrange(0, 2):]
    return s


def test_mutation_fuzz_against_pyarrow_and_python_json(fns):
    rng = random.Random(2026)
    taken = 0
    for _ in range(2500):
        keys = rng.sample(["a", "b", "ab", "", "A", "\u00e9", "prompt", "k" * 33], rng.randrange(1, 5))
        kinds = {k: rng.choice("si") for k in keys}
        text = "\n".join(_line(rng, kinds) for _ in range(rng.randrange(1, 6))) + rng.choice(["\n", ""])
        taken += _check(fns, text) is not None
    assert taken > 300


# --- whole ingest ----------------------------------------------------------------------------------

def _ingest_both(tmp_path, text: str):
    src = tmp_path / "in.jsonl"
    src.write_text(text, encoding="utf-8")
    out = {}
    for kernel in ("llvm", "hashlib"):
        cfg = IngestConfig(block_bytes=512, shard_rows=40, hash_kernel=kernel, prompt_field="prompt")
        rep = ingest([str(src)], tmp_path / kernel, cfg, progress=False)
        shards = [pq.read_table(p).to_pylist() for p in sorted((tmp_path / kernel / "prompts").glob("shard-*.parquet"))]
        quar = [pq.read_table(p).to_pylist() for p in sorted((tmp_path / kernel).rglob("*quarant*.parquet"))]
        out[kernel] = (shards, quar, rep.rows, rep.quarantined, rep.duplicates)
    return out


def test_ingest_with_and_without_the_kernel_on_edge_values(tmp_path, monkeypatch):
    read = []
    real = jsonl.flat_table
    monkeypatch.setattr(jsonl, "flat_table", lambda *a: read.append(real(*a)) or read[-1])
    assert jsonl.scan_kernel() and flatjson_llvm.kernels()  # loaded: no block goes around them
    rng = random.Random(11)
    vals = ['"hello"', '"a\\u00e9b"', '"  two  spaces"', '"x\\ty"', '"2024-01-02"', '"\\ud83d\\ude00"', '"caf\u00e9"',
            '""', '"   "', '"\\u0000"', '"\\u3000x"', '"\u00a0"', '"a\\\\"', '"\\n"', '"\uff21"', '"\\u2028"', '"x"']
    keys = ["prompt", "Prompt", "id", "n", "", "input", "text", "when"]
    lines = []
    for i in range(300):
        ks = rng.sample(keys, rng.randrange(1, 4))
        if "prompt" not in ks and rng.random() < 0.85:
            ks[0] = "prompt"
        ms = [f'"{k}"' + rng.choice([":", ": ", " :\r"]) + (str(i) if k == "n" else rng.choice(vals)) for k in ks]
        lines.append(rng.choice(["", " "]) + "{" + ",".join(ms) + "}" + rng.choice(["", "\r", " "]))
    out = _ingest_both(tmp_path, "\n".join(lines) + "\n")
    assert out["llvm"][0] and out["llvm"] == out["hashlib"]
    assert sum(t is not None for t in read) > len(read) // 2  # the kernel read most blocks
