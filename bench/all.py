"""Every benchmark in bench/ in a short mode, then the README's figures table.

    ./run.sh bench                       # all of them (about 15 minutes on 2 idle cores)
    .venv/bin/python bench/all.py --only gen,detect_modes
    .venv/bin/python bench/all.py --skip chaos --timeout 900

Each benchmark runs as its own subprocess (its output is shown as it comes) with a short
set of arguments and ``--json`` where it has one; every figure in the table is a ratio (or
a count) measured within that one run, so machines of any speed give comparable figures.
A benchmark script that this file does not know is run with ``--short`` when its ``--help``
offers it, and listed as skipped otherwise. A benchmark that fails or times out is listed
with its exit status; the others still run. Exit status: 1 when any benchmark failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# name -> short arguments (a JSON path is appended as --json PATH when "json" is True)
SHORT = {
    "ingest": {"args": ["--short"], "json": False},
    "dedup": {"args": ["--hashes", "3000000"], "json": False},
    "gen": {"args": ["--short"], "json": True},
    "detect_modes": {"args": ["--short"], "json": True},
    "retrieval": {"args": ["--guidelines", "100000", "--embed-texts", "500", "--repeats", "1",
                           "--queries", "20000", "--kinds", "flat", "--merge-texts", "5000",
                           "--bm25-queries", "200"], "json": True},
    "chaos": {"args": ["--kills", "2", "--prompts", "8", "--shard-rows", "2"], "json": True},
    "detect_quality": {"args": ["--limit", "24", "--max-tokens", "160"], "json": True},
}
# benchmarks that cannot run in a short mode on their own, and why (listed, not run)
BY_HAND = {"finish_rate": "not run here: it needs runs that got through retrieve (-w WORKDIR); "
                          "see bench/finish_rate.py"}
ORDER = ["ingest", "dedup", "gen", "detect_modes", "retrieval", "detect_quality", "chaos"]


def _f(x, fmt=".2f", default="-"):
    return default if x is None else format(x, fmt)


def rows_ingest(res, out) -> list[tuple[str, str]]:
    ratio = re.findall(r"ratio ingest / pyarrow: ([\d.]+)x", out)
    mem = re.findall(r"peak RSS ([\d,]+) / ([\d,]+) rows: ([\d.]+)x", out)
    csv = re.findall(r"ratio ingest / pyarrow \(CSV[^)]*\): ([\d.]+)x", out)
    proc = re.findall(r"JSONL.*both as whole processes \(each with its interpreter start and imports\) ([\d.]+)x", out)
    inner = re.findall(r"JSONL.*inside the process \(without interpreter start and imports\) ([\d.]+)x", out)
    rows = [("ingest vs pyarrow read_json + write_parquet, same file: ingest's whole CLI process "
             "(start and imports in) vs pyarrow's read and write alone (goal >= 0.5)",
             f"{ratio[-1]}x" if ratio else "-"),
            ("  same, both as whole processes (interpreter start and imports in both)",
             f"{proc[-1]}x" if proc else "-"),
            ("  same, both inside their process (no start, no imports)", f"{inner[-1]}x" if inner else "-"),
            ("ingest vs pyarrow read_csv + write_parquet, same rows as CSV",
             f"{csv[-1]}x" if csv else "-")]
    if mem:
        big, small, r = mem[-1]
        rows.append((f"ingest peak RSS, {big} vs {small} rows (flat = 1.0)", f"{r}x"))
    return rows


def rows_dedup(res, out):
    m = re.search(r"time, default budget / all in memory: ([\d.]+)x; memory held: ([\d.]+)x", out)
    return [("ingest de-dup set, default memory budget vs every hash in memory: time; memory held",
             f"{m[1]}x; {m[2]}x" if m else "-")]


def rows_gen(res, out):
    rows = [("detect stage vs raw LLM.generate, same built prompts (goal >= 0.95)",
             f"{_f(res.get('ratio_prompts_per_s'), '.3f')} (prompts/s), "
             f"{_f(res.get('ratio_tokens_per_s'), '.3f')} (tokens/s)"),
            ("detect prefix-cache hit rate", _f((res.get("stage") or {}).get("prefix_cache_hit_rate"), ".3f"))]
    if res.get("prefix_cache_speedup"):
        rows.append(("prefix caching on vs off", f"{res['prefix_cache_speedup']:.2f}x"))
    st = res.get("structured")
    if st:
        for stage in ("detect", "guidelines"):
            off, on = st["off"][stage], st["on"][stage]
            rows.append((f"{stage}: structured outputs off -> on, parse rate of finished outputs; "
                         f"all outputs; speed on/off",
                         f"{_f(off['parse_rate_finished'], '.3f')} -> {_f(on['parse_rate_finished'], '.3f')}; "
                         f"{off['parse_rate']:.3f} -> {on['parse_rate']:.3f}; "
                         f"{st[f'{stage}_speed_ratio_on_off']:.2f}x"))
    return rows


def rows_detect_modes(res, out):
    if "skipped" in res:
        return [("detect score vs rationale mode", f"skipped: {res['skipped']}")]
    s, r = res["score"], res["rationale"]
    a = res.get("score_at_rationale_fpr", {})
    flags = " ".join(f for f in res.get("cpu_flags", []) if f.startswith("amx")) or "no AMX"
    return [("detect score mode vs rationale mode, prompts/s on the same prompts (goal >= 10)",
             f"{res['speedup']:.1f}x ({s['prompts_per_s']:.2f} vs {r['prompts_per_s']:.2f} prompts/s; "
             f"{res.get('dtype', '?')}, CPU {flags})"),
            (f"detect recall on risky / FPR on benign, {res['risky']}+{res['benign']} held-out prompts",
             f"score {s['recall']:.3f} / {s['fpr']:.3f} (threshold {res['threshold']:.3f}); "
             f"rationale {r['recall']:.3f} / {r['fpr']:.3f}; score at rationale's FPR: "
             f"recall {a.get('recall', 0):.3f}"),
            ("detect work per prompt: prompt tokens computed + tokens decoded (ms per token)",
             "; ".join(f"{m} {res[m].get('prompt_tokens_computed', 0):.0f} + "
                       f"{res[m].get('tokens_decoded', 0):.0f} ({_f(res[m].get('ms_per_token'), '.1f')})"
                       for m in ("score", "rationale")))]


def rows_retrieval(res, out):
    rows = []
    e = res.get("embed")
    if e:
        rows.append(("embedding: our path vs raw SentenceTransformer.encode (goal >= 0.9)",
                     f"{e['ratio']:.3f}"))
    d = res.get("dedup")
    if d:
        rows.append((f"library de-dup of {d['n']:,} guidelines", f"{d['seconds']:.1f} s, "
                     f"peak RSS {d['peak_rss_mib']:.0f} MiB"))
    m = res.get("merge") or {}
    for kind in ("words", "typos"):
        if kind in m:
            r = m[kind]
            rows.append((f"library merge vs fuzz.ratio over every pair, {m['n']:,} rewrites ({kind}): "
                         "library size ours / exhaustive (1.0: no merge missed)",
                         f"{r['size_ratio']:.3f} ({r['library_ours']:,} vs {r['library_exhaustive']:,})"))
    b = res.get("bm25")
    if b:
        rows.append((f"retriever evaluation's BM25 vs rank_bm25, {b['queries']:,} queries over "
                     f"{b['library']:,} guidelines (same scores: max diff {b['max_abs_diff']:.0e})",
                     f"{b['ratio']:.0f}x ({b['ours_qps']:,.0f} vs {b['rank_bm25_qps']:,.1f} queries/s)"))
    for kind, r in (res.get("search") or {}).items():
        if isinstance(r, dict) and "qps" in r:
            rows.append((f"FAISS {kind} search, {r.get('queries', 0):,} queries",
                         f"{r['qps']:,.0f} queries/s (built in {r.get('build_s', 0):.2f} s)"))
        else:
            rows.append((f"FAISS {kind} search", json.dumps(r)[:120]))
    return rows


def rows_detect_quality(res, out):
    """One row per prompt file: recall on Do-Not-Answer and FP rate on Vicuna-Bench (its JSON);
    the script's last line when it wrote none (skipped: no benchmarks)."""
    results = res.get("results") if isinstance(res, dict) else None
    if not results:
        return rows_generic("detect_quality")(res, out)
    rows = []
    for f, r in results.items():
        s = r["summary"]
        name = "builtin detect.yaml" if f == "builtin" else Path(f).name
        rows.append((f"detect quality ({name}), {s['dna_n']} Do-Not-Answer + {s['vicuna_n']} Vicuna-Bench "
                     "prompts: recall / FP rate (unparsed)",
                     f"{100 * s['recall']:.1f}% / {100 * s['fp_rate']:.1f}% "
                     f"({s['dna_unparsed'] + s['vicuna_unparsed']})"))
    return rows


def rows_chaos(res, out):
    if not isinstance(res, list):
        return [("chaos", "no results")]
    bad = [r for r in res if r.get("lost") or r.get("duplicated") or r.get("extra") or r.get("differ")
           or r.get("rewritten")]  # chaos.py's Result.bad
    kills = sum(r.get("kills", 0) for r in res)
    return [(f"chaos: {len(res)} stages, {kills} SIGKILLs in all",
             f"{sum(r.get('lost', 0) for r in res)} rows lost, "
             f"{sum(r.get('duplicated', 0) for r in res)} duplicated, {len(bad)} stage(s) failing")]


def rows_generic(name):
    def rows(res, out):
        last = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        return [(name, last[0][:160])]
    return rows


EXTRACT = {"ingest": rows_ingest, "dedup": rows_dedup, "gen": rows_gen, "detect_modes": rows_detect_modes,
           "retrieval": rows_retrieval, "chaos": rows_chaos, "detect_quality": rows_detect_quality}


def has_short(script: Path) -> bool:
    try:
        h = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
    except subprocess.TimeoutExpired:
        return False
    return "--short" in h.stdout


def run_one(name: str, script: Path, spec: dict, timeout: int, tmp: Path):
    cmd = [sys.executable, str(script.relative_to(REPO))] + spec["args"]
    jpath = tmp / f"{name}.json"
    shown = " ".join(["python"] + cmd[1:])  # as a reader would type it (no temp --json path)
    if spec.get("json"):
        cmd += ["--json", str(jpath)]
    print(f"\n=== {name}: {shown}", flush=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    def pump():
        for line in p.stdout:  # vLLM's INFO lines are kept but not shown
            lines.append(line)
            if not re.search(r" (INFO|DEBUG) \d\d-\d\d ", line):
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = "timeout"
    reader.join(timeout=10)
    dt = time.perf_counter() - t0
    out = "".join(lines)
    res = {}
    if jpath.exists():
        try:
            res = json.loads(jpath.read_text())
        except json.JSONDecodeError:
            res = {}
    return rc, dt, out, res, shown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated benchmark names (bench/NAME.py)")
    ap.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per benchmark")
    args = ap.parse_args()
    found = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in ("all", "__init__"))
    names = [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    names = [n for n in names if n not in args.skip.split(",")]
    table, failed = [], []
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for name in names:
            script = BENCH / f"{name}.py"
            spec = SHORT.get(name)
            if name in BY_HAND:
                table.append((name, BY_HAND[name], "", "-"))
                continue
            if spec is None:
                if not has_short(script):
                    table.append((name, "skipped: no short mode known", "", "-"))
                    continue
                spec = {"args": ["--short"], "json": False}
            rc, dt, out, res, shown = run_one(name, script, spec, args.timeout, Path(tmp))
            if rc != 0:
                failed.append(name)
                table.append((name, f"FAILED (exit {rc}) after {dt:.0f} s", shown, f"{dt:.0f}"))
                continue
            try:
                rows = EXTRACT.get(name, rows_generic(name))(res, out)
            except Exception as e:  # noqa: BLE001 - a changed output format: say so, go on
                rows = [(name, f"ran, figures not read ({type(e).__name__}: {e})")]
            for what, fig in rows:
                table.append((what, fig, shown, f"{dt:.0f}"))
    print("\n| what | figure | command | s |\n| --- | --- | --- | --- |")
    for what, fig, cmd, secs in table:
        print(f"| {what} | {fig} | `{cmd}` | {secs} |" if cmd else f"| {what} | {fig} | | {secs} |")
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
