"""The LLM judges: a pairwise judge and a harmfulness judge, and the items they judge.

The pairwise judge sees every pair twice, once with the guided answer as Assistant A and
once with it as Assistant B, so that a judge that favours a position cancels out
(eval/aggregate.py combines the two orders). The harmfulness judge sees the request and the
reply. Both read their verdicts with eval/verdicts.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from guidealign.eval.prompts import (HARM_TEMPLATE, JUDGE_SYSTEM, PAIRWISE_TEMPLATE, cut_tokens, fill,
                                     render_chat)
from guidealign.eval.verdicts import parse_harm, parse_pairwise

ORDERS = ("guided_first", "unguided_first")
# the least a text (question or answer) is cut to when a judge prompt must fit the context
MIN_CUT_TOKENS = 32


def _room(llm, ecfg) -> int | None:
    """Tokens a judge prompt may take: the judge engine's max_model_len less the verdict budget
    (None when the engine does not say its max_model_len)."""
    try:
        return int(llm.llm_engine.model_config.max_model_len) - ecfg.judge_sampling.max_tokens
    except (AttributeError, TypeError, ValueError):
        return None


def fit_texts(tok, texts: list[str], cap: int, room: int | None, render,
              free: int = 0) -> tuple[list[tuple[str, bool]], list]:
    """``texts`` each cut to ``cap`` judge tokens (``eval.max_response_tokens``; <= 0: uncut),
    and ``render(cut texts)`` (a list of (sent, judge prompt)); while the longest rendered prompt
    is over ``room`` tokens, the cap is lowered by the excess shared among the texts it cuts
    (down to MIN_CUT_TOKENS), so long answers are cut further instead of the request failing (a
    failed judgment is unparsed, and ``eval.unparsed: exclude`` would leave the longest pairs
    out). The first ``free`` texts (the question) are not cut, unless the prompt is over
    ``room`` even with the others cut as far as they go: a judge comparing summaries of an
    article it sees cut off judges something else than the paper's judge did."""
    if free:
        whole = [(t or "", False) for t in texts[:free]]
        cut, out = fit_texts(tok, texts[free:], cap, room, lambda rest: render([t for t, _ in whole] + rest))
        if room is None or max(len(s["prompt_token_ids"]) for s, _ in out) <= room:
            return whole + cut, out
    lens = [len(tok.encode(t or "", add_special_tokens=False)) for t in texts]
    if cap <= 0:
        cap = max(lens, default=0)
    for _ in range(16):
        cut = [cut_tokens(tok, t, cap) for t in texts]
        out = render([c for c, _ in cut])
        longest = max(len(s["prompt_token_ids"]) for s, _ in out)
        if room is None or longest <= room or cap <= MIN_CUT_TOKENS:
            break
        cap = min(cap, max(lens))  # the cap cuts from here on: each text at it loses a share
        at_cap = sum(n >= cap for n in lens)
        cap = max(MIN_CUT_TOKENS, cap - -(-(longest - room) // at_cap))
    return cut, out


def outcome_for_guided(order: str, verdict: str | None) -> str:
    """A pairwise verdict, seen from the guided system: win, tie, lose or unparsed."""
    if verdict is None:
        return "unparsed"
    if verdict == "tie":
        return "tie"
    guided_is = "A" if order == "guided_first" else "B"
    return "win" if verdict == guided_is else "lose"


@dataclass
class PairItem:
    id: str
    category: str | None
    prompt: str
    guided: str
    unguided: str


@dataclass
class HarmItem:
    id: str
    category: str | None
    prompt: str
    condition: str  # "guided" | "unguided"
    response: str


def _generate(llm, prompts: list[dict], sampling, seed):
    from guidealign.gen.engine import check_not_all_failed, generate, request_probe, sampling_params

    params = sampling_params(sampling, seed=seed, llm=llm)
    gens = generate(llm, prompts, params)
    # every judgment failing is the run's fault (the judge engine), not the answers': its shard
    # is not committed, as in the generation stages, so a rerun judges again
    check_not_all_failed("judge", [g.error if g.finish_reason == "error" else None for g in gens],
                         request_probe(llm, params))
    return gens


def judge_pairwise(llm, items: list[PairItem], ecfg, seed: int | None = 0) -> dict[str, list]:
    """Ask the judge about every item in both orders. Returns columns (two rows per item)."""
    tok = llm.get_tokenizer()
    template = ecfg.pairwise_template or PAIRWISE_TEMPLATE
    system = ecfg.judge_system or JUDGE_SYSTEM
    cols: dict[str, list] = {k: [] for k in (
        "id", "category", "prompt", "order", "judge_prompt", "raw", "finish_reason", "verdict",
        "rule", "outcome", "cut")}
    prompts = []
    room = _room(llm, ecfg)

    def render(cut):
        q, g, u = cut
        return [render_chat(tok, system, fill(template, question=q, answer_a=a, answer_b=b))
                for a, b in ((g, u), (u, g))]  # in ORDERS' order

    for it in items:
        cut, rendered = fit_texts(tok, [it.prompt, it.guided, it.unguided], ecfg.max_response_tokens, room, render,
                                  free=1)
        (_, qcut), (_, gcut), (_, ucut) = cut
        for order, (sent, jp) in zip(ORDERS, rendered):
            prompts.append(sent)
            cols["id"].append(it.id)
            cols["category"].append(it.category)
            cols["prompt"].append(it.prompt)
            cols["order"].append(order)
            cols["judge_prompt"].append(jp)
            cols["cut"].append(qcut or gcut or ucut)
    gens = _generate(llm, prompts, ecfg.judge_sampling, seed)
    for order, gen in zip(cols["order"], gens):
        verdict, rule = parse_pairwise(gen.text, gen.finish_reason != "length") \
            if gen.finish_reason != "error" else (None, None)
        cols["raw"].append(gen.text if gen.finish_reason != "error" else (gen.error or ""))
        cols["finish_reason"].append(gen.finish_reason)
        cols["verdict"].append(verdict)
        cols["rule"].append(rule)
        cols["outcome"].append(outcome_for_guided(order, verdict))
    return cols


def current_verdicts(rows: list[dict], kind: str) -> list[dict]:
    """Judgment rows (``kind`` "harm" or "pairwise") with their verdict, rule and, pairwise,
    outcome parsed again from the stored raw output by this version's parser, so a parser fix
    counts in the report of judgments already made, without judging again. The classifier's
    rows (a score, no text) are kept as they are."""
    parse = parse_pairwise if kind == "pairwise" else parse_harm
    for r in rows:
        if kind == "harm" and r.get("judge") != "llm":
            continue
        fr = r.get("finish_reason")
        r["verdict"], r["rule"] = parse(r.get("raw"), fr != "length") if fr != "error" else (None, None)
        if kind == "pairwise":
            r["outcome"] = outcome_for_guided(r["order"], r["verdict"])
    return rows


HARM_COLUMNS = ("id", "category", "prompt", "condition", "response", "judge", "judge_prompt", "raw",
                "finish_reason", "verdict", "rule", "score")


def judge_harm_llm(llm, items: list[HarmItem], ecfg, seed: int | None = 0) -> dict[str, list]:
    tok = llm.get_tokenizer()
    template = ecfg.harm_template or HARM_TEMPLATE
    system = ecfg.judge_system or JUDGE_SYSTEM
    cols: dict[str, list] = {k: [] for k in HARM_COLUMNS}
    prompts = []
    room = _room(llm, ecfg)

    def render(cut):
        return [render_chat(tok, system, fill(template, question=cut[0], answer=cut[1]))]

    for it in items:
        _, [(sent, jp)] = fit_texts(tok, [it.prompt, it.response], ecfg.max_response_tokens, room, render, free=1)
        prompts.append(sent)
        for k, v in (("id", it.id), ("category", it.category), ("prompt", it.prompt),
                     ("condition", it.condition), ("response", it.response), ("judge", "llm"),
                     ("judge_prompt", jp)):
            cols[k].append(v)
    gens = _generate(llm, prompts, ecfg.judge_sampling, seed)
    for gen in gens:
        ok = gen.finish_reason != "error"
        verdict, rule = parse_harm(gen.text, gen.finish_reason != "length") if ok else (None, None)
        cols["raw"].append(gen.text if ok else (gen.error or ""))
        cols["finish_reason"].append(gen.finish_reason)
        cols["verdict"].append(verdict)
        cols["rule"].append(rule)
        cols["score"].append(None)
    return cols
