"""Parsing of raw model outputs: detection verdicts (gen/parse_detect.py, imported here),
guideline lists (question lists: gen/questions.py).

Parsers never raise: they return what they found and a status string, so a bad output
is kept with its status instead of being dropped.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter

# before_echo, own_turn and parse_detection are this module's API too
from guidealign.gen.parse_detect import LIST_ECHO, before_echo, own_turn, parse_detection  # noqa: F401

# --- guideline lists -------------------------------------------------------------------------

_ITEM = re.compile(
    r"^\s*(?:#{1,6}\s*)?(?:\*\*|__)?\s*"
    r"(?:(?:guideline|rule|principle|step)\s*#?\s*\d{1,2}\s*[.):\-–—]?"   # Guideline 1:
    r"|\(?\d{1,2}\s*[.):](?!\d)"                                      # 1.  1)  (1), not 1.1
    r"|\(?(?:[a-z]|ii|iii|iv|vi|vii|viii|ix)[.)](?=\s|\*\*|__)"         # a)  (b)  C.  iv.  not e.g.
    r"|[-*•+●▪◦](?=\s))"                                               # - * • bullets
    r"\s*(?P<bold>\*\*|__)?\s*(.*)$", re.IGNORECASE)
# "**Title**: text", "**Title.** text", "**Title -** text", "**Title** Text"; group 2: a separator
_BOLD_LEAD = re.compile(r"^\s*(?:#{1,6}\s*)?(?:\*\*|__)(.+?)(?:\*\*|__)\s*([:.\-–—]?)\s*(.*)$")
_HEADING = re.compile(r"^\s*#{1,6}\s+(.+)$")
_BULLET = re.compile(r"^\s*[-*•+●▪◦]\s+")
# a letter or Roman numeral marker: "a)", "(b)", "C.", "iv." (before, read as the title's start:
# "a) Protect privacy"); under a numbered item it marks sub-points, as a bullet does
_LETTERED = re.compile(r"^\s*(?:#{1,6}\s*)?(?:\*\*|__)?\s*"
                       r"\(?(?:[a-z]|ii|iii|iv|vi|vii|viii|ix)[.)](?:\s|\*\*|__)", re.IGNORECASE)
_TITLE_COLON = re.compile(r"^([^:\n]{2,80}?)\s*(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*(.*)$")
_TITLE_DASH = re.compile(r"^(.{2,80}?)\s+[-–—]\s+(.+)$")
_MAX_TITLE_WORDS = 12
_SENTENCE_END = re.compile(r"[.!?][\"'”’)*_]*$")


def _strip_md(s: str) -> str:
    s = re.sub(r"(\*\*|__)", "", s)
    return s.strip().strip("*_").strip()


_TITLE_WRAPS = (('"', '"'), ("“", "”"), ("'", "'"), ("‘", "’"), ("`", "`"), ("«", "»"))
_QUOTES = "\"“”'‘’`«»"


def unwrap_once(s: str, wraps) -> str:
    """``s`` without the first pair of ``wraps`` (opening, closing) that encloses all of it and
    occurs nowhere inside it ('"Stay impartial"', '**Why?**'); else ``s`` as it is."""
    for a, b in wraps:
        inner = s[len(a):len(s) - len(b)]
        if len(s) > len(a) + len(b) and s.startswith(a) and s.endswith(b) and a not in inner and b not in inner:
            return inner
    return s


def _clean_title(title: str) -> str:
    """A guideline title without what wraps it or leads it and names no rule: quotes (straight
    or curly) and backticks around it ('"Stay impartial"', "`Cite sources`"), an opening
    quote never closed, and emoji or other pictographs before it ("🛡️ Stay impartial")."""
    t = _strip_md(title)
    prev = None
    while t != prev:
        prev = t
        # emoji and other pictographs (with their joiners and variation selectors) before a
        # space: not "°C vs °F", "± tolerance" or "∑ totals"
        lead = re.match(r"^[^\w\s]+\s+", t)
        if lead and lead.group(0).strip() and all(
                unicodedata.category(c) == "So" or c in "\u200d\ufe0f\u20e3" for c in lead.group(0).strip()):
            t = t[lead.end():]
        t = t.strip()
        inner = unwrap_once(t, _TITLE_WRAPS)
        if inner != t:
            t = inner.strip()
        elif t[:1] in _QUOTES and not any(q in t[1:] for q in _QUOTES):
            t = t[1:].strip()  # '"Stay impartial' of '1. "Stay impartial: Do not ..."'
        t = _strip_md(t)
    return t


def _unquote_tail(title: str, body: str) -> str:
    """``body`` without the closing quote of a quote its title opened ('1. "Title: text."')."""
    t = _strip_md(title).lstrip()
    if t[:1] in _QUOTES and not any(q in t[1:] for q in _QUOTES) and body[-1:] in _QUOTES \
            and not any(q in body[:-1] for q in _QUOTES):
        return body[:-1].rstrip()
    return body


def _split_title(body: str) -> tuple[str, str]:
    """'Title: text', '**Title**: text', '**Title:** text', 'Title - text'; else ('', body)."""
    m = _BOLD_LEAD.match(body)
    if m and len(m.group(1).split()) <= _MAX_TITLE_WORDS and _bold_title(m):
        if not m.group(2) and not m.group(3).strip():
            # the whole item in bold ("**Respect privacy: never share addresses.**"): its
            # title is what the bold holds before a separator, not all of it
            title, text = _split_title(_strip_md(m.group(1)))
            if title and text:
                return title, text
        return _strip_md(m.group(1)).rstrip(":.-–— ").strip(), _strip_md(m.group(3))
    plain = body.strip()
    m = _TITLE_COLON.match(plain)
    if m and len(_strip_md(m.group(1)).split()) <= _MAX_TITLE_WORDS:
        return _strip_md(m.group(1)), _strip_md(m.group(2))
    m = _TITLE_DASH.match(plain)
    # "Title - text" (also "Stay impartial - do not take sides": a hyphen inside a sentence,
    # "Verify facts - misinformation spreads quickly.", splits too: a known limit)
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


# An item's text that says Yes/No (the detector's analysis repeated: "Unsafe content: no. ..."),
# a Verdict line, and the titles of an analysis: no guideline
_SAYS_YES_NO = re.compile(r"(?i)^(?:yes|no)(?:[.,;:!]|$)")
_VERDICT_LINE = re.compile(
    r"(?im)^[\s>*_#`]*(?:final\s+)?verdict[\s*_]*[:=\-–—][\s*_\"'`]*(?:yes|no)\b.*$")
_ANALYSIS_TITLES = ("verdict", "conclusion", "analysis", "reasoning", "rationale")
# a refusal, and what an intro to unmarked "Title: text" lines names (else it opens an answer:
# "Sure! Here is a recipe:" then "Ingredients: ...")
_REFUSAL = re.compile(
    r"(?i)^[\s*_\"']*(?:(?:i\s*(?:'|’|a)m\s+)?sorry|i\s+(?:cannot|can\s*not|can(?:'|’)t|won(?:'|’)t|"
    r"will\s+not|(?:'|’)m\s+(?:not\s+able|unable)|am\s+(?:not\s+able|unable))|as\s+an\s+ai)\b")
_NAMES_LIST = re.compile(r"(?i)\b(?:guidelines?|rules?|principles?|tips?|recommendations?)\b")
# a guideline list printed as JSON (in a code fence or not): '[{"title": ..., "text": ...}]'
_FENCE = re.compile(r"^```[\w-]*[ \t]*\n?|\n?```\s*$")
_JSON_OPEN = re.compile(r'^(?:\[\s*[{"\]]|\{\s*")')
_FENCED_JSON = re.compile(r"(?s)^[ \t]*```(?:json)?[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.MULTILINE)
_NUMBER = re.compile(r"\d{1,2}")


def _json_items(text: str) -> list[dict] | None:
    """The items of a JSON list of {title, text} (or {"guidelines": [...]}); [] for other JSON
    or JSON cut short with no whole item; None when the text is not JSON-shaped."""
    s = _FENCE.sub("", text.strip()).strip()
    fenced = False
    if not _JSON_OPEN.match(s):
        # "Here are the guidelines:" then a fenced JSON block: the block, when only a short
        # intro comes before it (a fenced example inside a list item is the item's text)
        m = _FENCED_JSON.search(text)
        if not m or not _JSON_OPEN.match(m.group(1).strip()) or \
                any(_ITEM.match(ln) for ln in text[:m.start()].splitlines()):
            return None
        s, fenced = m.group(1).strip(), True
    try:
        data = json.loads(s)
        objs = data.get("guidelines") if isinstance(data, dict) else data
        objs = objs if isinstance(objs, list) else []
    except ValueError:  # cut at max_tokens: its whole {...} objects
        objs = []
        for m in re.finditer(r"\{[^{}]*\}", s):
            try:
                objs.append(json.loads(m.group()))
            except ValueError:
                pass
    out = []
    for o in objs:
        if not (isinstance(o, dict) and isinstance(o.get("title"), str) and isinstance(o.get("text"), str)):
            return None if fenced else []  # not a guideline list (fenced: read the text as a list)
        title, body = _clean_title(o["title"]), _strip_md(" ".join(o["text"].split()))
        if body or title:
            out.append({"title": title, "text": body or title})
    return out if out or not fenced else None


def _marker_number(m: re.Match) -> int | None:
    n = _NUMBER.search(m.string[:m.start(2)])
    return int(n.group()) if n else None


_NOT_SECTIONS = {"do", "don't", "dont", "do not", "avoid", "example", "examples", "why", "note", "notes",
                 "important", "tip", "tips", "summary", "conclusion", "warning", "caution", "reason"}


def _section_title(head: str) -> str | None:
    """A heading or bold line that can title the list items under it ("## Privacy"), or None:
    it has text of its own, names the list itself ("## Guidelines") or is not a title."""
    title = _strip_md(head).rstrip(":").strip()
    if not title or not _title_only([head]) or _NAMES_LIST.search(title) or all(_split_title(head)):
        return None
    if not any(c.isalpha() for c in title) or title.lower().rstrip(".!") in _NOT_SECTIONS:
        return None  # "## 1", "**Do:**", "**Example:**": the list's structure, not a rule's name
    return title


def _title_lines(text: str) -> tuple[list[dict], str]:
    """The fallback with no list markers: "Title: text" lines, at least 2, after nothing but
    an intro that names a list; none if the text is a refusal or looks like an analysis."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or _REFUSAL.match(lines[0]):
        return [], "missing"
    out: list[dict] = []
    labelled = False  # the last item came from a "Title: ..." line (its text: an "Explanation:" line)
    for line in lines:
        m = _TITLE_COLON.match(line)
        if m and m.group(2).strip() and len(m.group(1).split()) <= 6:
            title, body = _clean_title(m.group(1)), _unquote_tail(m.group(1), _strip_md(m.group(2)))
            if _SAYS_YES_NO.match(body) or title.lower() in _ANALYSIS_TITLES:
                return [], "missing"
            if labelled and _TEXT_FIELD.match(title + ":"):
                out[-1]["text"], labelled = body, False  # "Explanation: ..." (see _unlabel)
                continue
            labelled = bool(_TITLE_FIELD.match(title))
            title, body = _unlabel(title, body)
            out.append({"title": _clean_title(title), "text": body or title})
        elif not out and not _NAMES_LIST.search(line):
            return [], "missing"  # an answer's opening, not a list's intro
    return (out, "unnumbered") if len(out) >= 2 else ([], "missing")


def parse_guidelines(text: str | None) -> tuple[list[dict], str]:
    """([{title, text}], status) of a guideline output: see :func:`_parse_list` for the list.
    Only the model's own turn is read, up to a line that starts another exemplar after the
    list ("Input: ...", "Request: ...", the request for guidelines: a copied or made-up
    exemplar, whose guidelines are not this input's). A Verdict line (the detector's answer
    repeated) cuts what comes before it only when a list follows it; one after the list
    ("1. ...\n2. ...\n\nVerdict: Yes") is dropped."""
    if text is None or not text.strip():
        return [], "empty"
    text = _before_list_echo(own_turn(text))
    found = _json_items(text)
    if found is not None:
        return (found, "ok") if found else ([], "missing")
    for v in reversed(list(_VERDICT_LINE.finditer(text))):
        # the last verdict a list follows: what comes before it is the detection turn repeated
        items, status = _parse_list(_VERDICT_LINE.sub("", text[v.end():]))
        if items:
            return items, status
    return _parse_list(_VERDICT_LINE.sub("", text))


_RESTART = re.compile(r"(?m)^[ \t]*(?:\*\*)?1[.)][ \t]")


def _before_list_echo(text: str) -> str:
    """``text`` up to a copied or made-up next exemplar after the list: an unindented line that
    starts one (LIST_ECHO: "Input: ...", "Request: ...") with a list before it (since the last
    Verdict line before it: not only a repeated detection turn), and either a blank line before
    it and a Verdict line after it (a safety exemplar's detection turn) or, after it, a list
    that starts again at 1 while 2 or more items came before. Anything else (an "Input:"
    example inside an item, a request repeated before the list, a user turn repeated first)
    cuts nothing."""
    for m in LIST_ECHO.finditer(text):
        start = text.rfind("\n", 0, m.start()) + 1
        if text[start:start + 1] in (" ", "\t"):
            continue
        before = text[:start]
        last = None
        for last in _VERDICT_LINE.finditer(before):
            pass
        items = _parse_list(before[last.end():] if last is not None else before)[0]
        if not items:
            continue
        exemplar = before.endswith("\n\n") and _VERDICT_LINE.search(text, m.end())
        restart = len(items) >= 2 and _RESTART.search(text, m.end())
        if exemplar or restart:
            return before
    return text


# The field names of the prompts' form ("N. Title: explanation") that a model writes out as
# labels: "1. Title: Protect privacy. Explanation: Never share ..." (or the explanation on the
# next line). Read as "Title: text", every such guideline was titled "Title", with "Protect
# privacy Explanation: ..." its text.
_TITLE_FIELD = re.compile(r"(?i)^title$")
_TEXT_FIELD = re.compile(r"(?i)(?:^|(?<=[\s.;,]))(?:explanation|text|description|details)\s*:\s*")


def _unlabel(title: str, body: str) -> tuple[str, str]:
    """(title, text) of an item whose title is a field label ("Title") with the real title, and
    perhaps an "Explanation:" label and the text, in its body; a body that opens with such a
    label ("Protect privacy: Explanation: Never share ...") loses it. Else as it is."""
    if _TITLE_FIELD.match(_strip_md(title).rstrip(":").strip()) and body:
        m = _TEXT_FIELD.search(body)
        if m is None:
            return body, ""  # the title alone (its text is the title, below)
        return body[:m.start()].rstrip(" .;,-–—"), body[m.end():].strip()
    m = _TEXT_FIELD.match(body)
    return (title, body[m.end():].strip()) if m and title else (title, body)


def _parse_list(text: str) -> tuple[list[dict], str]:
    """([{title, text}], status). Items are numbered (1. 1) (1) Guideline 1:), bulleted
    (- * •), markdown headings or bold leads; an item's continuation lines join its text,
    and an item that is only a title takes the following lines as its text; bullets, and
    numbered sub-items, indented under a numbered item are part of its text, and so is a line
    after a marker cut bare ("3." then the item on the next line; a bare marker last is
    dropped). Text before the first item and after the list (past a blank line, or
    unindented right after the last item's own finished sentence when no earlier item goes on
    that way) is ignored, a heading or bold line that introduces a numbered or bulleted list
    included; a title-only heading or bold line over exactly one untitled item is its title
    ("## Privacy" then "- Never share ..."), when the list has two or more sections and each
    holds one item (not "## 1", "**Do:**", "**Example:**").
    After 2 numbered items, a heading or bold line ends the list too, and once a
    note or a paragraph ended it, only the next number goes on with it. A JSON list of
    {title, text} is read as JSON (by :func:`parse_guidelines`). Status: ``ok`` (every
    item has a title), ``untitled`` (some have none), ``unnumbered`` (no list markers, but 2
    or more "Title: text" lines), ``missing`` (nothing found), ``empty``."""
    items: list[list[str]] = []  # [title-or-body line, continuation...]; [] after a bare marker
    marked: list[bool] = []      # the item began with a list marker (not a heading or bold lead)
    blank = False
    closed = None                # what ended the list: "para", "note", "head" (a section title)
    numbered, last_num = 0, None  # numbered items so far, and the last one's number
    numbered_at = -1             # indentation of the current item when it is numbered
    sub_bullets = False          # bullets at its indentation are the numbered item's text
    sub_items = False            # numbered items indented under it are its text
    digit_item = False           # the current item is numbered with digits ("1.", not "a)")
    loose: dict[int, int] = {}   # id(item) -> 1 when an unindented line follows its marker
    #                              line's own finished sentence (a closing remark, if last)
    section = None               # (serial, title) of the last title-only heading or bold line
    sections: dict[int, tuple] = {}  # id(list item) -> the section heading it sits under
    for line in text.splitlines():
        if not line.strip():
            blank = True
            continue
        indent = len(line) - len(line.lstrip())
        m, bullet = _ITEM.match(line), _BULLET.match(line)
        num = _marker_number(m) if m and not bullet else None
        # a lettered marker counts as a bullet under a numbered item; else it starts an item
        sub_marker = bool(m and (bullet or _LETTERED.match(line)))
        if m and closed and numbered >= 2 and closed != "head" \
                and (num is None or last_num is None or num != last_num + 1):
            continue  # a list a note or paragraph after the list brings: not guidelines
        if sub_marker and 0 <= numbered_at < indent and items and not closed:
            m = None  # a bullet (or "a)") under a numbered item: part of its text
        elif (num is not None and 0 <= numbered_at and indent >= numbered_at + 2 and items and items[-1]
              and not closed and (sub_items or num != (last_num or 0) + 1)):
            # "   1. Never share addresses." under "1. Privacy: ...": its text, as bullets are
            items[-1].append(_item_head(m).strip())
            sub_items, blank = True, False
            continue
        elif (m and (bullet or sub_marker and digit_item) and 0 <= numbered_at == indent and items
              and items[-1] and not closed
              and (sub_bullets or _title_only(items[-1])) and not _split_title(_item_head(m))[0]):
            # "1. Protect privacy" then "- Never share addresses." at the same indentation:
            # the numbered title's text, not items of their own (a titled bullet still is one)
            items[-1].append(line.strip())
            sub_bullets, blank = True, False
            continue
        if (not m and items and items[-1] and not closed and _TEXT_FIELD.match(_strip_md(line))
                and _TITLE_FIELD.match(_split_title(items[-1][0])[0])):
            # "**Explanation:** ..." under "1. **Title:** Protect privacy": its text (_unlabel),
            # not a note that ends the list
            items[-1].append(line.strip())
            blank = False
            continue
        head = None
        if m:
            head = _item_head(m)
        elif _BOLD_LEAD.match(line) and not line.startswith(" "):
            head = line
        elif _HEADING.match(line):
            head = _HEADING.match(line).group(1)
        if head is not None and not m:
            title = _section_title(head)
            section = (len(items), title) if title else None
        if head is not None and not m and any(marked) and (
                blank or numbered >= 2 and items and items[-1] and not _title_only(items[-1])):
            # a heading or bold note after a list: the list is over
            closed = "head" if _title_only([head]) else "note"  # a section title, or a note
        elif head is not None:
            items.append([head] if _strip_md(head) else [])
            marked.append(m is not None)
            if m is not None and section:
                sections[id(items[-1])] = section
            numbered_at = indent if m and not bullet else -1
            digit_item = num is not None
            if num is not None:
                numbered, last_num = numbered + 1, num
            sub_bullets = sub_items = False
            closed = None
        elif items and not closed:
            indented = line[:1] in (" ", "\t")
            if not items[-1]:
                items[-1].append(line.strip())  # the item of a bare marker
            elif blank and not indented and not _title_only(items[-1]):
                closed = "para"  # a trailing paragraph after the list
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
        return _title_lines(text)
    under = Counter(sections.get(id(it)) for it in items)
    if len(set(under) - {None}) < 2 or any(n != 1 for sec, n in under.items() if sec is not None):
        # one heading over the whole list introduces it, and headings over several items each
        # are categories: none names an item (all or none, so one list is titled one way)
        under = Counter()
    for it in items:
        head, *cont = it
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
        sec = sections.get(id(it))
        if not title and sec and under[sec] == 1:
            title = sec[1]  # "## Privacy" over one "- Never share ...": its title (over several
            #                 items the heading is a category, not a guideline's title)
        title, body = _unlabel(title, body)
        title, body = _clean_title(title.rstrip(":").strip()), _unquote_tail(title, body)
        if not body:  # a title with no text: keep it as the text too
            body = title
        if not title and not body:
            continue
        out.append({"title": title, "text": body})
        if not title:
            status = "untitled"
    if not out or all(_SAYS_YES_NO.match(g["text"]) for g in out):
        return [], "missing"  # nothing, or the detector's analysis ("1. Unsafe content: no. ...")
    return out, status


def ends_in_last(text: str | None, last: str | None) -> bool:
    """Whether ``text`` (a list output: guidelines, questions) ends inside ``last``, the text
    of its last parsed item: its words are the output's last ones, and, where a line break
    follows them, their line does not end a sentence. An output cut at max_tokens there has that
    item cut: a line break alone does not end one (a title on a line of its own, then the cut
    before its text; text that wraps onto the next line). One whose parse dropped what it ended
    in (a bare "3.", a closing paragraph, a heading's markup) has it whole, and so has closed
    JSON."""
    if not text or not last:
        return False
    own = own_turn(text)
    found = list(re.finditer(r"[^\W_]+", own))
    if not found or own.rstrip().endswith(("}", "]", "```")):
        return False
    tail = own[found[-1].start():]  # the last word and what follows it
    if "\n" in tail and _SENTENCE_END.search(tail.split("\n", 1)[0].rstrip()):
        return False  # its line ends a sentence; what follows (markup, blank lines) holds no words
    words = re.findall(r"[^\W_]+", last.lower())
    return bool(words) and [w.group().lower() for w in found[-len(words):]] == words
