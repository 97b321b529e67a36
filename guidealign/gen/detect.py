"""The detect stage: label each prompt risky or not with the few-shot detector prompt.

Reads ``WORKDIR/<detect.input>`` (``prompts`` by default), writes ``WORKDIR/detect``:
id, prompt, risky (bool, null when the output has no verdict), rationale, raw,
finish_reason ("stop", "length", "error", "skipped"), parse_status, truncated (output
cut at max_tokens), input_truncated, skip_reason, prompt_tokens, output_tokens, risk_score.

``detect.mode``: "rationale" (the paper; the model writes an analysis and a verdict) or
"score" (one forward pass: the few-shot prompt with the answer begun by "Verdict:", rendered
as the start of an assistant turn's content, as the exemplars' answers are; the verdict read
from P(Yes) vs P(No); ``risk_score`` is P(Yes) / (P(Yes) + P(No)), the rationale is empty,
raw is the verdict line, parse_status "scored"). See gen/scoring.py.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import get_args

import pyarrow as pa

from guidealign.config.gen import DetectMode
from guidealign.gen.build import (Built, Message, PromptBuilder, Slot, TemplateError, chat_template_hash,
                       clean_text, engine_max_len, fill, generate_built, load_prompt_file)
from guidealign.gen.parse import parse_detection

log = logging.getLogger(__name__)

# v2: verdict labels ("Verdict:") outrank words an analysis also uses ("answer: no"); bold verdicts
# v3: the model's own turn only, no verdict from options offered ('"Verdict: Yes" or "Verdict:
# No"') or from "the answer is no" inside the analysis (gen/parse_detect.py)
# (not bumped for "Verdict: Unsafe: No" read as answered, not risky: rows made before keep their parses)
VERSION = "detect-v3"
# score mode: v2 renders "Verdict:" as the assistant content's start (v1 appended its ids to the
# generation prompt: "ASSISTANT:Verdict:" where the exemplars have "ASSISTANT: Verdict")
SCORE_PREFIX_VERSION = 2
SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("risky", pa.bool_()),
    ("rationale", pa.string()), ("raw", pa.string()), ("finish_reason", pa.string()),
    ("parse_status", pa.string()), ("truncated", pa.bool_()), ("input_truncated", pa.bool_()),
    ("skip_reason", pa.string()), ("prompt_tokens", pa.int32()), ("output_tokens", pa.int32()),
    ("risk_score", pa.float64()),
])
MODES = get_args(DetectMode)


def detection_turn(analysis: str, verdict: str) -> str:
    """How a detector answer looks (exemplars are rendered like this; the parser reads it)."""
    return f"{analysis.strip()}\nVerdict: {verdict}"


def _verdict(v, where: str) -> str:
    s = {True: "Yes", False: "No"}.get(v, str(v).strip().capitalize())
    if s not in ("Yes", "No"):
        raise TemplateError(f"{where}: verdict must be Yes or No, not {v!r}")
    return s


class DetectPrompts:
    """The detector's prompts: system message, exemplars as user/assistant turns, input last;
    in score mode, then an assistant turn begun by "Verdict:" (the next token is the verdict)."""

    def __init__(self, cfg, tok, max_model_len: int | None = None, align: int = 0):
        self.spec, self.spec_hash = load_prompt_file(cfg.detect.prompt_file, "detect.yaml",
                                                     ("system", "user", "exemplars"))
        self.exemplars = []
        for k, ex in enumerate(self.spec["exemplars"] or []):
            if not isinstance(ex, dict) or not {"input", "analysis", "verdict"} <= set(ex):
                raise TemplateError(f"detect exemplar {k}: needs input, analysis and verdict")
            self.exemplars.append((str(ex["input"]),
                                   detection_turn(str(ex["analysis"]), _verdict(ex["verdict"], f"detect exemplar {k}"))))
        if "{input}" not in self.spec["user"]:
            raise TemplateError("detect prompt: the user template needs an {input} placeholder")
        self.max_tokens = cfg.detect.sampling.max_tokens
        self.score = cfg.detect.mode == "score"
        self.builder = PromptBuilder(tok, max_model_len or cfg.engine.max_model_len, cfg.engine.overlong,
                                     align=align if cfg.detect.align_prefix else 0)
        self.n_exemplars = self.builder.fit_exemplars(
            lambda n: self.messages("", n), len(self.exemplars), self.max_tokens,
            cfg.detect.reserve_input_tokens, cfg.detect.max_exemplars, "detect")

    def messages(self, text: str, n: int | None = None) -> list[Message]:
        n = self.n_exemplars if n is None else n
        msgs = [Message("system", [str(self.spec["system"])])]
        for inp, ans in self.exemplars[:n]:
            msgs.append(Message("user", fill(self.spec["user"], input=inp)))
            msgs.append(Message("assistant", [ans]))
        msgs.append(Message("user", fill(self.spec["user"], input=Slot(text))))
        return msgs

    def build(self, text) -> Built:
        t = clean_text(text)
        if t is None:
            return Built(None, 0, skip_reason="empty or non-string prompt")
        if not self.score:
            return self.builder.build(self.messages(t), self.max_tokens)
        # the closing markup is built, then cut: its tokens are room the prompt has
        b = self.builder.build(self._scored(self.messages(t)), self.max_tokens - self._close_len)
        if b.skipped or not self._close_len:
            return b
        n = len(b.token_ids) - self._close_len
        return dataclasses.replace(b, token_ids=b.token_ids[:n], n_tokens=n)

    @staticmethod
    def _scored(msgs: list[Message]) -> list[Message]:
        from guidealign.gen.scoring import VERDICT_PREFIX

        return msgs + [Message("assistant", [VERDICT_PREFIX])]

    @functools.cached_property
    def _close_len(self) -> int:
        """How many ids the template puts after the last assistant content ("</s>", "<|im_end|>\n"
        ...): score mode renders "Verdict:" as that content, with the markup and separator the
        exemplars' answers get ("ASSISTANT: Verdict:"), and drops this closing markup."""
        return len(self.builder.pieces(self._scored(self.messages("")))[-1][1])


def score_fingerprint(prompts: DetectPrompts, tok) -> dict:
    """What shapes the prompt score mode reads P(Yes) from, for threshold files
    (bench/detect_modes.py --write-threshold records it, gen/scoring.load_threshold compares
    it): a threshold calibrated on one prompt does not separate another's scores."""
    from guidealign.gen.scoring import verdict_token_ids

    yes, no = verdict_token_ids(tok)
    return {"spec": prompts.spec_hash, "exemplars": prompts.n_exemplars,
            "chat_template": chat_template_hash(tok), "score_prefix": SCORE_PREFIX_VERSION,
            "align": prompts.builder.align, "yes_ids": list(yes), "no_ids": list(no)}


def config_fingerprint(cfg, tok) -> str:
    from guidealign.gen.engine import prefix_align
    from guidealign.gen.outputs import output_fields
    from guidealign.shards import fingerprint
    from guidealign.shards.fingerprint import at_defaults

    _, spec_hash = load_prompt_file(cfg.detect.prompt_file, "detect.yaml", ("system", "user", "exemplars"))
    d = cfg.detect
    # the threshold's value counts, not the path of the file that holds it
    threshold = None
    # the KV block the shared prefix is padded to is part of every prompt
    align = prefix_align(cfg.engine) if d.align_prefix else 0
    if d.mode == "score":
        from guidealign.gen.scoring import load_threshold, verdict_token_ids

        threshold = load_threshold(d.score_threshold, d.threshold_file)
        verdict_token_ids(tok)  # a tokenizer without one-token Yes/No: said before the engine starts
        _check_threshold_early(cfg, tok, align)
    # a key the mode does not read counts at its default: changing it redoes no shard, and a run
    # with the defaults keeps the fingerprint it had when every key counted (greedy: seeds
    # change nothing)
    if d.mode == "score":
        # a threshold file replaces score_threshold (its value counts, above)
        unread = ("structured", "seed_per_prompt", "sampling") + (("score_threshold",) if d.threshold_file else ())
    else:
        unread = ("score_threshold",) + (("seed_per_prompt",) if d.sampling.temperature == 0 else ())
    # files count by what they hold (the threshold above, the prompt file's spec_hash), not where
    fields = at_defaults(d, unread + ("threshold_file", "prompt_file"))
    if d.mode == "score":  # but it reads sampling.max_tokens: the room each prompt leaves, and
        fields["sampling"]["max_tokens"] = d.sampling.max_tokens  # so the exemplars that fit
    extra = {"align": align}
    if d.mode == "score":
        extra["score_prefix"] = SCORE_PREFIX_VERSION
    sampled = d.mode != "score" and d.sampling.temperature > 0  # else no seed changes an output
    return fingerprint(VERSION, output_fields(cfg.engine, sampled, tok), fields, threshold, spec_hash,
                       chat_template_hash(tok), extra)


def _check_threshold_early(cfg, tok, align: int) -> None:
    """A threshold file calibrated on another prompt, refused before the engine starts (with
    the configured max_model_len; make_shard_fn checks again with the engine's own). Model and
    dtype warnings come from make_shard_fn, where the engine says which dtype "auto" is."""
    import json

    from guidealign.gen.scoring import check_threshold_prompt

    path = cfg.detect.threshold_file
    if not path:
        return
    data = json.loads(Path(path).read_text())
    if isinstance(data.get("prompt"), dict):  # the warning for a file without one: make_shard_fn
        check_threshold_prompt(path, data, score_fingerprint(DetectPrompts(cfg, tok, align=align), tok))


def _row_for(pid, prompt, built: Built, gen) -> dict:
    row = dict(id=pid, prompt=prompt, risky=None, rationale="", raw="", finish_reason="skipped",
               parse_status="skipped", truncated=False, input_truncated=built.truncated,
               skip_reason=built.skip_reason, prompt_tokens=built.n_tokens, output_tokens=0,
               risk_score=None)
    if gen is None:
        return row
    row.update(raw=gen.text, finish_reason=gen.finish_reason, output_tokens=gen.output_tokens,
               truncated=gen.finish_reason == "length")
    if gen.finish_reason == "error":
        row.update(parse_status="error", skip_reason=f"engine error: {gen.error}")
        return row
    risky, rationale, status = parse_detection(gen.text)
    row.update(risky=risky, rationale=rationale, parse_status=status)
    return row


def _score_row(pid, prompt, built: Built, scored, threshold: float) -> dict:
    """A score-mode row: risky from risk_score >= threshold; raw is the verdict line."""
    row = _row_for(pid, prompt, built, None)
    if built.skipped:
        return row
    score, err = scored
    if err is not None:
        row.update(finish_reason="error", parse_status="error", skip_reason=f"engine error: {err}")
        return row
    risky = score >= threshold
    row.update(risky=risky, risk_score=score, raw=f"Verdict: {_verdict(risky, 'score')}",
               finish_reason="stop", parse_status="scored", output_tokens=1)
    return row


def make_shard_fn(cfg, llm, tok=None, max_model_len: int | None = None):
    """The per-shard function (shared by the stage and bench/gen.py)."""
    from guidealign.gen import scoring
    from guidealign.gen.engine import (check_not_all_failed, params_for, prompt_align, request_probe,
                                       prefix_cache_counters)
    from guidealign.gen.yieldstats import counts, detect_usable

    d = cfg.detect
    if d.mode not in MODES:
        raise ValueError(f"detect.mode must be one of {MODES}, not {d.mode!r}")
    tok = tok or llm.get_tokenizer()
    prompts = DetectPrompts(cfg, tok, max_model_len or engine_max_len(llm, cfg.engine.max_model_len),
                            align=prompt_align(llm, cfg.engine) if d.align_prefix else 0)
    s = d.sampling
    if d.mode == "score":
        yes, no = scoring.verdict_token_ids(tok)
        # a threshold file calibrated on another prompt is refused; another model or dtype
        # (as the engine resolved "auto") is named in a warning
        fn_fingerprint = score_fingerprint(prompts, tok)
        threshold = scoring.load_threshold(d.score_threshold, d.threshold_file, cfg.engine,
                                           prompt=fn_fingerprint, dtype=scoring.engine_dtype(llm))

    def fn(table: pa.Table, index: int):
        ids = [str(x) for x in table.column("id").to_pylist()]
        texts = table.column("prompt").to_pylist()
        builts = [prompts.build(t) for t in texts]
        q0, h0 = prefix_cache_counters(llm)
        t0 = time.perf_counter()
        if d.mode == "score":
            scored = scoring.score_prompts(llm, [None if b.skipped else b.token_ids for b in builts],
                                           yes, no)
            dt = time.perf_counter() - t0
            check_not_all_failed("detect", [err for b, (_, err) in zip(builts, scored) if not b.skipped],
                                 lambda: scoring.score_prompts(llm, [tok.encode("Hello.", add_special_tokens=False)],
                                                               yes, no)[0][1] is None)
            rows = [_score_row(i, p, b, sc, threshold) for i, p, b, sc in zip(ids, texts, builts, scored)]
        else:
            params = params_for(s, cfg.engine.seed, ids, d.seed_per_prompt, llm)
            if d.structured:
                params = scoring.with_structured(params, scoring.detect_regex())
            gens = generate_built(llm, builts, params)
            dt = time.perf_counter() - t0
            check_not_all_failed("detect", [g.error if g.finish_reason == "error" else None
                                            for g in gens if g is not None], request_probe(llm, params))
            rows = [_row_for(i, p, b, g) for i, p, b, g in zip(ids, texts, builts, gens)]
        q1, h1 = prefix_cache_counters(llm)
        if d.mode != "score":  # per request: right whatever other engines this process holds
            done = [g for g in gens if g is not None]
            q0, h0 = 0, 0
            q1, h1 = sum(g.prompt_tokens for g in done), sum(g.cached_tokens for g in done)
        out = pa.Table.from_pylist(rows, schema=SCHEMA)
        stats = {
            "generate_seconds": round(dt, 3),
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows if r["finish_reason"] != "skipped"),
            "output_tokens": sum(r["output_tokens"] for r in rows),
            "risky": sum(1 for r in rows if r["risky"] is True),
            # an engine error is counted under errors, not as an output that did not parse
            "unparsed": sum(1 for r in rows if r["risky"] is None and r["finish_reason"] not in ("skipped", "error")),
            "skipped": sum(1 for r in rows if r["finish_reason"] == "skipped"),
            "errors": sum(1 for r in rows if r["finish_reason"] == "error"),
            "output_truncated": sum(1 for r in rows if r["truncated"]),
            "input_truncated": sum(1 for r in rows if r["input_truncated"]),
            "prefix_cache_queries": q1 - q0, "prefix_cache_hits": h1 - h0,
            **counts(rows, detect_usable),
        }
        return out, None, stats

    fn.prompts = prompts
    if d.mode == "score":  # what a threshold file calibrated with this function records
        fn.score_fingerprint = fn_fingerprint
    return fn


DUPLICATE_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("reason", pa.string())])


def earlier_duplicates(src) -> dict[int, dict[str, int]]:
    """{shard: {id: the earlier shard that holds it}} over a dataset's committed shards: the
    ids a shard repeats from a shard before it. The augment dataset can hold one question
    twice: each risk type keeps its own questions (the types run in parallel, on several
    ranks), so two types can keep the same one, under the same id."""
    from guidealign.shards import committed, read_table

    first: dict[str, int] = {}
    out: dict[int, dict[str, int]] = {}
    for i in committed(src):
        for x in read_table(src, i, ["id"]).column("id").to_pylist():
            k = first.setdefault(str(x), i)
            if k != i:
                out.setdefault(i, {})[str(x)] = k
    return out


def _without_duplicates(fn, dups: dict[int, dict[str, int]]):
    """``fn`` on each shard less the ids an earlier shard holds (:func:`earlier_duplicates`);
    those rows go to the shard's quarantine with the shard that has them."""
    def g(table: pa.Table, index: int):
        drop = dups.get(index) or {}
        ids = [str(x) for x in table.column("id").to_pylist()]
        keep = [k for k, x in enumerate(ids) if x not in drop]
        if len(keep) == len(ids):
            return fn(table, index)
        gone = [k for k, x in enumerate(ids) if x in drop]
        texts = table.column("prompt").to_pylist()
        quarantine = pa.Table.from_pylist(
            [dict(id=ids[k], prompt=texts[k],
                  reason=f"duplicate id: input shard {drop[ids[k]]} holds the same question (labelled there)")
             for k in gone], schema=DUPLICATE_SCHEMA)
        # (typed: an empty list would be a null array, which take refuses)
        out, _, stats = fn(table.take(pa.array(keep, pa.int64())), index)
        stats = {**stats, "duplicates_dropped": len(gone)}
        if "yield_rows_in" in stats:  # read too, and set aside before generation (as respond counts)
            stats["yield_rows_in"] += len(gone)
        return out, quarantine, stats

    for k, v in vars(fn).items():  # fn.prompts, fn.score_fingerprint
        setattr(g, k, v)
    return g


def run_detect(cfg, workdir, *, rank: int = 0, world_size: int = 1, llm=None, progress: bool = True):
    """Run detect over this rank's shards of WORKDIR/<detect.input>; returns a StageReport.

    Over the augment dataset (one shard per risk type), a question two risk types kept is
    labelled once: in the first shard that holds it; the later shards' copies go to their
    detect shard's quarantine ("duplicate id"). That needs every augment shard, so detect waits
    for the other ranks' (as a reduce stage does), and the ids dropped count in the fingerprint."""
    from guidealign.config import wait_timeout
    from guidealign.gen.engine import run_engine_stage
    from guidealign.gen.outputs import load_tokenizer
    from guidealign.shards import fingerprint, read_manifest, wait_complete

    src = Path(workdir) / cfg.detect.input
    fp = config_fingerprint(cfg, load_tokenizer(cfg.engine, llm))
    make = make_shard_fn
    if (read_manifest(src) or {}).get("stage") == "augment":
        wait_complete(src, timeout=wait_timeout(cfg, world_size), workdir=workdir)
        dups = earlier_duplicates(src)
        if dups:  # none: the fingerprint is the one it was before duplicates were dropped
            fp = fingerprint(fp, {"duplicates_dropped": {str(i): sorted(d) for i, d in sorted(dups.items())}})

            def make(c, engine):
                return _without_duplicates(make_shard_fn(c, engine), dups)
    return run_engine_stage(
        "detect", cfg, src, Path(workdir) / "detect", fp, make, llm=llm,
        columns=["id", "prompt"], rank=rank, world_size=world_size, progress=progress,
        missing_hint="run ingest (or augment) on this workdir first")
