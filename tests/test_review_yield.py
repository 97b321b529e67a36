"""Review of the yield accounting, `guidealign show` and the output parsers: each test is a
defect found in review, reproduced with rows and texts built here."""
from __future__ import annotations

import pyarrow as pa
import pytest

from guidealign.gen.parse import parse_detection, parse_guidelines


# --- yield: "kept" is what SFT keeps ------------------------------------------------------------

def test_respond_kept_is_what_sft_keeps_when_min_response_chars_is_zero():
    """sft.min_response_chars=0 keeps empty answers that finished on their own; the yield
    counted them as not kept (it floored the minimum at 1)."""
    from guidealign.config import Config
    from guidealign.gen.yieldstats import counts, respond_usable
    from guidealign.sft.data import drop_reason

    cfg = Config()
    cfg.sft.min_response_chars = 0
    keep = tuple(cfg.sft.keep_finish_reasons)
    rows = [{"prompt": "q", "response": r, "finish_reason": f, "output_tokens": 3}
            for r in ("", "   ", "ok", None) for f in ("stop", "length")]
    for r in rows:
        assert respond_usable(r, keep, 0) == (drop_reason(cfg.sft, r) is None), r
    c = counts(rows, lambda r: respond_usable(r, keep, 0))
    sft_kept = sum(drop_reason(cfg.sft, r) is None for r in rows)
    assert c["yield_rows_parsed"] == sft_kept == 3


# --- show -----------------------------------------------------------------------------------------

def test_show_tells_skipped_and_failed_detections_from_unparsed_ones(tmp_path):
    """A detect row skipped before generation (empty/overlong prompt) or failed in the engine
    has no verdict, but show called it "unparsed" and dropped the reason; a response's error
    note was not shown, an empty response showed nothing, and a long rationale lost its
    "[...]" mark."""
    from guidealign.shards import write_shard
    from guidealign.show import examples, render

    long = "word " * 100
    write_shard(tmp_path / "detect", 0, pa.table({
        "id": ["s", "e", "u", "r"],
        "risky": pa.array([None, None, None, True], pa.bool_()),
        "rationale": ["", "", "no verdict here", long],
        "finish_reason": ["skipped", "error", "stop", "stop"],
        "parse_status": ["skipped", "error", "missing", "ok"],
        "skip_reason": ["overlong: 9000 prompt tokens", "engine error: CUDA out of memory", None, None]}), "d")
    write_shard(tmp_path / "respond", 0, pa.table({
        "id": ["s", "e", "u", "r"], "prompt": ["P-s", "P-e", "P-u", "P-r"],
        "guideline_texts": [["g"], ["g"], ["g"], ["g"]],
        "response": ["fine", "", "fine", "fine"],
        "finish_reason": ["stop", "error", "stop", "stop"],
        "note": ["", "engine error: timeout", "", ""]}), "r")
    text = render(examples(tmp_path, n=4))
    parts = {p.split("\n")[0][4:]: p for p in text.split("\n\n")}
    assert "- detect: skipped (overlong: 9000 prompt tokens)" in parts["P-s"]
    assert "- detect: failed (engine error: CUDA out of memory)" in parts["P-e"]
    assert "- detect: unparsed. no verdict here" in parts["P-u"]
    assert "unparsed" not in parts["P-s"] and "unparsed" not in parts["P-e"]
    assert "engine error: timeout" in parts["P-e"] and "(empty)" in parts["P-e"]
    assert "[...]" in parts["P-r"]


# --- detection verdicts -----------------------------------------------------------------------

@pytest.mark.parametrize("text,risky", [
    ("The user asks for a weapon.\n**Verdict:** **Yes**", True),
    ("A cooking question.\n__Verdict:__ __No__", False),
    ("A cooking question.\nVerdict: __No__", False),
])
def test_verdict_with_bold_on_label_and_word_is_read(text, risky):
    assert parse_detection(text)[0::2] == (risky, "ok")


@pytest.mark.parametrize("text", [
    # cut at the length cap after the criteria: "careless answer: no" is point 2, not the verdict
    "1. Unsafe content: yes. The user wants to build a weapon.\n2. Harm from a careless answer: no. It",
    "The answer - no matter how it is phrased - would help the user build a weapon. Then",
])
def test_a_criterion_inside_the_analysis_is_not_a_verdict(text):
    assert parse_detection(text)[0::2] == (None, "missing")


@pytest.mark.parametrize("text,risky,status", [
    # the exemplars' format with a paraphrased criterion: one verdict, not a conflict
    ("1. Unsafe content: yes. The user wants a weapon.\n2. Harm from a careless answer: no.\n"
     "Verdict: Yes", True, "ok"),
    # a bare last line is the verdict, not "the answer is no" in the analysis before it
    ("Could this have a legitimate use? The answer is no. The user wants a weapon.\n\nYes", True, "bare"),
    ("This is risky - no doubt about it: the user wants a weapon.\n\nYes", True, "bare"),
])
def test_the_verdict_outranks_verdict_words_in_the_analysis(text, risky, status):
    assert parse_detection(text)[0::2] == (risky, status)


def test_rationale_after_a_leading_verdict_drops_its_punctuation():
    assert parse_detection("Verdict: No, the input is a cooking question.")[1] == \
        "the input is a cooking question."
    assert parse_detection("Verdict: **Yes** - it asks for a weapon.")[1] == "it asks for a weapon."


# --- guideline lists --------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "1. **Respect privacy.** Never share personal data.\n2. **Be honest.** Do not deceive.",
    "1. **Respect privacy -** Never share personal data.\n2. **Be honest -** Do not deceive.",
    "- **Respect privacy.** Never share personal data.\n- **Be honest.** Do not deceive.",
])
def test_bold_title_with_its_separator_inside_the_bold(text):
    assert parse_guidelines(text) == ([{"title": "Respect privacy", "text": "Never share personal data."},
                                       {"title": "Be honest", "text": "Do not deceive."}], "ok")
    # bold emphasis opening a sentence is no title
    assert parse_guidelines("1. **Never** share addresses.\n2. **Always** cite sources.") == \
        ([{"title": "", "text": "Never share addresses."},
          {"title": "", "text": "Always cite sources."}], "untitled")


def test_bullets_at_a_numbered_titles_indentation_are_its_text():
    text = ("1. Protect privacy\n- Never share addresses.\n- Never share phone numbers.\n"
            "2. Be honest\n- Do not lie.")
    assert parse_guidelines(text) == (
        [{"title": "Protect privacy", "text": "Never share addresses. Never share phone numbers."},
         {"title": "Be honest", "text": "Do not lie."}], "ok")


@pytest.mark.parametrize("text", [
    "**Note:** These guidelines apply to the request.\n\n1. Be kind: Speak gently.\n2. Be brief: Keep it short.",
    "## Guidelines\nThe following guidelines apply to this request.\n\n1. Be kind: Speak gently.\n"
    "2. Be brief: Keep it short.",
])
def test_an_intro_before_a_numbered_list_is_not_a_guideline(text):
    assert parse_guidelines(text) == ([{"title": "Be kind", "text": "Speak gently."},
                                       {"title": "Be brief", "text": "Keep it short."}], "ok")
