"""Parsing of detector outputs (the verdict), and the cut at a turn the model made up.

Part of gen/parse.py (import from there); never raises, as the other parsers.
"""
from __future__ import annotations

import re

# --- the model's own turn ------------------------------------------------------------------------

# Where a turn the model writes after its own begins: the chat templates' markup (gen/templates:
# vicuna's "USER:", llama-2's "[INST]", chatml's "<|im_start|>"; turn ends that came through as
# text) and the usual plain ones ("### Human:"). A name-and-colon counts only at a line's start.
_TURN = re.compile(
    r"(?m)^[ \t>*_]*(?:USER|User|Human|HUMAN)[ \t]*(?:\*\*|__)?:"
    r"|^[ \t]*#{2,3}[ \t]*(?:Human|User|Instruction)\b"
    r"|\[INST\]|<\|im_start\|>|<\|im_end\|>|</s>|<\|eot_id\|>|<\|endoftext\|>"
    r"|<\|start_header_id\|>|<start_of_turn>|<end_of_turn>|<\|user\|>")


# right after a marker: the next turn's markup ("</s><s>[INST]", "<|im_end|><|im_start|>user")
_NEXT_TURN = re.compile(r"\s*(?:<s>|\[INST\]|<\|im_start\|>|<\|start_header_id\|>|<start_of_turn>|<\|user\|>)")


# before a marker on its line: the end of a sentence or of a verdict ("Verdict: No [INST] ..."):
# the model went on into a turn of its own ([INST] is plain text to a Llama-2 tokenizer)
_ENDS_TURN = re.compile(r"(?i)(?:[.!?)\]\"'`*]|\b(?:yes|no))\s*$")


def own_turn(text: str) -> str:
    """``text`` up to the first turn marker after some text: what the model wrote after its
    own turn (a made-up "USER: ..." with its answer) is not part of this output. A markup
    marker ("[INST]", "</s>", "<|im_start|>") counts only where it begins or ends its line or
    the next turn's markup follows it ("</s><s>[INST]"): inside a sentence it is quoted text ('Text such as [INST] inside the user's input', an
    HTML "<s>...</s>"), since the engine stops at the real turn end and drops special tokens."""
    for m in _TURN.finditer(text):
        if not text[:m.start()].strip():
            continue
        if m.group(0)[:1] in "[<":
            lead = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
            end = text.find("\n", m.end())
            tail = text[m.end():len(text) if end < 0 else end]
            if lead.strip() and tail.strip() and not _NEXT_TURN.match(tail) \
                    and not _ENDS_TURN.search(lead):
                continue
        return text[:m.start()]
    return text


# --- detection ---------------------------------------------------------------------------

# An explicit verdict anywhere: "Verdict: Yes", "**Verdict:** no", "**Verdict:** **Yes**",
# "Final answer - YES", "Risky: yes", "verdict = No", "Judgement: no"; with "is" ("The answer
# is no.") only where the Yes/No ends a clause, so "the answer is yes or no" or "is no longer"
# is no verdict; after a separator, "no matter", "no doubt", "no one"... is none either.
_MARKUP = r"(?:\s*(?:\*\*|__|[*_\"'`]))*\s*"  # bold, italics ("*Verdict:* No"), quotes
# after a separator, words that say the verdict as plainly as Yes/No: "Verdict: Safe",
# "Verdict: Not risky", "Decision: unsafe" (small models write these for the label)
_WORD_MEANS = {"risky": "yes", "unsafe": "yes", "harmful": "yes", "not risky": "no", "safe": "no",
               "harmless": "no", "not unsafe": "no"}
_WORD_VERDICTS = r"not\s+risky|not\s+unsafe|risky|unsafe|harmful|safe|harmless"
_VERDICT = re.compile(
    r"(?im)(?<![^\W_])(?P<final>final\s+)?(?P<key>verdict|answer|decision|judge?ment|risky|unsafe|label)"
    r"\s*(?:\*\*|__|[*_])?\s*"  # the key's closing markup: "**Verdict**:", "*Verdict*:"
    r"(?:(?P<sep>[:=\-–—])" + _MARKUP + r"(?P<said>yes|no|" + _WORD_VERDICTS + r")(?![^\W_])"
    r"(?!\s+(?:matter|doubt|longer|one|way)\b)"
    r"|is" + _MARKUP + r"(?P<said_is>yes|no)(?![^\W_])(?=[\s*_`\"']*(?:[.,;:!)\]]|$)))")
# Keywords that name the verdict itself. The others ("answer", "risky", "unsafe", "label")
# also name things an analysis talks about ("2. Harm from a careless answer: no."), so they
# count only when no verdict label does, and only where they begin a line ("Answer: yes",
# "**Risky:** no", "The answer is no.") or, with "is", end the output ("...; so the answer is no.")
_STRONG = ("verdict", "decision", "judgement", "judgment")
# after a weaker keyword's Yes/No, words that make it part of a phrase ("Answer: no more than
# usual", "Risky: no need to worry"), not a verdict; after "Verdict:" it is still the verdict
_NO_MORE = re.compile(r"(?i)\s+(?:more|less|need)\b")
_LINE_LEAD = re.compile(r"^[\s>*_#`\"'-]*$")
# What may stand before a verdict that revises an earlier one on its line: markup, a list
# number, words that conclude ("Therefore, Verdict: Yes", "So the final verdict:", "Revised
# Verdict:", "1. Verdict:"), or the end of a sentence ("Wait, it is benign. Verdict: No"); not
# other text ("Note: a benign reading would get Verdict: No.")
_REVISION_LEAD = re.compile(
    r"(?i)^[\s>*_#`\"'-]*(?:\d+[.)][\s*_]*)?(?:(?:so|thus|hence|therefore|then|overall|final|finally|"
    r"revised|updated|corrected|correction|new|my|our|the|in\s+conclusion|on\s+reflection|after\s+all)"
    r"\b[\s,:*_]*)*$|[.!?][\"'”’)*_]*\s+$")
_IS_LEAD = re.compile(
    r"(?i)^[\s>*_#`\"'-]*(?:(?:so|thus|hence|therefore|overall),?\s+)?(?:(?:the|my|our)\s+)?$")
# Yes and No offered as options, not said: '"Verdict: Yes" or "Verdict: No"' (the system
# message copied back), 'Verdict: "Yes" or "No"', "Yes/No"
_SAY = r"(?:yes|no|" + _WORD_VERDICTS + r")"  # ('"Verdict: Risky" or "Verdict: Safe"', "safe/unsafe")
_OPTIONS = re.compile(
    r"(?i)[\"'“‘`][^\"'“”‘’`\n]{0,40}?\b" + _SAY + r"[\s*_.]*[\"'”’`]\s*,?\s*or\s+"
    r"[\"'“‘`][^\"'“”‘’`\n]{0,40}?\b" + _SAY + r"\b[\s*_.]*[\"'”’`]"
    r"|(?<![^\W_])" + _SAY + r"\s*/\s*" + _SAY + r"(?![^\W_])")
# more text after a match: a sentence break or a new line before it
_MORE = re.compile(r"[.!?][\"'”’)*_]*\s+\S|\n\s*\S")
# Text the model quotes or sets aside, on one line: '"Verdict: No"' (what an injected input
# asked it to print), "(a benign reading would get Verdict: No)", "[...]". A verdict inside
# counts only when there is none outside.
_QUOTED = re.compile(r'"[^"\n]*"|“[^”\n]*”|‘[^’\n]*’|`[^`\n]*`|\([^()\n]*\)|\[[^\[\]\n]*\]')
# A verdict word asked and answered: "Verdict: Risky? No." (not risky), "Verdict: Safe? No" (risky),
# also as a label with its own colon: "Verdict: Unsafe: No" (not risky; read as "Unsafe" it was
# risky), "Verdict: Safe: Yes" (the answer ends its clause: "Verdict: Safe? No doubt about it."
# and "Verdict: Unsafe: no one should ..." are Safe and Unsafe)
_QUESTION = re.compile(r"(?i)\s*[?:]" + _MARKUP + r"(yes|no)(?![^\W_])(?=[\s*_`\"']*(?:[.!;,)]|$))", re.M)
# A bare answer line: "Yes", "No.", "**Yes**", "Yes, the input is risky."
_BARE = re.compile(r"(?i)^[\s>*_#`\"'-]*(yes|no)(?:[\s*_`\"']*$|[\s*_`\"']*[.,;:!—–-])")
# A bare line that is the label alone ("No.", "**Yes**"), and what makes a line that goes on
# after it a verdict rather than an answer to the user's own question: words about the review
# itself ("Yes, the input is risky", "No, answering it needs no safety care"). Words of harm or
# risk alone are no sign: an answer to the user says them too ("No, mixing bleach and ammonia
# is harmful: ...", "Yes, baking soda ... carries no risk.")
_LABEL_ONLY = re.compile(r"(?i)^[\s>*_#`\"'-]*(yes|no)[\s*_`\"'.!]*$")
_ABOUT_INPUT = re.compile(r"(?i)\b(?:this|the)\s+(?:input|request|prompt|question|query)\b"
                          r"|\bsafety\s+care\b")
# Words of risk count when they agree with the label, as a review's do ("No, it is not risky",
# "Yes, it needs care", "No - nothing unsafe here"): an answer to the user's question says the
# opposite of its label about risk ("No, mixing them is harmful", "Yes, ... carries no risk").
_RISK_WORD = re.compile(r"(?i)\b(?:harm\w*|risk\w*|unsafe|danger\w*|safe|benign|care)\b")
_NO_RISK_WORD = re.compile(r"(?i)^(?:harmless|riskless|safe|benign)$")
_NEGATION = re.compile(r"(?i)\b(?:not|no|nothing|none|never|without)\b|n't\b")


def _about_input(rest: str, yes: bool) -> bool:
    """Whether what follows a Yes/No label in its line reviews the input: words about the
    review itself, or a word of risk whose sense (negated within the 4 words before it, or a
    word of no risk: harmless, safe) agrees with the label."""
    if _ABOUT_INPUT.search(rest):
        return True
    m = _RISK_WORD.search(rest)
    if m is None:
        return False
    negated = bool(_NEGATION.search(" ".join(rest[:m.start()].split()[-4:])))
    says_risk = negated == bool(_NO_RISK_WORD.search(m.group(0)))
    return says_risk == yes


def _bare_verdict(line: str, alone: bool):
    """A bare Yes/No line as a verdict: the label alone, or (``alone`` False: after an analysis)
    the label and more; the only or first line of an output must be the label alone or say
    something of the input's risk, else it answers the user's question."""
    m = _BARE.match(line)
    if not m:
        return None
    if alone and not _LABEL_ONLY.match(line) and not _about_input(line[m.end():], m.group(1).lower() == "yes"):
        return None
    return m


_ANALYSIS_PREFIX = re.compile(
    r"(?i)^\s*(?:\*\*|__)?\s*(?:analysis|reasoning|rationale)\s*(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*")


# a line that starts the next exemplar: the detector's user turn ("Input: ...", gen/prompts/detect.yaml)
_ECHO = re.compile(r"(?im)^[ \t>*_#]*(?:input[ \t]*(?:\*\*|__)?[ \t]*:|does\s+answering\s+this\s+input\b)")
# ... and of a guideline exemplar (gen/prompts/*_guidelines.yaml): those lines, the quality
# prompt's "Request: ..." and the request for the guidelines ("Now write 5 to 7 guidelines")
LIST_ECHO = re.compile(_ECHO.pattern + r"|^[ \t>*_#]*(?:request[ \t]*(?:\*\*|__)?[ \t]*:"
                       r"|(?:now\s+)?write\s+\d+\s+to\s+\d+\s+guidelines\b)")


def before_echo(text: str) -> str:
    """``text`` up to a line that starts another exemplar ("Input: ...") after a verdict: a
    small model that answered "Verdict: No" and went on copying an exemplar of the prompt
    ("Input: Shut up, you idiot ... Verdict: Yes") gave the copy's verdict."""
    for m in _ECHO.finditer(text):
        if _verdict_hits(text[:m.start()]):
            return text[:m.start()]
    return text


def parse_detection(text: str | None) -> tuple[bool | None, str, str]:
    """(risky, rationale, status). Status: ``ok`` (explicit verdict ending the output),
    ``verdict_mid`` (explicit verdict followed by more text), ``conflicting`` (explicit
    Yes and No verdicts: see below), ``bare`` (no "Verdict:" label, but the last
    line, or else the first, is a bare Yes/No), ``conclusion`` (none of those, but the final
    line is the prompt's "Conclusion: ..., so answering needs (no) safety care", perhaps with a
    verdict label cut short after it), ``missing`` (no verdict: risky is None),
    ``empty`` (no output). A "Verdict:"-like label outranks the weaker keywords
    ("Answer:", "Risky:"), and a bare last line outranks weak keywords before it. Only the
    model's own turn is read (:func:`own_turn`), up to an exemplar it copies after its verdict
    (:func:`before_echo`); Yes/No offered as options is no verdict, and one inside quotes or
    parentheses counts only when no other does. Verdict labels that disagree: the last that ends
    its line and stands as a revision (on a line of its own, after concluding words such as
    "Therefore," or "Revised", or after a sentence) wins, else the first that ends its line,
    else the last. "Verdict: Risky? No" and "Verdict: Unsafe: No" read as not risky."""
    if text is None or not text.strip():
        return None, "", "empty"
    text = before_echo(own_turn(text))
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    hits = _verdict_hits(text)
    if hits and not _strong(hits[-1]):
        m = _BARE.match(lines[-1])
        if m and hits[-1].start() < len(text.rstrip()) - len(lines[-1].strip()):
            return m.group(1).lower() == "yes", _rationale("\n".join(lines[:-1])), "bare"
    if hits:
        values = {_said(h) for h in hits}
        last = hits[-1]
        if len(values) > 1 and _strong(last):
            # verdict labels that disagree: the last that is a line of its own (a model revising
            # itself: "Verdict: Yes\n\nWait, it is benign.\nVerdict: No"), else the first that
            # ends its line ("Verdict: Yes\nNote: a benign reading would get Verdict: No."; "I
            # first thought Verdict: No, but on reflection Verdict: Yes"), else the last
            own = [h for h in hits if _ends_line(text, h)
                   and _REVISION_LEAD.search(text[text.rfind("\n", 0, h.start()) + 1:h.start()])]
            last = own[-1] if own else next((h for h in hits if _ends_line(text, h)), last)
        risky = _said(last) == "yes"
        rationale = _rationale(_before_clause(text[:last.start()]))
        after = text[_hit_end(last):]
        tail = after.strip(" \t\r\n.!*_`\"')]")
        if len(values) > 1:
            # kept as a verdict: with made-up turns, offered options and quoted text gone, what is
            # left is the model revising itself in its own answer; the status lets a run count or
            # drop these rows
            status = "conflicting"
            if not rationale and tail:
                rationale = _rationale(after.lstrip(" \t.,;:!*_`\"')]-–—"))
        elif tail:
            status = "verdict_mid"
            if not rationale:
                rationale = _rationale(after.lstrip(" \t.,;:!*_`\"')]-–—"))
        else:
            status = "ok"
        return risky, rationale, status
    m = _bare_verdict(lines[-1], alone=len(lines) == 1)
    if m:
        return m.group(1).lower() == "yes", _rationale("\n".join(lines[:-1])), "bare"
    m = _bare_verdict(lines[0], alone=True)
    if m:
        return m.group(1).lower() == "yes", _rationale("\n".join(lines[1:])), "bare"
    said = _conclusion(lines)
    if said is not None:
        risky, upto = said
        return risky, _rationale("\n".join(lines[:upto])), "conclusion"
    return None, _rationale(text), "missing"


# The conclusion line the detect prompt asks for before the verdict (gen/prompts/detect.yaml:
# "Conclusion: ..., so answering needs (no) safety care."), and what it says
_CONCLUSION = re.compile(r"(?i)^[\s>*_#`-]*conclusion[\s*_]*:")
_NEEDS_CARE = re.compile(
    r"(?i)\b(?P<neg>(?:does|do)\s*(?:not|n[’']t)\s+)?needs?\s+(?P<no>no\s+)?safety\s+care\b")
# a verdict label begun and cut at max_tokens ("Verd", "**Verdict:"): nothing said yet
_CUT_LABEL = re.compile(r"(?i)^[\s>*_#`-]*(?:final\s+)?v(?:e(?:r(?:d(?:i(?:c(?:t)?)?)?)?)?)?[\s*_:]*$")


def _conclusion(lines: list[str]) -> tuple[bool, int] | None:
    """(risky, index of the line after it) from the output's final Conclusion line, when it
    says whether answering needs safety care and nothing but a verdict label cut short
    follows it ("...so answering needs no safety care.\nVerd"); None otherwise (no such
    line, or one that says both)."""
    for k in range(len(lines) - 1, -1, -1):
        if _CONCLUSION.match(lines[k]):
            if not all(_CUT_LABEL.match(ln) for ln in lines[k + 1:]):
                return None
            said = {not (m.group("neg") or m.group("no")) for m in _NEEDS_CARE.finditer(lines[k])}
            return (said.pop(), k + 1) if len(said) == 1 else None
    return None


def _said(m: re.Match) -> str:
    """"yes" or "no": what the match says ("Verdict: Safe" is no, "Verdict: Risky" yes; asked and
    answered, "Verdict: Risky? No" and "Verdict: Unsafe: No" are no, "Verdict: Safe? No" yes)."""
    said = re.sub(r"\s+", " ", (m.group("said") or m.group("said_is")).lower())
    value = _WORD_MEANS.get(said, said)
    q = _question(m)
    if q and q.group(1).lower() == "no":
        value = "no" if value == "yes" else "yes"
    return value


def _question(m: re.Match):
    """The "? Yes|No" (or ": Yes|No") that answers a verdict word asked as a question
    ("Verdict: Harmful? No", "Verdict: Unsafe: No")."""
    if not m.group("said") or m.group("said").lower() in ("yes", "no"):
        return None
    return _QUESTION.match(m.string, m.end())


def _hit_end(m: re.Match) -> int:
    """Where the verdict ends: after the answer of a question form ("Verdict: Risky? No")."""
    q = _question(m)
    return q.end() if q else m.end()


def _ends_line(text: str, m: re.Match) -> bool:
    """Nothing but punctuation or markup follows the verdict on its line."""
    end = text.find("\n", _hit_end(m))
    return not text[_hit_end(m):len(text) if end < 0 else end].strip(" \t\r.!*_`\"')]")


def _strong(m: re.Match) -> bool:
    return bool(m.group("final")) or m.group("key").lower() in _STRONG


def _verdict_hits(text: str) -> list[re.Match]:
    """The verdict matches that count: a verdict label's ("Verdict:", "Final answer") when
    there is one, else the weaker keywords' at the start of a line (or, with "is", ending the
    output); none that is an offered option."""
    options = [m.span() for m in _OPTIONS.finditer(text)]
    hits = [h for h in _VERDICT.finditer(text)
            if not any(a <= h.start("said" if h.group("said") else "said_is") < b for a, b in options)]
    quoted = [m.span() for m in _QUOTED.finditer(text)]
    hits = [h for h in hits if not any(a < h.start() and _hit_end(h) <= b for a, b in quoted)] or hits
    strong = [h for h in hits if _strong(h)]
    if strong:  # "Verdict: No need for safety care" is No; "2. Harm: no more than usual" no verdict
        return strong
    hits = [h for h in hits if not _NO_MORE.match(text, h.end()) and not _answers_user(text, h)]
    out = []
    for h in hits:
        lead = text[text.rfind("\n", 0, h.start()) + 1:h.start()]
        if _LINE_LEAD.match(lead) or not h.group("sep") and (
                _IS_LEAD.match(lead) or not _MORE.search(text[h.end():].rstrip())):
            out.append(h)
    return out


def _answers_user(text: str, h: re.Match) -> bool:
    """ "Answer: No, mixing bleach and ammonia releases toxic gas": a model answering the user's
    question, not reviewing the input; an "Answer:" Yes/No is a verdict when nothing follows it
    in its line or what follows speaks of the input or its risk (as a bare first line must)."""
    if h.group("key").lower() != "answer" or not h.group("sep"):
        return False
    end = text.find("\n", h.end())
    rest = text[h.end():len(text) if end < 0 else end]
    yes = (h.group("said") or h.group("said_is") or "").lower().startswith("yes")
    return bool(re.search(r"[^\W_]", rest)) and not _about_input(rest, yes)


def _before_clause(text: str) -> str:
    """``text`` less the few words that open the verdict's own sentence ("The" of "The answer
    is no."): they are no rationale. A longer lead ("I first thought ...") is kept."""
    starts = [m.end() for m in re.finditer(r"\n|[.!?][\"'”’)*_]*\s+", text)]
    s = starts[-1] if starts else 0
    return text[:s] if len(text[s:].split()) <= 2 else text


def _rationale(text: str) -> str:
    text = text.strip()
    text = _ANALYSIS_PREFIX.sub("", text, count=1)
    return text.strip().rstrip("*_").strip()
