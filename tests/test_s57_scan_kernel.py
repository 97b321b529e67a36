"""The compiled JSONL line scan (``scan_llvm``, used by ``jsonl.scan_lines`` when ingest's compiled
kernels are on): the same line ends and screens as the numpy pass, the same shards and quarantine
from a whole ingest, and numpy again when the kernel cannot be built."""
from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest

pytest.importorskip("llvmlite")

from guidealign.ingest import llvm_build, scan_llvm  # noqa: E402
from guidealign.ingest.jsonl import scan_lines  # noqa: E402
from guidealign.ingest.run import IngestConfig, ingest  # noqa: E402
from guidealign.shards import iter_tables, read_quarantine  # noqa: E402


def _reference(b: bytes) -> tuple[list[int], bool]:
    return [i for i, c in enumerate(b) if c == 10], b"  " in b


def test_line_ends_match_a_byte_loop_around_every_vector_edge():
    rng = random.Random(1)
    for n in list(range(0, 3 * scan_llvm.WIDTH + 3)) + [1000, 4097]:
        for alphabet in (b"\n", b" ", b" \n", b"a \n{}", b"ab"):
            b = bytes(rng.choice(alphabet) for _ in range(n))
            ends, double = scan_llvm.line_ends(np.frombuffer(b, np.uint8))
            assert (ends.tolist(), double) == _reference(b), (n, b)
    # a pair of spaces across the edge of two vectors, and only there
    for k in range(1, 3 * scan_llvm.WIDTH):
        b = bytearray(b"a " * (2 * scan_llvm.WIDTH))
        b[k - 1:k + 1] = b"  "
        b = bytes(b)
        assert scan_llvm.line_ends(np.frombuffer(b, np.uint8))[1] == (b"  " in b), k


def test_compiled_scan_lines_equals_the_numpy_pass():
    rng = random.Random(2)
    alphabet = b'{}[] \n\r"a\t'
    for _ in range(2000):
        b = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        if rng.random() < 0.5:  # mostly object lines
            b = b"\n".join(b"{" + bytes(rng.choice(b'a "[] ') for _ in range(rng.randint(0, 90))) + b"}"
                           + (b"\r" if rng.random() < 0.2 else b"") for _ in range(rng.randint(1, 6)))
            b += b"\n" if rng.random() < 0.7 else b""
        arr = np.frombuffer(b, np.uint8)
        a, c = scan_lines(arr), scan_lines(arr, compiled=True)
        assert (a.ends.tolist(), a.double_space, a.maybe_blank, a.objects) == \
               (c.ends.tolist(), c.double_space, c.maybe_blank, c.objects), b


def _messy_jsonl(path, n: int = 4000) -> None:
    """Rows the scan's answers steer: blank and whitespace lines (line numbers), CRLF, double
    spaces (the collapsing pass), a pretty-printed object (lines that are not objects), bad rows."""
    rng = random.Random(3)
    lines = []
    for i in range(n):
        r = rng.random()
        if r < 0.03:
            lines.append("")
        elif r < 0.05:
            lines.append("   \t")
        elif r < 0.07:
            lines.append('{"prompt": ""}')
        elif r < 0.08:
            lines.append('{"prompt": "broken')
        else:
            gap = "  " if rng.random() < 0.1 else " "
            text = gap.join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(1, 30)))
            lines.append(json.dumps({"prompt": f"{i} {text}", "n": i}))
    lines.insert(n // 2, '{"prompt":\n "spread over\\n lines", "n": -1}')
    path.write_bytes(("\r\n".join(lines[: n // 3]) + "\r\n" + "\n".join(lines[n // 3:]) + "\n").encode())


def _everything(workdir) -> tuple[list, list]:
    rows = [r for t in iter_tables(workdir / "prompts") for r in t.to_pylist()]
    bad = sorted((r["source"], r["reason"]) for r in read_quarantine(workdir / "prompts").to_pylist())
    return rows, bad


def test_ingest_with_the_compiled_scan_writes_what_the_numpy_scan_writes(tmp_path):
    f = tmp_path / "messy.jsonl"
    _messy_jsonl(f)
    # small blocks: many block edges, each block scanned on its own
    out = {}
    for kernel in ("llvm", "hashlib"):
        cfg = IngestConfig(hash_kernel=kernel, shard_rows=500, block_bytes=16 << 10)
        ingest([str(f)], tmp_path / kernel, cfg, progress=False)
        out[kernel] = _everything(tmp_path / kernel)
    rows, bad = out["llvm"]
    assert len(rows) > 3000 and sum("is not JSON" in reason for _, reason in bad) > 10
    assert out["llvm"] == out["hashlib"]


def test_a_kernel_that_cannot_be_built_falls_back_to_numpy(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no code generator here")

    monkeypatch.setattr(scan_llvm, "build", broken)
    monkeypatch.setattr(llvm_build, "_LOADED", {})
    b = b'{"a": 1}\n\n{"b":  2}\n'
    with caplog.at_level(logging.WARNING, logger=scan_llvm.__name__):
        got = scan_lines(np.frombuffer(b, np.uint8), compiled=True)
    assert got.ends.tolist() == [8, 9, 19] and got.double_space and got.maybe_blank
    assert "line-end kernel is not available" in caplog.text
