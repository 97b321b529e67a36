"""Eval judging: the harmfulness and pairwise judgments, as map stages of the storage layer.

Each judge is two datasets under ``WORKDIR/eval/<name>/``:

    judge_<kind>_items/   the plan: one row per judgment item (the question and the answers
                          to judge), ``eval.shard_rows`` items per shard, in a fixed order
    judge_<kind>/         the judgments: ``shards.map_shards`` turns plan shard i into
                          judgment shard i

so resume, fingerprints, commit markers, quarantine, dynamic claims (``executor.assign``) and
``guidealign verify`` are those of every map stage. A judgment shard's fingerprint is the
judge's (:func:`judge_fp`) plus the checksum of its plan shard, and a plan shard is rewritten
only when its items change: shards are cut along the benchmark's questions (not along the
items judged), so a rerun redoes nothing, a changed, newly failed or newly usable response
redoes the shards that hold its question, a changed judge config redoes that judge, and an
aggregation option (``eval.combine``, ``eval.unparsed``, ``eval.count_duplicates``) redoes none.
The items hold each question's category, so a change of ``eval.category_field`` (which
column that is) judges again: a known cost, kept so that judgments made so far stay valid.
Verdicts are parsed again from the stored outputs for every report (``current_verdicts``).

Each rank writes the plan shards that static assignment gives it (i % W == rank). Under
dynamic assignment every rank waits for the whole plan before it claims shards; the reader
(rank 0) waits for the whole plan with the items it computed itself, then for the judgments.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import pyarrow as pa

from guidealign.eval.inputs import usable, wait_s
from guidealign.eval.settings import EvalError

PLAN_VERSION = "eval-judge-items-v1"


def plan_dir(sub: Path, kind: str) -> Path:
    return sub / f"judge_{kind}_items"


def judgments_dir(sub: Path, kind: str) -> Path:
    return sub / f"judge_{kind}"


def judge_fp(cfg, kind: str) -> str:
    """What a judgment depends on: a change re-judges, an aggregation option does not."""
    from guidealign.shards import fingerprint

    e = cfg.eval
    if kind == "harm" and e.harm_judge == "classifier":
        return fingerprint("eval-harm-classifier-v1", e.classifier_model, e.classifier_template,
                           e.classifier_harmful_labels, e.classifier_max_length)
    from guidealign.eval.prompts import HARM_TEMPLATE, JUDGE_SYSTEM, PAIRWISE_TEMPLATE

    # the wording actually sent (a change of the built-in wording re-judges too)
    template = (e.pairwise_template or PAIRWISE_TEMPLATE) if kind == "pairwise" \
        else (e.harm_template or HARM_TEMPLATE)
    from guidealign.eval.generate import judge_engine

    # the settings of the engine that judges (respond.engine's keys over engine's)
    je = judge_engine(cfg)
    template_name, model = judge_template(cfg)
    # v3: the vicuna_v1.1 template renders turns as FastChat does (no space after </s>); the
    # template by its text (a hash), so editing a template file re-judges; with none
    # configured, the judge model's own template by its text too (and where it ends a turn)
    # TOKENIZATION: how PromptBuilder turns a judge prompt into ids (render_chat builds with it)
    from guidealign.gen.build import TOKENIZATION
    from guidealign.gen.outputs import counted_seed, turn_end
    from guidealign.gen.templates import template_hash

    own = [] if template_name else [model_template(model)]
    return fingerprint(f"eval-{kind}-llm-v3", TOKENIZATION, e.judge_model, template_hash(template_name),
                       e.judge_sampling, e.max_response_tokens, template, e.judge_system or JUDGE_SYSTEM,
                       counted_seed(judge_seed(cfg), e.judge_sampling.temperature > 0), je.max_model_len,
                       je.dtype, turn_end(template_name), *own)


def judge_template(cfg) -> tuple[str | None, str]:
    """(the chat template the LLM judge renders with, the model it judges with): a judge that
    reuses the responder's engine (same model, no template of its own configured) renders with
    the responder's template; None = the model's own (from its tokenizer files)."""
    from guidealign.eval.generate import judge_is_responder, responder_engine

    e, r = cfg.eval, responder_engine(cfg)
    if judge_is_responder(cfg):
        return e.judge_chat_template or r.chat_template or None, r.model
    return e.judge_chat_template or None, e.judge_model


_OWN_TEMPLATES: dict = {}


def model_template(model: str) -> dict:
    """``gen.outputs.own_template`` of ``model`` (its own chat template's hash, where it ends a
    turn; ``own_template`` None: it has none), read from its tokenizer files (no weights) and
    kept while those files are unchanged; ``{"own_template": "unreadable"}`` when they cannot
    be read here (building its engine would say why)."""
    from guidealign.core.models import resolve
    from guidealign.gen.outputs import own_template

    try:
        path = resolve(model)
        d = Path(path)
        key = (path, tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in d.iterdir()
                                  if f.is_file() and f.suffix in (".json", ".jinja", ".model", ".txt"))
                           ) if d.is_dir() else None)
        if key not in _OWN_TEMPLATES:
            _OWN_TEMPLATES[key] = own_template(model)
    except (OSError, ValueError):  # not local, not in the Hub cache
        return {"own_template": "unreadable"}
    return _OWN_TEMPLATES[key]


def judge_seed(cfg) -> int:
    """The seed an LLM judge samples with (each request's): its engine's (``eval.judge_engine``,
    ``respond.engine`` and ``engine`` in that order), the one its fingerprint holds."""
    from guidealign.eval.generate import judge_engine

    return judge_engine(cfg).seed


@dataclass
class JudgePlan:
    """One judge's work: its items in shards, and what judges a list of items."""

    kind: str
    item_type: type
    chunks: list[list]
    config_fp: str
    judge: Callable[[list], dict]  # items -> judgment columns; builds its model on first use

    @cached_property
    def shard_fps(self) -> list[str]:
        from guidealign.shards import fingerprint

        return [fingerprint(PLAN_VERSION, [dataclasses.asdict(it) for it in c]) for c in self.chunks]


def make_plan(kind: str, items: list, item_type: type, key, shard_rows: int, config_fp: str,
         judge: Callable[[list], dict], slots: list | None = None) -> JudgePlan:
    """``items`` in shards of ``shard_rows``. ``slots``: every key an item may have (each
    benchmark question, or question and condition); the shards are cut along the sorted slots
    and each holds the items of its slots, so that an item that comes or goes (a response
    that failed, then was fixed) changes its own shard only, not every shard after it.
    Without ``slots``, along the items themselves."""
    items = sorted(items, key=key)
    if slots is None:
        chunks = [items[i:i + shard_rows] for i in range(0, len(items), shard_rows)] or [[]]
        return JudgePlan(kind, item_type, chunks, config_fp, judge)
    slots = sorted(set(slots))
    where = {s: i // shard_rows for i, s in enumerate(slots)}
    chunks = [[] for _ in range(max(1, -(-len(slots) // shard_rows)))]
    for it in items:
        k = key(it)
        if k not in where:
            raise ValueError(f"judgment item {k!r} is in none of the plan's slots")
        chunks[where[k]].append(it)
    return JudgePlan(kind, item_type, chunks, config_fp, judge)


def _items_table(chunk: list, item_type: type) -> pa.Table:
    names = [f.name for f in dataclasses.fields(item_type)]
    return pa.table({n: pa.array([getattr(it, n) for it in chunk], pa.string()) for n in names})


def _drop_shards_from(d: Path, n: int) -> None:
    """Remove the shards ``>= n`` that a previous run with more items committed in ``d``."""
    from guidealign.shards.layout import marker_path, quarantine_path, shard_indices, shard_path

    for i in shard_indices(d):
        if i >= n:
            for p in (marker_path(d, i), shard_path(d, i), quarantine_path(d, i)):
                p.unlink(missing_ok=True)


def write_plan(sub: Path, p: JudgePlan, rank: int, world_size: int) -> None:
    """Write the plan shards of this rank (static share) that do not hold these items yet."""
    from guidealign.shards import fingerprint, is_done, my_shards, write_manifest, write_shard

    d, fps = plan_dir(sub, p.kind), p.shard_fps
    write_manifest(d, stage=d.name, num_shards=len(fps), fingerprint=fingerprint(PLAN_VERSION, fps))
    if rank == 0:
        for dd in (d, judgments_dir(sub, p.kind)):
            _drop_shards_from(dd, len(fps))
    for i in my_shards(len(fps), rank, world_size):
        if not is_done(d, i, fps[i]):
            write_shard(d, i, _items_table(p.chunks[i], p.item_type), fps[i])


def wait_plan(sub: Path, p: JudgePlan, timeout: float, poll: float = 2.0) -> None:
    """Block until every plan shard holds the items of ``p`` (other ranks write theirs)."""
    from guidealign.shards import is_done
    from guidealign.shards.watch import Watch, waiting

    d, fps = plan_dir(sub, p.kind), p.shard_fps
    deadline = time.monotonic() + timeout
    watch = Watch(d.parent, str(d))
    with waiting(str(d)):
        while True:
            todo = [i for i, fp in enumerate(fps) if not is_done(d, i, fp)]
            if not todo:
                return
            what = (f"{d}: {len(todo)} of {len(fps)} plan shard(s) not written with the current "
                    f"items yet, e.g. {todo[:5]}")
            if timeout <= 0 or time.monotonic() >= deadline:
                raise EvalError(what + ": run every rank of the eval")
            watch.check(len(fps) - len(todo), what)
            time.sleep(poll)


def shard_fn(p: JudgePlan):
    """The per-shard function for ``map_shards``: plan shard (items) -> judgment shard."""
    def fn(table: pa.Table, index: int):
        items = [p.item_type(**r) for r in table.to_pylist()]
        if not items:
            return pa.table({"id": pa.array([], pa.string())})
        cols = p.judge(items)
        stats = {"judgments": len(cols["id"]),
                 "unparsed": sum(v is None for v in cols["verdict"])}
        return pa.table(cols), None, stats
    return fn


def judge_stage(sub: Path, p: JudgePlan, cfg, rank: int, world_size: int, progress: bool):
    """Plan, then judge this rank's shards (map_shards); returns its StageReport."""
    from guidealign.shards import claims, map_shards

    write_plan(sub, p, rank, world_size)
    if claims.current_assignment().kind == "dynamic":
        wait_plan(sub, p, wait_s(cfg, world_size))
    dst = judgments_dir(sub, p.kind)
    return map_shards(dst.name, plan_dir(sub, p.kind), dst, p.config_fp, fn=shard_fn(p), rank=rank,
                      world_size=world_size, progress=progress)


def read_judgments(sub: Path, p: JudgePlan, cfg, world_size: int) -> list[dict]:
    """Every judgment row of a judge, once every rank has planned and judged its shards."""
    from guidealign.shards import read_table, wait_complete

    wait_plan(sub, p, wait_s(cfg, world_size))
    d = judgments_dir(sub, p.kind)
    man = wait_complete(d, timeout=wait_s(cfg, world_size), config_fp=p.config_fp)
    rows = []
    for i in range(int(man["num_shards"])):
        t = read_table(d, i)
        if t.num_rows:
            rows.extend(t.to_pylist())
    return rows


def judge_plans(cfg, judges: list[str], bench: dict, resp: dict, engines) -> dict[str, JudgePlan]:
    """The configured judges' plans: harmfulness (one item per question and condition with a
    usable response) and pairwise (one item per question with both responses usable)."""
    from guidealign.eval.judges import HarmItem, PairItem, judge_harm_llm, judge_pairwise

    ecfg = cfg.eval
    plans = {}
    if "harmfulness" in judges:
        items = [HarmItem(id=i, category=b["category"], prompt=b["prompt"], condition=c,
                          response=resp[c][i]["response"])
                 for i, b in bench.items() for c in ("guided", "unguided") if usable(resp[c].get(i))]
        if ecfg.harm_judge == "classifier":
            holder = {}

            def judge(chunk):
                if "clf" not in holder:
                    from guidealign.eval.classifier import HarmClassifier

                    if engines is not None:  # its GPU memory first: not beside a live engine
                        engines.release_generator()
                    holder["clf"] = HarmClassifier(ecfg)
                return holder["clf"].judge(chunk)
        else:
            def judge(chunk):
                return judge_harm_llm(engines.judge(), chunk, ecfg, seed=judge_seed(cfg))
        plans["harm"] = make_plan("harm", items, HarmItem, lambda it: (it.id, it.condition),
                                  ecfg.shard_rows, judge_fp(cfg, "harm"), judge,
                                  slots=[(i, c) for i in bench for c in ("guided", "unguided")])
    if "pairwise" in judges:
        items = [PairItem(id=i, category=b["category"], prompt=b["prompt"],
                          guided=resp["guided"][i]["response"], unguided=resp["unguided"][i]["response"])
                 for i, b in bench.items()
                 if usable(resp["guided"].get(i)) and usable(resp["unguided"].get(i))]
        plans["pairwise"] = make_plan(
            "pairwise", items, PairItem, lambda it: it.id, ecfg.shard_rows, judge_fp(cfg, "pairwise"),
            lambda chunk: judge_pairwise(engines.judge(), chunk, ecfg, seed=judge_seed(cfg)),
            slots=list(bench))
    return plans


def check_judge_template(cfg) -> None:
    """Raise EvalError when the LLM judge cannot render a prompt: a configured template that
    does not read, or none configured and its model has none of its own. Read from the
    template and the model's tokenizer files only, before any answer or weight is loaded."""
    from guidealign.gen.templates import BUILTIN, ChatTemplateError, template_hash

    spec, model = judge_template(cfg)
    try:
        template_hash(spec)
    except ChatTemplateError as e:
        raise EvalError(f"eval.judge_chat_template: {e}") from e
    if spec is None and model_template(model).get("own_template") is None:
        raise EvalError(f"the eval judge {model} has no chat template of its own: set "
                        f"eval.judge_chat_template (a built-in: {', '.join(BUILTIN)}, or a .jinja file)")
