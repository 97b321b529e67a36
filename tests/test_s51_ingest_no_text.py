"""A prompt with nothing to read (blank space, control and format characters only: zero-width
spaces, a byte-order mark, control bytes) is quarantined as an empty prompt, on every reading
path (columnar ASCII, columnar non-ASCII, row by row) and from every input format; a prompt with
text beside such characters is kept."""
from __future__ import annotations

import json
import random
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guidealign.ingest.run import IngestConfig, ingest
from guidealign.ingest.visible import NO_TEXT, ascii_spans_without_text, has_text
from guidealign.shards import iter_tables, read_quarantine

NO_TEXT_PROMPTS = ["\u200b", "\u200b \u200b", "\ufeff", "\u00ad\u200d", "\x01", " \x02\x03 ", "\x7f",
                   "\u2060\t\u200e", "\U000e0041"]
KEPT = ["a\u200b", "\u200bhello", "\x01 x", "\u0301", "\u3164"]  # text beside them; a mark, a filler


# format characters Unicode 15 added (Egyptian hieroglyph format controls): unassigned in
# Python 3.11's Unicode 14 data, counted as format characters already
UNICODE_15_FORMAT = range(0x13439, 0x13440)


def test_has_text_follows_unicode_categories():
    """Every whitespace, control (Cc) and format (Cf) character of this Python's Unicode data has
    no text; every other character has (surrogates and unassigned code points included)."""
    def no_text(c):
        return chr(c).isspace() or unicodedata.category(chr(c)) in ("Cc", "Cf") or c in UNICODE_15_FORMAT

    wrong = [hex(c) for c in range(sys.maxunicode + 1) if has_text(chr(c)) == no_text(c)]
    assert not wrong, wrong[:20]


def test_ascii_spans_without_text_matches_has_text():
    rng = random.Random(0)
    for _ in range(2000):
        controls = rng.random() < 0.7
        alphabet = "ab !~" + ("\x00\x01\x1b\x7f" if controls else "\x7f")
        strings = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))).strip(" ")
                   for _ in range(rng.randint(1, 8))]
        data = "".join(strings).encode("ascii")
        ends = np.cumsum([len(s) for s in strings])
        starts = ends - np.array([len(s) for s in strings])
        got = ascii_spans_without_text(starts, ends, pa.py_buffer(data), controls=controls)
        want = [bool(s) and not has_text(s) for s in strings]
        assert got.tolist() == want, strings


def _ingest(paths, workdir: Path, **cfg):
    ingest([str(p) for p in paths], workdir, IngestConfig(**cfg), progress=False)
    kept = [r["prompt"] for t in iter_tables(workdir / "prompts") for r in t.to_pylist()]
    q = read_quarantine(workdir / "prompts")
    return kept, {(r["source"].rsplit("/", 1)[-1], r["row"]): r["reason"] for r in (q.to_pylist() if q else [])}


def _check(kept, reasons, name, first_row):
    """Rows first_row.. of file ``name`` hold NO_TEXT_PROMPTS then KEPT."""
    for k in range(len(NO_TEXT_PROMPTS)):
        assert reasons.get((name, first_row + k)) == NO_TEXT, (name, first_row + k, reasons)
    for p in KEPT:
        assert p in kept, (name, p, kept)


@pytest.mark.parametrize("escaped", [True, False])
@pytest.mark.parametrize("block_bytes", [4 << 20, 64])
def test_jsonl_prompts_without_text_are_quarantined(tmp_path, escaped, block_bytes):
    # escaped: \\u escapes (an ASCII block with escapes); raw: the characters themselves (raw C0
    # control bytes are not JSON, so those stay escaped; DEL and the rest are written as they are)
    lines = [json.dumps({"prompt": p}, ensure_ascii=escaped) for p in NO_TEXT_PROMPTS + KEPT]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    kept, reasons = _ingest([f], tmp_path / "w", block_bytes=block_bytes)
    _check(kept, reasons, "p.jsonl", 1)
    assert len(kept) == len(KEPT)


def test_a_raw_del_in_a_jsonl_block_without_escapes(tmp_path):
    """A block without escapes and without a double space takes the fast path that skips the
    whitespace pass; a prompt of DEL bytes (legal raw in a JSON string) is still found."""
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"prompt": "plain"}\n{"prompt": "\x7f\x7f"}\n{"prompt": "x\x7f"}\n')
    kept, reasons = _ingest([f], tmp_path / "w")
    assert kept == ["plain", "x\x7f"] and reasons == {("d.jsonl", 2): NO_TEXT}


def test_csv_json_array_and_parquet_prompts_without_text(tmp_path):
    prompts = NO_TEXT_PROMPTS + KEPT
    csv_f = tmp_path / "p.csv"  # raw control bytes in CSV fields; quoted, as a tab or CR would be
    csv_f.write_text("prompt,n\n" + "".join(f'"{p}",{i}\n' for i, p in enumerate(prompts)), encoding="utf-8")
    arr_f = tmp_path / "p.json"  # a JSON array: read row by row
    arr_f.write_text(json.dumps([{"prompt": p} for p in prompts]), encoding="utf-8")
    pq_f = tmp_path / "p.parquet"  # Arrow batches: the columnar path without the JSONL hints
    pq.write_table(pa.table({"prompt": prompts}), pq_f)
    for f, first in ((csv_f, 2), (arr_f, 1), (pq_f, 1)):
        kept, reasons = _ingest([f], tmp_path / f"w-{f.suffix[1:]}")
        _check(kept, reasons, f.name, first)
        assert len(kept) == len(KEPT), (f, kept)


def test_the_re2_pattern_is_the_python_one():
    """Arrow's compute functions (the columnar instruction + input join) take ``TEXT_RE2``: it
    says "text" of every code point exactly where ``has_text`` does."""
    import pyarrow.compute as pc

    from guidealign.ingest.visible import TEXT_RE2

    points = [c for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]  # UTF-8 has no surrogates
    got = pc.match_substring_regex(pa.array([chr(c) for c in points]), TEXT_RE2).to_pylist()
    wrong = [hex(c) for c, g in zip(points, got) if g != has_text(chr(c))]
    assert not wrong, wrong[:20]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_an_instruction_or_input_without_text_joins_nothing(tmp_path, fmt):
    """An instruction of zero-width spaces is no text: not its input alone (kept before as
    "\\u200b\\n\\ntext"), but an empty prompt; an input of such characters is not joined. The same
    on the columnar (JSONL) and the row-by-row (JSON array) path."""
    recs = [{"instruction": "\u200b", "input": "Translate to French: cat"},
            {"instruction": "\x0b", "input": "Translate to French: dog"},  # a vertical tab: blank space
            {"instruction": "Say hi", "input": "\u200b\u2060"},
            {"instruction": "Say bye", "input": "in French"}]
    f = tmp_path / f"ii.{fmt}"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n" if fmt == "jsonl" else json.dumps(recs))
    kept, reasons = _ingest([f], tmp_path / "w")
    assert sorted(kept) == ["Say bye\n\nin French", "Say hi"]
    assert reasons == {(f.name, 1): NO_TEXT, (f.name, 2): "empty prompt"}
