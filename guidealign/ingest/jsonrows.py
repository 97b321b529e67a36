"""JSON Lines, row by row: telling JSON Lines saved as .json from JSON (and a JSON array saved
as .jsonl from JSON Lines), one line as a row, a file's lines. The columnar JSONL path
(``guidealign.ingest.jsonl``) falls back to these."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Iterator

from guidealign.ingest.encodings import open_utf8, read_error, utf8_error_reason
from guidealign.ingest.rows import Row

# bytes of a .json file looked at to tell JSON Lines saved as .json (a common mislabel)
JSON_LINES_SNIFF = 1 << 20


def is_json_lines(head: bytes) -> bool:
    """The file starting with ``head`` is JSON Lines: it does not start with "[" (a JSON array)
    and either its first line is a whole JSON object and more text follows, or two or more of the
    lines in ``head`` are whole JSON objects, at least half of them (a first line that is broken,
    ``null``, a comment: the rest are records; a pretty-printed JSON value has mostly lines that
    are pieces, '{', '"key": 1,', '],'). As one JSON value it would be invalid (text after the
    value ends, or a value never closed); read as one, only its first record came through (or
    none) and the rest was one quarantine row. A first line longer than ``head`` is told from
    JSON by ``jsonarray`` (``_JsonItems._tail``)."""
    if head.lstrip().startswith(b"["):
        return False
    lines = [ln for ln in head.split(b"\n") if ln.strip()]
    if len(lines) < 2:
        return False
    if json_object_line(lines[0]):
        return True
    if not head.endswith(b"\n"):
        lines.pop()  # maybe cut by the sniff
    whole = sum(1 for ln in lines if json_object_line(ln))
    return whole >= 2 and 2 * whole >= len(lines)


def json_array_start(head: bytes, cut: bool) -> bool | None:
    """For a .jsonl file starting with ``head`` (``cut``: the file goes on past it) whose first
    byte that is not blank is "[": True when it is one JSON array (to be read as .json, each item
    a record), False when it is JSON Lines after all, None when neither is safe to assume.

    One JSON array: its first line is a whole array with nothing after it, or a piece of one
    (``[``, ``[{"prompt": "a"},``) and ``head`` reads on as one array: whole items, each followed
    by a comma or the closing "]" (blanks only after that), up to the end of the file or of
    ``head`` (an item cut there included). JSON Lines (each line a row, an array line
    quarantined): a whole first line with lines after it, or a broken one with most of the next
    lines whole objects. Read as JSON Lines, an array spanning lines lost each item that is not
    on one line, and the lines of its brackets were quarantined as "not JSON"."""
    text = head.decode("utf-8", "surrogateescape").lstrip(" \t\r\n")
    nl = text.find("\n")
    try:
        json.loads(text[:nl] if nl >= 0 else text)
        return nl < 0 or not text[nl:].strip()
    except (ValueError, RecursionError):
        pass  # a piece of a value spanning lines, or a broken line
    dec, pos = json.JSONDecoder(), _blank(text, 1)
    while pos < len(text):
        if text[pos] == "]":
            if not text[pos + 1:].strip():
                return True
            break  # text after the array
        try:
            pos = _blank(text, dec.raw_decode(text, pos)[1])
        except (ValueError, RecursionError) as e:
            end = _value_end(text, pos)
            if end is None:
                return True  # cut inside the item (by the sniff, or the file is)
            if isinstance(e, json.JSONDecodeError):
                break  # a bad item
            # too deep to read here, or an integer of too many digits: JSON all the same, the item
            # is quarantined alone when read
            pos = _blank(text, end)
        if pos < len(text) and text[pos] not in ",]":
            break
        if pos < len(text) and text[pos] == ",":
            pos = _blank(text, pos + 1)
    else:
        return True  # the sniff (or the file, cut) ends after an item
    rest = [ln for ln in text[nl + 1:].split("\n") if ln.strip()] if nl >= 0 else []
    if cut and rest:
        rest.pop()  # maybe cut by the sniff
    whole = sum(json_object_line(ln.encode("utf-8", "surrogateescape")) for ln in rest)
    return False if whole and 2 * whole >= len(rest) else None


_BLANK = re.compile(r"[ \t\r\n]*")
_SYNTAX = re.compile(r'["\[\]{}]')
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SCALAR_END = re.compile(r"[,\]\n]")


def _blank(text: str, pos: int) -> int:
    return _BLANK.match(text, pos).end()


def _value_end(text: str, pos: int) -> int | None:
    """Where the value at ``pos`` ends, by its brackets and strings (not parsed), None when
    ``text`` ends first."""
    if text[pos] not in "[{":
        m = _SCALAR_END.search(text, pos)
        return m.start() if m else None
    depth, i = 0, pos
    while (m := _SYNTAX.search(text, i)) is not None:
        if m.group() == '"':
            s = _STRING.match(text, m.start())
            if s is None:
                return None
            i = s.end()
            continue
        depth += 1 if m.group() in "[{" else -1
        i = m.end()
        if depth == 0:
            return i
    return None


def json_object_line(line: bytes) -> bool:
    """Whether ``line`` is one whole JSON object (and nothing else)."""
    if not line.lstrip().startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):  # a pretty-printed object's "{" line, or cut by the sniff
        return False


# --- row readers --------------------------------------------------------------------------------

def parse_jsonl_line(lineno: int, raw: bytes, last: bool, encoding: str = "utf-8") -> Row | None:
    """One JSONL line -> a Row (None for a blank line). ``last``: the file's final line, unterminated."""
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return lineno, {"_raw": raw.decode("utf-8", "replace")}, utf8_error_reason(lineno, raw, encoding)
    return (lineno,) + load_object(text, f"line {lineno}", "truncated last line" if last else f"line {lineno} is not JSON",
                                   lambda e: f"column {e.colno}")


_JSON_KIND = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


def load_object(text: str, what: str, not_json: str, where) -> tuple[dict | None, str | None]:
    """(record, None) for ``text`` that is one JSON object, else (what to show, reason): ``what``
    names the text in a reason ("line 3"), ``not_json`` opens the reason for text that is not
    JSON, ``where(error)`` says where it broke."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return {"_raw": text}, f"{not_json}: {e.msg} ({where(e)})"
    except RecursionError:
        return {"_raw": text}, f"{what} is JSON nested too deeply to read"
    except ValueError as e:  # Python's limit on an integer's digits (sys.get_int_max_str_digits)
        return {"_raw": text}, number_error(what, e)
    if not isinstance(rec, dict):  # its text stays in the quarantine row ("raw"), as a broken line's
        why = f"{what} is a JSON {_JSON_KIND.get(type(rec), 'value')}, not an object"
        return {"_raw": text}, why + (_AS_OBJECT if isinstance(rec, str) else "")
    return rec, None


# a string where a record belongs is most often a prompt (a list of plain prompts): how to hand it in
_AS_OBJECT = (' (a record is an object holding its prompt in a field: write each prompt as {"prompt": "..."}, '
              "in a JSON array or one object a line as .jsonl)")


def number_error(what: str, e: ValueError) -> str:
    """The reason for text that is JSON but holds a number Python will not read: an integer with
    more digits than ``sys.get_int_max_str_digits()`` (4300 by default) makes ``json.loads`` raise
    a plain ValueError."""
    if "digits" in str(e):
        return (f"{what} holds a number with more than {sys.get_int_max_str_digits()} digits (Python's "
                "limit for an integer); write it as a string, in quotes, to keep it")
    return f"{what} could not be read as JSON: {e}"


def iter_lines(stream) -> Iterator[tuple[bytes, bool]]:
    """(line, is-final-unterminated-line) for each line of a binary stream."""
    prev = None
    for raw in stream:
        if prev is not None:
            yield prev, False
        prev = raw
    if prev is not None:
        yield prev, not prev.endswith(b"\n")


def read_jsonl(path: Path, encoding: str = "auto") -> Iterator[Row]:
    stream, enc = open_utf8(path, encoding)
    with stream:
        for lineno, (raw, last) in enumerate(iter_lines(stream), start=1):
            # the line without its end, as ingest's blocks cut it (a reason's column, the raw text)
            row = parse_jsonl_line(lineno, raw[:-1] if raw.endswith(b"\n") else raw, last, enc)
            if row is not None:
                yield row
        if read_error(stream):
            yield 0, None, read_error(stream)
