"""Line bookkeeping in ingest found by the Stop 53 review: which JSONL blocks may pair pyarrow's rows
with their lines, and line numbers in a file sniffed as lone-CR that has CR LF line ends further on."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from guidealign.config.ingest import IngestConfig
from guidealign.ingest.encodings import SNIFF_BYTES
from guidealign.ingest.jsonl import lines_hold_whole_objects, scan_lines
from guidealign.ingest.fingerprint import files_fingerprint as _fingerprint
from guidealign.ingest.run import ingest
from guidealign.shards.fingerprint import fingerprint


def _holds(text: bytes) -> bool:
    arr = np.frombuffer(text, np.uint8)
    return lines_hold_whole_objects(arr, scan_lines(arr).ends)


def test_blank_lines_and_indentation_keep_the_columnar_path_a_value_over_two_lines_does_not():
    assert _holds(b'{"a": 1}\n\n  {"b": {"c": 2}}  \r\n\t{"d": 3}\n \n')
    assert _holds(b'{"a": 1}\n  {"b": 2}')  # the last line without its line end
    assert _holds(b"\n \n")
    assert not _holds(b'{"a": 1} {"b": 2}\n{"c": 3,\n"d": 4}\n')  # the object over two lines
    assert not _holds(b'{"a": 1}\n[1, 2]\n')
    assert not _holds(b'{"a": 1}\n\x0b{"b": 2}\n')  # not JSON's blank space: the row reader says so


def _sources(workdir) -> list[str]:
    rows = []
    for f in sorted((workdir / "prompts").glob("shard-*.parquet")):
        rows += pq.read_table(f).column("source").to_pylist()
    return [s.rsplit(":", 1)[1] for s in rows]


def test_a_crlf_line_end_after_a_lone_cr_start_is_one_line_end(tmp_path, monkeypatch):
    """A file whose sniffed start holds a CR but no LF is read as lone-CR: every CR became a line
    end, so each CR LF further on counted two lines and rows were numbered 1, 3, 5, ..."""
    first = b'{"prompt": "long", "pad": "'
    first += b"x" * (SNIFF_BYTES - 1 - len(first) - 2) + b'"}'  # its CR is the last byte sniffed
    rows = [first] + [b'{"prompt": "row %d"}' % i for i in range(2, 6)]
    f = tmp_path / "crlf.jsonl"
    f.write_bytes(b"\r\n".join(rows) + b"\r\n")
    ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    assert _sources(tmp_path / "w") == ["1", "2", "3", "4", "5"]

    # lone CR for the sniffed start, CR LF after it, read in small pieces: CR LFs split between
    # two pieces (the CR held until the next shows its LF)
    import guidealign.ingest.encodings as encodings

    monkeypatch.setattr(encodings, "CHUNK", 997)
    lone = [b'{"prompt": "lone %d", "pad": "%s"}' % (i, b"y" * 200) for i in range(1, 400)]
    rest = [b'{"prompt": "crlf %d"}' % i for i in range(400, 3_000)]
    data = b"\r".join(lone) + b"\r" + b"\r\n".join(rest) + b"\r\n"
    assert b"\n" not in data[:SNIFF_BYTES]
    cuts = range(SNIFF_BYTES, len(data), 997)  # where the pieces after the sniffed start end
    assert sum(data[c - 1:c + 1] == b"\r\n" for c in cuts) >= 3
    g = tmp_path / "mixed.jsonl"
    g.write_bytes(data)
    ingest([str(g)], tmp_path / "w2", IngestConfig(), progress=False)
    assert _sources(tmp_path / "w2") == [str(i) for i in range(1, 3_000)]


def test_text_inputs_carry_the_line_pairing_term_parquet_does_not(tmp_path):
    import pyarrow as pa

    c = IngestConfig()

    def rule(p, *terms):
        st = p.stat()
        return fingerprint("ingest-v8", c.prompt_field, list(c.prompt_aliases), c.max_chars, c.shard_rows,
                           c.encoding, c.delimiter, list(c.instruction_inputs),
                           [(str(p.resolve()), st.st_size, st.st_mtime_ns)], *terms)

    pf = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["x"]}), pf)
    assert _fingerprint([pf.resolve()], c) == rule(pf, "metadata-strict-json-v1", "prompt-has-text-v1",
                                                   "nested-binary-text-v1",  # Stop 54: Parquet and datasets
                                                   "chat-turns-v1")
    jl = tmp_path / "in.jsonl"
    jl.write_text('{"prompt": "x"}\n')
    assert _fingerprint([jl.resolve()], c) == rule(jl, "metadata-strict-json-v1", "prompt-has-text-v1",
                                                   "line-pairing-v1", "sniff-whole-file-v1", "chat-turns-v1")


def test_the_line_screen_agrees_with_stripping_each_line():
    """``lines_hold_whole_objects`` (gathers that step past blank space; one exact pass when a run of
    blank space is long) against Python's strip of each line, on seeded random blocks."""
    import random

    def by_line(block: bytes) -> bool:
        return all(s[:1] == b"{" and s[-1:] == b"}" for s in (ln.strip(b" \t\r\n") for ln in block.split(b"\n")) if s)

    rng = random.Random(53)
    pieces = [b"{", b"}", b" ", b"\t", b"\r", b"\n", b"x", b"{}", b"\n\n", b"  {", b"}  "]
    for _ in range(3000):
        block = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 30)))
        if rng.random() < 0.1:  # past the stepping's rounds
            block += b" " * rng.randrange(10, 40) + rng.choice([b"{}", b"x", b"\n"])
        assert _holds(block) == by_line(block), block
