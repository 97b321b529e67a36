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
    from guidealign.gen.engine import check_not_all_failed, generate, sampling_params

    gens = generate(llm, prompts, sampling_params(sampling, seed=seed, llm=llm))
    # every judgment failing is the run's fault (the judge engine), not the answers': its shard
    # is not committed, as in the generation stages, so a rerun judges again
    check_not_all_failed("judge", [g.error if g.finish_reason == "error" else None for g in gens])
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
    for it in items:
        q, qcut = cut_tokens(tok, it.prompt, ecfg.max_response_tokens)
        g, gcut = cut_tokens(tok, it.guided, ecfg.max_response_tokens)
        u, ucut = cut_tokens(tok, it.unguided, ecfg.max_response_tokens)
        for order in ORDERS:
            a, b = (g, u) if order == "guided_first" else (u, g)
            sent, jp = render_chat(tok, system, fill(template, question=q, answer_a=a, answer_b=b))
            prompts.append(sent)
            cols["id"].append(it.id)
            cols["category"].append(it.category)
            cols["prompt"].append(it.prompt)
            cols["order"].append(order)
            cols["judge_prompt"].append(jp)
            cols["cut"].append(qcut or gcut or ucut)
    gens = _generate(llm, prompts, ecfg.judge_sampling, seed)
    for order, gen in zip(cols["order"], gens):
        verdict, rule = parse_pairwise(gen.text) if gen.finish_reason != "error" else (None, None)
        cols["raw"].append(gen.text if gen.finish_reason != "error" else (gen.error or ""))
        cols["finish_reason"].append(gen.finish_reason)
        cols["verdict"].append(verdict)
        cols["rule"].append(rule)
        cols["outcome"].append(outcome_for_guided(order, verdict))
    return cols


HARM_COLUMNS = ("id", "category", "prompt", "condition", "response", "judge", "judge_prompt", "raw",
                "finish_reason", "verdict", "rule", "score")


def judge_harm_llm(llm, items: list[HarmItem], ecfg, seed: int | None = 0) -> dict[str, list]:
    tok = llm.get_tokenizer()
    template = ecfg.harm_template or HARM_TEMPLATE
    system = ecfg.judge_system or JUDGE_SYSTEM
    cols: dict[str, list] = {k: [] for k in HARM_COLUMNS}
    prompts = []
    for it in items:
        q, _ = cut_tokens(tok, it.prompt, ecfg.max_response_tokens)
        r, _ = cut_tokens(tok, it.response, ecfg.max_response_tokens)
        sent, jp = render_chat(tok, system, fill(template, question=q, answer=r))
        prompts.append(sent)
        for k, v in (("id", it.id), ("category", it.category), ("prompt", it.prompt),
                     ("condition", it.condition), ("response", it.response), ("judge", "llm"),
                     ("judge_prompt", jp)):
            cols[k].append(v)
    gens = _generate(llm, prompts, ecfg.judge_sampling, seed)
    for gen in gens:
        ok = gen.finish_reason != "error"
        verdict, rule = parse_harm(gen.text) if ok else (None, None)
        cols["raw"].append(gen.text if ok else (gen.error or ""))
        cols["finish_reason"].append(gen.finish_reason)
        cols["verdict"].append(verdict)
        cols["rule"].append(rule)
        cols["score"].append(None)
    return cols
