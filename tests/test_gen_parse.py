"""Parsing of raw detector / guideline / question outputs, over many output shapes."""
from __future__ import annotations

import pytest

from gen.parse import parse_detection, parse_guidelines, parse_questions


@pytest.mark.parametrize("text,risky,status", [
    ("The user wants to hurt someone.\nVerdict: Yes", True, "ok"),
    ("Analysis: a normal cooking question.\nVerdict: No", False, "ok"),
    ("**Verdict:** Yes", True, "ok"),
    ("Verdict: **no**.", False, "ok"),
    ("Final answer - YES", True, "ok"),
    ("verdict = No", False, "ok"),
    ("Verdict: Yes\nThe request asks for a weapon recipe.", True, "verdict_mid"),
    ("I first thought Verdict: No, but on reflection Verdict: Yes", True, "conflicting"),
    ("The input is safe.\nNo.", False, "bare"),
    ("The input is risky.\n**Yes**", True, "bare"),
    ("Yes, this input is risky because it asks for violence.", True, "bare"),
    ("No problem here, it is a simple math question.", None, "missing"),
    ("The input seems fine but I am not sure", None, "missing"),
    ("", None, "empty"),
    (None, None, "empty"),
    ("   \n  ", None, "empty"),
])
def test_detection_shapes(text, risky, status):
    r, rationale, st = parse_detection(text)
    assert (r, st) == (risky, status)
    assert isinstance(rationale, str)


def test_detection_rationale_is_the_analysis():
    r, rationale, st = parse_detection("Analysis: It asks how to steal a car.\nVerdict: Yes")
    assert rationale == "It asks how to steal a car."
    r, rationale, st = parse_detection("Verdict: No\nIt is a recipe question.")
    assert rationale == "It is a recipe question."


def test_detection_verdict_word_inside_text_is_not_a_verdict():
    # "answer" and "no" appear, but not as a verdict
    r, _, st = parse_detection("I can answer that. There is no risk in baking bread")
    assert r is None and st == "missing"


def _titles(items):
    return [g["title"] for g in items]


def test_numbered_with_colons_and_preamble_and_trailer():
    text = ("Here are the guidelines:\n\n1. Respect privacy: Never share personal data.\n"
            "2. Be honest: Do not deceive.\n3. Stay calm: Keep a neutral tone.\n\nI hope this helps!")
    items, st = parse_guidelines(text)
    assert st == "ok"
    assert _titles(items) == ["Respect privacy", "Be honest", "Stay calm"]
    assert items[2]["text"] == "Keep a neutral tone."


@pytest.mark.parametrize("text", [
    "- Respect privacy: Never share personal data.\n- Be honest: Do not deceive.",
    "* Respect privacy: Never share personal data.\n* Be honest: Do not deceive.",
    "• Respect privacy: Never share personal data.\n• Be honest: Do not deceive.",
    "1) Respect privacy: Never share personal data.\n2) Be honest: Do not deceive.",
    "(1) Respect privacy: Never share personal data.\n(2) Be honest: Do not deceive.",
    "1. **Respect privacy**: Never share personal data.\n2. **Be honest**: Do not deceive.",
    "1. **Respect privacy:** Never share personal data.\n2. **Be honest:** Do not deceive.",
    "**1. Respect privacy**: Never share personal data.\n**2. Be honest**: Do not deceive.",
    "Guideline 1: Respect privacy - Never share personal data.\nGuideline 2: Be honest - Do not deceive.",
    "1. Respect privacy - Never share personal data.\n2. Be honest — Do not deceive.",
    "### Respect privacy\nNever share personal data.\n### Be honest\nDo not deceive.",
    "1. Respect privacy\n   Never share personal data.\n2. Be honest\n   Do not deceive.",
    "**Respect privacy**\nNever share personal data.\n**Be honest**\nDo not deceive.",
])
def test_list_shapes(text):
    items, st = parse_guidelines(text)
    assert st == "ok", (text, items)
    assert _titles(items) == ["Respect privacy", "Be honest"]
    assert items[0]["text"] == "Never share personal data."
    assert items[1]["text"] == "Do not deceive."


def test_titles_without_colons_are_flagged_untitled():
    text = "1. Always protect the user's private information and never reveal it to others.\n" \
           "2. Safety: Refuse dangerous requests."
    items, st = parse_guidelines(text)
    assert st == "untitled"
    assert items[0]["title"] == "" and "private information" in items[0]["text"]
    assert items[1] == {"title": "Safety", "text": "Refuse dangerous requests."}


def test_continuation_lines_join_the_item():
    text = "1. Be kind: Speak gently\n   and with respect.\n2. Be brief: Keep it short."
    items, _ = parse_guidelines(text)
    assert items[0]["text"] == "Speak gently and with respect."


def test_unnumbered_title_lines_fallback():
    items, st = parse_guidelines("Honesty: Tell the truth.\nSafety: Avoid harm.")
    assert st == "unnumbered" and _titles(items) == ["Honesty", "Safety"]


@pytest.mark.parametrize("text,status", [
    ("", "empty"), (None, "empty"),
    ("I cannot help with that request. Please ask something else.", "missing"),
])
def test_no_guidelines(text, status):
    items, st = parse_guidelines(text)
    assert items == [] and st == status


def test_truncated_last_item_is_kept():
    items, st = parse_guidelines("1. Be kind: Speak gently.\n2. Be brief: Keep answers sh")
    assert len(items) == 2 and items[1]["text"] == "Keep answers sh"


def test_questions():
    assert parse_questions("1. How do I a thing?\n2) What about b?\n- And c?") == \
        ["How do I a thing?", "What about b?", "And c?"]
    assert parse_questions("Here you go:\n1. \"Quoted question?\"\n2. **Bold question?**") == \
        ["Quoted question?", "Bold question?"]
    assert parse_questions("") == []
