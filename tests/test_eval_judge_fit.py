"""Judge prompts fit the judge's context: long answers are cut further instead of the request
failing (a failed judgment is unparsed, and with eval.unparsed: exclude the longest answer
pairs, often the guided ones, silently left the net win rate)."""
from __future__ import annotations

from types import SimpleNamespace

from guidealign.config import load_config
from guidealign.eval.judges import HarmItem, PairItem, judge_harm_llm, judge_pairwise


class _Judge:
    """A stand-in engine: the real tokenizer, a max_model_len, and a reply to every prompt."""

    def __init__(self, tok, max_model_len):
        self.tok, self.lens = tok, []
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len))

    def get_tokenizer(self):
        return self.tok

    def generate(self, prompts, params, use_tqdm=False):
        self.lens += [len(p["prompt_token_ids"]) for p in prompts]
        out = SimpleNamespace(text="[[A]]", finish_reason="stop", token_ids=[0])
        return [SimpleNamespace(outputs=[out], prompt_token_ids=[0]) for _ in prompts]


def test_long_answers_are_cut_until_the_judge_prompt_fits(tok):
    ecfg = load_config(overrides=["eval.max_response_tokens=600", "eval.judge_sampling.max_tokens=64"]).eval
    long = " ".join(f"word{i}" for i in range(1500))
    judge = _Judge(tok, max_model_len=1024)
    cols = judge_pairwise(judge, [PairItem("1", None, "Which is better?", long, long + " more")], ecfg)
    assert len(judge.lens) == 2 and max(judge.lens) <= 1024 - 64, judge.lens
    assert cols["cut"] == [True, True] and all("cut for length" in p for p in cols["judge_prompt"])
    harm = _Judge(tok, max_model_len=512)
    judge_harm_llm(harm, [HarmItem("1", None, "Tell me.", "guided", long)], ecfg)
    assert max(harm.lens) <= 512 - 64, harm.lens


def test_a_prompt_that_fits_is_cut_only_at_max_response_tokens(tok):
    ecfg = load_config(overrides=["eval.max_response_tokens=600", "eval.judge_sampling.max_tokens=64"]).eval
    mid = " ".join(f"word{i}" for i in range(60))
    judge = _Judge(tok, max_model_len=32768)
    cols = judge_pairwise(judge, [PairItem("1", None, "Which is better?", mid, mid)], ecfg)
    assert cols["cut"] == [False, False] and all(mid in p for p in cols["judge_prompt"])


def test_a_long_question_is_not_cut_at_max_response_tokens_only_the_answers_are(tok):
    """An HHH "summarize this article" question (770 tokens) was cut at eval.max_response_tokens
    like the answers: the judge compared summaries of an article it saw cut off. The question
    is cut only when the prompt would not fit even with the answers cut as far as they go."""
    ecfg = load_config(overrides=["eval.max_response_tokens=600", "eval.judge_sampling.max_tokens=64"]).eval
    article = " ".join(f"fact{i}" for i in range(900))  # well over 600 tokens
    judge = _Judge(tok, max_model_len=32768)
    cols = judge_pairwise(judge, [PairItem("1", None, "Summarize: " + article, "short", "brief")], ecfg)
    assert cols["cut"] == [False, False] and all(article in p for p in cols["judge_prompt"])
    harm = _Judge(tok, max_model_len=32768)
    hc = judge_harm_llm(harm, [HarmItem("1", None, "Summarize: " + article, "guided", "ok")], ecfg)
    assert article in hc["judge_prompt"][0]
    small = _Judge(tok, max_model_len=1024)  # no room even for the question: cut as before
    cols = judge_pairwise(small, [PairItem("1", None, "Summarize: " + article, "short", "brief")], ecfg)
    assert max(small.lens) <= 1024 - 64 and cols["cut"] == [True, True]
