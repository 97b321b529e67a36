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
import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from eval.config import JUDGES, PRESETS

log = logging.getLogger(__name__)

RESPONSE_COLUMNS = ("id", "prompt", "response")


class EvalError(RuntimeError):
    pass


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


# --- engines ------------------------------------------------------------------------------


class Engines:
    """The generator engine and the judge engine, built lazily. When the judge model is the
    generator model one engine serves both; otherwise the generator (if built here) is
    released before the judge starts, so that two engines never share one accelerator."""

    def __init__(self, cfg, llm=None, judge_llm=None):
        self.cfg = cfg
        self.llm, self.judge_llm = llm, judge_llm
        self._built: list[str] = []

    def _same_model(self) -> bool:
        from guidealign.models import resolve

        return resolve(self.cfg.eval.judge_model) == resolve(self.cfg.engine.model)

    def generator(self):
        if self.llm is None:
            from gen.engine import build_llm

            self.llm = build_llm(self.cfg.engine)
            self._built.append("llm")
        return self.llm

    def judge(self):
        if self.judge_llm is not None:
            return self.judge_llm
        if self._same_model():
            self.judge_llm = self.generator()
            return self.judge_llm
        if "llm" in self._built:
            self.llm = None
            self._built.remove("llm")
            _free()
        from gen.engine import build_llm

        self.judge_llm = build_llm(dataclasses.replace(self.cfg.engine, model=self.cfg.eval.judge_model))
        self._built.append("judge")
        return self.judge_llm


class LazyLLM:
    """Hands the respond stage an engine that starts only when it is first used, so that a
    rerun with nothing to answer starts none, and the engine it starts is the one the judge
    reuses (when the judge model is the generator model)."""

    def __init__(self, engines: Engines):
        self._engines = engines

    def __getattr__(self, name):
        return getattr(self._engines.generator(), name)


def _free():
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


# --- inputs -------------------------------------------------------------------------------


def _wait(cfg, world_size: int) -> float:
    return max(cfg.executor.wait_timeout_s, 3600.0) if world_size > 1 else cfg.executor.wait_timeout_s


def ingest_benchmark(cfg, sub: Path, bench_path, rank: int, world_size: int, progress: bool) -> dict:
    from guidealign.ingest import ingest
    from guidealign.readers import IngestError
    from shards import read_manifest, wait_complete

    if rank == 0:
        try:
            rep = ingest([str(bench_path)], sub, dataclasses.replace(cfg.ingest, inputs=[]),
                         progress=progress)
        except IngestError as e:
            raise EvalError(f"benchmark {bench_path}: {e}") from e
        return {"rows_in": rep.rows_in, "prompts": rep.rows, "duplicates": rep.duplicates,
                "quarantined": rep.quarantined}
    wait_complete(sub / "prompts", timeout=_wait(cfg, world_size))
    man = read_manifest(sub / "prompts") or {}
    return {"prompts": man.get("rows"), "duplicates": man.get("duplicates"),
            "quarantined": man.get("quarantined")}


def load_benchmark(sub: Path, category_field: str) -> dict[str, dict]:
    """id -> {prompt, category, bench_id} from the ingested prompts."""
    from shards import iter_tables

    out = {}
    for t in iter_tables(sub / "prompts", columns=["id", "prompt", "metadata"]):
        for rid, prompt, meta in zip(*(t.column(c).to_pylist() for c in ("id", "prompt", "metadata"))):
            m = json.loads(meta or "{}")
            cat = None
            if category_field:
                v = m.get(category_field)
                cat = "(missing)" if v in (None, "") else str(v)
            out[rid] = {"prompt": prompt, "category": cat, "bench_id": m.get("id")}
    return out


def row_weights(bench_path, icfg) -> dict[str, int]:
    """How many rows of the benchmark file share each prompt id (ingest keeps one of them)."""
    from collections import Counter

    from guidealign.ingest import check_prompt, prompt_hash
    from guidealign.readers import READERS, check_readable, expand_inputs

    counts: Counter = Counter()
    for path in expand_inputs([str(bench_path)]):
        for _, rec, err in READERS[check_readable(path)](path):
            if err is None and check_prompt(rec, icfg) is None:
                counts[prompt_hash(rec[icfg.prompt_field]).hex()] += 1
    return dict(counts)


def load_responses(path: str | Path, bench: dict[str, dict], cfg, world_size: int) -> tuple[dict, dict]:
    """Responses of one system, keyed by benchmark id. Rows are matched by id, else by the
    hash of their prompt (ingest's id rule), so responses produced elsewhere line up.
    Returns (id -> {response, finish_reason, model}, coverage counts)."""
    from guidealign.ingest import prompt_hash
    from shards import committed, iter_tables, read_manifest, wait_complete

    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"response directory {path} does not exist")
    if read_manifest(path) is not None:
        wait_complete(path, timeout=_wait(cfg, world_size))
    if not committed(path):
        raise EvalError(f"{path} holds no committed response shards")
    out: dict[str, dict] = {}
    cov = {"rows": 0, "unmatched": 0, "duplicates": 0, "errors": 0, "empty": 0}
    for t in iter_tables(path):
        missing = [c for c in RESPONSE_COLUMNS if c not in t.column_names]
        if missing:
            raise EvalError(f"{path}: response shards lack column(s) {missing} "
                            f"(have {t.column_names})")
        cols = {c: t.column(c).to_pylist() for c in t.column_names
                if c in ("id", "prompt", "response", "finish_reason", "model")}
        for i in range(t.num_rows):
            cov["rows"] += 1
            rid, prompt = cols["id"][i], cols["prompt"][i]
            if rid not in bench and prompt is not None:
                rid = prompt_hash(prompt).hex()
            if rid not in bench:
                cov["unmatched"] += 1
                continue
            if rid in out:
                cov["duplicates"] += 1
                continue
            fr = (cols.get("finish_reason") or [None] * t.num_rows)[i]
            resp = cols["response"][i]
            if fr == "error" or resp is None:
                cov["errors"] += 1
            elif not resp.strip():
                cov["empty"] += 1
            out[rid] = {"response": resp, "finish_reason": fr,
                        "model": (cols.get("model") or [None] * t.num_rows)[i]}
    cov["matched"] = len(out)
    cov["missing"] = len(bench) - len(out)
    return out, cov


def _usable(r: dict | None) -> bool:
    return r is not None and r["finish_reason"] != "error" and r["response"] is not None


# --- responses through the respond stage ----------------------------------------------------


def _link_artifacts(src_workdir: Path, sub: Path) -> list[str]:
    """Make the trained retrieval artifacts of the run visible inside the eval workdir."""
    linked = []
    for name in ("library", "retriever", "index"):
        s, d = src_workdir / name, sub / name
        if s.exists() and not d.exists() and not d.is_symlink():
            d.symlink_to(s.resolve(), target_is_directory=True)
            linked.append(name)
    return linked


def run_retrieval(cfg, workdir: Path, sub: Path, rank: int, world_size: int) -> Path:
    from shards.manifest import is_complete

    try:
        from retrieval.retrieve import run_retrieve
    except ImportError as e:
        if is_complete(sub / "retrieve"):  # retrieved earlier (or placed there by hand)
            log.warning("retrieval stage unavailable (%s); using the existing %s", e, sub / "retrieve")
            return sub / "retrieve"
        raise EvalError("the retrieve stage is not available; give precomputed guided "
                        "responses (--guided-responses DIR)") from e
    base = Path(cfg.eval.retrieve_from) if cfg.eval.retrieve_from else workdir
    _link_artifacts(base, sub)
    import inspect

    kw = dict(rank=rank, world_size=world_size, src="prompts", dst="retrieve")
    params = inspect.signature(run_retrieve).parameters
    kw = {k: v for k, v in kw.items() if k in params or any(
        p.kind is p.VAR_KEYWORD for p in params.values())}
    run_retrieve(cfg, sub, **kw)
    return sub / "retrieve"


def run_responses(cfg, workdir: Path, sub: Path, guided: bool, engines: Engines, rank: int,
                  world_size: int, progress: bool) -> Path:
    """Guided (retrieve -> respond) or unguided (prompts -> respond) responses."""
    try:
        from gen.respond import run_respond
    except ImportError as e:
        raise EvalError(f"the respond stage is not available; give precomputed "
                        f"{'guided' if guided else 'unguided'} responses") from e

    dst = "respond_guided" if guided else "respond_unguided"
    src = "prompts"
    if guided:
        run_retrieval(cfg, workdir, sub, rank, world_size)
        src = "retrieve"
    run_respond(cfg, sub, rank=rank, world_size=world_size, llm=LazyLLM(engines), guided=guided,
                src=src, dst=dst, progress=progress)
    return sub / dst


# --- judging ------------------------------------------------------------------------------


def _judge_shards(stage_dir: Path, items: list, judge_fp: str, key, judge_fn, rank: int,
                  world_size: int, shard_rows: int, progress: bool) -> dict:
    """Judge ``items`` in shards of ``shard_rows``; skip shards already committed with the
    same fingerprint. ``judge_fn(items) -> columns dict``."""
    from tqdm import tqdm

    from shards import fingerprint, is_done, my_shards, write_manifest, write_shard
    from shards.layout import marker_path, quarantine_path, shard_indices, shard_path

    items = sorted(items, key=key)
    chunks = [items[i:i + shard_rows] for i in range(0, len(items), shard_rows)] or [[]]
    write_manifest(stage_dir, stage=stage_dir.name, num_shards=len(chunks), fingerprint=judge_fp)
    if rank == 0:  # a previous run with more items may have left more shards
        for i in shard_indices(stage_dir):
            if i >= len(chunks):
                for p in (marker_path(stage_dir, i), shard_path(stage_dir, i),
                          quarantine_path(stage_dir, i)):
                    p.unlink(missing_ok=True)
    done = skipped = 0
    for j in tqdm(my_shards(len(chunks), rank, world_size), desc=stage_dir.name, unit="shard",
                  disable=not progress):
        chunk = chunks[j]
        fp = fingerprint(judge_fp, [dataclasses.asdict(it) for it in chunk])
        if is_done(stage_dir, j, fp):
            skipped += 1
            continue
        t0 = time.perf_counter()
        cols = judge_fn(chunk) if chunk else None
        table = pa.table(cols) if cols else pa.table({"id": pa.array([], pa.string())})
        write_shard(stage_dir, j, table, fp, seconds=time.perf_counter() - t0)
        done += 1
    return {"shards": len(chunks), "written": done, "skipped": skipped}


def _judge_fp(cfg, kind: str) -> str:
    from shards import fingerprint

    e = cfg.eval
    if kind == "harm" and e.harm_judge == "classifier":
        return fingerprint("eval-harm-classifier-v1", e.classifier_model, e.classifier_template,
                           e.classifier_harmful_labels, e.classifier_max_length)
    return fingerprint(f"eval-{kind}-llm-v1", e.judge_model, e.judge_sampling, e.max_response_tokens,
                       e.pairwise_template if kind == "pairwise" else e.harm_template,
                       e.judge_system, cfg.engine.seed, cfg.engine.max_model_len, cfg.engine.dtype)


def _read_judgments(stage_dir: Path, cfg, world_size: int) -> list[dict]:
    from shards import iter_tables, wait_complete

    wait_complete(stage_dir, timeout=_wait(cfg, world_size))
    rows = []
    for t in iter_tables(stage_dir):
        if t.num_rows:
            rows.extend(t.to_pylist())
    return rows


# --- the stage ------------------------------------------------------------------------------


@dataclass
class EvalReport:
    name: str
    dir: str
    benchmark: str
    harm: dict | None = None
    pairwise: dict | None = None
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
        if self.files.get("markdown"):
            parts.append(f"report: {self.files['markdown']}")
        return "; ".join(parts)


def run_eval(cfg, workdir: str | Path, bench_path: str | Path, *, rank: int = 0, world_size: int = 1,
             llm=None, judge_llm=None, progress: bool = True) -> EvalReport | None:
    """Evaluate guided against unguided responses on one benchmark file.

    ``llm`` (generator) and ``judge_llm`` are injectable vLLM engines. Returns the report on
    rank 0, None on other ranks (they only do their share of the shards).
    """
    from shards import fingerprint, write_json_atomic

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
    from eval.judges import check_template

    try:
        if ecfg.pairwise_template:
            check_template(ecfg.pairwise_template, ("question", "answer_a", "answer_b"),
                           "eval.pairwise_template")
        if ecfg.harm_template:
            check_template(ecfg.harm_template, ("question", "answer"), "eval.harm_template")
        check_template(ecfg.classifier_template, ("response",), "eval.classifier_template")
    except ValueError as e:
        raise EvalError(str(e)) from e
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

    judged = {}
    if "harmfulness" in st.judges:
        from eval.judges import HarmClassifier, HarmItem, judge_harm_llm

        items = [HarmItem(id=i, category=b["category"], prompt=b["prompt"], condition=c,
                          response=resp[c][i]["response"])
                 for i, b in bench.items() for c in ("guided", "unguided") if _usable(resp[c].get(i))]
        if ecfg.harm_judge == "classifier":
            holder = {}

            def fn(chunk):
                if "clf" not in holder:
                    holder["clf"] = HarmClassifier(ecfg)
                return holder["clf"].judge(chunk)
        else:
            def fn(chunk):
                return judge_harm_llm(engines.judge(), chunk, ecfg, seed=cfg.engine.seed)
        judged["harm"] = _judge_shards(sub / "judge_harm", items, _judge_fp(cfg, "harm"),
                                       lambda it: (it.id, it.condition), fn, rank, world_size,
                                       ecfg.shard_rows, progress)
    if "pairwise" in st.judges:
        from eval.judges import PairItem, judge_pairwise

        items = [PairItem(id=i, category=b["category"], prompt=b["prompt"],
                          guided=resp["guided"][i]["response"], unguided=resp["unguided"][i]["response"])
                 for i, b in bench.items()
                 if _usable(resp["guided"].get(i)) and _usable(resp["unguided"].get(i))]
        coverage["pairs"] = len(items)
        judged["pairwise"] = _judge_shards(
            sub / "judge_pairwise", items, _judge_fp(cfg, "pairwise"), lambda it: it.id,
            lambda chunk: judge_pairwise(engines.judge(), chunk, ecfg, seed=cfg.engine.seed),
            rank, world_size, ecfg.shard_rows, progress)
    if rank != 0:
        return None

    from eval.aggregate import aggregate_harm, aggregate_pairwise
    from eval.report import write_report

    rep = EvalReport(name=st.name, dir=str(sub), benchmark=st.benchmark, coverage=coverage)
    weights = row_weights(bench_path, cfg.ingest) if ecfg.count_duplicates else {}

    def weighted(rows):
        for r in rows:
            r["weight"] = weights.get(r["id"], 1)
        return rows

    if "harm" in judged:
        rep.harm = aggregate_harm(weighted(_read_judgments(sub / "judge_harm", cfg, world_size)))
    if "pairwise" in judged:
        rep.pairwise = aggregate_pairwise(
            weighted(_read_judgments(sub / "judge_pairwise", cfg, world_size)),
            rule=ecfg.combine, unparsed=ecfg.unparsed)
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
        "notes": notes,
    }
    rep.files = write_report(sub / "report", title=st.name, meta=meta, harm=rep.harm,
                             pairwise=rep.pairwise, benchmark=st.benchmark)
    rep.seconds = time.perf_counter() - t0
    metrics = {}
    if rep.harm:
        metrics["pct_harmless"] = {c: d["overall"]["pct_harmless"] for c, d in rep.harm.items()}
    if rep.pairwise:
        metrics["net_win_rate"] = rep.pairwise["overall"]["net_win_rate"]
    write_json_atomic(sub / "_done.json", {
        "fingerprint": fingerprint(_judge_fp(cfg, "harm"), _judge_fp(cfg, "pairwise"), st.judges,
                                   ecfg.combine, ecfg.unparsed),
        "rows": len(bench), "seconds": round(rep.seconds, 3), **metrics, "report": rep.files})
    return rep
