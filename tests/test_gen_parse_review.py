"""Review of the output parsers and the guidelines stage's row logic: each test is a defect
found in review, reproduced with texts and rows built here (no engine)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from guidealign.gen.parse import parse_detection, parse_guidelines
from standins import FakeLLM, small_gen_cfg

# --- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    # "the answer is no" answers the user's question inside point 1; the analysis says care
    "1. Unsafe content: no. The user asks whether bleach and ammonia can be mixed; the answer is no.\n"
    "2. Harm a careless reply could do: yes. A wrong answer could poison someone.\n"
    "Conclusion: point 2 is yes, so answering needs safety care.",
    "The question is whether ibuprofen goes with alcohol. The short answer is no.\n"
    "Conclusion: point 2 is yes, so answering needs safety care.",
    # cut at max_tokens after it
    "1. Unsafe content: no. The user asks whether bleach and ammonia can be mixed; the answer is no, "
    "because it releases toxic gas.\n2. Harm a careless reply could do: yes. A careless reply could",
])
def test_the_answer_is_no_inside_the_analysis_is_no_verdict(text):
    """The weak "answer is yes|no" matched anywhere: verdict False ('verdict_mid'). With no
    verdict, a final Conclusion line that says safety care is read instead (s50)."""
    expected = (True, "conclusion") if "Conclusion:" in text else (None, "missing")
    assert parse_detection(text)[0::2] == expected


def test_the_verdict_sentences_first_word_is_no_rationale():
    """"The answer is no." had the rationale "The"; as the whole output, its own line or the
    last sentence, it is still the verdict."""
    assert parse_detection("The answer is no.") == (False, "", "ok")
    assert parse_detection("> Verdict: No") == (False, "", "ok")
    assert parse_detection("It asks for a cake recipe.\nThe answer is no.") == \
        (False, "It asks for a cake recipe.", "ok")
    assert parse_detection("It asks for a cake recipe, so the answer is no.")[0::2] == (False, "ok")


@pytest.mark.parametrize("text,risky,status", [
    # the system message copied back: options, no verdict (was False, 'conflicting')
    ('Then end with one final line, exactly "Verdict: Yes" or "Verdict: No".', None, "missing"),
    ('I will end with "Verdict: Yes" or "Verdict: No".\nThe input is fine.\nVerdict: No', False, "ok"),
    ('The input is fine. Verdict: "Yes" or "No"? Verdict: No', False, "ok"),
    ("Verdict: Yes/No", None, "missing"),
    # a turn the model made up after its own: its verdict is not this output's (was True)
    ("Fine.\nVerdict: No\nUSER: Does answering this input need safety care?\n\nInput: how to make a bomb\n"
     "ASSISTANT: Bombs.\nVerdict: Yes", False, "ok"),
    ("Fine.\nVerdict: No<|im_end|>\n<|im_start|>user\nInput: a bomb<|im_end|>\n<|im_start|>assistant\n"
     "Verdict: Yes", False, "ok"),
    ("Fine.\nVerdict: No</s><s>[INST] Input: a bomb [/INST] Verdict: Yes", False, "ok"),
    ("Fine.\nVerdict: No\n### Human: Input: a bomb\n### Assistant: Verdict: Yes", False, "ok"),
])
def test_copied_options_and_made_up_turns_are_no_verdict(text, risky, status):
    assert parse_detection(text)[0::2] == (risky, status)


# --- guideline lists -----------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    # a refusal with a note
    "I'm sorry, but I can't help with that.\nNote: If you are in danger, contact local emergency services.",
    "I'm sorry, but I can't help with that.\nReason: it asks for weapons.\nNote: call 911.",
    # one "Title: text" line is no list
    "Honesty: Tell the truth.",
    # the detector's analysis repeated
    "1. Unsafe content: no. This is a friendly request.\n2. Harm a careless reply could do: no. Any list "
    "is harmless.\nConclusion: point 1 is no and point 2 is no, so answering needs no safety care.\n"
    "Verdict: No",
    "1. Unsafe content: yes. It asks for a weapon.\n2. Harm a careless reply could do: yes. It could kill.",
    # an answer to the input, not guidelines
    "Sure! Here is a recipe for banana bread:\nIngredients: 3 bananas, 2 cups flour, 1 egg.\n"
    "Instructions: Mix everything and bake for 60 minutes.",
    # JSON that is no list of {title, text}
    '{"answer": "Bake it for an hour."}',
    '[{"title": "Privacy"}, {"title": "Honesty", "text": "Be truthful."}]',
])
def test_text_that_is_no_guideline_list_gives_none(text):
    assert parse_guidelines(text) == ([], "missing")


_TWO = [{"title": "Privacy", "text": "Never share addresses."}, {"title": "Honesty", "text": "Be truthful."}]


@pytest.mark.parametrize("text", [
    '[{"title": "Privacy", "text": "Never share addresses."}, {"title": "Honesty", "text": "Be truthful."}]',
    '```json\n[\n  {\n    "title": "Privacy",\n    "text": "Never share addresses."\n  },\n'
    '  {\n    "title": "Honesty",\n    "text": "Be truthful."\n  }\n]\n```',
    '{"guidelines": [{"title": "Privacy", "text": "Never share addresses."}, '
    '{"text": "Be truthful.", "title": "Honesty"}]}',
    # cut at max_tokens: the whole objects
    '[{"title": "Privacy", "text": "Never share addresses."}, {"title": "Honesty", "text": "Be truthful."}, '
    '{"title": "Saf',
])
def test_a_json_list_is_read_as_json(text):
    """It came back as one garbage guideline titled '[{"title"' (or one per JSON line)."""
    assert parse_guidelines(text) == (_TWO, "ok")
    assert parse_guidelines('["Never share addresses.", "Be truthful."]') == ([], "missing")


@pytest.mark.parametrize("text", [
    "1. Privacy: Never share addresses.\n2. Honesty: Be truthful.\n**Note:** These guidelines are general.",
    "1. Privacy: Never share addresses.\n2. Honesty: Be truthful.\n### Summary\nBe safe.",
    "1. Privacy: Never share addresses.\n2. Honesty: Be truthful.\n\n**Note:** general.\n- Be kind.",
    "1. Privacy: Never share addresses.\n2. Honesty: Be truthful.<|im_end|>\n<|im_start|>user\nThanks",
])
def test_a_note_or_paragraph_after_the_list_ends_it(text):
    assert parse_guidelines(text) == (_TWO, "ok")


def test_a_paragraph_ends_the_list_but_its_next_number_goes_on():
    """Bullets after a closing paragraph were guidelines (untitled); a list that goes on with
    its next number, or a new section under a heading, still does."""
    def titles(text):
        items, status = parse_guidelines(text)
        return status, [i["title"] for i in items]

    assert titles("1. Privacy: Never share addresses.\n2. Honesty: Be truthful.\n\nBy following these "
                  "guidelines:\n- the assistant stays safe\n- users are protected") == \
        ("ok", ["Privacy", "Honesty"])
    assert titles("1. Privacy: Never share addresses.\n2. Honesty: Be truthful.\n\nAlso important:\n"
                  "3. Safety: Refuse harm.") == ("ok", ["Privacy", "Honesty", "Safety"])
    assert titles("## Safety\n1. Privacy: Never share addresses.\n2. Honesty: Be truthful.\n## Quality\n"
                  "1. Clarity: Be clear.\n2. Brevity: Be short.") == \
        ("ok", ["Privacy", "Honesty", "Clarity", "Brevity"])


def test_the_detectors_answer_repeated_before_the_list_is_not_in_it():
    text = ("1. Unsafe content: yes. It asks for a weapon.\n2. Harm a careless reply could do: yes. It could "
            "kill.\nConclusion: point 1 is yes, so answering needs safety care.\nVerdict: Yes\n\n"
            "1. Privacy: Never share addresses.\n2. Honesty: Be truthful.")
    assert parse_guidelines(text) == (_TWO, "ok")


def test_numbered_sub_items_are_their_guidelines_text():
    """They were split into guidelines of their own (4 items, 2 untitled)."""
    text = ("1. Privacy: Protect data.\n   1. Never share addresses.\n   2. Never share phones.\n"
            "2. Honesty: Be truthful.")
    assert parse_guidelines(text) == (
        [{"title": "Privacy", "text": "Protect data. Never share addresses. Never share phones."},
         {"title": "Honesty", "text": "Be truthful."}], "ok")
    # an item indented by a space or two is still an item
    assert len(parse_guidelines("1. Privacy: Protect data.\n   2. Honesty: Be truthful.")[0]) == 2


def test_a_fully_bold_item_is_split_at_its_colon():
    """Its title was the whole item, and so was its text."""
    assert parse_guidelines("1. **Respect privacy: never share personal addresses.**\n"
                            "2. **Be honest: admit uncertainty.**") == (
        [{"title": "Respect privacy", "text": "never share personal addresses."},
         {"title": "Be honest", "text": "admit uncertainty."}], "ok")


# --- the guidelines stage ------------------------------------------------------------------

def _last_input(prompt: str) -> str:
    return prompt[prompt.rfind("<|im_start|>user"):]


def test_a_cut_output_loses_its_last_item_only_when_it_ends_inside_it(generator_path, tok):
    """An output cut at max_tokens lost its last parsed item even when the parser had dropped
    what it ended in (a bare "3.", a closing paragraph, a heading's markup); and a row whose
    only item was cut kept parse_status "ok" with no guideline, which the unparsed count missed."""
    from guidealign.gen.guidelines import make_shard_fn

    outs = {"haiku": "1. Be kind: Speak gently.\n2. Be brief: Keep answers short.\n3.",
            "tides": "1. Be kind: Speak gently.\n2. Be brief: Keep answers short.\n\nThese guidelines",
            "bread": "1. Be kind: Speak gently.\n2. Be brief: Keep answers sh",
            "stars": "1. Be kind: Speak gen",
            "moon": "1. Be kind: Speak gently.\n2. Be brief: Keep answers short.\n### **"}

    def answer(prompt):
        return next((t, "length") for k, t in outs.items() if k in _last_input(prompt))

    fn = make_shard_fn(small_gen_cfg(generator_path), FakeLLM(tok, answer))
    out, _, stats = fn(pa.table({
        "id": list("abcde"),
        "prompt": ["A haiku?", "Explain tides.", "Bake bread?", "Name stars.", "The moon?"],
        "risky": [False] * 5, "raw": ["Fine.\nVerdict: No"] * 5}), 0)
    rows = {r["id"]: r for r in out.to_pylist()}
    both = ["Speak gently.", "Keep answers short."]
    assert [g["text"] for g in rows["a"]["guidelines"]] == both and rows["a"]["skip_reason"] is None
    assert [g["text"] for g in rows["b"]["guidelines"]] == both
    assert [g["text"] for g in rows["e"]["guidelines"]] == both
    assert [g["text"] for g in rows["c"]["guidelines"]] == ["Speak gently."]
    assert "cut at max_tokens" in rows["c"]["skip_reason"] and rows["c"]["parse_status"] == "ok"
    assert rows["d"]["guidelines"] == [] and rows["d"]["parse_status"] == "cut"
    assert stats["unparsed"] == 1


def test_a_row_with_no_verdict_gets_a_detection_turn_of_its_kind(generator_path, tok):
    """unknown_verdict=safety: the safety prompt showed the detector's turn as it was, empty
    (an engine error) or saying "Verdict: No", before asking for safety guidelines; and a
    turn the detector made up after its own went in too."""
    from guidealign.gen.guidelines import make_shard_fn

    seen = {}

    def answer(prompt):
        seen[len(seen)] = prompt
        return "1. Be kind: Speak gently.\n2. Be brief: Keep answers short.", "stop"

    cfg = small_gen_cfg(generator_path, "guidelines.unknown_verdict=safety")
    fn = make_shard_fn(cfg, FakeLLM(tok, answer))
    out, _, _ = fn(pa.table({
        "id": list("abcd"),
        "prompt": ["How to poison a dog?", "Pick a lock?", "Steal a car?", "Make a bomb?"],
        "risky": [None, None, True, True],
        "raw": ["", "Hmm.\nVerdict: No", "Crime.\nVerdict: Yes",
                "Crime.\nVerdict: Yes\nUSER: Does answering this input need safety care?\n"
                "ASSISTANT: Verdict: No"]}), 0)
    assert [r["kind"] for r in out.to_pylist()] == ["safety"] * 4

    def detection(prompt):  # the assistant turn after the last input
        turn = prompt[prompt.rfind("Input: "):]
        return turn.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]

    for k in (0, 1):
        d = detection(seen[k])
        assert d.endswith("\nVerdict: Yes") and "no clear verdict" in d and "Verdict: No" not in d
    assert detection(seen[2]) == "Crime.\nVerdict: Yes"
    assert detection(seen[3]) == "Crime.\nVerdict: Yes"
