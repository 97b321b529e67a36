"""The compiled flat-JSON reader (``ingest.flatjson_llvm``) against pyarrow.json, on generated blocks.

For every block it takes, its table must equal the one ``jsonl._read_json_block`` (pyarrow.json,
with its date inference undone) reads; the blocks it must refuse give None; and a whole ingest
with the compiled kernels writes the same shards as one without them."""
from __future__ import annotations

import ctypes
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("llvmlite")

from guidealign.config.ingest import IngestConfig  # noqa: E402
from guidealign.ingest import flatjson_llvm, jsonl, llvm_build  # noqa: E402
from guidealign.ingest.jsonl import _read_json_block  # noqa: E402
from guidealign.ingest.run import ingest  # noqa: E402

KEYS = ["prompt", "n", "id", "caf\u00e9", "", "tag", "a b", "x" * 40]


@pytest.fixture(scope="module")
def fns():
    """The kernels as built, before their self-test: the tests here are the full check."""
    engine, got = flatjson_llvm._build()
    yield got
    del engine  # (owns the code: kept until the module's tests are done)


def _string(rng: random.Random) -> str:
    """A JSON string literal (quotes included) with escapes of every kind and raw non-ASCII."""
    parts = []
    for _ in range(rng.randrange(0, 12)):
        r = rng.random()
        if r < 0.4:
            parts.append("".join(rng.choice("abc xyz 019 {}[]:,") for _ in range(rng.randrange(1, 40))))
        elif r < 0.5:
            parts.append(rng.choice(['\\"', "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t"]))
        elif r < 0.6:
            parts.append("\\u%04x" % rng.choice([0, 0x1F, 0x41, 0xE9, 0x7FF, 0x800, 0x4E2D, 0xFFFF, 0xD7FF, 0xE000]))
        elif r < 0.65:
            parts.append("\\u%04X" % rng.choice([0x263A, 0xABCD]))
        elif r < 0.75:
            hi, lo = rng.randrange(0xD800, 0xDC00), rng.randrange(0xDC00, 0xE000)
            parts.append(f"\\u{hi:04x}\\u{lo:04x}")
        elif r < 0.85:
            parts.append(rng.choice(["\u00e9", "\u4e2d\u6587", "\U0001F600", "\u2028", "\x7f"]))
        else:
            parts.append("2024-01-0%d" % rng.randrange(1, 9))  # pyarrow.json takes it for a date
    return '"' + "".join(parts) + '"'


def _integer(rng: random.Random) -> str:
    digits = rng.choice([1, 1, 2, 5, 12, 17, 18])
    v = rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)
    return ("-" if rng.random() < 0.3 else "") + str(v)


def _flat_block(rng: random.Random, n_lines: int) -> str:
    """Lines of flat objects: keys in any order, some missing, each key's values of one kind."""
    keys = rng.sample(KEYS, rng.randrange(1, len(KEYS) + 1))
    kind = {k: rng.choice(["s", "i"]) for k in keys}
    lines = []
    for _ in range(n_lines):
        present = [k for k in keys if rng.random() < 0.8] or [keys[0]]
        rng.shuffle(present)
        ws = lambda: rng.choice(["", "", " ", "  ", "\t"])  # noqa: E731
        members = [f'{ws()}"{k}"{ws()}:{ws()}{_string(rng) if kind[k] == "s" else _integer(rng)}{ws()}'
                   for k in present]
        lines.append(ws() + "{" + ",".join(members) + "}" + ws() + rng.choice(["", "", "\r"]))
    return "\n".join(lines) + rng.choice(["\n", ""])


def _flat(fns, text: str):
    arr = np.frombuffer(text.encode("utf-8"), np.uint8)
    return flatjson_llvm.flat_table(arr, np.flatnonzero(arr == 10), fns)


def test_flat_blocks_read_as_pyarrow_json_reads_them(fns):
    rng = random.Random(58)
    taken = 0
    for _ in range(300):
        text = _flat_block(rng, rng.randrange(1, 40))
        got = _flat(fns, text)
        want = _read_json_block(text.encode("utf-8"))
        assert got is not None, text  # every generated line is flat: none may be refused
        assert want is not None
        want = want.combine_chunks()
        assert got.schema == want.schema, text
        assert got.equals(want), text
        # and each value as Python's json reads the line (the row reader's reference)
        for row, line in zip(got.to_pylist(), [x for x in text.split("\n") if x.strip()]):
            ref = json.loads(line)
            assert {k: v for k, v in row.items() if v is not None} == ref
        taken += 1
    assert taken == 300


@pytest.mark.parametrize("line", [
    '{"prompt": 1.5}', '{"prompt": 1e3}', '{"prompt": true}', '{"prompt": null}', '{"prompt": [1]}',
    '{"prompt": {"a": 1}}', '{"prompt": "a", "prompt": "b"}', '{"prompt": "\\ud800"}',
    '{"prompt": "\\udc00"}', '{"prompt": "\\ud800\\u0041"}', '{"prompt": "\\x41"}', '{"prompt": "\\u12g4"}',
    '{"prompt": "a\tb"}', '{"prompt": "a"} x', '{"prompt": 0123}', '{"prompt": -}', '{"prompt": 1234567890123456789}',
    '{"pro\\u006dpt": "a"}', '{}', '{"prompt": "a",}', '{"prompt" "a"}', '["a"]', '', '   ',
    '{"prompt": "a"}\n\n{"prompt": "b"}', '{"prompt": "a"}\n{"prompt": 1}', '{"prompt": "unclosed}',
    '{"prompt": NaN}', '{"prompt": -Infinity}',
])
def test_lines_that_are_not_flat_are_refused(fns, line):
    assert _flat(fns, line) is None


def test_more_keys_than_the_first_try_has_room_for(fns):
    line = "{" + ", ".join(f'"k{i}": {i}' for i in range(20)) + "}"
    got = _flat(fns, line + "\n" + line)
    assert got is not None and got.column_names == [f"k{i}" for i in range(20)]
    many = "{" + ", ".join(f'"k{i}": {i}' for i in range(70)) + "}"
    assert _flat(fns, many) is None  # past the most room: pyarrow.json reads it


def _shards(root) -> list:
    return [pq.read_table(p).to_pylist() for p in sorted((root / "prompts").glob("shard-*.parquet"))]


def test_ingest_with_and_without_the_compiled_reader_writes_the_same_shards(tmp_path, fns, monkeypatch):
    rng = random.Random(7)
    blocks = [_flat_block(rng, 50) for _ in range(20)]
    blocks.insert(5, '{"prompt": "a float here", "n": 1.5}\n{"prompt": "nested", "n": {"x": [1]}}\n')
    blocks.insert(9, '{"prompt": "bad line"\n\n{"prompt": "after a blank line"}\n')
    text = "".join(b if b.endswith("\n") else b + "\n" for b in blocks)
    src = tmp_path / "in.jsonl"
    src.write_text(text, encoding="utf-8")
    read = []
    real = jsonl.flat_table
    monkeypatch.setattr(jsonl, "flat_table", lambda *a: read.append(real(*a)) or read[-1])
    assert jsonl.scan_kernel() and flatjson_llvm.kernels()  # loaded: no block goes around them
    out = {}
    for kernel in ("llvm", "hashlib"):
        cfg = IngestConfig(block_bytes=2048, shard_rows=97, hash_kernel=kernel, prompt_field="prompt")
        rep = ingest([str(src)], tmp_path / kernel, cfg, progress=False)
        out[kernel] = (_shards(tmp_path / kernel), rep.rows, rep.quarantined, rep.duplicates)
    assert out["llvm"][0] and out["llvm"] == out["hashlib"]
    # the compiled reader read most blocks, and sent the ones with a float, a nested value or a
    # blank line on to pyarrow.json and the row reader
    assert sum(t is not None for t in read) > len(read) // 2 and any(t is None for t in read)


def test_a_kernel_that_fails_its_self_test_is_not_used_and_pyarrow_json_reads(tmp_path, monkeypatch, caplog):
    """A build whose code reads differently from pyarrow.json (here: one that reads every block
    as empty) is refused by the self-test with a warning, and ingest reads with pyarrow.json."""
    monkeypatch.setattr(llvm_build, "_LOADED", {})
    real = flatjson_llvm._build

    def empty_strings(data, vstart, vval, esc, nlines, kmax, col, out, offsets):
        ctypes.memset(offsets, 0, 4 * (nlines + 1))  # every string read as empty
        return 0

    def wrong_build():
        engine, (parse, gather) = real()
        return engine, (parse, empty_strings)
    monkeypatch.setattr(flatjson_llvm, "_build", wrong_build)
    with caplog.at_level("WARNING"):
        assert flatjson_llvm.kernels() is None
    assert "compiled flat JSON kernel is not available" in caplog.text
    assert "does not read what pyarrow.json reads" in caplog.text
    src = tmp_path / "in.jsonl"
    src.write_text("".join(f'{{"prompt": "question {i}", "n": {i}}}\n' for i in range(50)))
    rep = ingest([str(src)], tmp_path / "w", IngestConfig(hash_kernel="llvm"), progress=False)
    assert rep.rows == 50
    assert sorted(r["prompt"] for r in _shards(tmp_path / "w")[0]) == sorted(f"question {i}" for i in range(50))


def test_tiny_lines_with_many_keys_go_to_pyarrow_json_rather_than_take_memory(fns):
    """The parse's slots (a line times the keys) take at most 8 times the block: 100,000 lines
    of 8 bytes have room for 3 keys; with 4 the block goes to pyarrow.json (None here), with 3
    it is read."""
    four = "".join(f'{{"{k}":1}}\n' for k in "abcd" * 25_000)
    three = "".join(f'{{"{k}":1}}\n' for k in "abc" * 33_334)
    assert _flat(fns, four) is None
    got = _flat(fns, three)
    assert got is not None and got.column_names == ["a", "b", "c"] and got.num_rows == 100_002
