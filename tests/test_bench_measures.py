"""What the bench/ scripts measure: both sides of each ratio doing the same work, and
bench/all.py reading the figure each script prints. No engine: the runs are faked."""
from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# --- bench/ingest.py ---------------------------------------------------------------------

def _summary(rows_in: int, seconds: float) -> str:
    from guidealign.ingest.run import IngestReport

    return IngestReport(files=1, rows_in=rows_in, rows=rows_in - 20, duplicates=10, quarantined=10,
                        shards=1, written=1, seconds=seconds, dedup_memory_mib=0.5).summary()


class FakeChildren:
    """Stands in for ingest.py's run_child: fixed figures per tool, and a log of the calls."""

    def __init__(self, mod, rows: int, pa_cpu=(0.7,), pa_cpu_process=(0.9,), ing_cpu=(2.0,)):
        self.mod, self.rows, self.calls = mod, rows, []
        self.pa_cpu, self.pa_cpu_process, self.ing_cpu = list(pa_cpu), list(pa_cpu_process), list(ing_cpu)
        self.n_pa = self.n_ing = 0

    def __call__(self, code, *args, prefault=True):
        if code == self.mod.PYARROW:
            Path(args[1]).write_bytes(b"")  # compare() removes it
            k = self.n_pa
            self.n_pa += 1
            self.calls.append(("pyarrow", prefault))
            return {"rows_in": self.rows, "seconds": 0.5, "cpu": self.pa_cpu[k % len(self.pa_cpu)],
                    "cpu_process": self.pa_cpu_process[k % len(self.pa_cpu_process)], "peak_rss_mib": 500.0, "process_seconds": 0.7}
        assert code == self.mod.INGEST
        k = self.n_ing % len(self.ing_cpu)
        self.n_ing += 1
        self.calls.append(("ingest", prefault))
        return {"summary": _summary(self.rows, 1.0), "seconds": 1.25, "cpu": self.ing_cpu[k],
                "peak_rss_mib": 340.0, "process_seconds": 1.3}


def test_ingest_cpu_ratio_counts_whole_processes_on_both_sides():
    ing = _load("ingest")
    pa_r = {"rows_in": 1000, "seconds": 0.5, "cpu": 0.7, "cpu_process": 0.9, "process_seconds": 0.7}
    ig = {"rows_in": 1000, "seconds": 1.25, "cpu": 2.0, "inner_rate": 1000 / 1.0}
    r = ing.pair_ratios(pa_r, ig)
    # ingest's CPU figure is its whole process, so pyarrow's must be too (not 0.7 / 2.0)
    assert r["cpu"] == pytest.approx(0.9 / 2.0)
    assert r["ratio"] == pytest.approx(0.5 / 1.25)       # ingest's whole process vs pyarrow's work
    assert r["process"] == pytest.approx(0.7 / 1.25)     # both whole processes
    assert r["inner"] == pytest.approx(0.5 / 1.0)        # both without start and imports


def test_ingest_pyarrow_child_reports_its_whole_process_cpu(tmp_path):
    ing = _load("ingest")
    src = tmp_path / "in.jsonl"
    ing.make_input(src, 200)
    out = subprocess.run([sys.executable, "-c", ing.PYARROW, str(src), str(tmp_path / "o.parquet")],
                         check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["rows_in"] == 200
    # interpreter start and the pyarrow imports are in cpu_process, not in cpu
    assert r["cpu_process"] > r["cpu"] >= 0


def test_ingest_back_to_back_runs_are_not_separated_by_the_memory_toucher(tmp_path, monkeypatch):
    ing = _load("ingest")
    fake = FakeChildren(ing, rows=1000)
    monkeypatch.setattr(ing, "run_child", fake)
    ing.compare(tmp_path / "in.jsonl", tmp_path, [], repeats=2, label="JSONL")
    # untimed pair, 2 timed pairs (all touched first), then pyarrow twice and ingest twice in a row
    assert fake.calls[:6] == [("pyarrow", True), ("ingest", True)] * 3
    assert fake.calls[6:] == [("pyarrow", True), ("pyarrow", False), ("ingest", True), ("ingest", False)]


def test_ingest_medians_over_the_per_pair_ratios(tmp_path, monkeypatch):
    ing = _load("ingest")
    # the untimed first pair is index 0 of each list; the 3 timed pairs follow
    fake = FakeChildren(ing, rows=1000, pa_cpu_process=(9.0, 0.9, 1.2, 0.6, 5, 5, 5),
                        ing_cpu=(1.0, 2.0, 2.0, 2.0, 5, 5, 5))
    monkeypatch.setattr(ing, "run_child", fake)
    res = ing.compare(tmp_path / "in.jsonl", tmp_path, [], repeats=3, label="JSONL")
    assert res["cpu"] == pytest.approx(statistics.median([0.9 / 2.0, 1.2 / 2.0, 0.6 / 2.0]))
    assert res["ratio"] == pytest.approx((1000 / 1.25) / (1000 / 0.5))


def test_all_reads_the_figures_ingest_prints(tmp_path, monkeypatch, capsys):
    ing, al = _load("ingest"), _load("all")
    fake = FakeChildren(ing, rows=1000)
    monkeypatch.setattr(ing, "run_child", fake)
    monkeypatch.setattr(sys, "argv", ["ingest.py", "--rows", "1000", "--mem-rows", "2000", "--repeats", "1",
                                      "--dir", str(tmp_path / "b")])
    ing.main()
    out = capsys.readouterr().out
    rows = dict(al.rows_ingest({}, out))
    figs = list(rows.values())
    assert figs[0] == f"{(1000 / 1.25) / (1000 / 0.5):.2f}x"      # headline
    assert figs[1] == f"{0.7 / 1.25:.2f}x"                        # both whole processes
    assert figs[2] == f"{(1000 / 1.0) / (1000 / 0.5):.2f}x"       # inside the process
    assert figs[3] == f"{(1000 / 1.25) / (1000 / 0.5):.2f}x"      # CSV
    assert [k for k in rows if k.startswith("ingest peak RSS")] == ["ingest peak RSS, 2,000 vs 1,000 rows (flat = 1.0)"]
    assert "CPU seconds (both whole processes) 0.45x" in out


# --- bench/all.py --------------------------------------------------------------------------

def test_all_detect_quality_row_is_recall_and_fp_rate_not_the_last_line():
    al = _load("all")
    res = {"results": {"builtin": {"summary": {"dna_n": 24, "vicuna_n": 24, "recall": 0.75, "fp_rate": 0.125,
                                               "dna_unparsed": 1, "vicuna_unparsed": 2}}}}
    out = "...\n  builtin recall by risk area: Misinformation: 100% of 3\n"
    rows = al.EXTRACT["detect_quality"](res, out)
    assert len(rows) == 1
    assert "Do-Not-Answer" in rows[0][0] and rows[0][1] == "75.0% / 12.5% (3)"
    # skipped (no benchmarks: no JSON): the script's own last line
    assert al.EXTRACT["detect_quality"]({}, "skipped: x not present\n") == [("detect_quality", "skipped: x not present")]


def test_all_chaos_row_counts_every_failing_kind():
    al = _load("all")
    res = [{"stage": "ingest", "kills": 2, "lost": 0, "duplicated": 0, "differ": 0, "extra": 1, "rewritten": 0},
           {"stage": "index", "kills": 2, "lost": 0, "duplicated": 0, "differ": 0, "extra": 0, "rewritten": 1}]
    (what, fig), = al.rows_chaos(res, "")
    assert fig.endswith("2 stage(s) failing")



def test_all_lists_a_benchmark_that_needs_finished_runs_with_the_reason_and_runs_nothing(monkeypatch, capsys):
    al = _load("all")
    ran = []
    monkeypatch.setattr(al, "run_one", lambda *a, **k: ran.append(a) or (0, 0.0, "", {}, ""))
    monkeypatch.setattr(al.sys, "argv", ["all.py", "--only", "finish_rate"])
    al.main()
    out = capsys.readouterr().out
    assert not ran
    assert "| finish_rate | not run here: it needs runs that got through retrieve" in out

# --- bench/gen.py --------------------------------------------------------------------------

def test_gen_structured_guidelines_runs_read_the_same_detect_output(tmp_path, monkeypatch):
    import pyarrow as pa

    import guidealign.gen.detect as gd
    import guidealign.gen.guidelines as gg
    import guidealign.shards as shards

    gen = _load("gen")
    seen = []

    def fake_detect(cfg, wd, llm=None, progress=True):
        d = Path(wd) / "detect"
        d.mkdir()
        (d / "which").write_text(f"detect structured={cfg.detect.structured}")
        return SimpleNamespace(rows=4)

    def fake_guidelines(cfg, wd, llm=None, progress=True):
        seen.append((cfg.guidelines.structured, (Path(wd) / "detect" / "which").read_text()))
        (Path(wd) / "guidelines").mkdir()
        return SimpleNamespace(rows=4)

    def fake_tables(d, columns=None):
        yield pa.table({"finish_reason": ["stop"] * 4, "risky": [True, False, None, True],
                        "guidelines": [[{"title": "t", "text": "x"}] * 5] * 4})

    monkeypatch.setattr(gd, "run_detect", fake_detect)
    monkeypatch.setattr(gg, "run_guidelines", fake_guidelines)
    monkeypatch.setattr(shards, "iter_tables", fake_tables)
    args = SimpleNamespace(model="m", dtype="float32", max_model_len=2048, max_num_seqs=8, kv_gib=1,
                           temperature=0.7, max_tokens=16, shard_rows=0, prompts=4, guidelines_max_tokens=32)
    llm = SimpleNamespace(reset_prefix_cache=lambda: None)
    out = gen.structured_compare(args, llm, tmp_path)
    assert [s for s, _ in seen] == [False, True]
    assert {w for _, w in seen} == {"detect structured=False"}
    assert set(out) >= {"on", "off", "detect_speed_ratio_on_off", "guidelines_speed_ratio_on_off"}
    assert not (tmp_path / "detect.off").exists()


# --- bench/chaos.py ------------------------------------------------------------------------

def test_chaos_counts_a_failing_rerun_of_the_finished_stage(tmp_path, monkeypatch):
    import guidealign.shards.verify as verify

    ch = _load("chaos")
    rcs = iter([0, 1])  # the last episode finishes; its rerun fails
    monkeypatch.setattr(ch, "run_stage", lambda st, w, args, log, kill_after=None: (False, next(rcs), 0.1))
    monkeypatch.setattr(ch, "commit_records", lambda st, w: {})
    monkeypatch.setattr(ch, "compare", lambda *a: None)
    monkeypatch.setattr(ch, "orphan_temps", lambda w: [])
    monkeypatch.setattr(verify, "verify_run", lambda w: SimpleNamespace(failing=[]))
    (tmp_path / "ref").mkdir()
    res = ch.chaos_stage(ch.BY_NAME["ingest"], tmp_path / "ref", tmp_path, 1.0,
                         SimpleNamespace(kills=0), rng=None)
    assert res.bad and any("rerun" in n for n in res.notes)


# --- bench/retrieval.py --only merge -------------------------------------------------------

def test_merge_bench_compares_with_every_pair_and_all_reads_its_rows(tmp_path):
    """The merge bench runs the library's settings and the exhaustive reference on the same
    texts; a looser search (3 neighbours, min_cosine 0.9) must show as missed merges."""
    al = _load("all")
    figs = {}
    for name, sets in (("default", []), ("loose", ["--set", "library.neighbors=3", "--set", "library.min_cosine=0.9"])):
        out = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, str(REPO / "bench" / "retrieval.py"), "--only", "merge",
                        "--merge-texts", "400", "--json", str(out), *sets], check=True, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
        figs[name] = json.loads(out.read_text())["merge"]
    for name, m in figs.items():
        for kind in ("words", "typos"):
            r = m[kind]
            assert r["clusters_mixed"] == 0 and r["library_ours"] >= r["library_exhaustive"]
            assert r["size_ratio"] == r["library_ours"] / r["library_exhaustive"]
    assert figs["default"]["typos"]["size_ratio"] == 1.0
    assert figs["loose"]["typos"]["size_ratio"] > 1.0
    rows = dict(al.rows_retrieval({"merge": figs["loose"]}, ""))
    typos = [v for k, v in rows.items() if "(typos)" in k]
    assert typos == [f"{figs['loose']['typos']['size_ratio']:.3f} ({figs['loose']['typos']['library_ours']:,} "
                     f"vs {figs['loose']['typos']['library_exhaustive']:,})"]
