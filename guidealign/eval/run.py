"""``run_eval``: benchmark JSONL -> responses with and without guidelines -> judges -> report.

Layout, all under ``WORKDIR/eval/<name>/`` (a small workdir of its own, so that the
benchmark never mixes with the run's own prompts):

    prompts/                 the benchmark, ingested (category in the metadata JSON column)
    retrieve/                retrieved guidelines (the retrieve stage, from WORKDIR's index)
    respond_guided/          responses with guidelines  } the respond stage, unless precomputed
    respond_unguided/        responses without          } shard dirs are given
    judge_harm_items/        what the harmfulness judge judges: (question, condition, answer)
    judge_harm/              one row per (question, condition): verdict harmless/harmful/None
    judge_pairwise_items/    what the pairwise judge judges: (question, both answers)
    judge_pairwise/          one row per (question, answer order): verdict A/B/tie/None
    report/                  report.md, results.json, PNG charts
    _done.json               written last (fingerprint, rows, seconds, headline metrics, and
                             the checksums of the report files for ``guidealign verify``)

Every step is a stage of the storage layer: ingest (rank 0), retrieve and respond (map
stages), judging (map stages over the judgment plans, eval/judging.py); ranks split their
shards and skip committed ones whose fingerprint matches, so a rerun after a crash or a
config change redoes only what changed. Rank 0 aggregates and writes the report.

Jobs, one module each: settings.py (what to evaluate), inputs.py (benchmark and response
sets), generate.py (responses), judging.py (sharded judging) with judges.py, classifier.py,
prompts.py and verdicts.py, aggregate.py and risk_id.py (the numbers), charts.py and
report.py (the report).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from guidealign.eval.settings import EvalError, Settings, resolve_settings


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
        from guidealign.eval.charts import fmt

        parts = [f"eval {self.name} ({self.benchmark})"]
        if self.harm:
            for c, d in self.harm.items():
                o = d["overall"]
                parts.append(f"{c}: {fmt(o['pct_harmless'], 1, '%')} harmless "
                             f"({o['harmless']}/{o['judged']}, {o['unparsed']} unparsed)")
        if self.pairwise:
            o = self.pairwise["overall"]
            nwr = o["net_win_rate"]
            parts.append(f"pairwise: win {o['win']:g} tie {o['tie']:g} lose {o['lose']:g} unparsed "
                         f"{o['unparsed']:g}, net win rate "
                         f"{'n/a' if nwr is None else f'{100 * nwr:+.1f}%'}")
        if self.risk_identification:
            o = self.risk_identification["overall"]
            parts.append(f"risk identification (top {self.risk_identification['top_k']}): "
                         f"{fmt(o['pct'], 1, '%')} of {o['n']} "
                         f"(paper: {self.risk_identification['paper_pct']}%)")
        if self.files.get("markdown"):
            parts.append(f"report: {self.files['markdown']}")
        return "; ".join(parts)


def run_eval(cfg, workdir: str | Path, *, rank: int = 0, world_size: int = 1, progress: bool = True,
             benchmark_file: str | Path | None = None, llm=None, judge_llm=None) -> EvalReport | None:
    """Evaluate guided against unguided responses on ``benchmark_file`` (a prompt file:
    JSONL lines with id, prompt and a category field).

    ``llm`` (generator) and ``judge_llm`` are injectable vLLM engines, built lazily only when
    a shard needs one. Returns the report on rank 0, None on other ranks (they only do their
    share of the shards).
    """
    from guidealign.eval.generate import Engines
    from guidealign.eval.settings import check_config

    if benchmark_file is None:
        raise EvalError("eval needs benchmark_file (the benchmark's prompt file)")
    t0 = time.perf_counter()
    ecfg = cfg.eval
    check_config(ecfg)
    st = resolve_settings(ecfg, benchmark_file)
    workdir = Path(workdir)
    _check_judge(cfg, st, llm, judge_llm)
    sub = workdir / "eval" / st.name
    sub.mkdir(parents=True, exist_ok=True)
    engines = Engines(cfg, llm=llm, judge_llm=judge_llm)
    try:
        return _run_eval(cfg, workdir, sub, st, ecfg, engines, benchmark_file, rank, world_size,
                         progress, t0)
    finally:
        engines.close()


def _check_judge(cfg, st: Settings, llm, judge_llm) -> None:
    """An LLM judge without a chat template fails here, not after the responses are made and
    its weights loaded; an engine handed in (``judge_llm``, or ``llm`` when the judge reuses the
    responder's) brings its own tokenizer and is not checked."""
    from guidealign.eval.generate import judge_is_responder
    from guidealign.eval.judging import check_judge_template

    uses_llm = "pairwise" in st.judges or ("harmfulness" in st.judges and cfg.eval.harm_judge == "llm")
    if uses_llm and judge_llm is None and not (llm is not None and judge_is_responder(cfg)):
        check_judge_template(cfg)


def _run_eval(cfg, workdir: Path, sub: Path, st: Settings, ecfg, engines, benchmark_file, rank: int,
              world_size: int, progress: bool, t0: float) -> EvalReport | None:
    from guidealign.eval.generate import run_responses
    from guidealign.eval.inputs import ingest_benchmark, load_benchmark, load_responses, usable
    from guidealign.eval.judging import judge_plans, judge_stage

    if rank == 0:
        # the earlier run's _done.json goes before any work: a rerun (another config, another
        # benchmark file) killed while answering or judging left it describing the old report
        # while the judgment folders were half new; rank 0 writes it again at the end
        (sub / "_done.json").unlink(missing_ok=True)
    ingested = ingest_benchmark(cfg, sub, benchmark_file, rank, world_size, progress)
    bench = load_benchmark(sub, st.category_field)
    if not bench:
        raise EvalError(f"benchmark {benchmark_file} holds no question (the file is empty, or ingest "
                        f"quarantined every row: see {sub / 'prompts'})")

    dirs = {}
    for cond, pre in (("guided", ecfg.guided_responses), ("unguided", ecfg.unguided_responses)):
        dirs[cond] = Path(pre) if pre else run_responses(
            cfg, workdir, sub, cond == "guided", engines, rank, world_size, progress)
    resp, coverage = {}, {}
    for cond, d in dirs.items():
        resp[cond], coverage[cond] = load_responses(d, bench, cfg, world_size)
        coverage[cond]["dir"] = str(d)
        _check_matched(cond, d, coverage[cond], bench)

    plans = judge_plans(cfg, st.judges, bench, resp, engines)
    if not any(it for p in plans.values() for c in p.chunks for it in c):
        raise EvalError(
            f"nothing to judge: of {len(bench)} benchmark question(s), "
            + ", ".join(f"{c} has {sum(usable(r) for r in resp[c].values())} usable response(s)"
                        for c in resp)
            + " (a judgment needs a response that did not fail; see the response directories "
            + ", ".join(str(d) for d in dirs.values()) + ")")
    for p in plans.values():
        judge_stage(sub, p, cfg, rank, world_size, progress)
    if "pairwise" in plans:
        coverage["pairs"] = sum(len(c) for c in plans["pairwise"].chunks)
    if rank != 0:
        return None
    rep = EvalReport(name=st.name, dir=str(sub), benchmark=st.benchmark, coverage=coverage)
    _results(rep, cfg, st, workdir, sub, benchmark_file, plans, dirs, bench, world_size)

    from guidealign.eval.report import run_meta, write_report

    models = {c: sorted({r["model"] for r in resp[c].values() if r.get("model")}) for c in resp}
    meta = run_meta(cfg, st, benchmark_file, ingested, coverage, models)
    retrieval = _retrieval_record(cfg, workdir, sub, dirs, bench, rep)
    if "settings" in retrieval:
        meta["retrieve settings"] = {**retrieval["settings"], "source": retrieval["source"]}
    if "library_overlap" in retrieval:
        ov = retrieval["library_overlap"]
        meta["benchmark prompts in the library"] = (
            f"{ov['in_library']} of {ov['benchmark_prompts']} "
            f"({ov['in_retriever_training']} in the retriever's training pairs)")
    meta["notes"] = meta.get("notes", []) + retrieval["notes"]
    # the old report's _done.json goes first: a rerun killed while writing the report never
    # leaves it vouching for a mix of old and new files
    (sub / "_done.json").unlink(missing_ok=True)
    rep.files = write_report(sub / "report", title=st.name, meta=meta, harm=rep.harm,
                             pairwise=rep.pairwise, benchmark=st.benchmark,
                             risk_id=rep.risk_identification)
    rep.seconds = time.perf_counter() - t0
    _mark_done(rep, cfg, st, sub, len(bench), plans, retrieval)
    return rep


def _retrieval_record(cfg, workdir: Path, sub: Path, dirs: dict, bench: dict, rep: EvalReport) -> dict:
    """What the report says of the benchmark's retrieval: the retrieve settings used and how
    they compare with the run's (when this eval retrieved: guided answers made here, or risk
    identification of precomputed answers without their guideline ids), and how many benchmark
    prompts the library was built from (whenever retrieved guidelines count); ``notes`` holds
    the warnings, also logged."""
    import logging

    from guidealign.eval.generate import (benchmark_retrieve_settings, library_overlap, overlap_note,
                                          retrieval_base)
    from guidealign.eval.risk_id import retrieved_ids

    base = retrieval_base(cfg, workdir)
    retrieved_here = not cfg.eval.guided_responses or (
        rep.risk_identification is not None and retrieved_ids(dirs["guided"], bench) is None)
    out: dict = {"notes": []}
    if retrieved_here:
        _, info = benchmark_retrieve_settings(cfg, base)  # as run_retrieval chose (and logged) them
        out.update(settings=info["settings"], run_settings=info["run"], from_run=info["from_run"],
                   overridden=info["overridden"])
        out["source"] = ("this eval config's (the run recorded none)" if info["run"] is None else
                         f"the run's ({base / 'retrieve'})" + (
                             ", except " + ", ".join(info["overridden"]) + " from this eval config"
                             if info["overridden"] else ""))
        out["notes"] += info["notes"]
    if retrieved_here or rep.risk_identification is not None:
        ov = library_overlap(sub, base, bench)
        if ov is not None:
            out["library_overlap"] = ov
            note = overlap_note(ov)
            if note:
                logging.getLogger(__name__).warning("eval: %s", note)
                out["notes"].append(note)
    return out


def _check_matched(cond: str, d: Path, cov: dict, bench: dict) -> None:
    """A response set none of whose rows is a benchmark question is an error, not a report
    of nothing."""
    if cov["matched"]:
        return
    raise EvalError(
        f"{cond} responses ({d}): none of their {cov['rows']} row(s) matches one of the "
        f"{len(bench)} benchmark question(s) by id (the benchmark's own, or ingest's prompt "
        "hash) or by prompt text: are they answers to this benchmark?")


def _results(rep: EvalReport, cfg, st: Settings, workdir: Path, sub: Path, bench_path, plans: dict,
             dirs: dict, bench: dict, world_size: int) -> None:
    """The report's numbers: % harmless, the pairwise outcome, risk identification."""
    from guidealign.eval.aggregate import aggregate_harm, aggregate_pairwise, with_weights
    from guidealign.eval.inputs import row_weights
    from guidealign.eval.judges import current_verdicts
    from guidealign.eval.judging import read_judgments
    from guidealign.eval.risk_id import run_risk_identification

    ecfg = cfg.eval
    weights = row_weights(bench_path, cfg.ingest, st.category_field) if ecfg.count_duplicates else {}

    def judged(kind):  # verdicts by this version's parser (judgments made before it included)
        return with_weights(current_verdicts(read_judgments(sub, plans[kind], cfg, world_size), kind), weights)

    if "harm" in plans:
        rep.harm = aggregate_harm(judged("harm"))
    if "pairwise" in plans:
        rep.pairwise = aggregate_pairwise(judged("pairwise"), rule=ecfg.combine, unparsed=ecfg.unparsed)
    rep.risk_identification = run_risk_identification(cfg, st.benchmark, workdir, sub, dirs["guided"],
                                                      bench, weights)


def _mark_done(rep: EvalReport, cfg, st: Settings, sub: Path, rows: int, plans: dict,
               retrieval: dict | None = None) -> None:
    """``_done.json``, written last: what the report was made with, its headline numbers, the
    benchmark's retrieval (settings, differences from the run's, prompts the library was built
    from: ``_retrieval_record``) and the checksums of its files (checked by ``guidealign verify``)."""
    from guidealign.shards import fingerprint, write_json_atomic
    from guidealign.shards.artifact_files import file_checksums
    from guidealign.shards.write import torch_threads

    ecfg = cfg.eval
    metrics = {}
    if rep.harm:
        metrics["pct_harmless"] = {c: d["overall"]["pct_harmless"] for c, d in rep.harm.items()}
    if rep.pairwise:
        metrics["net_win_rate"] = rep.pairwise["overall"]["net_win_rate"]
    if rep.risk_identification:
        metrics["risk_identification_pct"] = rep.risk_identification["overall"]["pct"]
    files = {f"report/{k}": v for k, v in file_checksums(sub / "report").items()}
    write_json_atomic(sub / "_done.json", {
        # the judges that ran (their plans' fingerprints); one not run is None
        "fingerprint": fingerprint(*(plans[k].config_fp if k in plans else None
                                     for k in ("harm", "pairwise")), st.judges,
                                   ecfg.combine, ecfg.unparsed),
        "rows": rows, "seconds": round(rep.seconds, 3), "created": time.time(),
        "threads": torch_threads(), **metrics, "report": rep.files, "files": files,
        **({"retrieval": retrieval} if retrieval else {})})
