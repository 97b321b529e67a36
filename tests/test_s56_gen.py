"""Stop 56 review of the generation stages (detect, guidelines, augment, respond): defects a user
running them on real model outputs met. Pure functions only (no engine)."""
from __future__ import annotations

import pytest


# --- detect: a verdict word with its own colon, answered -------------------------------------------

@pytest.mark.parametrize("text,risky", [
    ("Verdict: Unsafe: No", False),
    ("Verdict: Risky: No.", False),
    ("**Verdict:** Unsafe: **No**", False),
    ("The input asks how to bake bread.\nVerdict: Harmful: No", False),
    ("Verdict: Safe: No", True),
    ("Verdict: Safe: Yes", False),
    ("Verdict: Unsafe: Yes", True),
    # a "no" that does not end its clause answers nothing: the label is the verdict
    ("Verdict: Unsafe: no one should build this.", True),
])
def test_verdict_label_answered_after_a_colon_reads_as_its_answer(text, risky):
    """"Verdict: Unsafe: No" answers the question "unsafe?" with No, as "Verdict: Unsafe? No"
    does; it was read as "Verdict: Unsafe" (risky) with "No" as the rationale."""
    from guidealign.gen.parse import parse_detection

    got = parse_detection(text)
    assert got[0] is risky, got


def test_verdict_answered_after_a_colon_ends_the_output():
    from guidealign.gen.parse import parse_detection

    risky, rationale, status = parse_detection("It asks for a recipe.\nVerdict: Unsafe: No")
    assert (risky, rationale, status) == (False, "It asks for a recipe.", "ok")


# --- guidelines: lettered and Roman-numeral list markers -------------------------------------------

TITLES = ["Protect privacy", "Be honest", "Avoid harm"]
TEXTS = ["Never share home addresses.", "Say what you do not know.", "Decline dangerous steps."]


@pytest.mark.parametrize("markers", [
    ["a)", "b)", "c)"], ["(a)", "(b)", "(c)"], ["A.", "B.", "C."], ["i.", "ii.", "iii."],
    ["I)", "II)", "III)"], ["iv.", "v.", "vi."], ["**a)**", "**b)**", "**c)**"],
])
def test_lettered_guideline_markers_are_not_kept_in_titles(markers):
    """A model that letters its list ("a) Protect privacy: ...", "iv. ...") gets the titles
    without the markers, as a numbered list does; before, "a) Protect privacy" was the title
    (and the status "unnumbered"), and the library held the marker in every such guideline."""
    from guidealign.gen.parse import parse_guidelines

    text = "\n".join(f"{mk} {t}: {x}" for mk, t, x in zip(markers, TITLES, TEXTS))
    items, status = parse_guidelines(text)
    assert [g["title"] for g in items] == TITLES and [g["text"] for g in items] == TEXTS
    assert status == "ok"


def test_lettered_items_with_titles_on_their_own_line():
    from guidealign.gen.parse import parse_guidelines

    text = "Here are the guidelines:\n\n" + "\n".join(
        f"{mk} {t}\n{x}" for mk, t, x in zip(["a)", "b)", "c)"], TITLES, TEXTS))
    items, _ = parse_guidelines(text)
    assert [(g["title"], g["text"]) for g in items] == list(zip(TITLES, TEXTS))


def test_lettered_sub_points_under_a_numbered_item_stay_its_text():
    """Letters under a numbered item mark its sub-points (as bullets there do), not guidelines."""
    from guidealign.gen.parse import parse_guidelines

    text = ("1. Protect privacy: Keep personal data out of answers.\n   a) Never share addresses.\n"
            "   b) Never share phone numbers.\n2. Be honest: Say what you do not know.")
    items, status = parse_guidelines(text)
    assert [g["title"] for g in items] == ["Protect privacy", "Be honest"]
    assert "Never share phone numbers." in items[0]["text"] and status == "ok"


def test_abbreviations_at_a_line_start_are_no_markers():
    from guidealign.gen.parse import parse_guidelines

    items, _ = parse_guidelines("1. Cite sources: e.g. journals.\n2. Be clear: i.e. plain words.")
    assert [g["text"] for g in items] == ["e.g. journals.", "i.e. plain words."]


# --- augment: lettered question lists --------------------------------------------------------------

@pytest.mark.parametrize("markers", [["a)", "b)"], ["A.", "B."], ["i.", "ii."], ["(a)", "(b)"]])
def test_lettered_question_list_loses_its_markers(markers):
    """augment keeps parsed questions as prompts: "a) How can I ...?" kept its "a) " before."""
    from guidealign.gen.questions import parse_questions

    qs = ["How can I pick a lock without a key?", "What is the best way to cheat on a test?"]
    text = "Here are new questions:\n" + "\n".join(f"{mk} {q}" for mk, q in zip(markers, qs))
    assert parse_questions(text) == qs


# --- guidelines: the prompt's field names written out as labels ------------------------------------

@pytest.mark.parametrize("text", [
    "1. Title: Protect privacy. Explanation: Never share home addresses.\n"
    "2. Title: Be honest. Explanation: Say what you do not know.",
    "1. Title: Protect privacy\n   Explanation: Never share home addresses.\n"
    "2. Title: Be honest\n   Explanation: Say what you do not know.",
    "1. **Title:** Protect privacy\n**Explanation:** Never share home addresses.\n"
    "2. **Title:** Be honest\n**Explanation:** Say what you do not know.",
    "Title: Protect privacy\nExplanation: Never share home addresses.\n"
    "Title: Be honest\nExplanation: Say what you do not know.",
    "1. Protect privacy: Explanation: Never share home addresses.\n"
    "2. Be honest: Explanation: Say what you do not know.",
])
def test_field_labels_of_the_prompt_form_are_no_titles(text):
    """The prompts ask for "N. Title: explanation"; a model that writes the field names out
    ("1. Title: Protect privacy. Explanation: ...") got every guideline titled "Title" (and,
    with the explanation on a bold line of its own, "Explanation" as a guideline, the second
    explanation lost)."""
    from guidealign.gen.parse import parse_guidelines

    items, _ = parse_guidelines(text)
    assert [(g["title"], g["text"]) for g in items] == [
        ("Protect privacy", "Never share home addresses."), ("Be honest", "Say what you do not know.")]


def test_a_rule_that_mentions_text_keeps_its_words():
    from guidealign.gen.parse import parse_guidelines

    items, _ = parse_guidelines("1. Quote exactly: Copy the source text: word for word.\n"
                                "2. Be honest: Say what you do not know.")
    assert items[0] == {"title": "Quote exactly", "text": "Copy the source text: word for word."}
