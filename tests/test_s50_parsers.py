"""Review s50 of the detect, guideline and question parsers and of the guidelines stage's rows:
each test is a defect reproduced with texts written here (no engine; the stage test uses the
stand-in for vLLM)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from guidealign.gen.parse import parse_detection, parse_guidelines
from guidealign.gen.questions import parse_questions
from standins import FakeLLM, small_gen_cfg

OWN = "1. Stay impartial: Do not take sides.\n2. Ground claims: Cite evidence.\n" \
      "3. Avoid loaded language: Use neutral terms."
OWN_ITEMS = [{"title": "Stay impartial", "text": "Do not take sides."},
             {"title": "Ground claims", "text": "Cite evidence."},
             {"title": "Avoid loaded language", "text": "Use neutral terms."}]


# --- 1. guideline lists: verdict lines and a made-up next exemplar ---------------------------

@pytest.mark.parametrize("text", [
    # a verdict line after the list: the text before it was thrown away
    OWN + "\n\nVerdict: Yes",
    # the detection turn's verdict before the list and again after it
    "Verdict: Yes\n\n" + OWN + "\n\nVerdict: Yes",
    # the detection turn repeated before the list (kept working)
    "1. Unsafe content: no. The question uses no offensive language.\n"
    "2. Harm a careless reply could do: yes. Immigration policy is divisive.\n"
    "Conclusion: point 1 is no and point 2 is yes, so answering needs safety care.\n"
    "Verdict: Yes\n\n" + OWN,
    # its own list, then a made-up next exemplar: input, analysis, verdict and two guidelines
    OWN + "\n\nInput: Write a convincing news article explaining how 5G towers spread viruses.\n"
    "1. Unsafe content: yes. The user asks for persuasive writing.\n"
    "2. Harm a careless reply could do: yes. Could spread false health info.\n"
    "Conclusion: point 1 is yes and point 2 is yes, so answering needs safety care.\n"
    "Verdict: Yes\n"
    "1. Do not create convincing falsehoods: Refuse to write articles that present false claims.\n"
    "2. Correct the claim: State briefly what the evidence shows.",
    # a quality exemplar's request echoed right after the list, with no blank line
    OWN + "\nRequest: Translate into German: where is the station?\n"
    "1. Translate faithfully: Keep the meaning.\n2. Use natural phrasing: Choose native wording.",
])
def test_guideline_list_around_verdict_lines_and_an_echoed_exemplar(text):
    assert parse_guidelines(text) == (OWN_ITEMS, "ok")


def test_a_user_turn_repeated_before_the_answer_cuts_nothing():
    text = "Input: Will the new law ruin the country?\n\n" + OWN
    assert parse_guidelines(text) == (OWN_ITEMS, "ok")


# --- 2. a first line that answers the user's question is no verdict ------------------------

@pytest.mark.parametrize("text", [
    "No, mixing bleach and ammonia is harmful: it releases toxic chloramine gas. Never do this.",
    "No, that could be harmful for a toddler. Ask your pediatrician about the dose.",
    "No, you should not stop your heart medication without your doctor; it carries serious risks.",
    "Yes, baking soda is fine for cleaning an oven and carries no risk.",
    "No. Stopping suddenly can be risky.",
])
def test_an_answer_to_the_users_question_is_no_verdict(text):
    assert parse_detection(text)[0::2] == (None, "missing")


@pytest.mark.parametrize("text,risky", [
    ("Yes, this input is risky because it asks for violence.", True),
    ("No, this request is harmless.", False),
    ("No, answering it needs no safety care.", False),
    ("Yes, answering the question needs safety care: it is about medication.", True),
])
def test_a_first_line_about_the_review_is_still_a_verdict(text, risky):
    assert parse_detection(text)[0::2] == (risky, "bare")


# --- 3, 4. the guidelines stage: exemplar copies, duplicates, counts -------------------------

def _exemplar_items(k: int) -> list[dict]:
    from guidealign.gen.build import load_prompt_file

    spec, _ = load_prompt_file(None, "safety_guidelines.yaml", ("system", "user", "request", "exemplars"))
    return spec["exemplars"][k]["guidelines"]


def _lines(items) -> str:
    return "\n".join(f"{n}. {g['title']}: {g['text']}" for n, g in enumerate(items, 1))


def test_guidelines_stage_counts_exemplar_copies_and_drops_repeats(generator_path, tok):
    """A small model copies the exemplar the prompt showed word for word (23% of the 135M
    model's guidelines): they are counted (kept: a guideline adapted from an exemplar for a like
    input scores as high, and the library merges true copies); a looping model's repeated items
    are dropped. Copies of an exemplar the prompt did not show are not counted."""
    from guidealign.gen.guidelines import make_shard_fn

    shown, unshown = _exemplar_items(0), _exemplar_items(2)  # small_gen_cfg shows one exemplar
    near = dict(shown[1], text=shown[1]["text"].upper().replace(",", "") + "  ")  # case, spacing
    outputs = {
        "copy": _lines(shown),                                   # all copied
        "mixed": _lines(OWN_ITEMS[:2] + [near, OWN_ITEMS[0], shown[3]]),  # 2 own, a repeat, 2 copies
        "other": _lines(unshown + OWN_ITEMS[:3]),                # 8 guidelines, none shown
    }

    def answer(prompt):
        tail = prompt[prompt.rfind("Input:"):]
        return next(out for key, out in outputs.items() if f"case {key}" in tail), "stop"

    fn = make_shard_fn(small_gen_cfg(generator_path), FakeLLM(tok, answer))
    keys = list(outputs)
    table = pa.table({"id": keys, "prompt": [f"How do I do case {k}?" for k in keys],
                      "risky": [True] * 3, "raw": ["Crime.\nVerdict: Yes"] * 3})
    out, _, stats = fn(table, 0)
    rows = {r["id"]: r for r in out.to_pylist()}
    assert len(rows["copy"]["guidelines"]) == len(shown) and rows["copy"]["parse_status"] == "ok"
    assert len(rows["mixed"]["guidelines"]) == 4 and rows["mixed"]["parse_status"] == "ok"
    assert len(rows["other"]["guidelines"]) == 8
    assert stats["exemplar_copies"] == len(shown) + 2 and stats["duplicate_guidelines"] == 1
    assert stats["rows_under_5_guidelines"] == 1 and stats["rows_over_7_guidelines"] == 1
    assert stats["unparsed"] == 0 and stats["guidelines"] == len(shown) + 12


def test_drop_duplicates_keeps_the_first_of_each():
    from guidealign.gen.guidelines import drop_duplicates

    items = [{"title": "Be kind", "text": "Say it gently."}, {"title": "be  kind", "text": "Say it gently. "},
             {"title": "Be kind", "text": "Say it kindly."}]
    assert drop_duplicates(items) == ([items[0], items[2]], 1)


# --- 6. the conclusion line the detect prompt asks for --------------------------------------

@pytest.mark.parametrize("text,risky", [
    ("1. Unsafe content: no. 2. Harm: no.\nConclusion: point 1 is no and point 2 is no, so "
     "answering needs no safety care.\nVerd", False),
    ("Conclusion: point 1 is no and point 2 is yes, so answering needs safety care.", True),
    ("1. Unsafe content: yes.\n2. Harm: yes.\nConclusion: point 1 is yes and point 2 is yes, so "
     "answering needs safety care.\nVerdict:", True),
    ("1. Unsafe content: no.\n**Conclusion:** answering does not need safety care.", False),
])
def test_a_final_conclusion_line_is_read(text, risky):
    got = parse_detection(text)
    assert got[0::2] == (risky, "conclusion")
    assert "Conclusion" in got[1] and not got[1].endswith(("Verd", "Verdict:"))


@pytest.mark.parametrize("text", [
    # more text after the conclusion: not the final line
    "Conclusion: so answering needs safety care.\nBut the user is a nurse.",
    # says both
    "Conclusion: it needs safety care, or maybe it needs no safety care.",
])
def test_a_conclusion_that_is_not_final_or_says_both_is_none(text):
    assert parse_detection(text)[0::2] == (None, "missing")


# --- 7. italic verdict labels ---------------------------------------------------------------

@pytest.mark.parametrize("text,risky", [
    ("*Verdict*: Yes", True), ("*Verdict:* No", False), ("_Verdict:_ No", False),
    ("1. Unsafe content: no.\n_Verdict_: *Yes*", True),
])
def test_italic_verdict_labels(text, risky):
    assert parse_detection(text)[0::2] == (risky, "ok")


# --- 8. titles without quotes and emoji; question labels and answers -----------------------

def test_titles_lose_wrapping_quotes_backticks_and_leading_emoji():
    text = ('1. "Stay impartial": Do not take sides.\n2. \u201cGround claims\u201d: Cite evidence.\n'
            "3. `Avoid loaded language`: Use neutral terms.\n4. \U0001F6E1\ufe0f Be humble: Do not claim "
            'certainty.\n5. \u2705 **Help the user**: Offer sources.\n6. "Keep calm: Stay polite."')
    items, status = parse_guidelines(text)
    assert status == "ok"
    assert [g["title"] for g in items] == ["Stay impartial", "Ground claims", "Avoid loaded language",
                                           "Be humble", "Help the user", "Keep calm"]
    assert items[5]["text"] == "Stay polite."
    # a quote that is part of a title stays
    assert parse_guidelines("1. Don't guess: Say so.\n2. Cite: Give sources.")[0][0]["title"] == "Don't guess"


def test_questions_lose_a_question_label_and_an_answer_under_them():
    assert parse_questions("1. **Question:** How do I forge a signature?\n"
                           "2. **Question:** How do I fake a receipt?") == \
        ["How do I forge a signature?", "How do I fake a receipt?"]
    assert parse_questions("1. How do I forge a signature?\n   Answer: I can't help with that.\n"
                           "2. How do I fake a receipt?\n   **Answer:** No.") == \
        ["How do I forge a signature?", "How do I fake a receipt?"]
    # a wrapped question still joins its item
    assert parse_questions("1. How do I get my landlord to return\n   my deposit?") == \
        ["How do I get my landlord to return my deposit?"]


@pytest.mark.parametrize("text,risky", [
    ("No, it is not risky.", False), ("No, it's not harmful.", False), ("No, there is no risk here.", False),
    ("No - nothing unsafe here.", False), ("No, it doesn't need any special care.", False),
    ("No, it is harmless.", False), ("Yes, a careless answer could cause harm.", True),
    ("Yes, it needs care.", True), ("Yes, the user's request involves self-harm.", True),
])
def test_a_first_line_whose_risk_words_agree_with_its_label_is_a_verdict(text, risky):
    # the narrowed rule (review words only) lost these; words of risk count when they agree
    # with the label, and an answer to the user says the opposite of its label about risk
    assert parse_detection(text)[0::2] == (risky, "bare")


@pytest.mark.parametrize("text", [
    "1. Explain the approach: Describe the algorithm.\n2. Show an example:\n**Input:** [1, 2, 3]\n"
    "**Output:** 6\n3. Handle edge cases: Empty lists return 0.\n4. Test it: Write unit tests.",
    "1. Name the endpoint: Give the URL.\n2. Show a call:\nRequest: GET /users?id=1\n3. Explain errors: List codes.",
])
def test_an_input_example_inside_an_item_cuts_nothing(text):
    items, _ = parse_guidelines(text)
    assert items[-1]["text"] in ("Write unit tests.", "List codes.")


@pytest.mark.parametrize("text", [
    "Verdict: Yes\n\nNow write 5 to 7 guidelines for this input.\n\n" + OWN,
    "Verdict: Yes\nInput: How many painkillers can I take?\n\n" + OWN,
])
def test_a_repeated_turn_before_the_list_cuts_nothing(text):
    assert parse_guidelines(text) == (OWN_ITEMS, "ok")
