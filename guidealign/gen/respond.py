"""The respond stage: each prompt answered by vLLM with its retrieved guidelines.

Guided (the aligned dataset): the guidelines that retrieval picked for a prompt go into
the system message, introduced as guidelines to follow; the model's own chat template
builds the final prompt and decoding is greedy (as in the paper). Unguided
(``--no-guidelines``): the same prompts answered without guidelines, the baseline that
evaluation compares against.

The responder may be its own model (``respond.engine``: keys over ``engine``; the paper
answers with Vicuna-13B, not the model that wrote the guidelines), and the prompt may show
``respond.num_exemplars`` example conversations (gen/prompts/respond_exemplars.yaml; the
paper: 2) as earlier turns, in guided and unguided prompts alike.

Input: ``WORKDIR/retrieve`` (id, prompt, guideline_ids, guideline_texts, scores) when
guided, the prompt set (``respond.prompts``; default ``prompts``, or ``prompts-sft`` when
the config has ``inputs_sft``) when unguided. Output shard i of
``WORKDIR/respond`` (``respond-baseline`` when unguided) comes from input shard i:
id, prompt, guideline_ids, guideline_texts, response, finish_reason, model, plus
prompt_tokens, output_tokens and note (what was done to the prompt, e.g. truncation).

Bad input never kills a shard: every prompt is tokenized and length-checked first;
an overlong one is truncated or skipped, per ``engine.overlong``. Truncation keeps the
guidelines (an answer without them is not an aligned answer) and cuts the start of the user
text (its question is usually last); lowest-ranked guidelines are dropped only when the rest
of the chat would leave the user text fewer than ``respond.min_user_tokens`` tokens, and the
top-ranked one always stays: a guided prompt that even with it alone leaves fewer is skipped
("overlong: no room for any guideline"); skipped and empty prompts go to the
shard's quarantine table with their reason; an engine error on one prompt gives that row
finish_reason "error" with the message in ``note``.

Chats are rendered into token ids by gen.build's PromptBuilder (template markup with
control tokens, contents as plain text).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from guidealign.config import check_guided_system
from guidealign.config.gen import DEFAULT_GUIDED_SYSTEM, RespondConfig  # noqa: F401
from guidealign.gen.yieldstats import USER_TEXT_CUT

log = logging.getLogger(__name__)

RESPOND_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()),
    ("guideline_ids", pa.list_(pa.string())), ("guideline_texts", pa.list_(pa.string())),
    ("response", pa.string()), ("finish_reason", pa.string()), ("model", pa.string()),
    ("prompt_tokens", pa.int32()), ("output_tokens", pa.int32()), ("note", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()),
                               ("reason", pa.string())])
# the quarantine reason of a guided prompt too long to answer even with only its top guideline
NO_GUIDELINE_ROOM = "overlong: no room for any guideline"
# the note of a guided row answered without guidelines (retrieve found none, or all were blank)
NO_GUIDELINES = "no guideline: answered without guidelines"



def format_guidelines(texts: list[str]) -> str:
    return "\n".join(f"{i}. {t.strip()}" for i, t in enumerate(texts, 1))


@functools.lru_cache(maxsize=8)
def _exemplars(path: str | None) -> tuple[tuple[tuple[tuple[str, str], ...], str]]:
    from guidealign.gen.build import TemplateError, load_prompt_file

    data, h = load_prompt_file(path, "respond_exemplars.yaml", ("exemplars",))
    out = []
    for i, ex in enumerate(data["exemplars"] or []):
        if not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str) \
                or not isinstance(ex.get("answer"), str):
            raise TemplateError(f"respond exemplar {i}: needs string keys prompt and answer")
        out.append((ex["prompt"].strip(), ex["answer"].strip()))
    return tuple(out), h


def load_exemplars(cfg: RespondConfig) -> tuple[list[tuple[str, str]], str]:
    """The first ``num_exemplars`` (prompt, answer) pairs and the file's hash."""
    from guidealign.gen.build import TemplateError

    exs, h = _exemplars(cfg.exemplars_file)
    if cfg.num_exemplars < 0 or cfg.num_exemplars > len(exs):
        raise TemplateError(f"respond.num_exemplars is {cfg.num_exemplars}; the exemplars file "
                            f"has {len(exs)}")
    return list(exs[:cfg.num_exemplars]), h


def build_messages(cfg: RespondConfig, prompt: str, guidelines: list[str]) -> list[dict]:
    """The chat a prompt is answered in: system message with the guidelines, the example
    conversations (``num_exemplars``), then the user."""
    msgs = []
    if guidelines:
        msgs.append({"role": "system",
                     "content": cfg.guided_system.replace("{guidelines}", format_guidelines(guidelines))})
    elif cfg.unguided_system:
        msgs.append({"role": "system", "content": cfg.unguided_system})
    if cfg.num_exemplars:
        for q, a in load_exemplars(cfg)[0]:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": prompt})
    return msgs


def respond_engine(cfg):
    """The responder's EngineConfig: ``engine`` with ``respond.engine``'s keys over it."""
    from guidealign.config import responder_engine_config

    return responder_engine_config(cfg)


def with_respond_engine(cfg):
    """``cfg`` with ``engine`` replaced by the responder's (a shallow copy)."""
    import dataclasses

    return dataclasses.replace(cfg, engine=respond_engine(cfg)) if cfg.respond.engine else cfg


def text_ids(tok, text: str) -> list[int]:
    """Ids of content text: special-token strings in it (``<|im_end|>``...) stay plain text."""
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of the chat with the assistant turn opened, built by gen.build's
    PromptBuilder: the template's markup is tokenized with control tokens, the contents
    without, so a prompt cannot close its turn or open a system turn of its own."""
    from guidealign.gen.build import Message, PromptBuilder

    built = PromptBuilder(tok, max_model_len=sys.maxsize).build(
        [Message(m["role"], [m["content"]]) for m in messages], max_tokens=0)
    return built.token_ids


@dataclass
class Prepared:
    ids: list[int] | None  # None: skipped
    guideline_ids: list[str]
    guideline_texts: list[str]
    note: str = ""


def prepare_prompt(tok, cfg: RespondConfig, prompt: str, gids: list[str], gtexts: list[str],
                   budget: int, overlong: str) -> Prepared:
    """Build and length-check one prompt: ids fit ``budget`` (max_model_len - max_tokens),
    or are truncated / skipped per ``overlong`` with the reason in ``note``."""
    ids = chat_ids(tok, build_messages(cfg, prompt, gtexts))
    if len(ids) <= budget:
        return Prepared(ids, gids, gtexts)
    why = f"overlong: {len(ids)} prompt tokens > {budget} (max_model_len - max_tokens)"
    if overlong != "truncate":
        return Prepared(None, gids, gtexts, why)
    notes = [why]
    user_ids = text_ids(tok, prompt)
    # The guidelines stay and the user text is cut (below); lowest-ranked guidelines go only
    # while the rest of the chat leaves the user text fewer than min_user_tokens, and never the
    # last one (an answer without guidelines is no guided answer).
    kept_ids, kept_texts = list(gids), list(gtexts)
    overhead = len(ids) - len(user_ids)
    # (a user text shorter than min_user_tokens needs only its own length: it is not cut)
    need = min(cfg.min_user_tokens, len(user_ids))
    while len(kept_texts) > 1 and budget - overhead < need:
        kept_ids.pop()
        kept_texts.pop()
        overhead = len(chat_ids(tok, build_messages(cfg, prompt, kept_texts))) - len(user_ids)
    if len(kept_texts) < len(gtexts):
        notes.append(f"dropped {len(gtexts) - len(kept_texts)} lowest-ranked guideline(s)")
    keep = budget - overhead
    if keep < need:
        notes.append(f"only {keep} tokens left for the user text (< min_user_tokens)")
        if kept_texts:  # even the top-ranked guideline alone leaves too little
            notes.insert(0, NO_GUIDELINE_ROOM)
        return Prepared(None, gids, gtexts, "; ".join(notes))
    # Keep the end of the user text (the question is usually last); re-check after decoding.
    for _ in range(8):
        text = tok.decode(user_ids[-keep:], skip_special_tokens=False) if keep < len(user_ids) else prompt
        ids = chat_ids(tok, build_messages(cfg, text, kept_texts))
        if len(ids) <= budget:
            if text != prompt:
                notes.append(f"{USER_TEXT_CUT} to its last {keep} of {len(user_ids)} tokens")
            return Prepared(ids, kept_ids, kept_texts, "; ".join(notes))
        keep -= len(ids) - budget
        if keep < need:
            break
    notes.append("could not truncate to fit")
    return Prepared(None, gids, gtexts, "; ".join(notes))


def row_guidelines(ids, texts, max_guidelines: int = 0) -> tuple[list[str], list[str]]:
    """A retrieve row's (guideline ids, guideline texts), kept in pairs: a guideline whose text
    is null or blank is dropped with its id (a null id becomes ""), a text without an id gets
    "" and an id without a text is dropped; then the first ``max_guidelines`` (0 = all)."""
    ids, texts = list(ids or []), list(texts or [])
    pairs = [("" if k >= len(ids) or ids[k] is None else str(ids[k]), str(t))
             for k, t in enumerate(texts) if t is not None and str(t).strip()]
    if max_guidelines > 0:
        pairs = pairs[:max_guidelines]
    return [g for g, _ in pairs], [t for _, t in pairs]


def make_respond_fn(cfg, llm, *, guided: bool, model_name: str):
    """The per-shard function: (table, index) -> (respond table, quarantine, stats)."""
    from guidealign.gen.build import engine_max_len
    from guidealign.gen.engine import check_not_all_failed, generate, params_for, request_probe, use_template
    from guidealign.gen.yieldstats import counts, respond_usable

    rcfg: RespondConfig = cfg.respond
    ecfg = cfg.engine
    if guided:
        check_guided_system(rcfg)
    tok = use_template(llm, ecfg.chat_template, model=ecfg.model)
    load_exemplars(rcfg)  # a bad exemplars file fails here, not once per row
    max_len = engine_max_len(llm, ecfg.max_model_len)  # an injected engine may be shorter
    budget = max_len - rcfg.sampling.max_tokens
    if budget <= 0:
        raise ValueError(f"respond.sampling.max_tokens ({rcfg.sampling.max_tokens}) leaves no room "
                         f"for a prompt in the engine's max_model_len ({max_len})")
    _probe_template(tok, rcfg, guided, budget, ecfg)

    def fn(table: pa.Table, index: int):
        from vllm.inputs import TokensPrompt

        rows = table.to_pylist()
        out = {k: [] for k in RESPOND_SCHEMA.names}
        quarantine = {k: [] for k in QUARANTINE_SCHEMA.names}
        stats = {"truncated": 0, "skipped": 0, "no_guideline_room": 0, "errors": 0, "length": 0,
                 "prompt_tokens": 0, "output_tokens": 0, "no_guidelines": 0}
        todo: list[tuple[dict, Prepared]] = []
        for r in rows:
            pid, prompt = r.get("id"), r.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                quarantine["id"].append(pid)
                quarantine["prompt"].append(prompt if isinstance(prompt, str) else None)
                quarantine["reason"].append("empty prompt" if isinstance(prompt, str) else "missing prompt")
                stats["skipped"] += 1
                continue
            gids, gtexts = row_guidelines(r.get("guideline_ids"), r.get("guideline_texts"),
                                          rcfg.max_guidelines) if guided else ([], [])
            try:
                p = prepare_prompt(tok, rcfg, prompt, gids, gtexts, budget, ecfg.overlong)
            except Exception as e:  # noqa: BLE001 - a tokenizer/template error is this row's problem
                p = Prepared(None, gids, gtexts, f"prompt building failed: {type(e).__name__}: {e}")
            if p.ids is None:
                quarantine["id"].append(pid)
                quarantine["prompt"].append(prompt)
                quarantine["reason"].append(p.note)
                stats["skipped"] += 1
                stats["no_guideline_room"] += p.note.startswith(NO_GUIDELINE_ROOM)
                continue
            if p.note:
                stats["truncated"] += 1
            if guided and not p.guideline_texts:
                p = dataclasses.replace(p, note=f"{p.note}; {NO_GUIDELINES}" if p.note else NO_GUIDELINES)
                stats["no_guidelines"] += 1
            todo.append((r, p))
        # sampled: one seed per prompt (on GPUs; greedy needs none, and vLLM on the CPU crashes
        # on seeded requests whose prefill is chunked: there the engine's seed is shared)
        params = params_for(rcfg.sampling, ecfg.seed, [r["id"] for r, _ in todo], rcfg.seed_per_prompt, llm)
        gens = generate(llm, [TokensPrompt(prompt_token_ids=p.ids) for _, p in todo], params)
        # every prompt failing is a fault of the run, not of the prompts: not committed
        check_not_all_failed("respond", [g.error for g in gens], request_probe(llm, params))
        for (r, p), g in zip(todo, gens):
            note = p.note
            if g.error:
                note = f"{note}; {g.error}" if note else g.error
                stats["errors"] += 1
            if g.finish_reason == "length":
                stats["length"] += 1
            stats["prompt_tokens"] += len(p.ids)
            stats["output_tokens"] += g.output_tokens
            out["id"].append(r["id"])
            out["prompt"].append(r["prompt"])
            out["guideline_ids"].append(p.guideline_ids)
            out["guideline_texts"].append(p.guideline_texts)
            out["response"].append(g.text)
            out["finish_reason"].append(g.finish_reason)
            out["model"].append(model_name)
            out["prompt_tokens"].append(len(p.ids))
            out["output_tokens"].append(g.output_tokens)
            out["note"].append(note)
        q = pa.Table.from_pydict(quarantine, schema=QUARANTINE_SCHEMA) if quarantine["id"] else None
        # yield (gen/yieldstats.py): usable = what this run's SFT keeps; the rows quarantined
        # before generation were read too
        keep, min_chars = tuple(cfg.sft.keep_finish_reasons), cfg.sft.min_response_chars
        stats.update(counts([{"finish_reason": f, "output_tokens": n, "response": t, "note": w}
                             for f, n, t, w in zip(out["finish_reason"], out["output_tokens"],
                                                   out["response"], out["note"])],
                            lambda r: respond_usable(r, keep, min_chars)))
        stats["yield_rows_in"] += stats["skipped"]
        if stats["no_guidelines"]:
            log.warning("respond shard %d: %d guided prompt(s) had no guideline (none retrieved, or all "
                        "blank) and were answered without, noted %r", index, stats["no_guidelines"],
                        NO_GUIDELINES)
        return pa.Table.from_pydict(out, schema=RESPOND_SCHEMA), q, stats

    return fn


def _probe_template(tok, rcfg: RespondConfig, guided: bool, budget: int, ecfg) -> None:
    """A chat template that cannot render this stage's chat at all (one that refuses a system
    turn, as Gemma's and some Mistral templates do), or a fixed part (system message, example
    conversations) that leaves a short prompt no room, is the config's fault: raise it before
    the first shard, instead of quarantining every row as its own and committing empty shards."""
    from guidealign.gen.build import TemplateError

    try:
        p = prepare_prompt(tok, rcfg, "Hello.", ["probe"] if guided else [], ["Be helpful."] if guided else [],
                           budget, ecfg.overlong)
    except Exception as e:  # noqa: BLE001 - whatever the template raises
        raise TemplateError(f"respond: the chat template cannot render a respond prompt ({type(e).__name__}: "
                            f"{e}); the guidelines go in a system turn: use a template that takes one "
                            "(engine.chat_template, or respond.engine.chat_template for the responder)") from e
    if p.ids is None:  # the fixed part (system message, exemplars) leaves no room: every row would go
        raise TemplateError(f"respond: even a one-word prompt{' with one short guideline' if guided else ''} "
                            f"does not fit ({p.note}): the system message and respond.num_exemplars="
                            f"{rcfg.num_exemplars} example conversations leave too little of max_model_len - "
                            f"respond.sampling.max_tokens ({budget} tokens); lower them, or raise max_model_len")


def respond_fingerprint(cfg, guided: bool, llm=None) -> str:
    """``llm``: the responder's engine when one is given (its tokenizer is read, not loaded)."""
    from guidealign.gen.build import chat_template_hash
    from guidealign.gen.outputs import load_tokenizer, output_fields
    from guidealign.gen.templates import BUILTIN, template_hash
    from guidealign.shards import fingerprint

    e = respond_engine(cfg)
    # the template the responder renders with: the configured one, else the tokenizer's own
    # (from the model dir's tokenizer files, no weights), so editing that one redoes shards too
    tok = load_tokenizer(e, llm) if not e.chat_template or e.chat_template not in BUILTIN else None
    extra = {"chat_template": template_hash(e.chat_template) if e.chat_template
             else chat_template_hash(tok)}
    if cfg.respond.num_exemplars:
        extra["exemplars"] = load_exemplars(cfg.respond)[1]
    from guidealign.gen.build import TOKENIZATION

    # Only what this mode reads: the responder's engine counts by the settings that change
    # an answer (below), not by its memory, parallelism or batch knobs (respond.engine); the
    # baseline reads neither guided_system nor max_guidelines, the guided stage not the
    # baseline's prompt set.
    # (the exemplars file counts by what it holds, in ``extra``, and only when exemplars are shown)
    r = dataclasses.replace(cfg.respond, engine={}, exemplars_file=None)
    r = dataclasses.replace(r, prompts="") if guided else \
        dataclasses.replace(r, guided_system=DEFAULT_GUIDED_SYSTEM, max_guidelines=0)
    r = dataclasses.asdict(r)
    if cfg.respond.sampling.temperature == 0:  # greedy: seeds change nothing (and a greedy run
        del r["seed_per_prompt"]               # keeps the fingerprint it had before the key)
    # the engine's model, dtype, context, overlong rule, seed (when sampling) and turn end
    return fingerprint("respond/v1", TOKENIZATION, r, guided,
                       output_fields(e, cfg.respond.sampling.temperature > 0, tok) | extra)


def run_respond(cfg, workdir, *, rank: int = 0, world_size: int = 1, llm=None, guided: bool = True,
                src: str | None = None, dst: str | None = None, progress: bool = True):
    """Answer every prompt of this rank's shards (skipping committed ones); returns a StageReport.

    ``src`` defaults to "retrieve" (guided) or the prompt set (unguided, ``respond.prompts``);
    ``dst`` to "respond" or "respond-baseline". Both are names under ``workdir`` or paths.
    ``llm`` is built lazily from the responder's engine (``respond.engine`` over ``engine``)
    on the first shard that needs work.
    """
    from guidealign.gen.engine import run_engine_stage
    from guidealign.config import prompt_set

    workdir = Path(workdir)
    if guided:
        check_guided_system(cfg.respond)  # before any engine starts
    fp = respond_fingerprint(cfg, guided, llm)
    cfg = with_respond_engine(cfg)
    src = src or ("retrieve" if guided else prompt_set(cfg, cfg.respond.prompts))
    dst = dst or ("respond" if guided else "respond-baseline")
    columns = ["id", "prompt"] + (["guideline_ids", "guideline_texts"] if guided else [])
    return run_engine_stage(
        "respond" if guided else "respond-baseline", cfg, workdir / src, workdir / dst,
        fp,
        lambda c, engine: make_respond_fn(c, engine, guided=guided, model_name=c.engine.model),
        llm=llm, columns=columns, rank=rank, world_size=world_size, progress=progress,
        missing_hint="run retrieve on this workdir first" if guided else "run ingest first")
