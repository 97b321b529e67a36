"""Stop 59: less work around ingest's kernels, with the same output.

- the deep-line check reads the long lines from the line scan's ends instead of probing for them;
- shard ids are stored with their lengths apart (Parquet DELTA_LENGTH_BYTE_ARRAY);
- a shard's rows are copied once where a block left many runs of them (not sliced), and a
  block's metadata JSON is built by the shard encoders (``shard_table.Later``);
- the sync thread makes the groups written meanwhile durable together;
- a command given no config file or override never loads PyYAML.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from guidealign.config.ingest import IngestConfig
from guidealign.ingest import commit, run
from guidealign.ingest.commit import Pending, ShardWriter
from guidealign.ingest.jsonl import has_deep_line, scan_lines
from guidealign.shards.marker import read_marker


def _piece(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.3:
        return b"[" * rng.randrange(0, 1200) + b"]" * rng.randrange(0, 1200)
    if r < 0.5:
        return b"{" + b'"a":{' * rng.randrange(0, 700) + b"}" * rng.randrange(0, 700)
    if r < 0.7:
        return b"x" * rng.randrange(0, 5000)
    if r < 0.8:
        return b"\n" * rng.randrange(1, 3)
    return b'{"prompt":"' + b"w " * rng.randrange(0, 3000) + b'"}'


@pytest.mark.parametrize("compiled", [False, True])
def test_deep_line_check_from_line_ends_answers_as_the_probe(compiled):
    """Blocks of long and short lines, brackets nested past and below the limit, a last line
    with and without its line end: the check given the scan's line ends says what probing says."""
    rng = random.Random(59)
    said = {True: 0, False: 0}
    for _ in range(400):
        block = b"".join(_piece(rng) + (b"\n" if rng.random() < 0.6 else b"") for _ in range(rng.randrange(1, 12)))
        ends = scan_lines(np.frombuffer(block, np.uint8), compiled=compiled).ends
        for limit, long_line in ((500, 4096), (100, 300), (1000, 2000)):
            probe = has_deep_line(block, limit, long_line)
            assert has_deep_line(block, limit, long_line, ends=ends) == probe, (block[:80], limit, long_line)
            said[probe] += 1
    assert said[True] > 100 and said[False] > 100  # both answers were tested
    # at the boundary: a deep line of exactly ``long_line`` bytes is looked at, one byte less is not
    for size, deep in ((299, False), (300, True), (301, True)):
        line = b"[" * (size // 2) + b"]" * (size - size // 2)
        for block in (b"x\n" + line + b"\n", b"x\n" + line, line + b"\n" + b"y" * 400):
            ends = scan_lines(np.frombuffer(block, np.uint8), compiled=compiled).ends
            assert has_deep_line(block, 100, 300) is deep
            assert has_deep_line(block, 100, 300, ends=ends) is deep


def _ingest(tmp_path, rows, **cfg):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = run.ingest([str(src)], tmp_path / "w", IngestConfig(**cfg), progress=False)
    return rep, tmp_path / "w" / "prompts"


def test_shard_ids_are_stored_with_their_lengths_apart_and_read_back_unchanged(tmp_path):
    rows = [{"prompt": f"question {i} about {i % 7}", "n": i} for i in range(500)]
    rep, dst = _ingest(tmp_path, rows, shard_rows=200)
    assert rep.shards == 3
    for i in range(rep.shards):
        path = dst / f"shard-{i:05d}.parquet"
        col = {c.path_in_schema: c for c in (pq.ParquetFile(path).metadata.row_group(0).column(k) for k in range(4))}
        assert "DELTA_LENGTH_BYTE_ARRAY" in col["id"].encodings
        assert all("DELTA_LENGTH_BYTE_ARRAY" not in col[c].encodings for c in ("prompt", "source", "metadata"))
        assert col["id"].compression == "ZSTD"
    table = ds.dataset(sorted(map(str, dst.glob("shard-*.parquet"))), format="parquet").to_table()
    assert sorted(table.column("prompt").to_pylist()) == sorted(r["prompt"] for r in rows)
    assert all(len(x) == 16 and int(x, 16) >= 0 for x in table.column("id").to_pylist())
    from guidealign.core.ids import prompt_hash

    by_prompt = dict(zip(table.column("prompt").to_pylist(), table.column("id").to_pylist()))
    assert all(by_prompt[r["prompt"]] == prompt_hash(r["prompt"]).hex() for r in rows)


def test_shard_rows_from_many_runs_are_copied_once_and_from_few_runs_sliced(tmp_path, monkeypatch):
    """Many dropped rows in a shard (many runs of kept ones): the shard's prompt column is one
    array when encoded; a shard with one dropped row keeps the zero-copy slices. Same rows either way."""
    seen = []
    encode = commit.parquet_bytes

    def spy(table, **options):
        if "id" in table.column_names:
            seen.append(table.column("prompt").num_chunks)
        return encode(table, **options)

    monkeypatch.setattr(commit, "parquet_bytes", spy)
    rows = [{"prompt": "" if i % 100 == 3 else f"question {i}"} for i in range(2000)]  # 21 runs
    rep, dst = _ingest(tmp_path, rows, shard_rows=5000)
    assert rep.shards == 1 and rep.quarantined == 20 and seen == [1]
    seen.clear()
    rows = [{"prompt": "" if i == 700 else f"question {i}"} for i in range(2000)]  # 2 runs
    rep, dst = _ingest(tmp_path / "b", rows, shard_rows=5000)
    assert rep.shards == 1 and seen == [2]
    got = pq.read_table(dst / "shard-00000.parquet").column("prompt").to_pylist()
    assert got == [r["prompt"] for r in rows if r["prompt"]]


def _table(i):
    return pa.table({"id": [f"{i:016x}"], "prompt": [f"p{i}"], "source": ["s"], "metadata": ["{}"]})


def test_groups_written_while_the_sync_thread_works_are_made_durable_together(tmp_path, monkeypatch):
    """The first group's sync is held until the writer has written several more: those are then
    made durable in one pass, and every shard still gets its file and its marker, in order."""
    release = threading.Event()
    passes = []
    durable = ShardWriter._make_durable

    def held(self, w):
        if not passes:
            assert release.wait(20)
        passes.append([m.index for m in w.markers])
        return durable(self, w)

    monkeypatch.setattr(ShardWriter, "_make_durable", held)
    dst = tmp_path / "d"
    writer = ShardWriter(dst, max_pending=1, max_group=1, encoders=1)
    for i in range(6):
        writer.submit(Pending(i, f"fp{i}", lambda i=i: (_table(i), None), 0.0, {}))
        if i == 4:
            release.set()
    writer.close()
    assert [i for p in passes for i in p] == list(range(6))  # each once, in order
    assert len(passes) < 6 and max(len(p) for p in passes) > 1
    for i in range(6):
        assert read_marker(dst, i).fingerprint == f"fp{i}"
        assert pq.read_table(dst / f"shard-{i:05d}.parquet").column("prompt").to_pylist() == [f"p{i}"]
    assert not [p for p in os.listdir(dst) if p.endswith(".tmp")]


def _cli(tmp_path, *args) -> dict:
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a question"}\n{"prompt": "another one"}\n')
    code = ("import json, sys\n"
            "from guidealign.cli import main\n"
            f"sys.argv = ['guidealign', 'ingest', {str(src)!r}, '-w', {str(tmp_path / 'w')!r}, '--no-progress', *{list(args)!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "print(json.dumps({'rc': code, 'yaml': 'yaml' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ingest_without_a_config_file_or_override_never_loads_yaml(tmp_path):
    assert _cli(tmp_path) == {"rc": 0, "yaml": False}


def test_an_override_still_reads_as_yaml_and_a_bad_one_is_still_a_usage_error(tmp_path):
    assert _cli(tmp_path, "--set", "ingest.shard_rows=5") == {"rc": 0, "yaml": True}
    assert _cli(tmp_path, "--set", "ingest.shard_rows=[") == {"rc": 2, "yaml": True}


def test_blocks_read_before_the_kernels_are_loaded_give_the_same_shards(tmp_path, monkeypatch):
    """The parse thread does not wait for the line scan's and reader's kernels: a block read
    while they load goes the numpy and pyarrow.json way. Here the first 5 blocks find them "not
    loaded" (as while the kernel thread works): the shards and quarantine are those of a run that
    had them from the start, and of a run without them."""
    pytest.importorskip("llvmlite")
    from guidealign.ingest import jsonl, llvm_build

    assert jsonl.scan_kernel() is not None
    rows = [{"prompt": "" if i % 37 == 1 else f"question {i % 900} of {i % 11}", "n": i} for i in range(4000)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = []
    real = jsonl.flat_table
    monkeypatch.setattr(jsonl, "flat_table", lambda *a: read.append(real(*a)) or read[-1])

    def run_with(name, kernel, late_blocks):
        asked = []
        really = llvm_build.loaded
        def late(*what):
            if what != ("line-end", "flat JSON"):  # (the hash kernel, asked for too)
                return really(*what)
            asked.append(what)
            return len(asked) > late_blocks and really(*what)

        monkeypatch.setattr(jsonl, "loaded", late)
        read.clear()
        cfg = IngestConfig(block_bytes=4096, shard_rows=300, hash_kernel=kernel)
        rep = run.ingest([str(src)], tmp_path / name, cfg, progress=False)
        dst = tmp_path / name / "prompts"
        shards = [pq.read_table(p).to_pylist() for p in sorted(dst.glob("shard-*.parquet"))]
        quarantine = [pq.read_table(p).to_pylist() for p in sorted(dst.rglob("quarantine/*.parquet"))]
        return (shards, quarantine, rep.rows, rep.duplicates, rep.quarantined), len(read), len(asked)

    late, late_read, blocks = run_with("late", "llvm", 5)
    ready, ready_read, _ = run_with("ready", "llvm", 0)
    assert blocks > 20 and late_read == blocks - 5 and ready_read == blocks
    without, without_read, _ = run_with("without", "hashlib", 0)
    assert without_read == 0
    assert late == ready == without and late[0]


def test_a_dedup_set_sized_for_its_hashes_answers_alike_without_rebuilding_its_filter(tmp_path):
    from guidealign.ingest.dedup import EXPECTED_MAX, HashSet

    rng = np.random.default_rng(59)
    blocks = [rng.integers(0, 2**63, 5000, dtype=np.int64).astype(np.uint64) for _ in range(60)]
    for b in blocks[1:]:
        b[:50] = blocks[0][:50]  # repeats across blocks
        b[50:60] = b[60:70]      # and within one
    answers, filters = {}, {}
    for expected in (0, 300_000):
        with HashSet(memory_hashes=1 << 16, spill_dir=tmp_path, expected=expected) as s:
            first = s.filter
            answers[expected] = [s.add_new(b).tolist() for b in blocks]
            filters[expected] = (s.filter is first, len(s))
    assert answers[0] == answers[300_000]
    assert filters[300_000] == (True, filters[0][1]) and filters[0][0] is False  # rebuilt only without
    seen, want = set(), []
    for b in blocks:
        want.append([not (x in seen or seen.add(x)) for x in b.tolist()])
    assert answers[0] == want
    assert HashSet(expected=10 * EXPECTED_MAX).filter.words.nbytes == HashSet(expected=EXPECTED_MAX).filter.words.nbytes


# --- kernels as shared libraries -----------------------------------------------------------------

def _scan_build(monkeypatch, so_path):
    pytest.importorskip("llvmlite")
    from guidealign.ingest import llvm_build, scan_llvm

    monkeypatch.setattr(llvm_build, "shared_library_file", lambda source: so_path)
    owner, addrs = llvm_build.build(scan_llvm._module, Path(scan_llvm.__file__), [scan_llvm.FUNC])
    fn = scan_llvm._CFUNC(addrs[scan_llvm.FUNC])
    scan_llvm._self_test(fn)  # raises unless it finds what numpy finds
    return owner, fn


@pytest.mark.skipif(shutil.which("ld") is None, reason="no linker on PATH")
def test_a_kernel_is_linked_once_and_then_loaded_as_a_library(tmp_path, monkeypatch):
    import ctypes

    so = tmp_path / "scan.so"
    owner, _ = _scan_build(monkeypatch, so)
    assert so.is_file() and not isinstance(owner, ctypes.CDLL)  # built with the JIT, then linked
    owner, _ = _scan_build(monkeypatch, so)
    assert isinstance(owner, ctypes.CDLL)  # the next load: the library, no JIT
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_without_a_linker_a_kernel_loads_with_the_jit_and_no_library_is_made(tmp_path, monkeypatch):
    import ctypes

    from guidealign.ingest import llvm_build

    monkeypatch.setattr(llvm_build.shutil, "which", lambda name: None)
    so = tmp_path / "scan.so"
    owner, _ = _scan_build(monkeypatch, so)
    assert not so.exists() and not isinstance(owner, ctypes.CDLL)


@pytest.mark.skipif(shutil.which("ld") is None, reason="no linker on PATH")
def test_a_damaged_library_is_replaced_not_trusted(tmp_path, monkeypatch, caplog):
    import ctypes

    so = tmp_path / "scan.so"
    so.write_bytes(b"\x7fELF not really a library")
    with caplog.at_level("WARNING"):
        owner, _ = _scan_build(monkeypatch, so)
    assert "does not load" in caplog.text and not isinstance(owner, ctypes.CDLL)
    assert isinstance(_scan_build(monkeypatch, so)[0], ctypes.CDLL)  # linked again, and loads


def test_the_library_key_follows_the_source_and_the_cpu(tmp_path, monkeypatch):
    pytest.importorskip("llvmlite")
    from guidealign.ingest import llvm_build

    if llvm_build._cpu_id() is None:
        pytest.skip("no /proc/cpuinfo here: no shared libraries")
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("x = 2\n")
    first = llvm_build.shared_library_file(a)
    assert first == llvm_build.shared_library_file(a) and first != llvm_build.shared_library_file(b)
    assert first.parent == tmp_path / "__pycache__" and first.suffix == ".so"
    monkeypatch.setattr(llvm_build, "_cpu_id", lambda: "model name: another CPU\nflags: sse2")
    assert llvm_build.shared_library_file(a) != first


def test_a_fresh_process_loads_the_cached_kernels_without_llvmlites_binding():
    pytest.importorskip("llvmlite")
    if shutil.which("ld") is None:
        pytest.skip("no linker on PATH")
    code = ("import sys\n"
            "from guidealign.ingest.blake2_llvm import kernel as b\n"
            "from guidealign.ingest.scan_llvm import kernel as s\n"
            "from guidealign.ingest.flatjson_llvm import kernels as j\n"
            "ok = all(f() is not None for f in (b, s, j))\n"
            "print(ok, 'llvmlite.binding' in sys.modules)\n")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            for _ in range(2)]  # the first may build and link them (a fresh clone); the second loads
    assert runs[1].stdout.split() == ["True", "False"], runs[1].stderr


def test_dedup_helpers_give_what_numpy_unique_gives():
    from guidealign.ingest.dedup import _distinct_sorted, _first_of_each

    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 10, 1000):
        for hi in (1, 3, 50, 2**60):
            v = rng.integers(0, hi, n).astype(np.uint64)
            assert np.array_equal(_distinct_sorted(np.sort(v)), np.unique(v))
            assert np.array_equal(_first_of_each(v), np.unique(v, return_index=True)[1])


def test_a_later_column_is_made_once_whichever_threads_ask():
    from guidealign.ingest.shard_table import Later, column

    made, gate = [], threading.Event()

    def make():
        gate.wait(5)
        made.append(1)
        return pa.array(["{}"] * 3)

    later = Later(make)
    got = []
    threads = [threading.Thread(target=lambda: got.append(column(later))) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert made == [1] and len(got) == 4 and all(g is got[0] for g in got)
    plain = pa.array(["{}"])
    assert column(plain) is plain


def test_ingest_shortens_the_switch_interval_while_it_runs_and_gives_it_back(tmp_path, monkeypatch):
    seen = []
    add = run._Shards.add
    monkeypatch.setattr(run._Shards, "add", lambda self, b, s: seen.append(sys.getswitchinterval()) or add(self, b, s))
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        _ingest(tmp_path, [{"prompt": f"q{i}"} for i in range(50)])
        assert seen and all(v == pytest.approx(run.SWITCH_INTERVAL) for v in seen)
        assert sys.getswitchinterval() == pytest.approx(0.004)
        with pytest.raises(run.IngestError):  # given back after a failed run too
            run.ingest([str(tmp_path / "in.jsonl")], tmp_path / "w2", IngestConfig(shard_cut="nowhere"), progress=False)
        seen.clear()
        (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "a"}\n' * 10)
        monkeypatch.setattr(run._Shards, "add", lambda self, b, s: (_ for _ in ()).throw(OSError("disk gone")))
        with pytest.raises(OSError):
            run.ingest([str(tmp_path / "bad.jsonl")], tmp_path / "w3", IngestConfig(), progress=False)
        assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.skipif(shutil.which("ld") is None, reason="no linker on PATH")
def test_a_library_that_cannot_be_loaded_here_is_not_kept_nor_linked_again(tmp_path, monkeypatch):
    """As on a file system mounted noexec: the library links but does not load. It is not kept,
    a note says so, and the next runs neither link it again nor warn: the JIT loads the kernel."""
    import ctypes

    from guidealign.ingest import llvm_build

    real_cdll, links = ctypes.CDLL, []

    def noexec(path, *a, **k):
        if str(path).startswith(str(tmp_path)):
            raise OSError(f"{path}: failed to map segment from shared object")
        return real_cdll(path, *a, **k)

    real_run = llvm_build.subprocess.run
    monkeypatch.setattr(llvm_build.ctypes, "CDLL", noexec)
    monkeypatch.setattr(llvm_build.subprocess, "run", lambda *a, **k: links.append(a) or real_run(*a, **k))
    so = tmp_path / "scan.so"
    for _ in range(3):
        owner, _ = _scan_build(monkeypatch, so)
        assert not isinstance(owner, real_cdll)
    assert not so.exists() and so.with_suffix(".nolib").is_file() and len(links) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ingests_running_at_once_give_the_switch_interval_back_when_the_last_ends():
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        first = run._shorter_switches()
        second = run._shorter_switches()
        assert sys.getswitchinterval() == pytest.approx(run.SWITCH_INTERVAL)
        first()  # the first to start ends first: the second still runs
        assert sys.getswitchinterval() == pytest.approx(run.SWITCH_INTERVAL)
        second()
        assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(before)


def test_prompts_hashed_ahead_by_the_parse_thread_give_the_batch_the_caller_makes(monkeypatch):
    """Blocks of ASCII strings with single spaces: empty, blank and too-long prompts, rows
    without the prompt key, a renamed prompt key (an alias), repeats. table_batch given the spans
    and hashes made ahead gives the batch it makes itself, with the kernel and with hashlib."""
    pytest.importorskip("llvmlite")
    from guidealign.ingest import batch
    from guidealign.ingest.batch import Spec, table_batch
    from guidealign.ingest.jsonl import hashes_ahead

    hashed = []
    real_hash = batch.hash_spans
    monkeypatch.setattr(batch, "hash_spans", lambda *a: hashed.append(1) or real_hash(*a))
    taken = 0
    rng = random.Random(3)
    spec = Spec("prompt", ("question",), 60, "llvm")
    made = 0
    for t in range(60):
        key = "question" if t % 5 == 0 else "prompt"
        rows = []
        for i in range(rng.randrange(1, 80)):
            r = rng.random()
            p = ("" if r < 0.1 else " " if r < 0.15 else " a b " if r < 0.2 else "x " * 40 if r < 0.25
                 else f"question {rng.randrange(30)} about {'y ' * rng.randrange(5)}".strip())
            rows.append({"n": i} if r > 0.985 else {key: p, "n": i})
        table = pa.Table.from_pylist(rows)
        ahead = hashes_ahead(table, spec)
        assert ahead is not None and ahead.key == key
        made += 1
        linenos = np.arange(1, table.num_rows + 1)
        fallback = lambda i, rows=rows: (rows[i], None)  # noqa: E731
        for kernel in ("llvm", "hashlib"):
            s = Spec("prompt", ("question",), 60, kernel)
            want = table_batch("f", table, linenos, s, fallback, True, True)
            hashed.clear()
            got = table_batch("f", table, linenos, s, fallback, True, True, ahead=ahead)
            taken += not hashed  # the caller hashed nothing: it took what was made ahead
            for field in ("pos", "at", "hashes", "lineno"):
                assert np.array_equal(getattr(got, field), getattr(want, field)), (t, field)
            assert (got.bad_pos, got.bad_reason) == (want.bad_pos, want.bad_reason)
    assert made == 60 and taken > 30  # (a block with a row lacking the prompt goes the usual way)
    # no plain prompt column: nothing made ahead
    assert hashes_ahead(pa.table({"messages": [[{"role": "user", "content": "hi"}]]}), spec) is None
    assert hashes_ahead(pa.table({"n": [1, 2]}), spec) is None


def test_on_a_read_only_install_the_kernels_still_load_with_the_jit(tmp_path, monkeypatch):
    """A package on a read-only mount (a container image): writing the object or the library
    fails with EROFS, and so does removing a file that is not there. The kernel still loads
    (with the JIT, compiled this run), and a library that does not load is left in place."""
    import errno

    real_unlink, real_write = Path.unlink, Path.write_bytes

    def read_only(fn):
        def refuse(self, *a, **k):
            if str(self).startswith(str(tmp_path)):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return fn(self, *a, **k)
        return refuse

    monkeypatch.setattr(Path, "unlink", read_only(real_unlink))
    monkeypatch.setattr(Path, "write_bytes", read_only(real_write))
    so = tmp_path / "scan.so"
    owner, _ = _scan_build(monkeypatch, so)
    assert owner is not None and not so.exists()
    (tmp_path / "bad.so").write_text("not a library")  # (write_text is not refused here)
    owner, _ = _scan_build(monkeypatch, tmp_path / "bad.so")
    assert owner is not None and (tmp_path / "bad.so").exists()


def test_a_loaded_kernel_is_handed_out_while_another_one_builds():
    """``load`` of a kernel already loaded does not wait for the lock a build holds."""
    pytest.importorskip("llvmlite")
    from guidealign.ingest import llvm_build, scan_llvm

    assert scan_llvm.kernel() is not None
    got = []
    with llvm_build._LOCK:  # as while the kernel thread builds another kernel
        t = threading.Thread(target=lambda: got.append(scan_llvm.kernel()))
        t.start()
        t.join(10)
        assert not t.is_alive() and got and got[0] is not None
