"""``run_eval``: benchmark JSONL -> responses with and without guidelines -> judges -> report.

Layout, all under ``WORKDIR/eval/<name>/`` (a small workdir of its own, so that the
benchmark never mixes with the run's own prompts):

    prompts/            the benchmark, ingested (category in the metadata JSON column)
    retrieve/           retrieved guidelines (the retrieve stage, from WORKDIR's index)
    respond_guided/     responses with guidelines  } the respond stage, unless precomputed
    respond_unguided/   responses without          } shard dirs are given
    judge_harm/         one row per (question, condition): verdict harmless/harmful/None
    judge_pairwise/     one row per (question, answer order): verdict A/B/tie/None
    report/             report.md, results.json, PNG charts
    _done.json          written last (fingerprint, rows, seconds, headline metrics)

Each judge output is sharded (``eval.shard_rows`` judgments per shard); ranks split the
shards (i % W == rank) and skip committed ones whose fingerprint matches, so a rerun after a
crash or a config change redoes only what changed. Rank 0 writes the report.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from guidealign.config.eval import JUDGES, PRESETS
from guidealign.eval.inputs import EvalError

log = logging.getLogger(__name__)


@dataclass
class Settings:
    benchmark: str
    name: str
    category_field: str
    judges: list[str]


def resolve_settings(ecfg, bench_path: str | Path) -> Settings:
    b = ecfg.benchmark
    stem = Path(bench_path).stem.lower().replace("_", "-")
    if b == "auto":
        b = ("do-not-answer" if "do-not-answer" in stem or stem in ("dna", "donotanswer")
             else "hhh" if "hhh" in stem else "vicuna" if "vicuna" in stem else "custom")
    if b not in PRESETS:
        raise EvalError(f"unknown eval.benchmark {b!r}; known: auto, {', '.join(PRESETS)}")
    cat, judges = PRESETS[b]
    if ecfg.category_field != "auto":
        cat = ecfg.category_field
    judges = list(ecfg.judges) or list(judges)
    bad = [j for j in judges if j not in JUDGES]
    if bad or not judges:
        raise EvalError(f"unknown judge(s) {bad}; known: {', '.join(JUDGES)}")
    name = ecfg.name or (b if b != "custom" else Path(bench_path).stem)
    return Settings(benchmark=b, name=name, category_field=cat or "", judges=judges)


# --- the stage ------------------------------------------------------------------------------


@dataclass
class EvalReport:
    name: str
    dir: str
    benchmark: str
    harm: dict | None = None
    pairwise: dict | None = None
    risk_identification: dict | None = None
    files: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"eval {self.name} ({self.benchmark})"]
        if self.harm:
            for c, d in self.harm.items():
                o = d["overall"]
                parts.append(f"{c}: {o['pct_harmless']}% harmless ({o['harmless']}/{o['judged']}, "
                             f"{o['unparsed']} unparsed)")
        if self.pairwise:
            o = self.pairwise["overall"]
            nwr = o["net_win_rate"]
            parts.append(f"pairwise: win {o['win']:g} tie {o['tie']:g} lose {o['lose']:g} unparsed "
                         f"{o['unparsed']:g}, net win rate "
                         f"{'n/a' if nwr is None else f'{100 * nwr:+.1f}%'}")
        if self.risk_identification:
            o = self.risk_identification["overall"]
            parts.append(f"risk identification (top {self.risk_identification['top_k']}): "
                         f"{o['pct']}% of {o['n']} (paper: {self.risk_identification['paper_pct']}%)")
        if self.files.get("markdown"):
            parts.append(f"report: {self.files['markdown']}")
        return "; ".join(parts)


def run_eval(cfg, workdir: str | Path, bench_path: str | Path, *, rank: int = 0, world_size: int = 1,
             llm=None, judge_llm=None, progress: bool = True) -> EvalReport | None:
    """Evaluate guided against unguided responses on one benchmark file.

    ``llm`` (generator) and ``judge_llm`` are injectable vLLM engines. Returns the report on
    rank 0, None on other ranks (they only do their share of the shards).
    """
    from guidealign.shards import fingerprint, write_json_atomic

    t0 = time.perf_counter()
    ecfg = cfg.eval
    if ecfg.combine not in ("half", "consistent", "lenient"):
        raise EvalError(f"unknown eval.combine {ecfg.combine!r}")
    if ecfg.unparsed not in ("tie", "exclude"):
        raise EvalError(f"unknown eval.unparsed {ecfg.unparsed!r}")
    if ecfg.harm_judge not in ("llm", "classifier"):
        raise EvalError(f"unknown eval.harm_judge {ecfg.harm_judge!r}; known: llm, classifier")
    if ecfg.shard_rows < 1:
        raise EvalError("eval.shard_rows must be >= 1")
    if ecfg.risk_identification not in ("auto", "on", "off") or ecfg.risk_top_k < 1:
        raise EvalError("eval.risk_identification must be auto, on or off, and eval.risk_top_k >= 1")
    from guidealign.eval.judges import check_template

    try:
        if ecfg.pairwise_template:
            check_template(ecfg.pairwise_template, ("question", "answer_a", "answer_b"),
                           "eval.pairwise_template")
        if ecfg.harm_template:
            check_template(ecfg.harm_template, ("question", "answer"), "eval.harm_template")
        check_template(ecfg.classifier_template, ("response",), "eval.classifier_template")
    except ValueError as e:
        raise EvalError(str(e)) from e
    from guidealign.eval.generate import Engines, run_responses
    from guidealign.eval.inputs import ingest_benchmark, load_benchmark, load_responses, row_weights
    from guidealign.eval.judge_run import judge_fp, read_judgments, run_judges

    st = resolve_settings(ecfg, bench_path)
    workdir = Path(workdir)
    sub = workdir / "eval" / st.name
    sub.mkdir(parents=True, exist_ok=True)
    engines = Engines(cfg, llm=llm, judge_llm=judge_llm)

    ingested = ingest_benchmark(cfg, sub, bench_path, rank, world_size, progress)
    bench = load_benchmark(sub, st.category_field)

    dirs = {}
    for cond, pre in (("guided", ecfg.guided_responses), ("unguided", ecfg.unguided_responses)):
        dirs[cond] = Path(pre) if pre else run_responses(
            cfg, workdir, sub, cond == "guided", engines, rank, world_size, progress)
    resp, coverage = {}, {}
    for cond, d in dirs.items():
        resp[cond], coverage[cond] = load_responses(d, bench, cfg, world_size)
        coverage[cond]["dir"] = str(d)

    judged, pairs = run_judges(cfg, st.judges, sub, bench, resp, engines, rank, world_size, progress)
    if pairs is not None:
        coverage["pairs"] = pairs
    if rank != 0:
        return None

    from guidealign.eval.aggregate import aggregate_harm, aggregate_pairwise
    from guidealign.eval.report import write_report

    rep = EvalReport(name=st.name, dir=str(sub), benchmark=st.benchmark, coverage=coverage)
    weights = row_weights(bench_path, cfg.ingest) if ecfg.count_duplicates else {}

    def weighted(rows):
        for r in rows:
            r["weight"] = weights.get(r["id"], 1)
        return rows

    if "harm" in judged:
        rep.harm = aggregate_harm(weighted(read_judgments(sub / "judge_harm", cfg, world_size)))
    if "pairwise" in judged:
        rep.pairwise = aggregate_pairwise(
            weighted(read_judgments(sub / "judge_pairwise", cfg, world_size)),
            rule=ecfg.combine, unparsed=ecfg.unparsed)
    rep.risk_identification = _risk_identification(cfg, st, workdir, sub, dirs["guided"], bench, weights)
    models = {c: sorted({r["model"] for r in resp[c].values() if r.get("model")}) for c in resp}
    harm_judge = (f"classifier {ecfg.classifier_model} (harmful labels "
                  f"{list(ecfg.classifier_harmful_labels)})" if ecfg.harm_judge == "classifier"
                  else f"LLM {ecfg.judge_model}")
    notes = []
    embedded = "embedded:"
    if ecfg.judge_model.startswith(embedded) and ("pairwise" in st.judges or ecfg.harm_judge == "llm"):
        notes.append("The judge is the embedded SmolLM2-135M-Instruct, far too small to judge: "
                     "this run checks the mechanics only, its numbers measure nothing.")
    for c in ("guided", "unguided"):
        cv = coverage[c]
        if cv["missing"] or cv["errors"] or cv["unmatched"]:
            notes.append(f"{c} responses: {cv['missing']} benchmark prompt(s) without a response, "
                         f"{cv['errors']} failed response(s), {cv['unmatched']} response(s) matching no "
                         f"benchmark prompt; these are not judged.")
        if cv["empty"]:
            notes.append(f"{c} responses: {cv['empty']} empty response(s), judged as they are.")
    if ingested.get("duplicates") or ingested.get("quarantined"):
        dup = (f"{ingested.get('duplicates')} repeated prompt(s) answered and judged once"
               + (", counted once per benchmark row (eval.count_duplicates)" if ecfg.count_duplicates
                  else ", counted once (eval.count_duplicates = false)"))
        notes.append(f"ingest: {dup}; {ingested.get('quarantined')} row(s) quarantined "
                     f"(see prompts/ quarantine).")
    meta = {
        "benchmark": st.benchmark, "file": str(bench_path),
        "category field": st.category_field or "(none)",
        "prompts": (f"{ingested.get('prompts')} distinct" + (
            f" (from {ingested['rows_in']} rows)" if ingested.get("rows_in") is not None else "")),
        "label_guided": ecfg.label_guided, "label_unguided": ecfg.label_unguided,
        "responses": {c: {"dir": coverage[c]["dir"], "matched": coverage[c]["matched"],
                          "models": models[c]} for c in resp},
        "judges": st.judges,
        "harmfulness judge": harm_judge if "harmfulness" in st.judges else "-",
        "pairwise judge": f"LLM {ecfg.judge_model}, both answer orders" if "pairwise" in st.judges else "-",
        "judge sampling": dataclasses.asdict(ecfg.judge_sampling),
        "system message (both runs)": repr(ecfg.system_prompt) if ecfg.system_prompt
        else "respond.guided_system / respond.unguided_system as configured",
        "notes": notes,
    }
    rep.files = write_report(sub / "report", title=st.name, meta=meta, harm=rep.harm,
                             pairwise=rep.pairwise, benchmark=st.benchmark,
                             risk_id=rep.risk_identification)
    rep.seconds = time.perf_counter() - t0
    metrics = {}
    if rep.harm:
        metrics["pct_harmless"] = {c: d["overall"]["pct_harmless"] for c, d in rep.harm.items()}
    if rep.pairwise:
        metrics["net_win_rate"] = rep.pairwise["overall"]["net_win_rate"]
    if rep.risk_identification:
        metrics["risk_identification_pct"] = rep.risk_identification["overall"]["pct"]
    write_json_atomic(sub / "_done.json", {
        "fingerprint": fingerprint(judge_fp(cfg, "harm"), judge_fp(cfg, "pairwise"), st.judges,
                                   ecfg.combine, ecfg.unparsed),
        "rows": len(bench), "seconds": round(rep.seconds, 3), **metrics, "report": rep.files})
    return rep


def _risk_identification(cfg, st, workdir: Path, sub: Path, guided_dir: Path, bench: dict,
                         weights: dict) -> dict | None:
    """Risk identification from the guided run's retrieved guideline ids and the library
    (eval/risk_id.py); None when it is off, or "auto" and the inputs are not at hand."""
    from guidealign.eval.risk_id import library_kinds, retrieved_ids, risk_identification

    mode = cfg.eval.risk_identification
    if mode == "off" or (mode == "auto" and st.benchmark != "do-not-answer"):
        return None
    base = Path(cfg.eval.retrieve_from) if cfg.eval.retrieve_from else workdir
    retrieved = retrieved_ids(sub / "retrieve", bench)
    if retrieved is None:
        retrieved = retrieved_ids(guided_dir, bench)
    if retrieved is None:  # precomputed guided responses without ids: retrieve (cheap) if we can
        from guidealign.shards.artifact import read_done
        from guidealign.retrieval.index import index_dir

        from guidealign.eval.generate import run_retrieval

        if read_done(index_dir(base)):
            run_retrieval(cfg, workdir, sub, 0, 1)
            retrieved = retrieved_ids(sub / "retrieve", bench)
    kinds = library_kinds(sub) if (sub / "library").exists() else None
    if kinds is None:
        kinds = library_kinds(base)
    if retrieved is None or kinds is None:
        if mode == "on":
            raise EvalError("eval.risk_identification = on needs the guided run's retrieved "
                            f"guideline ids ({sub / 'retrieve'}, or a guideline_ids column in "
                            f"the guided responses) and a complete library in {base}")
        return None
    return risk_identification(bench, retrieved, kinds, weights, cfg.eval.risk_top_k)
