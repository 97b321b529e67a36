"""A list cut at max_tokens right after a line break kept its unfinished last item: a title on a
line of its own with the cut before its text, or text that wraps onto the next line. Only a
line break with no words after it was taken as the item's end; now the line must also end a
sentence (guidelines) or a question (augment) for the last item to count as whole."""
from __future__ import annotations

import pyarrow as pa
import pytest

from guidealign.core.models import prepare_generator
from guidealign.gen.augment import parse_questions
from guidealign.gen.parse import ends_in_last, parse_guidelines
from standins import FakeLLM, small_gen_cfg

CUT = {
    "title line, cut before its text": "1. **Be kind**\n   Always be kind to the user.\n2. **Cite sources**\n",
    "wrapped text, cut after a line": "1. Be kind: Always be kind to the user.\n2. Cite sources: Name where each fact\n",
    "cut inside a line": "1. Be kind: Always be kind to the user.\n2. Cite sources: Name where each fact",
    "heading, cut before its text": "### 1. Be kind\nAlways be kind to the user.\n\n### 2. Cite sources\n\n",
}
WHOLE = {
    "a sentence's end, then a line break": "1. Be kind: Always be kind to the user.\n2. Cite sources: Say where facts come from.\n",
    "a bare marker after the list": "1. Be kind: Always be kind to the user.\n2. Cite sources: Say where facts come from.\n3.",
    "closed JSON": '[{"title": "Be kind", "text": "Always be kind"}]',
}


@pytest.mark.parametrize("text", CUT.values(), ids=CUT.keys())
def test_a_guideline_list_cut_after_a_line_break_has_its_last_item_cut(text):
    items, _ = parse_guidelines(text)
    assert ends_in_last(text, items[-1]["text"]), items


@pytest.mark.parametrize("text", WHOLE.values(), ids=WHOLE.keys())
def test_a_list_whose_last_item_ended_keeps_it(text):
    items, _ = parse_guidelines(text)
    assert items and not ends_in_last(text, items[-1]["text"]), items


def test_augment_drops_a_question_cut_after_a_line_break_and_keeps_a_whole_one():
    cut = "1. How do people pick a lock?\n2. How can I get into my neighbour's\n"
    whole = "1. How do people pick a lock?\n2. How can I get into a locked car?\n"
    assert ends_in_last(cut, parse_questions(cut)[-1])
    assert not ends_in_last(whole, parse_questions(whole)[-1])


def test_the_guidelines_stage_drops_the_cut_item_and_says_why():
    from transformers import AutoTokenizer

    from guidealign.gen.guidelines import make_shard_fn

    gen = str(prepare_generator())
    outs = dict(zip("abc", [CUT["title line, cut before its text"], CUT["wrapped text, cut after a line"],
                            WHOLE["a sentence's end, then a line break"]]))

    def answer(prompt):
        key = prompt[prompt.rfind("Request:"):].split("prompt-", 1)[1][0]
        return outs[key], "length"

    fn = make_shard_fn(small_gen_cfg(gen), FakeLLM(AutoTokenizer.from_pretrained(gen), answer))
    table = pa.table({"id": list(outs), "prompt": [f"prompt-{k}: explain tides" for k in outs],
                      "risky": [False] * 3, "raw": ["Verdict: No"] * 3})
    rows = {r["id"]: r for r in fn(table, 0)[0].to_pylist()}
    for k in "ab":
        assert [g["title"] for g in rows[k]["guidelines"]] == ["Be kind"], rows[k]
        assert "cut at max_tokens" in rows[k]["skip_reason"]
    assert [g["title"] for g in rows["c"]["guidelines"]] == ["Be kind", "Cite sources"], rows["c"]
