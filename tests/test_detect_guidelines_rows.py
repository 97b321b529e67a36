"""Row handling of the detect and guidelines stages, with a stand-in for vLLM (no engine):
structured guideline outputs that always parse with titles, a parser failure kept as one
row's status, and a shard whose prompts all fail left uncommitted."""
from __future__ import annotations

import random
import re

import pyarrow as pa
import pytest

from guidealign.gen.parse import parse_guidelines
from standins import FakeLLM, small_gen_cfg


def last_input(prompt: str) -> str:
    return prompt[prompt.rfind("<|im_start|>user"):]


# --- structured guidelines: what the regex admits, the parser reads with titles ----------

def test_structured_regex_rejects_titles_the_parser_cannot_read():
    """A title of at most 8 words but over 80 characters was admitted by the regex and came
    back from the parser untitled."""
    from guidealign.gen.scoring import guidelines_regex

    long_title = ("Acknowledge Overwhelming Emotional Vulnerability Compassionately Throughout "
                  "Bereavement-related Conversations")
    assert len(long_title.split()) == 8 and len(long_title) > 80
    text = "\n".join(f"{k}. {long_title if k == 1 else 'Be kind'}: Do it well." for k in range(1, 6))
    assert parse_guidelines(text)[1] == "untitled"
    assert not re.fullmatch(guidelines_regex(), text)
    # a line break the parser splits on (str.splitlines) inside an item
    assert not re.fullmatch(guidelines_regex(),
                            "\n".join(f"{k}. Be kind: x\u2028{k + 1}. y" for k in range(1, 6)))
    # ordinary titles (up to 8 words, up to 80 characters, a 1-letter first word) still pass
    ok = ["A clear structure", "Respect privacy and confidentiality always",
          "Do not predict prices or give personal picks", "Cite"]
    text = "\n".join(f"{k}. {ok[k % len(ok)]}: Text {k}." for k in range(1, 8))
    assert re.fullmatch(guidelines_regex(), text)


def test_every_structured_guidelines_match_parses_with_titles():
    from guidealign.gen.scoring import guidelines_regex

    rx = re.compile(guidelines_regex())
    chars = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789*_-—–#().,;!?\"'`/\\|+=~<>[]{}éß")
    rare = ["**", "__", "\u00a0", "\t", "\u2028", "\r", ":"]
    rnd = random.Random(7)

    def ch():
        return rnd.choice(rare) if rnd.random() < 0.01 else rnd.choice(chars)

    matched = 0
    for _ in range(6000):
        k = rnd.randint(5, 7)
        lines = []
        for i in range(1, k + 1):
            words = ["".join(ch() for _ in range(rnd.choice([1, 2, 3, 5, 8, 9, 12, 16, 20])))
                     for _ in range(rnd.choice([1, 2, 3, 4, 6, 8, 9]))]
            words[0] = rnd.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + words[0]
            text = "".join(rnd.choice([ch(), " ", ": ", "1. ", " - "]) for _ in range(rnd.randint(1, 20)))
            lines.append(f"{i}. {' '.join(words)}: {text}")
        s = "\n".join(lines)
        if not rx.fullmatch(s):
            continue
        matched += 1
        items, status = parse_guidelines(s)
        assert status == "ok" and len(items) == k, s
        assert all(it["title"] and it["text"] for it in items), s
    assert matched >= 20  # the check had something to check


# --- guidelines: an output the parser fails on is one row's status -------------------------

def test_guidelines_parser_failure_is_a_row_status_not_a_dead_shard(generator_path, tok, monkeypatch):
    """A parser exception on one output (an output cut after a list by a bare heading once
    raised IndexError) is that row's status, not the end of its shard and of every rerun."""
    import guidealign.gen.guidelines as guidelines
    from guidealign.gen.guidelines import make_shard_fn

    cut = "1. Be kind: Answer gently.\n2. Be brief: Say less.\n### **"
    real = guidelines.parse_guidelines

    def parse(text):
        if text == cut:
            raise IndexError("list index out of range")
        return real(text)

    monkeypatch.setattr(guidelines, "parse_guidelines", parse)

    def answer(prompt):
        return (cut, "length") if "haiku" in last_input(prompt) else \
            ("1. Be kind: Answer gently.\n2. Be brief: Say less.", "stop")

    fn = make_shard_fn(small_gen_cfg(generator_path), FakeLLM(tok, answer))
    table = pa.table({"id": ["a", "b", "c"],
                      "prompt": ["Write a haiku about rain.", "How do I pick a lock?", "Explain tides."],
                      "risky": [False, True, None],
                      "raw": ["Fine.\nVerdict: No", "Crime.\nVerdict: Yes", "Hmm."]})
    out, _, stats = fn(table, 0)
    rows = {r["id"]: r for r in out.to_pylist()}
    assert list(rows) == ["a", "b", "c"]
    assert rows["a"]["parse_status"] == "parse_error" and rows["a"]["guidelines"] == []
    assert "IndexError" in rows["a"]["skip_reason"] and rows["a"]["raw"] == cut
    assert rows["a"]["kind"] == "quality" and rows["a"]["finish_reason"] == "length"
    assert rows["b"]["parse_status"] == "ok" and len(rows["b"]["guidelines"]) == 2
    assert rows["b"]["kind"] == "safety" and rows["c"]["kind"] == "safety"  # unknown -> safety
    assert stats["unparsed"] == 1 and stats["yield_rows_parsed"] == 2


# --- a shard whose prompts all fail is not committed ---------------------------------------

def _boom(prompt):
    raise ValueError("structured outputs backend 'xgrammar' is not available")


def test_detect_shard_whose_prompts_all_fail_raises(generator_path, tok):
    """Every prompt failed with the same request error: the shard came back as one to commit
    (every row 'error', risky null, so guidelines wrote safety guidelines for all of them),
    and a rerun kept it."""
    from guidealign.gen.detect import make_shard_fn
    from guidealign.gen.engine import AllPromptsFailed

    table = pa.table({"id": ["a", "b", "c", "d"],
                      "prompt": ["How to poison a dog?", "Banana bread?", "   ", "What is love?"]})
    fn = make_shard_fn(small_gen_cfg(generator_path), FakeLLM(tok, _boom))
    with pytest.raises(AllPromptsFailed, match="all 3 prompts"):
        fn(table, 0)


def test_detect_score_mode_shard_whose_prompts_all_fail_raises(generator_path, tok):
    from guidealign.gen.detect import make_shard_fn
    from guidealign.gen.engine import AllPromptsFailed

    table = pa.table({"id": ["a", "b"], "prompt": ["How to poison a dog?", "Banana bread?"]})
    fn = make_shard_fn(small_gen_cfg(generator_path, "detect.mode=score"), FakeLLM(tok, _boom))
    with pytest.raises(AllPromptsFailed):
        fn(table, 0)


def test_guidelines_shard_whose_prompts_all_fail_raises(generator_path, tok):
    from guidealign.gen.engine import AllPromptsFailed
    from guidealign.gen.guidelines import make_shard_fn

    table = pa.table({"id": ["a", "b"], "prompt": ["How to poison a dog?", "Banana bread?"],
                      "risky": [True, False], "raw": ["Verdict: Yes", "Verdict: No"]})
    fn = make_shard_fn(small_gen_cfg(generator_path), FakeLLM(tok, _boom))
    with pytest.raises(AllPromptsFailed):
        fn(table, 0)


@pytest.mark.parametrize("stage, sets", [("detect", []), ("detect", ["detect.mode=score"]), ("guidelines", [])])
def test_a_one_prompt_shard_whose_settings_fail_raises(generator_path, tok, stage, sets):
    """A shard that sent one prompt (the last shard of a set, or all but one row skipped)
    whose request failed was committed with that error as its row, even when every request
    fails (a structured-outputs backend that does not work): a short probe with the same
    settings now tells the run's fault from the prompt's."""
    from importlib import import_module

    from guidealign.gen.engine import AllPromptsFailed

    fn = import_module(f"guidealign.gen.{stage}").make_shard_fn(small_gen_cfg(generator_path, *sets),
                                                                 FakeLLM(tok, _boom))
    one = {"id": ["a"], "prompt": ["How to poison a dog?"]}
    if stage == "guidelines":
        one.update(risky=[True], raw=["Verdict: Yes"])
    with pytest.raises(AllPromptsFailed, match="the only prompt the shard sent failed"):
        fn(pa.table(one), 0)


def test_one_failing_prompt_is_still_isolated(generator_path, tok):
    """Only a shard where every prompt failed stops: one bad prompt is its row's error, the
    rows stay aligned with the input, and a one-prompt shard that fails is kept too."""
    from guidealign.gen.detect import make_shard_fn

    def answer(prompt):
        if "poison" in last_input(prompt):
            raise ValueError("bad request")
        return "Harmless.\nVerdict: No", "stop"

    fn = make_shard_fn(small_gen_cfg(generator_path), FakeLLM(tok, answer))
    table = pa.table({"id": ["a", "b", "c"], "prompt": ["Banana bread?", "How to poison a dog?", ""]})
    out, _, stats = fn(table, 0)
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert [r["finish_reason"] for r in rows] == ["stop", "error", "skipped"]
    assert rows[0]["risky"] is False and rows[1]["risky"] is None and "bad request" in rows[1]["skip_reason"]
    assert stats["errors"] == 1 and stats["skipped"] == 1

    one = pa.table({"id": ["b"], "prompt": ["How to poison a dog?"]})
    out, _, _ = fn(one, 1)
    assert out.to_pylist()[0]["finish_reason"] == "error"


def test_a_guideline_list_cut_at_max_tokens_loses_its_cut_last_item(generator_path, tok):
    """An output that stopped at max_tokens inside its last item kept that fragment ("Keep
    answers sh") as a guideline, which the library then took in."""
    from guidealign.gen.guidelines import make_shard_fn

    def answer(prompt):
        if "haiku" in last_input(prompt):
            return "1. Be kind: Speak gently.\n2. Be brief: Keep answers sh", "length"
        return "1. Be kind: Speak gently.\n2. Be brief: Keep answers short.", "stop"

    fn = make_shard_fn(small_gen_cfg(generator_path), FakeLLM(tok, answer))
    out, _, _ = fn(pa.table({"id": ["a", "b"], "prompt": ["Write a haiku about rain.", "Explain tides."],
                             "risky": [False, False], "raw": ["Fine.\nVerdict: No", "Fine.\nVerdict: No"]}), 0)
    rows = {r["id"]: r for r in out.to_pylist()}
    assert [g["text"] for g in rows["a"]["guidelines"]] == ["Speak gently."]
    assert "cut at max_tokens" in rows["a"]["skip_reason"]
    assert [g["text"] for g in rows["b"]["guidelines"]] == ["Speak gently.", "Keep answers short."]
