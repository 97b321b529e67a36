"""Reading ahead in a JSON file being streamed (``jsonarray._JsonItems``, passed as ``r``: its
text buffer ``buf``, position ``pos`` and its ``_next``/``_more``/``_value_end``/``_string_end``/
``_line_end``), without moving: what an array holds, which keys an object holds further on,
where the item after a broken one starts, whether JSON Lines follow."""
from __future__ import annotations

import json
import re

from guidealign.ingest.jsonrows import json_object_line
from guidealign.ingest.keys import norm_key

JSON_NON_WS = re.compile(r"[^ \t\r\n]")
JSON_DECODER = json.JSONDecoder()
_NEXT_OBJECT = re.compile(r",[ \t\r\n]*\{")
_NUMBER_TAIL = 8  # characters a read may cut off the end of a number that reads without them
CANDIDATES = 16  # objects after a bad item tried as the next one (bad items one after another: not each)


def first_item(r, stop: float = float("inf")) -> str | None:
    """What the array whose '[' is at ``pos`` holds: the first character of its first item that is
    an object or an array, scalar items before it passed over (``null`` placeholders in scraped
    dumps, a header string: the array still holds records); when it holds none (or its scalars
    run on past position ``stop``, or one does not read), its first item's first character ("n"
    for a leading ``null``); "]" when it is empty; None at the end of the file. ``pos`` stays."""
    at, first = r.pos, None
    try:
        r.pos += 1
        while True:
            c = r._next()
            if c is None or c in "{[":
                return c
            if c == "]":
                return first or c
            if r.pos > stop:
                return first
            first = first or c
            m = value_end(r, stop)  # the scalar item, read (raw_decode)
            if m is None or m.group() != ",":
                return first
            r.pos = m.end()
    finally:
        r.pos = at


def first_object(r, stop: float) -> object | None:
    """The first item of the array whose '[' is at ``pos``, decoded, when it is an object that
    reads by position ``stop`` (more of the file read as needed); else None. ``pos`` stays."""
    at = r.pos
    try:
        r.pos += 1
        if r._next() != "{":
            return None
        while True:
            try:
                return JSON_DECODER.raw_decode(r.buf, r.pos)[0]
            except RecursionError:
                return None
            except ValueError:  # cut by the end of the buffer, or bad
                if len(r.buf) > stop or not r._more():
                    return None
    finally:
        r.pos = at


def keys_after(r, stop: int) -> dict[str, bool] | None:
    """The keys after the value at ``pos`` up to the prompt field or the object's end (key:
    whether its value is an array), values passed over unparsed but for arrays' items; None
    when the object is not read through by position ``stop``, or is not valid JSON. ``pos`` is
    left where it was."""
    at, kinds = r.pos, {}
    try:
        while True:
            if r.buf[r.pos] == "[":
                if not pass_array(r, stop):
                    return None
                c = r._next()
            else:
                end = r._value_end(",}", stop)
                if end is None:
                    return None
                r.pos, c = end, r.buf[end]
            if c != ",":
                return kinds if c == "}" else None
            r.pos += 1
            if r._next() != '"' or (end := r._string_end(r.pos)) is None:
                return None
            key = key_name(r.buf[r.pos:end])
            r.pos = end
            if r._next() != ":":
                return None
            r.pos += 1
            c = r._next()
            if c is None:
                return None
            kinds[key] = c == "["
            if norm_key(key) == norm_key(r.field):
                return kinds
    finally:
        r.pos = at


def pass_array(r, stop: int) -> bool:
    """Move ``pos`` past the array at ``pos``, its items each read by ``raw_decode`` (ten times
    as fast as scanning brackets); False when one does not read by position ``stop``."""
    r.pos += 1
    if r._next() == "]":
        r.pos += 1
        return True
    while r.pos <= stop:
        m = value_end(r, stop)
        if m is None:
            return False
        r.pos = m.end()
        if m.group() == "]":
            return True
        if m.group() != "," or r._next() is None:
            return False
    return False


def value_end(r, stop: float) -> re.Match | None:
    """The first character that is not blank space after the value at ``pos`` (read by
    ``raw_decode``), more of the file read where the buffer may cut the value (a number's "1." of
    "1.5" reads as 1, the "." after it looking like an error); None when the value does not read by
    position ``stop`` (a bad one reads on to there) or the file ends first. ``pos`` stays."""
    while True:
        try:
            _, end = JSON_DECODER.raw_decode(r.buf, r.pos)
            m = JSON_NON_WS.search(r.buf, end)
        except (json.JSONDecodeError, RecursionError):
            m = None
        except ValueError:  # an integer of more digits than Python reads: JSON, passed by its brackets
            end = r._value_end(",]", stop)
            m = None if end is None else JSON_NON_WS.search(r.buf, end)
        # (a number cut after "1.5e+" reads as 1.5: the decisive character must not end the buffer)
        if m is not None and (m.group() in ",]" or m.end() + _NUMBER_TAIL < len(r.buf)):
            return m
        if len(r.buf) > stop or not r._more():  # cut by the end of the buffer, or bad
            return m


def text_ahead(r, at: int, n: int) -> str:
    """The ``n`` characters from position ``at`` on (fewer at the file's end), read as needed: the
    same however the reads cut the file."""
    while len(r.buf) < at + n and r._more():
        pass
    return r.buf[at:at + n]


def next_item_start(r, window: int, inside: bool = False) -> int | None:
    """For an array item at ``pos`` whose brackets do not close (``_item_end``): the ',' before the
    first object that starts after the point where JSON finds the item wrong, within ``window``
    characters of its start, and reads as the next item (``_rest_of_array``: not an object nested
    in the bad item). With a quote left out, the text after that point may pair quotes wrongly,
    so an item after it may be taken into the bad item's text. ``inside``: the array is a value of
    a top-level object (else the top-level value). When none of the first ``CANDIDATES`` objects
    does and the first of them does not read either (bad items one after another), that one's
    ','. None when the item reads, or no object follows. Only ``2 * window`` characters of the
    file decide it (``text_ahead``). ``pos`` stays."""
    text = text_ahead(r, r.pos, 2 * window)
    try:
        _, err = JSON_DECODER.raw_decode(text)
        m = JSON_NON_WS.search(text, err)
        if m is None or m.group() in ",]":
            return None
        err = m.start()
    except json.JSONDecodeError as e:
        if e.msg.startswith("Unterminated string"):  # no end seen: a long string, or truncated
            return None
        err = e.pos
    except (ValueError, RecursionError):
        return None
    tries, first, past = CANDIDATES, None, 0
    for m in _NEXT_OBJECT.finditer(text, 1, window):
        if m.end() > err and m.start() >= past:
            ok, past = _rest_of_array(text, m.end() - 1, inside)
            if ok:
                return r.pos + m.start()
            if first is None:  # the first object after the error: a bad item too, or nested
                first = -1 if _reads(text, m.end() - 1) else m.start()
            tries -= 1
            if not tries:
                break
    return r.pos + first if first is not None and first >= 0 else None


def _reads(text: str, at: int) -> bool:
    try:
        JSON_DECODER.raw_decode(text, at)
        return True
    except (ValueError, RecursionError):
        return False


def items_follow(r, at: int, window: int, inside: bool = False) -> bool:
    """Whether what follows the ',' or ']' at position ``at`` may be the rest of the records
    array, judged on ``window`` characters: False only where it reads as the end of a list nested
    in an item (``_rest_of_array``'s ']' test): the end found for an item that holds text that
    cannot be JSON, where two quotes left out (in it and in a later item) paired up and closed its
    brackets in the middle of another item's list of objects."""
    text = text_ahead(r, at, window)
    if text.startswith("]"):
        return _after_the_array(text, 1, inside)
    n = JSON_NON_WS.search(text, 1)
    if n is None:
        return True
    ok, past = _rest_of_array(text, n.start(), inside)
    return ok or not past  # (an item that does not read, or is longer than the window: it cannot tell)


def _rest_of_array(text: str, at: int, inside: bool) -> tuple[bool, int]:
    """Whether the object at ``at`` of ``text`` reads as an item of the records array: it reads
    and is followed by ',' or ']', and the items after it read up to a ']' that is not followed
    as a list nested in an item is (``_after_the_array``). An item that does not read on the way
    (another bad one) or the end of ``text`` leaves it undecided: taken as an item (a list of
    objects in the bad item longer than ``text`` is taken for items). Objects nested in the bad
    item (``{"prompt": "a, "turns": [{...}, {...}]}``) fail it: their list's ']' is followed by
    the bad item's '}' and then ',' or ']'. Also where that ']' is (the objects before it fail
    alike: not tried again), else 0."""
    try:
        _, end = JSON_DECODER.raw_decode(text, at)
    except (ValueError, RecursionError):
        return False, 0
    m = JSON_NON_WS.search(text, end)
    if m is not None and m.group() not in ",]":
        return False, 0
    while m is not None and m.group() == ",":
        n = JSON_NON_WS.search(text, m.end())
        if n is None:
            return True, 0
        try:
            _, end = JSON_DECODER.raw_decode(text, n.start())
        except (ValueError, RecursionError):
            return True, 0
        m = JSON_NON_WS.search(text, end)
        if m is not None and m.group() not in ",]":
            return True, 0
    if m is None or _after_the_array(text, m.end(), inside):
        return True, 0
    return False, m.end()


def _after_the_array(text: str, at: int, inside: bool) -> bool:
    """Whether the text after an array's ']' (at ``at``) may follow the records array: not a ','
    or ']' (at the top level: the array is no value of an object or array), and, ``inside`` (the
    array a value of the top-level object), its other keys, then a '}' not followed by ',' or ']'
    (an item of an array closes there). A value that does not read (a big or bad array of
    records of another split) leaves it undecided: taken as the records array."""
    m = JSON_NON_WS.search(text, at)
    while inside and m is not None and m.group() == ",":  # , "key": value
        k = JSON_NON_WS.search(text, m.end())
        if k is None or k.group() != '"':
            return k is None
        try:
            _, end = JSON_DECODER.raw_decode(text, k.start())
            c = JSON_NON_WS.search(text, end)
            if c is None or c.group() != ":":
                return c is None
            v = JSON_NON_WS.search(text, c.end())
            if v is None:
                return True
            _, end = JSON_DECODER.raw_decode(text, v.start())
        except (ValueError, RecursionError):
            return True
        m = JSON_NON_WS.search(text, end)
    if m is None:
        return True
    if m.group() == "}":
        n = JSON_NON_WS.search(text, m.end())
        return n is None or n.group() not in ",]"
    return m.group() not in ",]"


def object_lines_follow(r, lookahead: int, lines: int = 3) -> bool:
    """Whether one of the next ``lines`` lines that are not blank, from ``pos`` on, is one whole
    JSON object (not the pieces of pretty-printed values one after another); a line longer than
    ``lookahead``, not read whole, counts as one when it starts as one does. ``pos`` stays."""
    at = r.pos
    while lines:
        nl = r._line_end(at, at + lookahead)
        if nl < 0 and not (r.eof and len(r.buf) - at <= lookahead):  # a line longer than that
            return r.buf[at:at + 64].lstrip(" \t\r").startswith('{"')
        line = r.buf[at:nl if nl >= 0 else len(r.buf)]
        if line.strip():
            if json_object_line(line.encode("utf-8", "surrogateescape")):
                return True
            lines -= 1
        if nl < 0:
            return False
        at = nl + 1
    return False


def peek(r, at: int, stop: float) -> str | None:
    """The first character from position ``at`` on that is not blank space (None: the file ends
    first, or it is past ``stop``)."""
    while True:
        m = JSON_NON_WS.search(r.buf, at)
        if m:
            return m.group() if m.start() <= stop else None
        if len(r.buf) > stop or not r._more():
            return None


def key_name(token: str) -> str:
    """The key that the JSON string ``token`` (quotes and all) reads as."""
    try:
        return json.loads(token)
    except ValueError:
        return token[1:-1]
