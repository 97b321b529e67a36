"""The augment stage: grow the paper's safety-question set self-instruct style.

One output shard per risk type (shard i = the i-th type of the risk-type file, or of
``augment.types``), so the work splits by rank and resumes per type. Each round, every
unfinished type of this worker gets ``requests_per_round`` prompts showing a few kept
questions of that type; all of them go to vLLM in one call. A new question is kept when
it passes the format checks and its ROUGE-L F against every question kept so far is at
most ``rouge_threshold`` (0.7, the paper's rule); rejected ones go to the shard's
quarantine table with the reason, never silently away. A type's shard is committed as
soon as it reaches ``target_per_type`` (or after ``max_rounds``).

Output rows have the prompt schema (id, prompt, source, metadata) plus risk_type, so
``guidealign ingest 'WORKDIR/augment/shard-*.parquet'`` ingests them and
``--set detect.input=augment`` runs detect on them directly. Types run apart (on several
ranks), so two types can keep one question (one id in two shards); detect over augment labels
it once, in the first type's shard, and quarantines the later copies (gen/detect.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
from rapidfuzz.distance import Indel

from guidealign.gen.build import (Message, PromptBuilder, TemplateError, chat_template_hash, engine_max_len,
                       fill, generate_built, load_prompt_file)
from guidealign.gen.parse import ends_in_last
from guidealign.gen.questions import parse_questions, unwrap_question

log = logging.getLogger(__name__)

# v2: questions cleaned of list markers; Unicode ROUGE tokens; v3: CJK word count; v4: wrapped
# lines join their question, text after the list ("Note: ...") is none (not bumped for a cut
# output's last question dropped also where a line break follows it without a "?" or a
# sentence's end, nor for lettered items ("a) ...", "iv. ...") read as a list: questions made
# before keep their parses)
VERSION = "augment-v4"
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("source", pa.string()),
                    ("metadata", pa.string()), ("risk_type", pa.string())])
QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("row", pa.int64()),
                               ("reason", pa.string()), ("raw", pa.string())])

_WORD = re.compile(r"[^\W_]+")
# Scripts written without spaces between words: each character is a token of its own.
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff])")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens of the text as the prompt id rule normalizes it (NFKC:
    a full-width or ligature copy of a question has its tokens, not none, and so its ROUGE-L
    of 1.0 against it; it would have been kept under the same id). For ASCII text exactly
    what rouge_score's default tokenizer keeps ([a-z0-9]+); letters and digits of other
    scripts are kept too (rouge_score drops them, so a Cyrillic or Chinese question had no
    tokens, scored 0.0 against everything and was kept even as an exact duplicate), and each
    CJK character is one token."""
    from guidealign.core.ids import normalize

    return _WORD.findall(_CJK.sub(r" \1 ", normalize(text).lower()))


# A list marker or label left in front of a parsed question ("**1.** ..." parses to "1. ...",
# "- 1. ...", "1. Question 3: ...", "### 2. ...", "#4 ..."). A number counts as a marker only
# with whitespace (or nothing) after it, so "3.5 million ..." keeps its number.
_MARKER = re.compile(r"^(?:#{1,6}\s+|#\d{1,3}[.):]?(?=\s|$)|\(?\d{1,3}\s*[.):](?=\s|$)|[-*•+](?=\s|$)"
                     r"|(?:q|question)\s*\d*\s*[:.](?=\s|$))", re.IGNORECASE)


def clean_question(q: str) -> str:
    """``q`` without the list markers, labels and quotes left around it."""
    prev = None
    while q != prev:
        prev = q
        q = unwrap_question(_MARKER.sub("", q.strip(), count=1))
    return q


def check_question(raw: str, *, min_words: int, max_chars: int) -> tuple[str, str | None]:
    """(the cleaned question, None) when ``raw`` passes the format checks, else (.., reason).
    Words are counted when they hold a letter, so numbering alone ("2. 3. 4. 5.") is no question;
    in scripts written without spaces each CJK character is a word, as in :func:`rouge_tokens`."""
    q = clean_question(raw)
    if not q:
        return q, "no question: only list markers"
    words = sum(1 for w in _CJK.sub(r" \1 ", q).split() if any(c.isalpha() for c in w))
    if words < min_words:
        return q, f"fewer than {min_words} words"
    if len(q) > max_chars:
        return q, f"longer than {max_chars} characters"
    return q, None


def rouge_l(a: list, b: list) -> float:
    """ROUGE-L F1 between two token lists; 0.0 when either is empty.

    With precision LCS/len(a) and recall LCS/len(b), F1 = 2*LCS/(len(a)+len(b)), which is
    rapidfuzz's normalized Indel similarity (the Indel distance is len(a)+len(b)-2*LCS). rapidfuzz
    computes it as 1 - distance/(len(a)+len(b)), and for the 0.7 threshold that float is on the
    same side of 0.7 as the exact fraction (tests check all lengths up to 60 tokens), while
    2*p*r/(p+r) rounds some exact 0.7 scores up to 0.7000000000000001 (e.g. an LCS of 7 with
    7 and 13 tokens), which rejected questions the rule keeps."""
    if not a or not b:
        return 0.0
    return Indel.normalized_similarity(a, b)


def rouge_l_exact(a: list, b: list) -> Fraction:
    """ROUGE-L F1 as an exact fraction, 2*LCS / (len(a) + len(b)) (0 when either is empty)."""
    if not a or not b:
        return Fraction(0)
    n = len(a) + len(b)
    return Fraction(n - Indel.distance(a, b), n)


class Pool:
    """Questions kept for one risk type, with the ROUGE-L duplicate filter. A question is kept
    when its ROUGE-L is at most the threshold, compared exactly: the score as a fraction, the
    threshold as the decimal it is written as (0.3 is 3/10), so F = 6/20 passes 0.3, where the
    floats (0.30000000000000004 > 0.3) rejected it."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.limit = Fraction(repr(float(threshold)))
        self.questions: list[str] = []
        self.origins: list[str] = []
        self._toks: list[list] = []

    def closest(self, toks: list) -> tuple[float, int]:
        best, at = self._closest(toks)
        return float(best), at

    def _closest(self, toks: list) -> tuple[Fraction, int]:
        best, at = Fraction(0), -1
        for k, t in enumerate(self._toks):
            s = rouge_l_exact(toks, t)
            if s > best:
                best, at = s, k
        return best, at

    def offer(self, q: str, origin: str) -> str | None:
        """Keep ``q`` (None) or return why not."""
        toks = rouge_tokens(q)
        score, at = self._closest(toks)
        if score > self.limit:
            return f"rouge-l {float(score):.4g} > {self.threshold} against: {self.questions[at][:200]}"
        self.questions.append(q)
        self.origins.append(origin)
        self._toks.append(toks)
        return None


@dataclass
class TypeState:
    name: str
    info: dict
    index: int
    pool: Pool
    target: int
    rounds: int = 0
    rejected: list = field(default_factory=list)  # (reason, raw)
    generated: int = 0

    @property
    def done(self) -> bool:
        return self._n_out() >= self.target

    def _n_out(self) -> int:
        return len(self.pool.questions) - (0 if self.include_seeds else self.n_seeds)

    include_seeds: bool = True
    n_seeds: int = 0


def output_questions(st: TypeState, include_seeds: bool) -> list[tuple[str, str]]:
    """The (question, origin) pairs a type's shard holds: the first ``target`` (seeds only when
    ``include_seeds``). Seeds past the target (more seeds than ``target_per_type``) go to
    ``st.rejected`` with the reason, as every question left out does."""
    out = [(q, o) for q, o in zip(st.pool.questions, st.pool.origins) if include_seeds or o != "seed"]
    for q, _ in out[st.target:]:  # only seeds: generated ones stop at the target
        st.rejected.append((f"seed question: not kept, the risk type's target is {st.target}", q))
    return out[:st.target]


def load_risk_types(cfg) -> tuple[dict, str]:
    a = cfg.augment
    data, h = load_prompt_file(a.risk_types_file, "risk_types.yaml", ())
    for name, info in data.items():
        if not isinstance(info, dict) or not isinstance(info.get("seeds"), list) or not info["seeds"]:
            raise TemplateError(f"risk type {name!r}: needs a non-empty list of seeds")
    if a.types:
        unknown = [t for t in a.types if t not in data]
        if unknown:
            raise TemplateError(f"augment.types: unknown risk type(s) {unknown}; known: {list(data)}")
        data = {t: data[t] for t in a.types}
    return data, h


def config_fingerprint(cfg, tok) -> str:
    """The part of every type's shard fingerprint that all types share. Which types are
    selected (augment.types) and what the risk-type file says about the others are left out:
    shard i's own fingerprint adds its type's name and entry (run_augment), so adding a type
    or editing another one does not redo the types already done."""
    from guidealign.gen.outputs import output_fields
    from guidealign.shards import fingerprint

    load_risk_types(cfg)  # a bad file or an unknown type fails here
    _, h2 = load_prompt_file(cfg.augment.prompt_file, "augment.yaml", ("system", "user"))
    # the prompt file counts by what it holds (h2), not where it is
    a = dataclasses.replace(cfg.augment, types=[], risk_types_file=None, prompt_file=None)
    return fingerprint(VERSION, output_fields(cfg.engine, tok=tok), a, h2, chat_template_hash(tok))


def _row(q: str, name: str, info: dict, origin: str) -> dict:
    from guidealign.core.ids import prompt_hash

    meta = {"risk_type": name, "category": info.get("category"), "origin": origin}
    return dict(id=prompt_hash(q).hex(), prompt=q, source=f"augment:{name}:{origin}",
                metadata=json.dumps(meta, ensure_ascii=False), risk_type=name)


def run_augment(cfg, workdir, *, rank: int = 0, world_size: int = 1, llm=None, progress: bool = True):
    """Generate this rank's risk types into WORKDIR/augment; returns a StageReport."""
    from tqdm import tqdm

    from guidealign.gen.engine import (AllPromptsFailed, build_llm, check_not_all_failed, params_for,
                                       prefix_cache_counters, request_probe)
    from guidealign.gen.outputs import load_tokenizer
    from guidealign.shards.write import retire_shards_from
    from guidealign.shards import StageReport, fingerprint, is_done, my_shards, write_manifest, write_shard

    a = cfg.augment
    if not 0 <= a.rouge_threshold < 1:  # 1 would keep exact duplicates (ROUGE-L 1): two rows of one id
        raise ValueError("augment.rouge_threshold must be in [0, 1)")
    types, _ = load_risk_types(cfg)
    spec, _ = load_prompt_file(a.prompt_file, "augment.yaml", ("system", "user"))
    dst = Path(workdir) / "augment"
    fp = config_fingerprint(cfg, load_tokenizer(cfg.engine, llm))
    names = list(types)
    # a type no longer listed leaves no shard beyond the new count (`ingest W/augment/shard-*`
    # read them back); gone before the manifest says how many, as map stages do
    retire_shards_from(dst, len(names))
    write_manifest(dst, stage="augment", num_shards=len(names), fingerprint=fp, types=names)
    rep = StageReport(stage="augment", total=len(names))
    mine = my_shards(len(names), rank, world_size)
    rep.mine = len(mine)
    shard_fp = {i: fingerprint(fp, names[i], types[names[i]]) for i in mine}
    todo = [i for i in mine if not is_done(dst, i, shard_fp[i])]
    rep.skipped = len(mine) - len(todo)
    if not todo:
        return rep
    if llm is None:
        llm = build_llm(cfg.engine)
    tok = llm.get_tokenizer()
    builder = PromptBuilder(tok, engine_max_len(llm, cfg.engine.max_model_len), cfg.engine.overlong)
    states: list[TypeState] = []
    for i in todo:
        name = names[i]
        st = TypeState(name=name, info=types[name], index=i, pool=Pool(a.rouge_threshold),
                       target=a.target_per_type, include_seeds=a.include_seeds)
        for s in types[name]["seeds"]:
            why = st.pool.offer(str(s), "seed")  # near-duplicate seeds are kept out too
            if why:
                st.rejected.append((f"seed question: {why}", str(s)))
        st.n_seeds = len(st.pool.questions)
        states.append(st)
    bar = tqdm(total=len(states), desc="augment", unit="type", disable=not progress)
    t_start = time.perf_counter()

    def commit(st: TypeState):
        keep = output_questions(st, a.include_seeds)
        table = pa.Table.from_pylist([_row(q, st.name, st.info, o) for q, o in keep], schema=SCHEMA)
        quarantine = pa.Table.from_pylist(
            [dict(source=f"augment:{st.name}", row=k, reason=r, raw=raw)
             for k, (r, raw) in enumerate(st.rejected)], schema=QUARANTINE_SCHEMA) if st.rejected else None
        # generated == kept_generated + the quarantined rows that hold a question (raw != "")
        stats = {"rounds": st.rounds, "generated": st.generated, "kept": len(keep),
                 "kept_generated": sum(1 for _, o in keep if o != "seed"),
                 "rejected": len(st.rejected), "short_of_target": max(0, st.target - len(keep))}
        if len(keep) < st.target:
            log.warning("augment %s: %d of %d questions after %d rounds", st.name, len(keep),
                        st.target, st.rounds)
        m = write_shard(dst, st.index, table, shard_fp[st.index], quarantine=quarantine,
                        seconds=time.perf_counter() - t_start, stats=stats)
        rep.processed += 1
        rep.rows += m.rows
        rep.quarantined += m.quarantined
        for k, v in stats.items():
            rep.stats[k] = rep.stats.get(k, 0) + v
        bar.update(1)

    active = []
    for st in states:
        (commit if st.done else active.append)(st)
    q0, h0 = prefix_cache_counters(llm)
    while active:
        builts, owners = [], []
        for st in active:
            rng = random.Random(f"{cfg.engine.seed}:{st.name}:{st.rounds}")
            for j in range(a.requests_per_round):
                k = min(a.examples_per_request, len(st.pool.questions))
                ex = rng.sample(st.pool.questions, k)
                examples = "\n".join(f"{n}. {q}" for n, q in enumerate(ex, 1))
                msgs = [Message("system", [str(spec["system"])]),
                        Message("user", fill(spec["user"], risk_type=st.name.replace("_", " "),
                                             category=str(st.info.get("category", "")),
                                             description=str(st.info.get("description", "")),
                                             examples=examples, n=str(a.new_per_request)))]
                builts.append(builder.build(msgs, a.sampling.max_tokens))
                owners.append((st, f"{st.name}:{st.rounds}:{j}"))
        if builts and all(b.skipped for b in builts) and all(st.rounds == 0 for st, _ in owners):
            # a first round's prompts hold only seeds: none fitting is the config's fault
            # (max_tokens, max_model_len, examples_per_request), and each type would be committed
            # with its seeds alone after max_rounds (later rounds show generated questions, up
            # to augment.max_chars each: those that do not fit are skipped, as before)
            raise AllPromptsFailed(f"augment: no request of the round fits ({builts[0].skip_reason}); "
                                   "lower augment.sampling.max_tokens or augment.examples_per_request, or "
                                   "raise engine.max_model_len; nothing is committed")
        params = params_for(a.sampling, cfg.engine.seed, [k for _, k in owners], True, llm)
        gens = generate_built(llm, builts, params)
        # every request of the round failing is a fault of the run: no type is committed with
        # its seeds alone (a rerun would keep that)
        check_not_all_failed("augment", [g.error if g.finish_reason == "error" else None for g in gens if g is not None],
                             request_probe(llm, params))
        for (st, key), b, g in zip(owners, builts, gens):
            if g is None:
                st.rejected.append((f"prompt skipped: {b.skip_reason}", ""))
                continue
            if g.finish_reason == "error":
                st.rejected.append((f"engine error: {g.error}", ""))
                continue
            qs = parse_questions(g.text)
            # cut at max_tokens inside its last question (not in a note after the list)
            if g.finish_reason == "length" and ends_in_last(g.text, qs[-1] if qs else None):
                st.generated += 1
                st.rejected.append(("cut off at max_tokens", qs.pop()))
            for raw in qs:  # every generated question is kept or quarantined with its reason
                st.generated += 1
                if st.done:
                    st.rejected.append(("not needed: the risk type already has its "
                                        f"{st.target} questions", raw))
                    continue
                q, why = check_question(raw, min_words=a.min_words, max_chars=a.max_chars)
                if why is None:
                    why = st.pool.offer(q, f"round{st.rounds}")
                if why:
                    st.rejected.append((why, raw[:2000]))
        still = []
        for st in active:
            st.rounds += 1
            if st.done or st.rounds >= a.max_rounds:
                commit(st)
            else:
                still.append(st)
        active = still
    bar.close()
    q1, h1 = prefix_cache_counters(llm)
    rep.seconds = time.perf_counter() - t_start
    rep.stats["prefix_cache_hit_rate"] = round((h1 - h0) / (q1 - q0), 4) if q1 > q0 else None
    log.info(rep.summary())
    return rep
