"""Ingest: formats, stable ids, duplicates, quarantine, crash-resume, config changes."""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import json
import lzma
import os
import random
import re
import signal
import unicodedata
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guidealign.ingest.dedup import HashSet
from guidealign.ingest.run import KILL_AFTER_ENV, IngestConfig, ingest, prompt_hash
from guidealign.ingest.readers import IngestError
from guidealign.shards import committed, iter_tables, read_manifest, read_marker, read_quarantine


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
    good = ["good prompt 0 (naïve)"] + [f"good prompt {i}" for i in range(1, 5)]  # real UTF-8: the file is UTF-8
    with open(f, "wb") as fh:
        fh.write(json.dumps({"prompt": good[0]}, ensure_ascii=False).encode() + b"\n")
        fh.write(b'{"body": "no prompt field"}\n')                       # missing
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
    assert by_row[8].startswith("line 8 is not valid UTF-8 at byte 15; re-save the file as UTF-8 or pass "
                                "--encoding cp1252")
    assert "line 9 is not JSON" in by_row[9]
    assert "too long" in by_row[11]
    assert "not an object" in by_row[12]
    assert by_row[15].startswith("truncated last line")
    assert all(r["source"] == str(f) for r in q)
    assert rep.quarantined == 10 and rep.rows == 5
    # the raw text of an undecodable line is kept for inspection
    assert "latin-1" in next(r["raw"] for r in q if r["row"] == 8)


def test_bad_rows_in_csv_parquet_and_json(tmp_path):
    cs = tmp_path / "x.csv"
    cs.write_bytes("prompt,other\nfine one ü,1\n,2\n".encode() + b"bad \xff byte,3\nfine two,4\n")
    pqf = tmp_path / "y.parquet"
    pq.write_table(pa.table({"prompt": ["ok parquet", None, "  "]}), pqf)
    js = tmp_path / "z.json"
    js.write_text(json.dumps([{"prompt": "ok json"}, {"prompt": 1.5}, "str"]))
    rep = ingest([str(cs), str(pqf), str(js)], tmp_path / "w", progress=False)
    assert [r["prompt"] for r in _all_rows(tmp_path / "w")] == ["fine one ü", "fine two", "ok parquet", "ok json"]
    reasons = sorted(r["reason"].split(" (")[0] for r in read_quarantine(tmp_path / "w" / "prompts").to_pylist())
    assert reasons == ["array item 3 is a JSON string, not an object", "empty prompt", "empty prompt",
                       "line 4 is not valid UTF-8 at byte 4; re-save the file as UTF-8 or pass --encoding cp1252",
                       "null prompt", "prompt is not a string"]
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


def _run_cli(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "guidealign", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, **kw)


@pytest.mark.parametrize("cut", ["position", "content"])
def test_sigkill_mid_run_then_resume_gives_exactly_the_uninterrupted_rows(tmp_path, cut):
    """Deterministic: the ingest process SIGKILLs itself right after committing its 3rd shard
    (KILL_AFTER_ENV), so the kill always lands mid-run, whatever the machine's speed."""
    src = tmp_path / "in.jsonl"
    _big_input(src, 30_000)
    args = ["ingest", str(src), "--set", "ingest.shard_rows=2000", "--set", "ingest.block_bytes=300000",
            "--set", f"ingest.shard_cut={cut}", "--no-progress"]
    clean = tmp_path / "clean"
    p = _run_cli([*args, "-w", str(clean)])
    assert p.wait() == 0, p.stderr.read()
    n_total = read_manifest(clean / "prompts")["num_shards"]
    assert n_total == 15 if cut == "position" else 7 <= n_total <= 30

    crashed = tmp_path / "crashed"
    proc = _run_cli([*args, "-w", str(crashed)], env={KILL_AFTER_ENV: "3"})
    assert proc.wait() == -signal.SIGKILL
    assert committed(crashed / "prompts") == [0, 1, 2]
    assert read_manifest(crashed / "prompts") is None  # the manifest is written last
    created = {i: read_marker(crashed / "prompts", i).created for i in (0, 1, 2)}
    # what a kill in the middle of a write leaves behind: a temp file (the resume removes it)
    (crashed / "prompts" / ".shard-00003.parquet.99999.tmp").write_bytes(b"partial")

    p = _run_cli([*args, "-w", str(crashed)])
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert f"({n_total - 3} written, 3 already done)" in out
    a, b = _all_rows(clean), _all_rows(crashed)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [(r["prompt"], r["source"]) for r in a] == [(r["prompt"], r["source"]) for r in b]
    assert len({r["id"] for r in b}) == len(b) == 30_000
    # shards committed before the crash were not written again
    assert all(read_marker(crashed / "prompts", i).created == c for i, c in created.items())
    assert read_quarantine(crashed / "prompts").to_pylist() == read_quarantine(clean / "prompts").to_pylist()
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


# --- files as people produce them ---------------------------------------------------------------

PROMPTS = ["Café au lait, s'il vous plaît?", "naïve question: what is 5 € in $?", "plain ascii prompt",
           "quote \"inside\" and; semicolon | pipe\ttab"]


def _ingested(inputs, workdir, **cfg) -> tuple[list[dict], list[dict], object]:
    rep = ingest([str(p) for p in inputs], workdir, IngestConfig(**cfg), progress=False)
    q = read_quarantine(Path(workdir) / "prompts")
    return _all_rows(workdir), (q.to_pylist() if q is not None else []), rep


def _csv_text(delim: str, header: str = "prompt", newline: str = "\n") -> str:
    buf = []
    w = csv.writer(_Collect(buf), delimiter=delim, lineterminator=newline)
    w.writerow([header, "topic"])
    for i, p in enumerate(PROMPTS):
        w.writerow([p, f"t{i}"])
    return "".join(buf)


class _Collect:
    def __init__(self, buf):
        self.buf = buf

    def write(self, s):
        self.buf.append(s)


@pytest.mark.parametrize("name,data", [
    ("excel-utf8-bom-crlf.csv", lambda: b"\xef\xbb\xbf" + _csv_text(",", newline="\r\n").encode()),
    ("excel-unicode-text.tsv", lambda: b"\xff\xfe" + _csv_text("\t", newline="\r\n").encode("utf-16-le")),
    ("utf16-be-bom.csv", lambda: b"\xfe\xff" + _csv_text(";").encode("utf-16-be")),
    ("utf16-le-no-bom.csv", lambda: _csv_text(",").encode("utf-16-le")),
    ("windows-cp1252-semicolon.csv", lambda: _csv_text(";", newline="\r\n").encode("cp1252")),
    ("old-mac-lone-cr-pipe.csv", lambda: _csv_text("|", newline="\r").encode()),
    ("notepad-bom.jsonl", lambda: b"\xef\xbb\xbf" + "".join(
        json.dumps({"prompt": p, "topic": f"t{i}"}, ensure_ascii=False) + "\r\n" for i, p in enumerate(PROMPTS)
    ).encode()),
    ("utf16-le-bom.jsonl", lambda: b"\xff\xfe" + "".join(
        json.dumps({"prompt": p, "topic": f"t{i}"}, ensure_ascii=False) + "\n" for i, p in enumerate(PROMPTS)
    ).encode("utf-16-le")),
    ("lone-cr.jsonl", lambda: "".join(
        json.dumps({"prompt": p, "topic": f"t{i}"}) + "\r" for i, p in enumerate(PROMPTS)).encode()),
    ("cp1252.jsonl", lambda: "".join(
        json.dumps({"prompt": p, "topic": f"t{i}"}, ensure_ascii=False) + "\n" for i, p in enumerate(PROMPTS)
    ).encode("cp1252")),
    ("utf8-bom.json", lambda: b"\xef\xbb\xbf" + json.dumps(
        [{"prompt": p, "topic": f"t{i}"} for i, p in enumerate(PROMPTS)], ensure_ascii=False).encode()),
])
def test_exports_in_every_encoding_and_line_ending_arrive_whole(tmp_path, name, data):
    f = tmp_path / name
    f.write_bytes(data())
    rows, q, rep = _ingested([f], tmp_path / "w")
    assert q == []
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [json.loads(r["metadata"]) for r in rows] == [{"topic": f"t{i}"} for i in range(len(PROMPTS))]
    assert [r["id"] for r in rows] == [prompt_hash(p).hex() for p in PROMPTS]

@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_plain_utf8_file_is_read_directly_past_its_bom(tmp_path, bom):
    """A plain UTF-8 file is handed over as the file itself (no transcoding copies), positioned
    after the byte-order mark; a compressed or re-encoded one still goes through the decoder."""
    import io

    from guidealign.ingest.encodings import open_utf8

    body = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in PROMPTS).encode()
    f = tmp_path / "plain.jsonl"
    f.write_bytes(bom + body)
    stream, enc = open_utf8(f)
    with stream:
        assert enc == "utf-8" and type(stream.raw) is io.FileIO
        assert stream.read() == body
    g = tmp_path / "plain.jsonl.gz"
    g.write_bytes(gzip.compress(bom + body))
    stream, _ = open_utf8(g)
    with stream:
        assert type(stream.raw) is not io.FileIO
        assert stream.read() == body


@pytest.mark.parametrize("header", ["Prompt", " prompt ", "PROMPT", "question", "Instruction", " text"])
def test_header_spellings(tmp_path, header):
    f = tmp_path / "h.csv"
    f.write_text(_csv_text(",", header=header))
    rows, q, _ = _ingested([f], tmp_path / "w")
    assert q == [] and [r["prompt"] for r in rows] == PROMPTS
    g = tmp_path / "h.jsonl"
    g.write_text("".join(json.dumps({header: p}) + "\n" for p in PROMPTS))
    rows, q, _ = _ingested([g], tmp_path / "w2")
    assert q == [] and [r["prompt"] for r in rows] == PROMPTS


def test_configured_field_wins_over_aliases_and_missing_field_is_named(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "the alias", "Prompt": "the field"}\n{"body": "neither"}\n')
    rows, q, _ = _ingested([f], tmp_path / "w")
    assert [r["prompt"] for r in rows] == ["the field"]
    assert json.loads(rows[0]["metadata"]) == {"text": "the alias"}
    assert q[0]["row"] == 2 and q[0]["reason"] == (
        "missing prompt field 'prompt' (tried 'prompt' or 'question' or 'instruction' or 'text'; the row "
        "has body): --set ingest.prompt_field=NAME names the prompt's")


def _write_compressed(path: Path, data: bytes) -> None:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    elif path.suffix == ".bz2":
        path.write_bytes(bz2.compress(data))
    elif path.suffix == ".xz":
        path.write_bytes(lzma.compress(data))
    else:
        with pa.output_stream(str(path), compression="zstd") as out:
            out.write(data)


@pytest.mark.parametrize("name", ["p.jsonl.gz", "p.csv.bz2", "p.json.xz", "p.jsonl.zst", "p.csv.zst"])
def test_compressed_inputs_with_bad_rows(tmp_path, name):
    if ".jsonl" in name:
        data = ("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]) + "not json\n"
                + "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[2:])).encode()
        bad_row, why = 3, "line 3 is not JSON"
    elif ".csv" in name:
        data = (_csv_text(",").replace("plain ascii prompt", "")).encode()
        bad_row, why = 4, "empty prompt"
    else:
        data = json.dumps([{"prompt": p} for p in PROMPTS[:2]] + [{"prompt": 7}]
                          + [{"prompt": p} for p in PROMPTS[2:]]).encode()
        bad_row, why = 3, "prompt is not a string"
    f = tmp_path / name
    _write_compressed(f, data)
    rows, q, _ = _ingested([f], tmp_path / "w")
    expect = [p for p in PROMPTS if not (".csv" in name and p == "plain ascii prompt")]
    assert [r["prompt"] for r in rows] == expect
    assert [(r["row"], r["reason"].split(":")[0].split(" (")[0]) for r in q] == [(bad_row, why)]


def test_non_utf8_rows_in_a_utf8_file_are_quarantined_with_the_fix(tmp_path):
    f = tmp_path / "mixed.csv"
    f.write_bytes("prompt\nfirst ünïcode row\n".encode() + b"caf\xe9 in cp1252\n" + b"last row\n")
    rows, q, _ = _ingested([f], tmp_path / "w")
    assert [r["prompt"] for r in rows] == ["first ünïcode row", "last row"]
    assert q[0]["row"] == 3
    assert q[0]["reason"].startswith("line 3 is not valid UTF-8 at byte 3; re-save the file as UTF-8 or pass "
                                     "--encoding cp1252")
    # the user's fix: say how the file was saved (here every row then decodes as cp1252)
    rows, q, _ = _ingested([f], tmp_path / "w2", encoding="cp1252")
    assert q == [] and [r["prompt"] for r in rows][1] == "café in cp1252"


def test_unknown_encoding_or_contradicting_bom_fails_before_any_work(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"prompt": "x"}\n')
    with pytest.raises(IngestError, match="unknown encoding 'klingon'"):
        ingest([str(f)], tmp_path / "w", IngestConfig(encoding="klingon"), progress=False)
    g = tmp_path / "b.jsonl"
    g.write_bytes(b"\xff\xfe" + '{"prompt": "x"}\n'.encode("utf-16-le"))
    with pytest.raises(IngestError, match="utf-16-le byte-order mark"):
        ingest([str(g)], tmp_path / "w", IngestConfig(encoding="cp1252"), progress=False)
    assert not (tmp_path / "w" / "prompts").exists()


# --- the columnar path keeps the row-by-row semantics -----------------------------------------

TRICKY = ["ﬁnancial ﬂow", "Ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ", "nbsp\u00a0here", "line\u2028sep", "nel\x85x", "e\u0301 vs é",
          "\x1cfile sep\x1f", "vt\x0bff\x0c", "tabs\t\tand\r\nnewlines", "  lead and trail  ", "zero\u200bwidth",
          "mongol\u180esep", "emoji 👍🏽 family 👨‍👩‍👧", "한국어 ᄒᆞᆫ", "שלום עולם", "ﾊﾝｶｸ ｶﾀｶﾅ", "x\u3000\u3000y",
          "²³ ½ ℌ", "\u2002en\u2003em\u2009thin", "a \\u escape", "Ａ  b", "A b", "ǅ dz", "\u212b", "\u00c5", "e\u0301",
          "\u00e9"]


def _reference_id(p: str) -> str:
    """The id rule as it was before the columnar path, written out independently."""
    n = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", p)).strip()
    return hashlib.blake2b(n.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _reference_ingest(path: Path, cfg: IngestConfig) -> tuple[list[tuple], list[tuple]]:
    """Row by row with the readers and the reference checks: (id, prompt, source, metadata), (row, reason)."""
    from guidealign.ingest.run import check_prompt, prompt_of
    from guidealign.ingest.metadata import meta_json
    from guidealign.ingest.keys import find_prompt_key
    from guidealign.ingest.readers import READERS, check_readable

    rows, bad, seen = [], [], set()
    for row_no, rec, err in READERS[check_readable(path)](path):
        err = err or check_prompt(rec, cfg)
        if err:
            bad.append((row_no, err))
            continue
        p = prompt_of(rec, cfg)
        if _reference_id(p) in seen:
            continue
        seen.add(_reference_id(p))
        key = find_prompt_key(tuple(rec), cfg.prompt_field, cfg.prompt_aliases)
        rows.append((_reference_id(p), p, f"{path}:{row_no}", meta_json(rec, key)))
    return rows, bad


def test_columnar_ids_equal_the_reference_rule_on_tricky_unicode(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=bool(i % 2)) + "\n" for i, p in enumerate(TRICKY)))
    rows, q, rep = _ingested([f], tmp_path / "w")
    ref = {_reference_id(p): p for p in reversed(TRICKY)}  # first occurrence wins
    assert q == []
    assert {r["id"]: r["prompt"] for r in rows} == ref
    assert rep.duplicates == len(TRICKY) - len(ref) == 3  # "Ａ  b"/"A b", Angstrom/Å, e+accent/é fold
    assert all(r["id"] == prompt_hash(r["prompt"]).hex() for r in rows)


def test_columnar_path_equals_row_by_row_reference(tmp_path):
    """Blocks that parse (columnar), blocks that do not (a type change, a bad line), nulls that the
    row reader settles, metadata of every JSON type: same rows, ids, sources, reasons, and
    metadata byte for byte (keys in any order, integers in a float column, keys a row leaves
    out of a nested object), whatever the block size."""
    import random

    rng = random.Random(3)
    f = tmp_path / "mix.jsonl"
    lines = []
    for i in range(3000):
        p = TRICKY[i % len(TRICKY)] + f" #{i % 2500}"
        rec = {"prompt": p, "n": i, "ok": i % 3 == 0, "score": i if i % 4 == 0 else i / 7,
               "tag": None if i % 5 else f"t\"{i}\"\n", "when": "2024-01-02T03:04:05",
               "nested": {"a": [i, 1]} if i % 6 else {"b": i, "a": []}}
        if i < 1000:  # columns that give their values back exactly: no float, no struct
            rec = {k: rec[k] for k in ("prompt", "n", "ok", "tag", "when")}
        if i % 3 == 0:
            rec = dict(rng.sample(sorted(rec.items()), len(rec)))  # keys in another order
        if i % 401 == 0:
            rec = {"Prompt": p, "n": i}                     # another spelling, in a block with "prompt"
        if i % 333 == 0:
            rec = {"prompt": None, "question": p}          # null prompt, alias present
        if i == 1700:
            rec = {"prompt": p, "n": "a string now"}        # type change: this block goes row by row
        lines.append(json.dumps(rec, ensure_ascii=bool(i % 2)))
        if i % 777 == 0:
            lines.append("")                                # blank line
        if i % 999 == 0:
            lines.append("{broken")
        if i == 1234:
            lines.append('{"prompt": "an unterminated string')
    f.write_text("\n".join(lines) + "\n")
    ref_rows, ref_bad = _reference_ingest(f, IngestConfig())
    for block_bytes in (40_000, 300, 4 << 20):
        cfg = IngestConfig(shard_rows=250, block_bytes=block_bytes)
        w = tmp_path / f"w{block_bytes}"
        ingest([str(f)], w, cfg, progress=False)
        got = [(r["id"], r["prompt"], r["source"], r["metadata"]) for r in _all_rows(w)]
        assert got == ref_rows, block_bytes
        q = read_quarantine(w / "prompts").to_pylist()
        assert [(r["row"], r["reason"]) for r in q] == ref_bad


def test_quarantine_rows_land_beside_the_shard_being_filled(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}" if i % 4 else ""}) + "\n" for i in range(1, 21)))
    ingest([str(f)], tmp_path / "w", IngestConfig(shard_rows=5), progress=False)
    from guidealign.shards.layout import quarantine_path
    by_shard = {i: pq.read_table(quarantine_path(tmp_path / "w" / "prompts", i)).column("row").to_pylist()
                for i in committed(tmp_path / "w" / "prompts")
                if quarantine_path(tmp_path / "w" / "prompts", i).exists()}
    # shard 0 holds rows 1,2,3,5,6 (and bad row 4); row 8 is read while shard 1 (7,9,...) fills;
    # row 20 comes after row 19 completed shard 2, so it opens shard 3 (no rows, one quarantined)
    assert by_shard == {0: [4], 1: [8, 12], 2: [16], 3: [20]}


@pytest.mark.parametrize("memory_hashes,lookup", [(1 << 20, "auto"), (40_000, "auto"), (700, "windows"),
                                                  (700, "scan"), (40_000, "short reads")])
def test_hash_set_matches_a_python_set(tmp_path, monkeypatch, memory_hashes, lookup):
    """In memory, and with a budget so small that most hashes move to temp files and the files
    merge (the bit filter rebuilds as the set grows past its capacity); small file chunks so
    that merges and scans cross chunk boundaries; files looked up window by window, read
    through, or either as the set chooses; reads that return less than asked."""
    import os
    import numpy as np
    from guidealign.ingest import dedup

    monkeypatch.setattr(dedup, "MERGE_CHUNK", 50)
    monkeypatch.setattr(dedup, "LOOKUP_CHUNK", 7)
    if lookup == "windows":  # never read a file through
        monkeypatch.setattr(dedup, "SCAN_EVERY", 0)
    elif lookup == "scan":  # always read a file through
        monkeypatch.setattr(dedup, "SCAN_EVERY", 10**9)
    if lookup == "short reads":
        real = os.preadv  # at most 24 bytes a call
        monkeypatch.setattr(dedup.os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:24]], off))
    rng = np.random.default_rng(0)
    s, ref = HashSet(memory_hashes=memory_hashes, spill_dir=tmp_path), set()
    biggest = 0
    for k in range(300):
        # repeats within and across batches, spread over all 64 bits by a multiplication that
        # wraps; later batches reach further, so the set keeps growing
        h = rng.integers(0, 3000 + 2000 * k, size=int(rng.integers(0, 2000)),
                         dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        new = s.add_new(h)
        expect = []
        for x in h.tolist():
            expect.append(x not in ref)
            ref.add(x)
        assert new.tolist() == expect
        biggest = max([biggest] + [r.size for r in s.runs])
    assert len(s) == len(ref) > 150_000  # past the filter's first capacity (131,072)
    assert sum(r.size for r in s.runs) < memory_hashes
    assert biggest < 2 * s.max_run + 2000  # merges in memory stop at max_run (a batch: < 2000)
    assert all((r[1:] > r[:-1]).all() for r in s.runs)  # each memory run sorted, no repeats
    on_disk = [np.concatenate(list(d.chunks())) for d in s.disk]
    if memory_hashes < len(ref):
        assert 1 < len(s.disk) < 20 and all(d.n == c.size for d, c in zip(s.disk, on_disk))
        assert all((c[1:] > c[:-1]).all() for c in on_disk)  # merged files sorted, no repeats
        assert all((d.fences == c[::dedup.FENCE]).all() for d, c in zip(s.disk, on_disk))
        assert sum(c.size for c in on_disk) > len(ref) // 2
    else:
        assert not s.disk
    every = np.concatenate(on_disk + s.runs)
    assert np.unique(every).size == every.size == len(ref)
    before = s.add_new(every[:50].copy())  # all seen: nothing new; a failed rebuild changes nothing
    monkeypatch.setattr(s.filter, "capacity", 0)
    monkeypatch.setattr(dedup._BitFilter, "add", lambda self, h: (_ for _ in ()).throw(MemoryError()))
    fresh = np.arange(1, 4, dtype=np.uint64) << np.uint64(40)
    with pytest.raises(MemoryError):
        s.add_new(fresh)
    monkeypatch.undo()
    assert not before.any() and len(s) == len(ref)
    assert not s.add_new(every[:50].copy()).any() and s.add_new(fresh).all()  # still whole
    s.close()
    assert not list(tmp_path.iterdir())  # the temp files have no name
    assert len(s) == 0 and s.add_new(every[:5]).all()  # closed: empty, usable again
    with pytest.raises(TypeError):
        s.add_new(every[:5].astype(np.int64))


def test_ingest_with_the_dedup_set_on_disk_gives_the_same_shards(tmp_path, monkeypatch):
    """300k rows, 1 MiB for hashes (131,072): most of the set moves to temp files, and the shards,
    counts and quarantine are the same as with the whole set in memory."""
    from guidealign.ingest import dedup

    spills = []
    real_write = dedup._DiskRun.write
    monkeypatch.setattr(dedup._DiskRun, "write", classmethod(
        lambda cls, run, spill_dir: spills.append(run.size) or real_write(run, spill_dir)))
    f = tmp_path / "in.jsonl"
    rng = random.Random(0)
    with open(f, "w") as out:
        for i in range(300_000):
            k = rng.randrange(i) if i and rng.random() < 0.2 else i  # 20% repeat an earlier row
            out.write(json.dumps({"prompt": f"p {k}" if i % 5000 else ""}) + "\n")
    reps, rows, spilled = [], [], []
    for mib in (1, 64):
        cfg = IngestConfig(shard_rows=50_000, dedup_memory_mib=mib)
        reps.append(ingest([str(f)], tmp_path / f"w{mib}", cfg, progress=False))
        rows.append(_all_rows(tmp_path / f"w{mib}"))
        spilled.append(sum(spills))
        spills.clear()
    assert spilled[0] > 150_000 and spilled[1] == 0  # the small budget spilled most of the set
    a, b = reps
    assert (a.rows, a.duplicates, a.quarantined) == (b.rows, b.duplicates, b.quarantined)
    assert a.duplicates > 50_000 and a.rows + a.duplicates + a.quarantined == 300_000
    assert rows[0] == rows[1]
    assert not [p for p in (tmp_path / "w1").rglob("*") if "dedup" in p.name]
    with pytest.raises(ValueError, match="dedup_memory_mib"):
        ingest([str(f)], tmp_path / "w0", IngestConfig(dedup_memory_mib=0), progress=False)


# --- a second prompt set -------------------------------------------------------------------------

def test_ingest_into_another_dataset(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    g = tmp_path / "main.jsonl"
    g.write_text('{"prompt": "c"}\n')
    ingest([str(g)], tmp_path / "w", progress=False)
    rep = ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False, dataset="prompts-sft")
    assert rep.rows == 2
    assert [r["prompt"] for t in iter_tables(tmp_path / "w" / "prompts-sft") for r in t.to_pylist()] == ["a", "b"]
    assert [r["prompt"] for r in _all_rows(tmp_path / "w")] == ["c"]  # the main set is untouched
    p = _run_cli(["ingest", str(f), "-w", str(tmp_path / "w2"), "--into", "prompts-sft", "--no-progress"])
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert read_manifest(tmp_path / "w2" / "prompts-sft")["rows"] == 2
    assert not (tmp_path / "w2" / "prompts").exists()
    with pytest.raises(IngestError, match="dataset name"):
        ingest([str(f)], tmp_path / "w", dataset="../escape", progress=False)


def test_the_ingest_command_without_files_ingests_both_prompt_sets_of_the_config(tmp_path):
    """The stage command, as ``launch ingest`` and the SLURM stage script run it: with no files
    it ingests the config's ``inputs`` into prompts and ``inputs_sft`` into prompts-sft (it
    ingested the first set only, and ``--into prompts-sft`` put the library's prompts there)."""
    lib, sft = tmp_path / "lib.jsonl", tmp_path / "sft.jsonl"
    lib.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"}\n')
    sft.write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    two = tmp_path / "two.yaml"
    two.write_text(f"inputs: [{lib}]\ninputs_sft: [{sft}]\n")
    one = tmp_path / "one.yaml"
    one.write_text(f"inputs: [{lib}]\n")

    def cli(*args, rc=0):
        p = _run_cli(["ingest", *args, "--no-progress"])
        err = p.communicate()[1]
        assert p.returncode == rc, err
        return err

    cli("-w", str(tmp_path / "w1"), "-c", str(two))
    assert read_manifest(tmp_path / "w1" / "prompts")["rows"] == 3
    assert read_manifest(tmp_path / "w1" / "prompts-sft")["rows"] == 2
    cli("-w", str(tmp_path / "w2"), "-c", str(two), "--into", "prompts-sft")
    assert [r["prompt"] for t in iter_tables(tmp_path / "w2" / "prompts-sft") for r in t.to_pylist()] == ["x", "y"]
    assert not (tmp_path / "w2" / "prompts").exists()
    err = cli("-w", str(tmp_path / "w3"), "-c", str(one), "--into", "prompts-sft", rc=1)
    assert "no input files for dataset 'prompts-sft' (inputs_sft is not set" in err
    assert not (tmp_path / "w3" / "prompts-sft").exists()


def test_csv_quoted_newlines_and_ragged_rows(tmp_path):
    f = tmp_path / "r.csv"
    # a trailing delimiter (an empty extra field) is kept; a non-empty extra field is quarantined
    # (tests/test_ingest_csv_quirks.py)
    f.write_bytes(b'Prompt;Note\r\n"first line\r\nsecond line";a\r\n"say ""hi""";b;\r\nlast;\r\n')
    rows, q, _ = _ingested([f], tmp_path / "w")
    assert q == []
    assert [r["prompt"] for r in rows] == ["first line\r\nsecond line", 'say "hi"', "last"]
    assert json.loads(rows[1]["metadata"]) == {"Note": "b", "_extra_fields": [""]}
    assert [r["source"].rsplit(":", 1)[1] for r in rows] == ["2", "4", "5"]  # a record's first line


@pytest.mark.parametrize("name", ["cut.jsonl.gz", "cut.csv.gz", "cut.json.xz", "cut.jsonl.bz2"])
def test_truncated_compressed_file_keeps_the_rows_before_and_says_so(tmp_path, name):
    n = 60_000 if name.endswith(".bz2") else 3000  # bz2 decodes in 900 kB blocks
    if ".jsonl" in name:
        data = "".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(n)).encode()
    elif ".csv" in name:
        data = ("prompt\n" + "".join(f"prompt number {i}\n" for i in range(n))).encode()
    else:
        data = json.dumps([{"prompt": f"prompt number {i}"} for i in range(n)]).encode()
    f = tmp_path / name
    _write_compressed(f, data)
    whole = f.read_bytes()
    f.write_bytes(whole[: len(whole) * 2 // 3])
    rows, q, rep = _ingested([f], tmp_path / "w")
    assert 0 < len(rows) < n
    assert [r["prompt"] for r in rows] == [f"prompt number {i}" for i in range(len(rows))]
    assert [r["row"] for r in q][-1] == 0 and "truncated or corrupt" in q[-1]["reason"]
    # the row cut in two is quarantined too, never kept half (JSONL: not JSON; CSV: held back)
    assert len(q) == 2 if ".json." not in name else len(q) == 1
    assert "re-download or re-compress" in q[-1]["reason"]


@pytest.mark.parametrize("extra", ["", '{"prompt": "raw\ttab inside"}\n', '{"prompt": "esc\\\\u0041pe"}\n'])
def test_ascii_blocks_without_escapes_keep_the_id_rule(tmp_path, extra):
    """The cheapest path (ASCII block, no escapes, maybe no whitespace runs) against the reference."""
    f = tmp_path / "a.jsonl"
    prompts = ["one space each", " lead", "trail ", "double  space", "  both  ", "x"]
    f.write_text("".join('{"prompt": "%s"}\n' % p for p in prompts) + extra)
    rows, q, _ = _ingested([f], tmp_path / "w")
    # a raw tab inside a JSON string is not JSON (Python's json and pyarrow.json agree)
    assert [r["reason"].split(":")[0] for r in q] == (["line 7 is not JSON"] if "\t" in extra else [])
    assert [r["id"] for r in rows] == [_reference_id(r["prompt"]) for r in rows]
    assert [r["prompt"] for r in rows][:len(prompts)] == prompts
    g = tmp_path / "b.jsonl"
    g.write_text("".join('{"prompt": "%s"}\n' % p for p in prompts if "  " not in p) + extra)
    rows, q, _ = _ingested([g], tmp_path / "w2")
    assert [r["id"] for r in rows] == [_reference_id(r["prompt"]) for r in rows]


# --- the compiled hash, the CSV columnar path, the shard writer ---------------------------------

def test_llvm_blake2b_equals_hashlib(tmp_path):
    """The llvmlite kernel (hash_kernel=llvm, what auto picks for big inputs) gives hashlib's
    digests on every length around the 128-byte block edges, and the same shards."""
    pytest.importorskip("llvmlite")
    import numpy as np

    from guidealign.ingest.blake2_llvm import blake2b64

    msgs = [os.urandom(n) for n in list(range(0, 300)) + [383, 384, 385, 1000, 5000]]
    # in order (neighbours of similar length share a 4-lane group) and shuffled (a 5000-byte
    # message beside empty ones); 305 messages: the last group has spare lanes
    for order in (msgs, random.Random(0).sample(msgs, len(msgs))):
        offsets = np.cumsum([0] + [len(m) for m in order])
        got = blake2b64(offsets, np.frombuffer(b"".join(order), np.uint8))
        assert got.tolist() == [int.from_bytes(hashlib.blake2b(m, digest_size=8).digest(), "little")
                                for m in order]
    assert blake2b64(np.zeros(3, np.int64), np.zeros(0, np.uint8)).tolist() == \
        [int.from_bytes(hashlib.blake2b(b"", digest_size=8).digest(), "little")] * 2
    f = tmp_path / "a.jsonl"
    _big_input(f, 3000)
    a = ingest([str(f)], tmp_path / "a", IngestConfig(hash_kernel="llvm", shard_rows=700), progress=False)
    b = ingest([str(f)], tmp_path / "b", IngestConfig(hash_kernel="hashlib", shard_rows=700), progress=False)
    assert a.rows == b.rows == 3000
    assert _all_rows(tmp_path / "a") == _all_rows(tmp_path / "b")


def test_pyarrow_json_rejects_raw_control_bytes_in_strings():
    """The columnar JSONL path skips the whitespace-collapsing pass for ASCII blocks without
    escapes or double spaces: sound only because a raw control byte inside a JSON string is a
    parse error (the block then goes row by row), as it is for Python's json."""
    import pyarrow.json as pajson

    for c in [*range(0, 32)]:
        line = b'{"prompt": "a' + bytes([c]) + b'b"}\n'
        with pytest.raises(pa.ArrowInvalid):
            pajson.read_json(pa.BufferReader(line))
        with pytest.raises(ValueError):
            json.loads(line)


def _messy_csv(path: Path, seed: int) -> None:
    """A CSV with what real exports carry: quoting styles, quoted delimiters and line ends,
    CRLF, blank and ragged rows, non-UTF-8 bytes, stray quotes, lone CRs, NULs, duplicates."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "naïve", "café", "", " ", "  two  spaces ", "tab\there", "semi;colon",
             "com,ma", 'quo"te', "new\nline", "cr\r\nlf", "pipe|", "ü€", "long " * 30]
    delim, nl = rng.choice([",", ";", "\t", "|"]), rng.choice(["\n", "\r\n"])
    quoting = rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])
    ncol = rng.randint(1, 4)
    scale = rng.choice([1, 3, 30, 1000])  # how often the rarer faults appear

    def line(row):
        buf = []
        csv.writer(_Collect(buf), delimiter=delim, lineterminator=nl, quoting=quoting).writerow(row)
        return "".join(buf).encode()

    out = [line([rng.choice(["prompt", "Prompt", " question ", "text"])] + [f"c{i}" for i in range(1, ncol)])]
    for i in range(rng.randint(0, 300)):
        row = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 4))) + f" {i % 120}"]
        row += [rng.choice(words) for _ in range(ncol - 1)]
        r = rng.random()
        if r < 0.03:
            row = row[:-1] or [""]
        elif r < 0.06:
            row = row + ["extra"]
        elif r < 0.08:
            row[0] = ""
        raw, r = line(row), rng.random() * scale
        if r < 0.01:
            raw = b"bad \xff byte" + raw
        elif r < 0.02:
            raw = nl.encode()
        elif r < 0.025:
            raw = b'5" screen' + delim.encode() + raw
        elif r < 0.03:
            raw = b"lone\rcr" + raw
        elif r < 0.035:
            raw = b"nul\0byte " + raw
        elif r < 0.04:
            raw = b"   " + nl.encode()
        out.append(raw)
    data = b"".join(out)
    if rng.random() < 0.3 and data.endswith(nl.encode()):
        data = data[:-len(nl)]
    path.write_bytes(data)


def test_csv_columnar_path_equals_row_by_row_reference(tmp_path, monkeypatch):
    """CSV blocks go through pyarrow.csv where both parsers read them alike and row by row
    elsewhere: on messy files cut into blocks of every size, the same rows, ids, sources,
    metadata, quarantine rows and reasons as Python's csv module alone."""
    used = count_csv_paths(monkeypatch)
    for seed in range(40):
        f = tmp_path / f"m{seed}.csv"
        _messy_csv(f, seed)
        cfg = IngestConfig(shard_rows=[7, 50, 1000][seed % 3], block_bytes=[64, 300, 2000, 1 << 20][seed % 4],
                           max_chars=200)
        w = tmp_path / f"w{seed}"
        ingest([str(f)], w, cfg, progress=False)
        got = [(r["id"], r["prompt"], r["source"], json.loads(r["metadata"])) for r in _all_rows(w)]
        ref_rows, ref_bad = _reference_ingest(f, cfg)
        assert got == [(i, p, s, json.loads(m)) for i, p, s, m in ref_rows], seed
        q = read_quarantine(w / "prompts")
        assert [(r["row"], r["reason"]) for r in (q.to_pylist() if q is not None else [])] == ref_bad, seed
    assert used["columnar"] > 100 and used["rows"] > 10  # both paths were taken


def _clean_and_as_the_row_reader_reads(files, workdir, **cfg):
    """Ingest ``files`` (one) with ``IngestConfig(**cfg)``: nothing quarantined, and the rows
    (id, prompt, source) the row-by-row reader gives; returns (rows, report)."""
    got, q, rep = _ingested(files, workdir, **cfg)
    ref_rows, ref_bad = _reference_ingest(files[0], IngestConfig(**cfg))
    assert [(r["id"], r["prompt"], r["source"]) for r in got] == [r[:3] for r in ref_rows]
    assert q == [] == ref_bad
    return got, rep


def test_csv_stray_quote_hands_the_rest_of_the_file_to_the_row_reader(tmp_path):
    f = tmp_path / "q.csv"
    rows = [f"prompt {i},t{i}\n" for i in range(200)]
    rows[50] = 'a 5" screen,x\n'                                  # a quote that opens nothing
    rows[120] = '"multi\nline ""quoted""",y\n'                     # then a quoted line end
    f.write_text("prompt,topic\n" + "".join(rows))
    rows_got, rep = _clean_and_as_the_row_reader_reads([f], tmp_path / "w", block_bytes=256, shard_rows=64)
    assert rep.rows == 200
    assert rows_got[50]["prompt"] == 'a 5" screen' and rows_got[120]["prompt"] == 'multi\nline "quoted"'
    assert rows_got[120]["source"].endswith(":122")  # the line the record starts on (both readers)


def test_csv_stray_quote_does_not_hold_the_rest_of_the_file_in_memory(tmp_path, monkeypatch):
    """After a quote that opens nothing ('a 5" screen'), no later line end has an even number
    of quotes before it, so the block cutter read on to the end of the file looking for a record
    end, the whole rest of the file in one buffer (and scanned again at every read). Past
    csvcol.MAX_RECORD_BYTES the row reader takes over, streaming; the rows are the same."""
    from guidealign.ingest import csvcol

    monkeypatch.setattr(csvcol, "MAX_RECORD_BYTES", 2048, raising=False)
    held = record_block_sizes(monkeypatch)
    f = tmp_path / "q.csv"
    rows = [f"prompt number {i},t{i}\n" for i in range(3000)]
    rows[50] = 'a 5" screen,x\n'
    f.write_text("prompt,topic\n" + "".join(rows))
    got, rep = _clean_and_as_the_row_reader_reads([f], tmp_path / "w", block_bytes=256, shard_rows=500)
    assert rep.rows == 3000
    assert f.stat().st_size > 50_000 and max(held) <= 2048 + 2 * 256


def test_output_does_not_depend_on_block_size(tmp_path):
    """Blocks are how the input is read, never what comes out: shards, quarantine, ids."""
    jl, cs = tmp_path / "a.jsonl", tmp_path / "a.csv"
    _big_input(jl, 2000)
    with open(cs, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "n"])
        for i in range(2000):
            w.writerow([f"p {i % 1700}" if i % 97 else "", i])
    out = []
    for bb in (97, 4096, 1 << 20):
        w = tmp_path / f"w{bb}"
        ingest([str(jl), str(cs)], w, IngestConfig(block_bytes=bb, shard_rows=333), progress=False)
        qs = {i: pq.read_table(p).to_pylist() for i in committed(w / "prompts")
              if (p := w / "prompts" / "quarantine" / f"shard-{i:05d}.parquet").exists()}
        out.append(([t.to_pylist() for t in iter_tables(w / "prompts")], qs))
    assert out[0] == out[1] == out[2]


def test_shard_writer_groups_queued_shards_and_commits_them_verifiably(tmp_path):
    """Shards that queue up while the writer is busy are committed as one group; every file's
    marker checksum is the file's (what `guidealign verify` checks), markers come in order."""
    import threading

    from guidealign.ingest.commit import Pending, ShardWriter
    from guidealign.shards.verify import verify_run

    gate = threading.Event()
    dst = tmp_path / "run" / "prompts"
    writer = ShardWriter(dst, max_pending=8, max_group=8)
    groups = []
    commit = writer._commit
    writer._commit = lambda group: (groups.append(len(group)), commit(group))

    def build(i):
        def make():
            gate.wait(10)
            t = pa.table({"id": [f"{i:016x}"], "prompt": [f"p{i}"], "source": ["s"], "metadata": ["{}"]})
            bad = pa.table({"source": ["s"], "row": [i], "reason": ["empty prompt"], "raw": [None]},
                           schema=pa.schema([("source", pa.string()), ("row", pa.int64()),
                                             ("reason", pa.string()), ("raw", pa.string())]))
            return t, (bad if i % 2 else None)
        return make

    for i in range(6):
        writer.submit(Pending(i, f"fp{i}", build(i), 0.0, {"duplicates": 0}))
    gate.set()
    writer.close()
    assert committed(dst) == list(range(6))
    markers = [read_marker(dst, i) for i in range(6)]
    assert [m.fingerprint for m in markers] == [f"fp{i}" for i in range(6)]
    assert all(m.sha256 == hashlib.sha256((dst / f"shard-{i:05d}.parquet").read_bytes()).hexdigest()
               for i, m in enumerate(markers))
    assert [m.quarantined for m in markers] == [0, 1] * 3
    assert [r["row"] for r in read_quarantine(dst).to_pylist()] == [1, 3, 5]
    assert verify_run(tmp_path / "run").ok
    assert not list(dst.rglob("*.tmp"))
    # the first shard held the writer (the gate): the ones queued meanwhile came as one group
    assert sum(groups) == 6 and len(groups) <= 2


def test_shard_writer_syncs_every_file_before_renaming_it(tmp_path, monkeypatch):
    """Durability with the batched syncs: every shard, quarantine and marker file is fdatasynced
    before the rename that makes it visible, and each marker only after its shard's files."""
    import os

    from guidealign.ingest import commit as commit_mod
    from guidealign.ingest.commit import Pending, ShardWriter

    events = []
    sync, replace = commit_mod._sync, os.replace
    monkeypatch.setattr(commit_mod, "_sync",
                        lambda fd: (events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))), sync(fd)))
    monkeypatch.setattr(commit_mod.os, "replace",
                        lambda a, b: (events.append(("rename", str(a), str(b))), replace(a, b)))
    fsync_dir = commit_mod.fsync_dir
    monkeypatch.setattr(commit_mod, "fsync_dir", lambda d: (events.append(("dirsync", str(d))), fsync_dir(d)))

    def build(i):
        t = pa.table({"id": [f"{i:016x}"], "prompt": [f"p{i}"], "source": ["s"], "metadata": ["{}"]})
        bad = pa.table({"source": ["s"], "row": [i], "reason": ["empty prompt"], "raw": [None]},
                       schema=pa.schema([("source", pa.string()), ("row", pa.int64()),
                                         ("reason", pa.string()), ("raw", pa.string())]))
        return lambda: (t, bad if i % 2 else None)

    dst = tmp_path / "d"
    writer = ShardWriter(dst, max_pending=8, max_group=8)
    for i in range(5):
        writer.submit(Pending(i, f"fp{i}", build(i), 0.0, {}))
    writer.close()
    assert committed(dst) == list(range(5))
    renames = [e for e in events if e[0] == "rename"]
    assert len(renames) == 5 + 2 + 5  # shards, quarantine files (odd shards), markers
    for _, tmp, final in renames:
        at = events.index(("rename", tmp, final))
        assert ("sync", tmp) in events[:at], f"{final} renamed before its file was synced"
        if final.endswith(".done.json"):  # a marker: after its files' renames and a sync of their dirs
            i = int(final.rsplit("-", 1)[1].split(".")[0])
            files = [str(dst / f"shard-{i:05d}.parquet")]
            if i % 2:
                files.append(str(dst / "quarantine" / f"shard-{i:05d}.parquet"))
            for f in files:
                moved = [k for k, e in enumerate(events[:at]) if e[0] == "rename" and e[2] == f]
                assert moved, f"marker {final} before {f}"
                assert ("dirsync", str(Path(f).parent)) in events[moved[0]:at], f"{f}'s dir not synced"


def test_shard_writer_error_reaches_the_caller(tmp_path):
    from guidealign.ingest.commit import Pending, ShardWriter

    def boom():
        raise OSError("disk full")

    writer = ShardWriter(tmp_path / "d")
    writer.submit(Pending(0, "fp", boom, 0.0, {}))
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert committed(tmp_path / "d") == []


def test_shard_writer_sync_error_reaches_the_caller(tmp_path, monkeypatch):
    """An error in the sync thread (fsync failing: EIO, a full quota) reaches the caller once,
    nothing is committed after it, and no file descriptor is left open."""
    import os

    from guidealign.ingest import commit as commit_mod
    from guidealign.ingest.commit import Pending, ShardWriter

    sync, calls = commit_mod._sync, []

    def failing_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError("fsync: input/output error")
        sync(fd)

    monkeypatch.setattr(commit_mod, "_sync", failing_once)
    open_fds = len(os.listdir("/proc/self/fd"))
    writer = ShardWriter(tmp_path / "d", max_pending=2, max_group=1)
    t = pa.table({"id": ["0" * 16], "prompt": ["p"], "source": ["s"], "metadata": ["{}"]})
    with pytest.raises(OSError, match="input/output error"):
        for i in range(6):
            writer.submit(Pending(i, "fp", lambda: (t, None), 0.0, {}))
        writer.close()
    writer.close()  # raised once: closing again neither raises nor commits anything more
    assert calls  # the failing sync ran
    assert committed(tmp_path / "d") == []  # the later groups (fsync fine) were not committed
    assert len(os.listdir("/proc/self/fd")) == open_fds


def test_block_scan_counts_match_bytes_methods():
    """The one-pass block scan (line ends, control bytes, CR/CRLF, double spaces) in any step
    size, against Python's own byte counting."""
    import random

    import numpy as np

    from guidealign.ingest.blocks import scan

    rng = random.Random(0)
    for _ in range(300):
        b = bytes(rng.choice(b"ab \r\n\t") for _ in range(rng.randint(0, 300)))
        sc = scan(np.frombuffer(b, np.uint8), rng.choice([1, 2, 3, 7, 64]), count_ctrl=True, count_cr=True)
        assert (sc.n_nl, sc.n_cr, sc.n_crlf) == (b.count(b"\n"), b.count(b"\r"), b.count(b"\r\n"))
        assert sc.n_ctrl == sum(c < 32 for c in b) and sc.double_space == (b"  " in b)
        if any(not ln.strip() for ln in b.split(b"\n")[:-1]):  # a blank line: never missed
            assert sc.maybe_blank


def test_metadata_column_equals_meta_json():
    """The columnar metadata JSON (one string join in the usual cases) is meta_json's, byte for
    byte: key order, nulls left out, every JSON type, one column or several."""
    import random

    from guidealign.ingest.metadata import meta_json, metadata_column

    rng = random.Random(1)
    kinds = {"int": lambda: rng.randint(-5, 5), "str": lambda: rng.choice(["a", 'q"uote', "ü", "new\nline", ""]),
             "nullable_str": lambda: rng.choice(["a", None, "b\\c"]), "bool": lambda: rng.random() < 0.5,
             "float": lambda: rng.random(), "nullable_int": lambda: rng.choice([None, 3]),
             "all_null": lambda: None, "list": lambda: rng.choice([[1, 2], None, []])}
    for _ in range(300):
        cols = {"prompt": [f"p{i}" for i in range(6)]}
        for c in range(rng.randint(0, 3)):
            make = kinds[rng.choice(sorted(kinds))]
            cols[f"c{c} k"] = [make() for _ in range(6)]
        order = list(cols)
        rng.shuffle(order)
        got = metadata_column(pa.table({k: cols[k] for k in order}), "prompt").to_pylist()
        assert got == [meta_json({k: cols[k][i] for k in order}, "prompt") for i in range(6)]


# --- Arrow arrays built without pyarrow's pandas shim -------------------------------------------

def test_arrow_helpers_equal_pyarrow_conversions():
    """str_arrow/int_arrow/bool_arrow/bool_numpy give what pa.array / to_numpy give."""
    import numpy as np
    import pyarrow as pa

    from guidealign.ingest.arrays import bool_arrow, bool_numpy, int_arrow, lit, str_arrow

    for vals in ([], ["a"], ["", None, "héllo wörld", "日本", "x" * 1000], [None, None]):
        got = str_arrow(vals)
        assert got.equals(pa.array(vals, pa.string())) and got.to_pylist() == vals
    assert int_arrow(np.array([3, -1, 2**40])).to_pylist() == [3, -1, 2**40]
    assert int_arrow([]).to_pylist() == []
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 100):
        mask = rng.random(n + 11) < 0.5
        assert bool_arrow(mask).to_pylist() == mask.tolist()
        for off in (0, 1, 3, 9):  # a slice starts inside a byte of the bitmap
            sliced = pa.array(mask.tolist()).slice(off, n)
            assert bool_numpy(sliced).tolist() == mask[off:off + n].tolist()
    with pytest.raises(ValueError):
        bool_numpy(pa.array([True, None]))
    assert lit("x").as_py() == "x" and lit(False).as_py() is False
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate: pyarrow's own error
        str_arrow(["\ud800"])


def test_ingest_cli_never_imports_pandas(tmp_path):
    """pandas costs ~0.35 s of every ingest run and ingest needs none of it: the columnar paths
    (JSONL, CSV, bad rows, non-ASCII prompts, a prompt under another key, quarantine) run
    without pyarrow's pandas shim pulling it in."""
    pytest.importorskip("pandas")  # else the check below could not fail
    j = tmp_path / "a.jsonl"
    j.write_text('{"prompt": "héllo  wörld", "x": null}\n{"prompt": null, "question": "q?"}\n'
                 'not json\n{"prompt": "a\\u00e9  b", "k": [1, 2]}\n{"prompt": "", "y": true}\n'
                 + "".join(f'{{"prompt": "row {i} text", "n": {i}}}\n' for i in range(50)))
    c = tmp_path / "b.csv"
    c.write_text("prompt,n\n" + "".join(f"csv row {i},{i}\n" for i in range(50)) + ",7\n")
    code = ("import sys\nfrom guidealign.cli import main\n"
            f"sys.argv = ['guidealign', 'ingest', {str(j)!r}, {str(c)!r}, '-w', {str(tmp_path / 'w')!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('PANDAS', 'pandas' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "quarantined" in out.stdout + out.stderr
    assert "PANDAS False" in out.stdout, out.stdout[-500:]


# one case per way the columnar path once differed from the row reader, or a row killed the job
ROW_READER_CASES = {
    "key order": ['{"prompt": "a", "x": 1, "y": 2, "s": {"q": 1, "p": 2}}', '{"y": 3, "prompt": "b", "x": 4}',
                  '{"s": {"p": 3, "q": 4}, "prompt": "c"}'],
    "ints in a float column": ['{"prompt": "a", "n": 1, "l": [1, null]}', '{"prompt": "b", "n": 2.5, "l": [0.5]}'],
    "whole numbers among floats": ['{"prompt": "a", "s": 0.5}', '{"prompt": "b", "s": 2}', '{"prompt": "c", "s": 2.0}',
                                   '{"prompt": "d", "s": 1e300}', '{"prompt": "e", "s": -0}', '{"prompt": "f"}',
                                   '{"prompt": "g", "s": 0.1, "t": 3}'],
    "keys a nested object leaves out": ['{"prompt": "a", "m": {"x": 1, "y": 2}}', '{"prompt": "b", "m": {"x": 3}}'],
    "bad row beside other columns": ['{"prompt": "", "n": 1}', '{"prompt": "b"}', '{"prompt": "c", "m": "z"}'],
    "lone surrogate in metadata": ['{"prompt": "a", "m": "\\ud800"}', '{"prompt": "b", "\\udc01": 1}', '{"prompt": "c"}'],
    "deep metadata": ['{"prompt": "a", "m": ' + "[" * 990 + "]" * 990 + "}", '{"prompt": "b"}',
                      '{"prompt": "c", "m": ' + "[" * 1200 + "]" * 1200 + "}"],
    "unterminated string": ['{"prompt": "broken', '{"prompt": "b"}'],
    "instruction with its input": [
        '{"instruction": "Sum up.", "input": "Text one.", "output": "1"}',
        '{"instruction": "Sum up.", "input": "Text  two.\\u00e9"}', '{"instruction": "Sum up.", "input": " \\n"}',
        '{"instruction": "Sum up.", "input": 3}', '{"instruction": "Sum up.", "context": "ctx"}',
        '{"instruction": null, "input": "orphan"}', '{"instruction": "Sum up.", "input": null, "context": "c2"}'],
    # pyarrow.json reads two objects on one line as two rows and one object over two lines as one:
    # the counts matched and every row after them took the next line's number and metadata
    "two objects on a line, one over two lines": [
        '{"prompt": "a", "s": 1.5} {"prompt": "b", "s": 1.5}', '{"prompt": "c", "s": 3.0}',
        '{"prompt": null, "s": 4.5}', '{"prompt": "d", "s": 5.5}', '{"prompt": "e",', ' "s": 6.5}'],
    "the same among blank lines and indentation": [
        '{"prompt": "a", "n": 1} {"prompt": "b", "n": 2}', '', '  {"prompt": "c", "n": 3}  ',
        '{"prompt": "d", "n": 4}', '{"prompt": "e",', '"n": 5}', '\t{"prompt": "f", "n": 6}'],
    "blank lines and indentation alone": ['', '  {"prompt": "a", "n": 1}', '', '\t{"prompt": "b", "n": 2}\r',
                                          '{"prompt": "c", "n": {"x": 3}}  '],
    # numbers pyarrow.json reads and Python's json does not
    "numbers only pyarrow reads": [
        '{"prompt": "a", "n": -NaN}', '{"prompt": "b", "n": 1.5}', '{"prompt": "c", "n": Inf}',
        '{"prompt": "d", "m": {"x": -Inf}}', '{"prompt": "e", "n": Infinity, "l": [NaN, -Infinity]}',
        '{"prompt": "f: Inf, -NaN]", "n": 2.5}'],
    "the same nested only": ['{"prompt": "d", "m": {"x": -Inf}}', '{"prompt": "e", "l": [Inf]}', '{"prompt": "g"}'],
}


@pytest.mark.parametrize("case", sorted(ROW_READER_CASES))
def test_jsonl_rows_come_out_as_the_row_reader_reads_them(tmp_path, case):
    """Whatever the block size (one line a block, or the whole file): the same rows, metadata byte
    for byte, quarantine rows, reasons and raw records as the row-by-row reference, and no row
    stops the job."""
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(ROW_READER_CASES[case]) + "\n")
    ref_rows, ref_bad = _reference_ingest(f, IngestConfig())
    runs = []
    for block_bytes in (1, 4 << 20):
        w = tmp_path / f"w{block_bytes}"
        ingest([str(f)], w, IngestConfig(block_bytes=block_bytes), progress=False)
        got = [(r["id"], r["prompt"], r["source"], r["metadata"]) for r in _all_rows(w)]
        assert got == ref_rows, block_bytes
        q = read_quarantine(w / "prompts")
        q = q.to_pylist() if q is not None else []
        assert [(r["row"], r["reason"]) for r in q] == ref_bad
        runs.append([r["raw"] for r in q])
    assert runs[0] == runs[1]
    assert [json.loads(m) for *_, m in ref_rows]  # every metadata string is JSON


def test_row_too_deep_to_write_is_quarantined_not_fatal():
    """A record the reader could build but JSON cannot write back (nested past the recursion
    limit) is a quarantine row with its reason; the rows around it are kept."""
    from guidealign.ingest.batch import Spec, rows_batch

    deep: list = []
    for _ in range(5000):
        deep = [deep]
    b = rows_batch("s", [(1, {"prompt": "a"}, None), (2, {"prompt": "b", "m": deep}, None),
                         (3, {"prompt": "c"}, None)], Spec("prompt", (), 100_000, "hashlib"))
    assert b.prompt.to_pylist() == ["a", "c"]
    assert b.bad_row == [2] and "nested too deeply to write as JSON" in b.bad_reason[0]
    assert "nested too deeply to show" in b.bad_raw[0]


@pytest.mark.parametrize("prompt_type", [pa.string(), pa.binary()])
def test_parquet_binary_metadata_comes_out_as_the_row_reader_reads_it(tmp_path, prompt_type):
    """Binary columns beside the prompt are decoded as the row reader decodes them (not written
    as Python's b'...'), an undecodable byte included; a string prompt goes columnar, a binary
    one row by row: the same metadata either way."""
    import pyarrow.parquet as pq

    f = tmp_path / "b.parquet"
    prompts = ["a", "b", "c"] if prompt_type == pa.string() else [b"a", b"b", b"c"]
    pq.write_table(pa.table({"prompt": pa.array(prompts, prompt_type),
                             "blob": pa.array([b"x", b"\xff", None], pa.binary()),
                             "fixed": pa.array([b"ab", b"cd", b"ef"], pa.binary(2))}), f)
    ref_rows, ref_bad = _reference_ingest(f, IngestConfig())
    ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    got = [(r["id"], r["prompt"], r["source"], r["metadata"]) for r in _all_rows(tmp_path / "w")]
    assert got == ref_rows and ref_bad == []
    assert [json.loads(m) for *_, m in got] == [{"blob": "x", "fixed": "ab"}, {"blob": "\udcff", "fixed": "cd"},
                                               {"fixed": "ef"}]


@pytest.mark.parametrize("bad", ["comma", ",,", "", '"', "\n"])
def test_a_delimiter_no_csv_parser_takes_is_refused_before_any_work(tmp_path, bad):
    """``ingest.delimiter=comma`` used to get through to csv.reader, which raised a TypeError
    mid-run; now it is refused up front, naming the setting."""
    src = tmp_path / "in.csv"
    src.write_text("prompt\nhello\n")
    with pytest.raises(IngestError, match="ingest.delimiter"):
        ingest([str(src)], tmp_path / "run", IngestConfig(delimiter=bad), progress=False)
    assert not (tmp_path / "run" / "prompts").exists()


@pytest.mark.parametrize("ok, text", [(";", "prompt;n\nhello;1\n"), ("tab", "prompt\tn\nhello\t1\n"),
                                      ("\\t", "prompt\tn\nhello\t1\n"), ("|", "prompt|n\nhello|1\n")])
def test_a_one_character_or_tab_delimiter_is_taken(tmp_path, ok, text):
    src = tmp_path / "in.csv"
    src.write_text(text)
    rep = ingest([str(src)], tmp_path / "run", IngestConfig(delimiter=ok), progress=False)
    assert rep.rows == 1 and rep.quarantined == 0


def test_a_file_rewritten_with_the_same_size_within_the_same_second_is_ingested_again(tmp_path):
    """Ingest told input files by size and mtime in whole seconds: a file rewritten with the
    same size within the same second was taken as already ingested (its old prompts kept)."""
    import json
    import os

    from guidealign.ingest.run import IngestConfig, ingest
    from guidealign.shards import iter_tables

    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Old question {i}?"}) + "\n" for i in range(3)))
    t = 1_700_000_000 * 10**9
    os.utime(f, ns=(t, t))
    ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    f.write_text("".join(json.dumps({"prompt": f"New question {i}?"}) + "\n" for i in range(3)))
    os.utime(f, ns=(t + 1_000_000, t + 1_000_000))  # 1 ms later: the same second
    rep = ingest([str(f)], tmp_path / "w", IngestConfig(), progress=False)
    prompts = [r["prompt"] for tb in iter_tables(tmp_path / "w" / "prompts") for r in tb.to_pylist()]
    assert rep.rows == 3 and sorted(prompts) == [f"New question {i}?" for i in range(3)]


def record_block_sizes(monkeypatch) -> list[int]:
    """The size of every block the CSV path cuts (and of what it held when a record ran too long)."""
    from guidealign.ingest import blocks, csvcol

    held: list[int] = []
    real = blocks.cut_blocks

    def recording(*a, **k):
        try:
            for item in real(*a, **k):
                held.append(len(item[0]))
                yield item
        except blocks.RecordTooLong as e:
            held.append(len(e.data))
            raise

    monkeypatch.setattr(csvcol, "cut_blocks", recording)
    return held


def count_csv_paths(monkeypatch) -> dict:
    """How many CSV blocks went the columnar way and how many row by row (counted as they go)."""
    from guidealign.ingest import csvcol

    used = {"columnar": 0, "rows": 0}
    parse = csvcol._parse

    def counting(*a, **k):
        out = parse(*a, **k)
        used["columnar" if out is not None else "rows"] += 1
        return out

    monkeypatch.setattr(csvcol, "_parse", counting)
    return used


@pytest.mark.parametrize("pattern", ["none", "all", "one_gap", "few_gaps", "rare_gaps", "every_other", "sliced_input"])
def test_shard_rows_taken_as_slices_equal_a_take(pattern):
    """A shard's kept rows of a block, taken as zero-copy slices of their runs (or by one take
    where there are many runs), are exactly ``take(at)``: the same values, in order, nulls included."""
    import numpy as np

    from guidealign.ingest.shard_table import rows_at as _rows_at

    rng = random.Random(7)
    values = [None if i % 97 == 5 else f"p{i}-" + "x" * rng.randrange(0, 40) for i in range(5000)]
    arr = pa.array(values, pa.string())
    if pattern == "sliced_input":  # a block column that is itself a slice (an offset into its buffers)
        arr = arr.slice(123, 4000)
    n = len(arr)
    at = {"none": np.zeros(0, np.int64), "all": np.arange(n),
          "one_gap": np.delete(np.arange(n), [n // 2]),
          "few_gaps": np.delete(np.arange(n), [10, 900, 901, 2500, 3000]),
          "rare_gaps": np.array(sorted(rng.sample(range(n), n - 40))),
          "every_other": np.arange(0, n, 2), "sliced_input": np.delete(np.arange(n), [0, 7, 8, 3999])}[pattern]
    at = np.asarray(at, dtype=np.int64)
    got = _rows_at(arr, at)
    assert got.type == pa.string()
    assert got.to_pylist() == arr.take(pa.array(at, pa.int64())).to_pylist()
    if pattern == "few_gaps":  # the case it exists for: a few runs, no copy of the prompts
        assert isinstance(got, pa.ChunkedArray) and got.num_chunks == 5
    if pattern == "rare_gaps":  # 40 gaps: one copy, since Parquet encodes many chunks slower
        assert isinstance(got, pa.Array)


def test_one_array_hands_back_a_single_chunk_without_copying_it():
    from guidealign.ingest.arrays import one_array

    a = pa.array(["a", "bb", None, "ccc"], pa.string())
    one = one_array(pa.chunked_array([a]))
    assert one.buffers()[2].address == a.buffers()[2].address  # no copy of the text
    two = one_array(pa.chunked_array([a, a.slice(1, 2)]))
    assert isinstance(two, pa.Array) and two.to_pylist() == ["a", "bb", None, "ccc", "bb", None]
    assert one_array(pa.chunked_array([], pa.string())).to_pylist() == []
