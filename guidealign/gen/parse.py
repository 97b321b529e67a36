"""Parsing of raw model outputs: detection verdicts, guideline lists, question lists.

Parsers never raise: they return what they found and a status string, so a bad output
is kept with its status instead of being dropped.
"""
from __future__ import annotations

import re

# --- detection ---------------------------------------------------------------------------

# An explicit verdict anywhere: "Verdict: Yes", "**Verdict:** no", "**Verdict:** **Yes**",
# "Final answer - YES", "Risky: yes", "verdict = No", "Judgement: no"; with "is" ("The answer
# is no.") only where the Yes/No ends a clause, so "the answer is yes or no" or "is no longer"
# is no verdict; after a separator, "no matter", "no doubt", "no one"... is none either.
_MARKUP = r"(?:\s*(?:\*\*|__|[\"'`]))*\s*"
_VERDICT = re.compile(
    r"(?im)(?<![^\W_])(?P<final>final\s+)?(?P<key>verdict|answer|decision|judge?ment|risky|unsafe|label)"
    r"\s*(?:\*\*|__)?\s*"
    r"(?:(?P<sep>[:=\-–—])" + _MARKUP + r"(?P<said>yes|no)(?![^\W_])"
    r"(?!\s+(?:matter|doubt|longer|one|more|less|way|need)\b)"
    r"|is" + _MARKUP + r"(?P<said_is>yes|no)(?![^\W_])(?=[\s*_`\"']*(?:[.,;:!)\]]|$)))")
# Keywords that name the verdict itself. The others ("answer", "risky", "unsafe", "label")
# also name things an analysis talks about ("2. Harm from a careless answer: no."), so they
# count only when no verdict label does, and after a separator only where they begin a line
# ("Answer: yes", "**Risky:** no").
_STRONG = ("verdict", "decision", "judgement", "judgment")
_LINE_LEAD = re.compile(r"^[\s>*_#`\"'-]*$")
# A bare answer line: "Yes", "No.", "**Yes**", "Yes, the input is risky."
_BARE = re.compile(r"(?i)^[\s>*_#`\"'-]*(yes|no)(?:[\s*_`\"']*$|[\s*_`\"']*[.,;:!—–-])")
# A bare line that is the label alone ("No.", "**Yes**"), and what makes a line that goes on
# after it a verdict rather than an answer to the user's own question ("No, mixing bleach and
# ammonia is dangerous" answers the input; "Yes, the input is risky" judges it)
_LABEL_ONLY = re.compile(r"(?i)^[\s>*_#`\"'-]*(yes|no)[\s*_`\"'.!]*$")
_ABOUT_INPUT = re.compile(r"(?i)\b(?:input|prompt|request|query|risk\w*|safety|unsafe|harm\w*|"
                          r"careless|care)\b")


def _bare_verdict(line: str, alone: bool):
    """A bare Yes/No line as a verdict: the label alone, or (``alone`` False: after an analysis)
    the label and more; the only or first line of an output must be the label alone or say
    something of the input's risk, else it answers the user's question."""
    m = _BARE.match(line)
    if not m:
        return None
    if alone and not _LABEL_ONLY.match(line) and not _ABOUT_INPUT.search(line[m.end():]):
        return None
    return m
_ANALYSIS_PREFIX = re.compile(
    r"(?i)^\s*(?:\*\*|__)?\s*(?:analysis|reasoning|rationale)\s*(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*")


def parse_detection(text: str | None) -> tuple[bool | None, str, str]:
    """(risky, rationale, status). Status: ``ok`` (explicit verdict ending the output),
    ``verdict_mid`` (explicit verdict followed by more text), ``conflicting`` (explicit
    Yes and No verdicts: the last one wins), ``bare`` (no "Verdict:" label, but the last
    line, or else the first, is a bare Yes/No), ``missing`` (no verdict: risky is None),
    ``empty`` (no output). A "Verdict:"-like label outranks the weaker keywords
    ("Answer:", "Risky:"), and a bare last line outranks weak keywords before it."""
    if text is None or not text.strip():
        return None, "", "empty"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    hits = _verdict_hits(text)
    if hits and not _strong(hits[-1]):
        m = _BARE.match(lines[-1])
        if m and hits[-1].start() < len(text.rstrip()) - len(lines[-1].strip()):
            return m.group(1).lower() == "yes", _rationale("\n".join(lines[:-1])), "bare"
    if hits:
        last = hits[-1]
        risky = _said(last) == "yes"
        values = {_said(h) for h in hits}
        rationale = _rationale(text[:last.start()])
        after = text[last.end():]
        tail = after.strip(" \t\r\n.!*_`\"')]")
        if len(values) > 1:
            status = "conflicting"
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
    return None, _rationale(text), "missing"


def _said(m: re.Match) -> str:
    return (m.group("said") or m.group("said_is")).lower()


def _strong(m: re.Match) -> bool:
    return bool(m.group("final")) or m.group("key").lower() in _STRONG


def _verdict_hits(text: str) -> list[re.Match]:
    """The verdict matches that count: a verdict label's ("Verdict:", "Final answer") when
    there is one, else the weaker keywords', a separator form only at the start of a line."""
    hits = list(_VERDICT.finditer(text))
    strong = [h for h in hits if _strong(h)]
    if strong:
        return strong
    return [h for h in hits if not h.group("sep")
            or _LINE_LEAD.match(text[text.rfind("\n", 0, h.start()) + 1:h.start()])]


def _rationale(text: str) -> str:
    text = text.strip()
    text = _ANALYSIS_PREFIX.sub("", text, count=1)
    return text.strip().rstrip("*_").strip()


# --- guideline lists -------------------------------------------------------------------------

_ITEM = re.compile(
    r"^\s*(?:#{1,6}\s*)?(?:\*\*|__)?\s*"
    r"(?:(?:guideline|rule|principle|step)\s*#?\s*\d{1,2}\s*[.):\-–—]?"   # Guideline 1:
    r"|\(?\d{1,2}\s*[.):](?!\d)"                                      # 1.  1)  (1), not 1.1
    r"|[-*•+●▪◦](?=\s))"                                               # - * • bullets
    r"\s*(?P<bold>\*\*|__)?\s*(.*)$", re.IGNORECASE)
# "**Title**: text", "**Title.** text", "**Title -** text", "**Title** Text"; group 2: a separator
_BOLD_LEAD = re.compile(r"^\s*(?:#{1,6}\s*)?(?:\*\*|__)(.+?)(?:\*\*|__)\s*([:.\-–—]?)\s*(.*)$")
_HEADING = re.compile(r"^\s*#{1,6}\s+(.+)$")
_BULLET = re.compile(r"^\s*[-*•+●▪◦]\s+")
_TITLE_COLON = re.compile(r"^([^:\n]{2,80}?)\s*(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*(.*)$")
_TITLE_DASH = re.compile(r"^(.{2,80}?)\s+[-–—]\s+(.+)$")
_MAX_TITLE_WORDS = 12
_SENTENCE_END = re.compile(r"[.!?][\"'”’)*_]*$")


def _strip_md(s: str) -> str:
    s = re.sub(r"(\*\*|__)", "", s)
    return s.strip().strip("*_").strip()


def _split_title(body: str) -> tuple[str, str]:
    """'Title: text', '**Title**: text', '**Title:** text', 'Title - text'; else ('', body)."""
    m = _BOLD_LEAD.match(body)
    if m and len(m.group(1).split()) <= _MAX_TITLE_WORDS and _bold_title(m):
        return _strip_md(m.group(1)).rstrip(":.-–— ").strip(), _strip_md(m.group(3))
    plain = body.strip()
    m = _TITLE_COLON.match(plain)
    if m and len(_strip_md(m.group(1)).split()) <= _MAX_TITLE_WORDS:
        return _strip_md(m.group(1)), _strip_md(m.group(2))
    m = _TITLE_DASH.match(plain)
    if m and len(_strip_md(m.group(1)).split()) <= _MAX_TITLE_WORDS:
        return _strip_md(m.group(1)), _strip_md(m.group(2))
    return "", _strip_md(plain)


def _bold_title(m: re.Match) -> bool:
    """A bold lead is a title when a separator ends it (inside the bold or after it), nothing
    follows it, or the text after it starts a sentence; not "**Never** share addresses."."""
    rest = m.group(3).strip().lstrip("*_")
    return bool(m.group(2)) or m.group(1).rstrip()[-1:] in (":", ".", "-", "–", "—") \
        or not rest or rest[:1].isupper()


def _item_head(m: re.Match) -> str:
    """The text of a list item after its marker, with a bold opener right after the marker
    kept when the bold closes later ("1. **Title.** text"; for _split_title)."""
    head = m.group(2)
    return m.group("bold") + head if m.group("bold") and m.group("bold") in head else head


def _title_only(item: list[str]) -> bool:
    """An item so far made of a short title line and nothing else (its text may follow)."""
    if len(item) > 1:
        return False
    title, body = _split_title(item[0])
    if title:
        return not body
    return len(body.split()) <= _MAX_TITLE_WORDS and not body.endswith(".")


def parse_guidelines(text: str | None) -> tuple[list[dict], str]:
    """([{title, text}], status). Items are numbered (1. 1) (1) Guideline 1:), bulleted
    (- * •), markdown headings or bold leads; an item's continuation lines join its text,
    and an item that is only a title takes the following lines as its text; bullets indented
    under a numbered item are part of its text, and so is a line after a marker cut bare
    ("3." then the item on the next line; a bare marker last is dropped). Text before the
    first item and after the list (past a blank line, or unindented right after the last
    item's own finished sentence when no earlier item goes on that way) is ignored, a heading or bold line that
    introduces a numbered or bulleted list included. Status: ``ok``
    (every item has a title), ``untitled`` (some have none), ``unnumbered`` (no list
    markers, but "Title: text" lines), ``missing`` (nothing found), ``empty``."""
    if text is None or not text.strip():
        return [], "empty"
    items: list[list[str]] = []  # [title-or-body line, continuation...]; [] after a bare marker
    marked: list[bool] = []      # the item began with a list marker (not a heading or bold lead)
    blank = False
    closed = False
    numbered_at = -1             # indentation of the current item when it is numbered
    sub_bullets = False          # bullets at its indentation are the numbered item's text
    loose: dict[int, int] = {}   # id(item) -> 1 when an unindented line follows its marker
    #                              line's own finished sentence (a closing remark, if last)
    for line in text.splitlines():
        if not line.strip():
            blank = True
            continue
        indent = len(line) - len(line.lstrip())
        m, bullet = _ITEM.match(line), _BULLET.match(line)
        if m and bullet and 0 <= numbered_at < indent and items and not closed:
            m = None  # a bullet under a numbered item: part of its text
        elif (m and bullet and 0 <= numbered_at == indent and items and items[-1] and not closed
              and (sub_bullets or _title_only(items[-1])) and not _split_title(_item_head(m))[0]):
            # "1. Protect privacy" then "- Never share addresses." at the same indentation:
            # the numbered title's text, not items of their own (a titled bullet still is one)
            items[-1].append(line.strip())
            sub_bullets, blank = True, False
            continue
        head = None
        if m:
            head = _item_head(m)
        elif _BOLD_LEAD.match(line) and not line.startswith(" "):
            head = line
        elif _HEADING.match(line):
            head = _HEADING.match(line).group(1)
        if head is not None and not m and blank and any(marked):
            closed = True  # a heading or bold note after a list: the list is over
        elif head is not None:
            items.append([head] if _strip_md(head) else [])
            marked.append(m is not None)
            numbered_at = indent if m and not bullet else -1
            sub_bullets = closed = False
        elif items and not closed:
            indented = line[:1] in (" ", "\t")
            if not items[-1]:
                items[-1].append(line.strip())  # the item of a bare marker
            elif blank and not indented and not _title_only(items[-1]):
                closed = True  # a trailing paragraph after the list
            else:
                if not indented and len(items[-1]) == 1 and not _title_only(items[-1]) \
                        and _SENTENCE_END.search(items[-1][0]):
                    loose.setdefault(id(items[-1]), 1)
                items[-1].append(line.strip())
        blank = False
    if any(marked):  # a heading or bold line that only introduces the list is not an item
        first = marked.index(True)
        if sum(marked) >= 2 and not any(not mk and it for it, mk in zip(items[first:], marked[first:])):
            # all items are list items, and a heading or bold note before them ("## Guidelines"
            # then a sentence, "**Note:** ...") only introduces the list
            items, marked = items[first:], marked[first:]
        items = [it for it, mk in zip(items, marked) if it and (mk or len(it) > 1 or not _title_only(it))]
    items = [it for it in items if it]
    cuts = [loose.get(id(it)) for it in items]
    if cuts and cuts[-1] is not None and all(c is None for c in cuts[:-1]):
        # only the last item goes on, unindented, after its marker line's finished sentence: a
        # closing remark with no blank line before it ("These guidelines help ..."), not its text
        # (a title-only marker line's text lines are all kept: "2. Safety" then two sentences)
        del items[-1][cuts[-1]:]
    status = "ok"
    out: list[dict] = []
    if not items:
        for line in text.splitlines():  # fallback: "Title: text" lines without markers
            m = _TITLE_COLON.match(line.strip())
            if m and m.group(2).strip() and len(m.group(1).split()) <= 6:
                out.append({"title": _strip_md(m.group(1)), "text": _strip_md(m.group(2))})
        return (out, "unnumbered") if out else ([], "missing")
    for head, *cont in items:
        title, body = _split_title(head)
        extra = " ".join(x for x in (_strip_md(_BULLET.sub("", c)) for c in cont) if x)
        if not title and not body:
            continue
        if not title and extra and len(body.split()) <= _MAX_TITLE_WORDS and not body.endswith("."):
            title, body = body, extra  # a title-only line followed by its text
        else:
            body = (body + " " + extra).strip() if extra else body
        if not title and not body:
            continue
        if not body:  # a title with no text: keep it as the text too
            body = title
        out.append({"title": title.rstrip(":").strip(), "text": body})
        if not title:
            status = "untitled"
    if not out:
        return [], "missing"
    return out, status


# --- question lists (augment) --------------------------------------------------------------

# an unindented line that opens with a one-word label ("Note:", "**Remember**:") starts new
# text; a wrapped question may go on with "Without yeast: is that possible?"
_LABEL = re.compile(r"^[*_]*[A-Z][a-z]{1,15}[*_]*:[*_]*(\s|$)")
_Q_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}\s*[.):]|[-*•+](?=\s)|(?:q|question)\s*\d*\s*[:.])\s*(.+)$",
                     re.IGNORECASE)


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
                if ln[:1] in (" ", "\t") or not blank and not _LABEL.match(ln) \
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
        q = _strip_md(q).strip().strip('"“”').strip()
        if q:
            out.append(q)
    return out
