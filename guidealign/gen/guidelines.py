"""The guidelines stage: general guidelines per prompt (safety for risky, quality for the rest).

Reads ``WORKDIR/detect``, writes ``WORKDIR/guidelines``: id, prompt, risky, kind
("safety" | "quality" | null when skipped), guidelines (list of {title, text}), raw,
parse_status (gen/parse.py's, or "cut": the only item was cut at max_tokens), finish_reason,
truncated (output cut at max_tokens), input_truncated, skip_reason, prompt_tokens, output_tokens.

As in the paper, a risky prompt is shown as a conversation: the input, the detector's
answer (one with the kind's verdict when the detector gave none), then the request for
guidelines; its exemplars are laid out the same way. Both prompt kinds start with a fixed
system message and exemplars, the prefix vLLM caches.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import pyarrow as pa

from guidealign.config.gen import UnknownVerdict
from guidealign.gen.build import (Built, Message, PromptBuilder, Slot, TemplateError, chat_template_hash,
                       clean_text, engine_max_len, fill, generate_built, load_prompt_file)
from guidealign.gen.detect import _verdict, detection_turn
from guidealign.gen.parse import before_echo, ends_in_last, own_turn, parse_guidelines

log = logging.getLogger(__name__)

# v2: bold titles with their separator inside the bold, bullets under a title-only numbered
# item, an intro line before a numbered list (gen/parse.py); v3: a list ends at a closing note,
# JSON lists, numbered sub-items, no list from a refusal or an answer, the model's own turn
# only; a cut output loses its last item only when it ends inside it; the detection turn of a
# row with no verdict
# (not bumped for the later parser fixes: repeated items dropped, exemplar copies counted, a
# verdict line after the list, a list cut at a copied exemplar, a cut output's last item dropped
# also where a line break follows it without a sentence's end, lettered and Roman-numeral markers
# ("a)", "iv.") read as list markers, not kept in titles, the prompt's field names written out
# ("1. Title: ... Explanation: ...") no title; rows made before keep their parses)
VERSION = "guidelines-v3"
GUIDELINE_TYPE = pa.list_(pa.struct([("title", pa.string()), ("text", pa.string())]))
SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("risky", pa.bool_()), ("kind", pa.string()),
    ("guidelines", GUIDELINE_TYPE), ("raw", pa.string()), ("parse_status", pa.string()),
    ("finish_reason", pa.string()), ("truncated", pa.bool_()), ("input_truncated", pa.bool_()),
    ("skip_reason", pa.string()), ("prompt_tokens", pa.int32()), ("output_tokens", pa.int32()),
])
_SAFETY_KEYS = ("system", "user", "request", "exemplars")
_QUALITY_KEYS = ("system", "user", "exemplars")
# the analysis of the detection turn a safety prompt shows for a row whose detector output
# has no verdict (guidelines.unknown_verdict=safety), with the verdict the kind says
NO_VERDICT_ANALYSIS = ("The review of this input reached no clear verdict, so answering it is "
                       "treated as needing safety care.")
# statuses of rows left with no guideline ("cut": its only item was cut at max_tokens)
UNPARSED = ("missing", "empty", "parse_error", "cut")
# A guideline whose text, normalized (core.ids.normalize, case-folded), has a rapidfuzz
# fuzz.ratio / 100 of at least this to a guideline of an exemplar the prompt showed is counted
# as a copy of it (small models repeat the last one word for word) in the shard stats; it is
# kept: a guideline adapted from an exemplar for a like input (dosing, units) scores as high,
# and the library merges true copies into one entry anyway.
EXEMPLAR_COPY_RATIO = 0.9
# how many guidelines the prompts ask for (gen/prompts/*_guidelines.yaml); without
# guidelines.structured nothing enforces it, so the stats count the rows outside it
ASKED_MIN, ASKED_MAX = 5, 7


def _norm(text: str) -> str:
    from guidealign.core.ids import normalize

    return normalize(text or "").casefold()


def drop_duplicates(items: list[dict]) -> tuple[list[dict], int]:
    """``items`` without exact repeats (same title and text, up to case and whitespace: a
    model looping on one line), and how many were dropped."""
    seen, out = set(), []
    for g in items:
        key = (_norm(g["title"]), _norm(g["text"]))
        if key not in seen:
            seen.add(key)
            out.append(g)
    return out, len(items) - len(out)


def exemplar_copies(items: list[dict], shown: Sequence[str], ratio: float = EXEMPLAR_COPY_RATIO) -> int:
    """How many of ``items`` have a normalized text that matches one of ``shown`` (the normalized
    texts of the guidelines of the exemplars the prompt showed) with a fuzz.ratio of at least
    ``ratio`` (0..1)."""
    if not items or not shown:
        return 0
    from rapidfuzz import fuzz, process

    return sum(process.extractOne(_norm(g["text"]), shown, scorer=fuzz.ratio,
                                  score_cutoff=ratio * 100.0 - 1e-6) is not None for g in items)


def detection_for(raw: str | None, risky: bool | None) -> str:
    """The detection turn a safety prompt shows: the detector's own turn when it said Yes
    (``risky`` is the verdict detect parsed from ``raw``), else, for a row with no verdict
    (guidelines.unknown_verdict=safety), one made up saying Yes: an empty turn, or one saying
    "Verdict: No", before a request for safety guidelines would contradict the kind."""
    if risky:  # without an exemplar copied after the verdict (it may say "Verdict: No")
        return before_echo(own_turn(raw or "")).strip()
    return detection_turn(NO_VERDICT_ANALYSIS, _verdict(True, "detection_for"))


def guidelines_turn(items: list) -> str:
    """How a guideline answer looks: "N. Title: text" lines (exemplars; the parser reads it)."""
    return "\n".join(f"{k}. {g['title'].strip()}: {g['text'].strip()}" for k, g in enumerate(items, 1))


def _check_items(ex: dict, where: str) -> list:
    items = ex.get("guidelines")
    if not isinstance(items, list) or not items or not all(
            isinstance(g, dict) and {"title", "text"} <= set(g) for g in items):
        raise TemplateError(f"{where}: guidelines must be a non-empty list of {{title, text}}")
    return items


class GuidelinePrompts:
    def __init__(self, cfg, tok, max_model_len: int | None = None, align: int = 0):
        g = cfg.guidelines
        self.safety, _ = load_prompt_file(g.safety_prompt_file, "safety_guidelines.yaml", _SAFETY_KEYS)
        self.quality, _ = load_prompt_file(g.quality_prompt_file, "quality_guidelines.yaml", _QUALITY_KEYS)
        for spec, name in ((self.safety, "safety"), (self.quality, "quality")):
            if "{input}" not in spec["user"]:
                raise TemplateError(f"{name} guideline prompt: the user template needs {{input}}")
        self.safety_ex, self.safety_items = [], []
        for k, ex in enumerate(self.safety["exemplars"] or []):
            where = f"safety exemplar {k}"
            if not isinstance(ex, dict) or not {"input", "analysis", "verdict"} <= set(ex):
                raise TemplateError(f"{where}: needs input, analysis, verdict and guidelines")
            self.safety_items.append(_check_items(ex, where))
            self.safety_ex.append((str(ex["input"]),
                                   detection_turn(str(ex["analysis"]), _verdict(ex["verdict"], where)),
                                   guidelines_turn(self.safety_items[-1])))
        self.quality_ex, self.quality_items = [], []
        for k, ex in enumerate(self.quality["exemplars"] or []):
            where = f"quality exemplar {k}"
            if not isinstance(ex, dict) or "input" not in ex:
                raise TemplateError(f"{where}: needs input and guidelines")
            self.quality_items.append(_check_items(ex, where))
            self.quality_ex.append((str(ex["input"]), guidelines_turn(self.quality_items[-1])))
        self.max_tokens = g.sampling.max_tokens
        self.builder = PromptBuilder(tok, max_model_len or cfg.engine.max_model_len, cfg.engine.overlong,
                                     align=align if g.align_prefix else 0)
        self.n_safety = self.builder.fit_exemplars(
            lambda n: self.safety_messages("", "", n), len(self.safety_ex), self.max_tokens,
            g.reserve_input_tokens, g.max_safety_exemplars, "safety guidelines")
        self.n_quality = self.builder.fit_exemplars(
            lambda n: self.quality_messages("", n), len(self.quality_ex), self.max_tokens,
            g.reserve_input_tokens, g.max_quality_exemplars, "quality guidelines")
        # the normalized texts of the guidelines of the exemplars each kind's prompt shows: an
        # output's copies of them are counted (exemplar_copies)
        self.shown = {kind: [_norm(str(it["text"])) for ex in exs[:n] for it in ex]
                      for kind, exs, n in (("safety", self.safety_items, self.n_safety),
                                           ("quality", self.quality_items, self.n_quality))}

    def safety_messages(self, text: str, detection: str, n: int | None = None) -> list[Message]:
        n = self.n_safety if n is None else n
        s = self.safety
        msgs = [Message("system", [str(s["system"])])]
        for inp, det, gl in self.safety_ex[:n]:
            msgs += [Message("user", fill(s["user"], input=inp)), Message("assistant", [det]),
                     Message("user", [str(s["request"])]), Message("assistant", [gl])]
        # the detection turn is cut before the input when the prompt is too long
        msgs += [Message("user", fill(s["user"], input=Slot(text))),
                 Message("assistant", [Slot(detection, cut_order=-1)]), Message("user", [str(s["request"])])]
        return msgs

    def quality_messages(self, text: str, n: int | None = None) -> list[Message]:
        n = self.n_quality if n is None else n
        q = self.quality
        msgs = [Message("system", [str(q["system"])])]
        for inp, gl in self.quality_ex[:n]:
            msgs += [Message("user", fill(q["user"], input=inp)), Message("assistant", [gl])]
        msgs.append(Message("user", fill(q["user"], input=Slot(text))))
        return msgs

    def build(self, text, kind: str, detection: str | None) -> Built:
        t = clean_text(text)
        if t is None:
            return Built(None, 0, skip_reason="empty or non-string prompt")
        if kind == "safety":
            return self.builder.build(self.safety_messages(t, (detection or "").strip()), self.max_tokens)
        return self.builder.build(self.quality_messages(t), self.max_tokens)


def config_fingerprint(cfg, tok) -> str:
    from guidealign.gen.engine import prefix_align
    from guidealign.gen.outputs import output_fields
    from guidealign.shards import fingerprint
    from guidealign.shards.fingerprint import at_defaults

    g = cfg.guidelines
    _, h1 = load_prompt_file(g.safety_prompt_file, "safety_guidelines.yaml", _SAFETY_KEYS)
    _, h2 = load_prompt_file(g.quality_prompt_file, "quality_guidelines.yaml", _QUALITY_KEYS)
    # the KV block the shared prefixes are padded to is part of every prompt
    align = prefix_align(cfg.engine) if g.align_prefix else 0
    # greedy: seeds change nothing (counted at the default); the prompt files count by what
    # they hold (h1, h2), not where they are
    fields = at_defaults(g, ("safety_prompt_file", "quality_prompt_file")
                         + (("seed_per_prompt",) if g.sampling.temperature == 0 else ()))
    parts = [VERSION, output_fields(cfg.engine, g.sampling.temperature > 0, tok), fields, h1, h2,
             chat_template_hash(tok), {"align": align}]
    if g.structured:  # the grammar the outputs were constrained to (unstructured runs: unchanged)
        from guidealign.gen.scoring import guidelines_regex

        parts.append(guidelines_regex())
    return fingerprint(*parts)


def _parse(text: str) -> tuple[list, str, str | None]:
    """parse_guidelines, but an output the parser fails on is that row's status
    ("parse_error", with the exception as skip_reason), never the end of its shard."""
    try:
        items, status = parse_guidelines(text)
        return items, status, None
    except Exception as e:  # noqa: BLE001 - one odd output must not kill the shard
        log.warning("guideline parser failed on an output: %s: %s", type(e).__name__, e)
        return [], "parse_error", f"parser failed: {type(e).__name__}: {e}"


def kind_for(risky, unknown: str) -> str | None:
    if risky is True:
        return "safety"
    if risky is False:
        return "quality"
    if unknown not in get_args(UnknownVerdict):
        raise ValueError(f"guidelines.unknown_verdict must be safety, quality or skip, not {unknown!r}")
    return None if unknown == "skip" else unknown


def make_shard_fn(cfg, llm, tok=None, max_model_len: int | None = None):
    from guidealign.gen import scoring
    from guidealign.gen.engine import (check_not_all_failed, params_for, prompt_align, request_probe,
                                       prefix_cache_counters)
    from guidealign.gen.yieldstats import counts, guidelines_usable

    g = cfg.guidelines
    tok = tok or llm.get_tokenizer()
    prompts = GuidelinePrompts(cfg, tok, max_model_len or engine_max_len(llm, cfg.engine.max_model_len),
                               align=prompt_align(llm, cfg.engine) if g.align_prefix else 0)
    kind_for(None, g.unknown_verdict)  # validate early

    def fn(table: pa.Table, index: int):
        ids = [str(x) for x in table.column("id").to_pylist()]
        texts = table.column("prompt").to_pylist()
        riskys = table.column("risky").to_pylist()
        raws = table.column("raw").to_pylist()
        kinds, builts = [], []
        for t, r, raw in zip(texts, riskys, raws):
            k = kind_for(r, g.unknown_verdict)
            kinds.append(k)
            if k is None:
                builts.append(Built(None, 0, skip_reason="detection has no verdict "
                                                         "(guidelines.unknown_verdict=skip)"))
            else:
                builts.append(prompts.build(t, k, detection_for(raw, r) if k == "safety" else None))
        params = params_for(g.sampling, cfg.engine.seed, ids, g.seed_per_prompt, llm)
        if g.structured:
            params = scoring.with_structured(params, scoring.guidelines_regex())
        q0, h0 = prefix_cache_counters(llm)
        t0 = time.perf_counter()
        gens = generate_built(llm, builts, params)
        dt = time.perf_counter() - t0
        check_not_all_failed("guidelines", [g.error if g.finish_reason == "error" else None
                                            for g in gens if g is not None], request_probe(llm, params))
        q1, h1 = prefix_cache_counters(llm)
        rows = []
        counted: list[tuple[int, int]] = []  # per parsed row: (duplicates, exemplar copies) dropped
        for pid, text, r, k, b, gen in zip(ids, texts, riskys, kinds, builts, gens):
            row = dict(id=pid, prompt=text, risky=r, kind=k if not b.skipped else None,
                       guidelines=[], raw="", parse_status="skipped", finish_reason="skipped",
                       truncated=False, input_truncated=b.truncated, skip_reason=b.skip_reason,
                       prompt_tokens=b.n_tokens, output_tokens=0)
            if gen is not None:
                row.update(raw=gen.text, finish_reason=gen.finish_reason,
                           truncated=gen.finish_reason == "length", output_tokens=gen.output_tokens)
                if gen.finish_reason == "error":
                    row.update(parse_status="error", skip_reason=f"engine error: {gen.error}")
                else:
                    items, status, err = _parse(gen.text)
                    if gen.finish_reason == "length" and ends_in_last(gen.text, items[-1]["text"] if items else None):
                        # the output stopped at max_tokens inside its last item: that fragment
                        # ("Keep answers sh") would be a guideline of the library (not so when
                        # the parser dropped what it ended in: a bare "3.", a closing paragraph)
                        items = items[:-1]
                        err = err or "last guideline cut at max_tokens: dropped"
                        status = status if items else "cut"
                    items, dups = drop_duplicates(items)
                    counted.append((dups, exemplar_copies(items, prompts.shown.get(k, ()))))
                    row.update(guidelines=items, parse_status=status)
                    if err:
                        row.update(skip_reason=err)
            rows.append(row)
        stats = {
            "generate_seconds": round(dt, 3),
            "output_tokens": sum(r["output_tokens"] for r in rows),
            "safety": sum(1 for r in rows if r["kind"] == "safety"),
            "quality": sum(1 for r in rows if r["kind"] == "quality"),
            "guidelines": sum(len(r["guidelines"]) for r in rows),
            # guidelines repeated within their row (dropped), and copying an exemplar's (kept)
            "duplicate_guidelines": sum(d for d, _ in counted),
            "exemplar_copies": sum(c for _, c in counted),
            # rows with guidelines, but fewer or more than the prompts ask for (kept as they are)
            f"rows_under_{ASKED_MIN}_guidelines": sum(1 for r in rows if 0 < len(r["guidelines"]) < ASKED_MIN),
            f"rows_over_{ASKED_MAX}_guidelines": sum(1 for r in rows if len(r["guidelines"]) > ASKED_MAX),
            "unparsed": sum(1 for r in rows if r["parse_status"] in UNPARSED),
            "skipped": sum(1 for r in rows if r["finish_reason"] == "skipped"),
            "errors": sum(1 for r in rows if r["finish_reason"] == "error"),
            "output_truncated": sum(1 for r in rows if r["truncated"]),
            "input_truncated": sum(1 for r in rows if r["input_truncated"]),
            "prefix_cache_queries": q1 - q0, "prefix_cache_hits": h1 - h0,
            **counts(rows, guidelines_usable),
        }
        return pa.Table.from_pylist(rows, schema=SCHEMA), None, stats

    fn.prompts = prompts
    return fn


def run_guidelines(cfg, workdir, *, rank: int = 0, world_size: int = 1, llm=None,
                   progress: bool = True):
    """Run the guidelines stage over this rank's shards of WORKDIR/detect."""
    from guidealign.gen.engine import run_engine_stage
    from guidealign.gen.outputs import load_tokenizer

    return run_engine_stage(
        "guidelines", cfg, Path(workdir) / "detect", Path(workdir) / "guidelines",
        config_fingerprint(cfg, load_tokenizer(cfg.engine, llm)), make_shard_fn, llm=llm,
        columns=["id", "prompt", "risky", "raw"], rank=rank, world_size=world_size,
        progress=progress, missing_hint="run detect on this workdir first")
