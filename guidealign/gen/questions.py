"""Augment's question lists: the new questions of an output (``parse_questions``) and a
question without the markup that wraps it (``unwrap_question``)."""
from __future__ import annotations

import re

from guidealign.gen.parse import _SENTENCE_END, _strip_md, unwrap_once

_WRAPS = (("**", "**"), ("__", "__"), ('"', '"'), ("“", "”"), ("*", "*"), ("_", "_"))


def unwrap_question(q: str) -> str:
    """``q`` without the markup or quotes that wrap all of it (``**...**``, ``"..."``), and bold
    inside it; a quote or ``__`` that is part of the question stays (``reply only with "I have
    been PWNED"``, ``"Hamlet" fans ...``, ``__import__('os')``)."""
    q = re.sub(r"\*\*(\S(?:.*?\S)?)\*\*", r"\1", q.strip())
    prev = None
    while q != prev:
        prev, q = q, unwrap_once(q.strip(), _WRAPS)
    return q.strip()


# an unindented line that opens with a one-word label ("Note:", "**Remember**:") starts new
# text; a wrapped question may go on with "Without yeast: is that possible?"
_LABEL = re.compile(r"^[*_]*[A-Z][a-z]{1,15}[*_]*:[*_]*(\s|$)")
# an answer the model wrote under a question, indented or not ("   Answer: I can't help ..."):
# it ends the question's item
_ANSWER = re.compile(r"(?i)^\s*[*_]*(?:answer|response)[*_]*\s*:")
# a label left in front of a question once its bold is gone ("1. **Question:** How ...")
_Q_LABEL = re.compile(r"(?i)^(?:q|question)\s*\d*\s*[:.]\s+")
# a list item: "1." "(2)" "-" "Q3:", or a letter or Roman numeral ("a)", "B.", "iv."; before, such a
# list was read as unmarked lines, and every question kept its "a) " in the dataset)
_Q_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}\s*[.):]|\(?(?:[a-z]|ii|iii|iv|vi|vii|viii|ix)[.)](?=\s)"
                     r"|[-*•+](?=\s)|(?:q|question)\s*\d*\s*[:.])\s*(.+)$", re.IGNORECASE)


def parse_questions(text: str | None) -> list[str]:
    """New questions from a numbered or bulleted list: an item's wrapped lines (indented, or
    going on mid-sentence) join it; text before the list and after it is not a question.
    With no list, each line is one, less an intro (a line ending with a colon, or a first line
    that asks nothing when every other line is a question)."""
    if not text:
        return []
    found: list[str] = []
    if any(_Q_ITEM.match(ln) for ln in text.splitlines()):
        blank = ended = False
        for ln in text.splitlines():
            m = _Q_ITEM.match(ln)
            if m:
                found.append(m.group(1).strip())
                ended = False
            elif ln.strip() and found and not ended:
                if _ANSWER.match(ln):
                    ended = True
                elif ln[:1] in (" ", "\t") or not blank and not _LABEL.match(ln) \
                        and not _SENTENCE_END.search(_strip_md(found[-1])):
                    found[-1] += " " + ln.strip()
                else:  # text after the item ("Note: ..."): neither it nor what follows joins
                    ended = True
            blank = not ln.strip()
    else:
        found = [ln for ln in text.splitlines() if ln.strip() and not ln.rstrip().endswith(":")]
        if len(found) > 1 and not found[0].rstrip().endswith("?") \
                and all(q.rstrip().endswith("?") for q in found[1:]):
            found = found[1:]  # "Here are some new questions." then the questions
    out = []
    for q in found:
        q = unwrap_question(q)
        q = unwrap_question(_Q_LABEL.sub("", q, count=1)) if _Q_LABEL.match(q) else q
        if q:
            out.append(q)
    return out
