"""JSON inputs (a ``.json`` file): an array of records, or an object holding arrays of records,
read item by item without holding the file.

Each item is cut out of the text by its brackets and strings (nothing between is parsed) and
read with ``json.loads``, as a JSONL line is, so a JSON file and the same records as JSONL give
the same rows (big integers, NaN/Infinity and all), and a bad item is quarantined alone, with
its text, while the items after it are still read.

A top-level object is one record when it has the prompt field (``read_json``'s ``field``: the
caller's ``ingest.prompt_field``, "prompt" by default, in any case and spacing, as ingest finds it
in a row) at its top level holding something other than an array: then its arrays of objects
(``{"prompt": ..., "turns": [{...}]}``) are fields of it, whatever the key order. So is an
object whose first array of objects is a chat conversation under a chat field or the prompt
field (``{"messages": [{"role": "user", "content": ...}]}``: its first item a turn; ``chat``):
one conversation saved as .json. Otherwise its arrays of objects are records, streamed item by
item. The prompt aliases do not decide it: a container may well describe itself under "text" or
"question" beside its records. When an array of objects comes before the prompt field, what follows is read ahead to find the field
(items decoded and dropped, other values passed over by their brackets), up to ``LOOKAHEAD``
(16 Mi characters, held meanwhile): an object that goes on past that (a multi-GiB
``{"data": [...]}``) is read as a container. JSON Lines saved as .json is read line by line.
"""
from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Iterator

from guidealign.config.ingest import IngestConfig
from guidealign.ingest.chat import CHAT_FIELDS, chat_turns
from guidealign.ingest.encodings import has_surrogates, open_utf8, read_error, utf8_error_reason
from guidealign.ingest.jsonrows import load_object, parse_jsonl_line
from guidealign.ingest.jsonpeek import (JSON_DECODER, JSON_NON_WS, first_item, first_object, items_follow, key_name,
                                        keys_after, next_item_start, object_lines_follow, peek, text_ahead)
from guidealign.ingest.keys import find_prompt_key, norm_key
from guidealign.ingest.rows import Row


_DEFAULTS = IngestConfig()
# characters past the '[' of an object's first array of objects read ahead to find its prompt field
LOOKAHEAD = 16 << 20
# characters past an item that does not close where the next item is looked for (``next_item_start``)
RESYNC = 1 << 20
# characters a bad item may go on for past the first text that cannot be JSON (``_value_end``)
SETTLE = 1 << 10
# characters after such an item's end read to check that no nested list's end follows (``items_follow``)
CHECK = 1 << 16
_HOLDS_RECORDS = re.compile(r"\[\s*\{")  # an array of objects somewhere in a value


def read_json(path: Path, encoding: str = "auto", field: str = _DEFAULTS.prompt_field,
              aliases: tuple[str, ...] = tuple(_DEFAULTS.prompt_aliases)) -> Iterator[Row]:
    """A JSON array of objects, streamed item by item; or a JSON object: one record when its
    prompt field ``field`` is there and holds no array, or it is one chat conversation, else its
    arrays of objects (``{"data": [...]}``, ``{"train": [...], "test": [...]}``) item by item,
    or, holding none, the object itself as one record.

    Each item is cut out by its brackets and read with ``json.loads``, as a JSONL line is (big
    integers, NaN/Infinity and all), so a bad item is quarantined alone, with its text, and
    the items after it are read."""
    stream, enc = open_utf8(path, encoding)
    with stream:
        yield from _JsonItems(stream, enc, field, aliases).rows()


_JSON_SYNTAX = re.compile(r'["\[\]{},]')
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_JSON_CHUNK = 1 << 22
# consumed characters dropped from the buffer past this many (a JSON error counts the lines before it)
_COMPACT = 1 << 18
_AFTER_STRING = (":", ",", "]", "}")


class _JsonItems:
    """The records of a JSON file, cut out of its text by brackets, without parsing what lies
    between; each item is read with ``json.JSONDecoder.raw_decode`` in place, and only one that
    does not read (a bad item, or one the buffer cuts) is cut out by scanning its brackets.
    Bytes that are not UTF-8 are kept as lone surrogates, so that only their item is quarantined."""

    def __init__(self, stream, enc: str, field: str = _DEFAULTS.prompt_field,
                 aliases: tuple[str, ...] = tuple(_DEFAULTS.prompt_aliases)):
        self.stream, self.enc = stream, enc
        self.field, self.aliases = field, aliases
        # the prompt field as a key somewhere in a value: its records, not a schema naming it
        self._field_key = re.compile(r'"\s*' + re.escape(field.strip()) + r'\s*"\s*:', re.IGNORECASE)
        self.dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf, self.pos, self.keep, self.eof = "", 0, None, False
        self.dirty = False  # the buffer holds bytes that are not UTF-8
        self.reported = False  # a damaged compressed file's error is said
        self.n = 0  # items read
        self.inside = False  # the arrays read are values of a top-level object
        self.suspect = False  # the last strict _value_end saw text that cannot be JSON

    def _more(self) -> bool:
        """Append the next chunk of the file (positions into the buffer stay valid)."""
        if self.eof:
            return False
        data = self.stream.read(_JSON_CHUNK)
        text = self.dec.decode(data, not data)
        if text:
            self.dirty = self.dirty or (not text.isascii() and has_surrogates(text))
            self.buf += text
        if not data:
            self.eof = True
        return bool(text) or not self.eof

    def _compact(self) -> None:
        """Drop what is done with (between items, outside a record kept whole)."""
        if self.keep is None and self.pos > _COMPACT:
            self.buf, self.pos = self.buf[self.pos:], 0

    def _next(self) -> int | None:
        """The next byte that is not whitespace (``pos`` moved to it), None at the end of the file."""
        while True:
            m = JSON_NON_WS.search(self.buf, self.pos)
            if m:
                self.pos = m.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self._more():
                return None

    def _string_end(self, at: int, stop: float = float("inf")) -> int | None:
        """End of the JSON string that starts at ``at``, None when the file ends inside it (or it
        runs on past position ``stop``: a quote left out pairs the quotes after it wrongly)."""
        while True:
            m = _JSON_STRING.match(self.buf, at)
            if m:
                return m.end()
            if len(self.buf) > stop or not self._more():
                return None

    def _value_end(self, closers: str, stop: float = float("inf"), strict: bool = False) -> int | None:
        """End of the value at ``pos``: the first byte of ``closers`` outside strings and brackets
        (its position), None when the file ends first (or the value runs past position ``stop``,
        or, ``strict``, a bracket closes one of the other kind: a '}' or ']' left out). ``strict``
        also watches for text that cannot be JSON (a string followed by other than ':' ',' ']' '}',
        a ',' in an object followed by other than a key): past the first, the value must end within
        ``SETTLE`` characters (a bracket or quote left out takes in the items after it)."""
        depth, i, opened, watch = 0, self.pos, [], strict
        self.suspect = False  # (text that cannot be JSON seen)
        while True:
            m = _JSON_SYNTAX.search(self.buf, i)
            if m is None:
                i = len(self.buf)
                if i > stop or not self._more():
                    return None
                continue
            j = m.start()
            if j > stop:
                return None
            c = self.buf[j]
            if c == '"':  # a string: jump over it
                i = self._string_end(j, stop)
                if i is None:
                    return None
                if watch and peek(self, i, stop) not in _AFTER_STRING:
                    watch, stop, self.suspect = False, min(stop, i + SETTLE), True
                continue
            if depth == 0 and c in closers:
                return j
            if c in "[{":
                depth += 1
                if strict:
                    opened.append(c)
            elif c != "," and depth:  # ] or }
                depth -= 1
                if strict and opened.pop() != ("[" if c == "]" else "{"):
                    return None
            elif watch and c == "," and opened and opened[-1] == "{" and peek(self, j + 1, stop) != '"':
                watch, stop, self.suspect = False, min(stop, j + SETTLE), True
            i = j + 1

    def _excerpt(self, n: int) -> str:
        """The ``n`` characters from ``pos`` on, for a reason (``text_ahead``)."""
        return text_ahead(self, self.pos, n)

    def _truncated(self, row: int, what: str) -> tuple[int, str]:
        """(row, reason) for the file ending inside the JSON: a damaged compressed file's error
        (row 0, as for every format, said once), else a cut-off plain file."""
        err = read_error(self.stream, self.n)
        if err:
            self.reported = True
            return 0, f"{err} ({what})"
        return row, f"{what}: the file ends before the JSON does (truncated?)"

    def _item(self, text: str) -> Row:
        self.n += 1
        n = self.n
        if not text:
            return n, None, f"array item {n} is empty (two commas in a row, or a comma before ']')"
        if self.dirty and has_surrogates(text):
            raw = text.encode("utf-8", "surrogateescape")
            reason = utf8_error_reason(n, raw, self.enc).replace(f"line {n}", f"array item {n}", 1)
            return n, {"_raw": raw.decode("utf-8", "replace")}, reason
        return (n,) + load_object(text, f"array item {n}", f"array item {n} is not JSON",
                                  lambda e: f"line {e.lineno} column {e.colno} of the item")

    def _array(self) -> Iterator[Row]:
        """The items of the array whose '[' is at ``pos``; ``pos`` ends past its ']'."""
        self.pos += 1
        if self._next() == "]":  # []
            self.pos += 1
            return
        while True:
            if self._next() is None:
                row, why = self._truncated(self.n + 1, f"the file ends after array item {self.n}")
                yield row, None, why
                return
            row = self._fast_item()
            if row is not None:
                end, row = row
            else:
                end = self._item_end()
                if end is None:
                    raw = self.buf[self.pos:].encode("utf-8", "surrogateescape")
                    self.n += 1
                    row, why = self._truncated(self.n, f"array item {self.n} is cut off")
                    yield row, {"_raw": raw.decode("utf-8", "replace")[:2000]}, why
                    self.pos = len(self.buf)
                    return
                row = self._item(self.buf[self.pos:end].rstrip(" \t\r\n"))
            closer = self.buf[end]
            self.pos = end + 1
            self._compact()
            yield row
            if closer == "]":
                return

    def _item_end(self) -> int | None:
        """The ',' or ']' after the item at ``pos`` (None when the file ends first). An item whose
        brackets do not close (a '}' or a quote left out) would take in every item after it, to
        the file's end or to a bracket of the other kind: when they do not close within
        ``RESYNC`` characters, close one of the other kind, or do not close within ``SETTLE`` of
        text that cannot be JSON (``_value_end``, strict), it ends where the next item that reads
        begins (``jsonpeek.next_item_start``). One whose brackets close is cut there, unescaped
        quotes inside or not, unless they close after such text and a nested list's end follows
        (``jsonpeek.items_follow``: two quotes left out paired up): then the next item decides."""
        end = self._value_end(",]", self.pos + RESYNC, strict=True)
        if end is None:
            end = next_item_start(self, RESYNC, self.inside)
        elif self.suspect and not items_follow(self, end, CHECK, self.inside):
            end = next_item_start(self, RESYNC, self.inside) or end
        return self._value_end(",]") if end is None else end

    def _fast_item(self) -> tuple[int, Row] | None:
        """(position of the ',' or ']' after it, row) for an object item that reads in place, else
        None (the slow way then cuts it out and says why it does not read)."""
        if self.buf[self.pos] != "{" or self.dirty:
            return None
        try:
            rec, end = JSON_DECODER.raw_decode(self.buf, self.pos)
        except (ValueError, RecursionError):  # ValueError: also an integer of too many digits
            return None
        m = JSON_NON_WS.search(self.buf, end)
        if m is None or m.group() not in ",]":  # the buffer ends here, or the item is bad
            return None
        self.n += 1
        return m.start(), (self.n, rec, None)

    def _tail(self, record: bool = False) -> Iterator[Row]:
        """After the top-level value: whitespace only, else say that the rest was not read. When
        the value was one record ending its line and one of the next lines is another whole
        object, the file is JSON Lines (``jsonrows.is_json_lines`` could not tell: a first line
        longer than what it reads): read the rest as such, a line of ``null`` or a comment too."""
        end = self.pos
        c = self._next()
        if c is not None and record and "\n" in self.buf[end:self.pos] and object_lines_follow(self, LOOKAHEAD):
            yield from self._json_lines()
        elif c is not None:
            yield 0, None, (f"more text after the JSON value ends (after item {self.n}), not read: "
                            f"{self._excerpt(40)!r}; a file of one record per line "
                            "is JSON Lines (.jsonl)")
        elif read_error(self.stream) and not self.reported:
            yield 0, None, read_error(self.stream, self.n)

    def _line_end(self, at: int, stop: float = float("inf")) -> int:
        """The next line end from ``at`` on, reading more of the file as needed; -1 at its end (or
        past position ``stop``, however much the reads brought in)."""
        while True:
            nl = self.buf.find("\n", at)
            if nl >= 0:
                return nl if nl <= stop else -1
            at = len(self.buf)
            if at > stop or not self._more():
                return -1

    def _json_lines(self) -> Iterator[Row]:
        """The lines from the one at ``pos`` on, read as JSON Lines (row: the line number)."""
        self.pos = self.buf.rfind("\n", 0, self.pos) + 1
        lineno = self.buf.count("\n", 0, self.pos) + 1
        rows = self.n
        while True:
            nl = self._line_end(self.pos)
            if nl < 0:
                last, line, self.pos = True, self.buf[self.pos:], len(self.buf)
            else:
                last, line, self.pos = False, self.buf[self.pos:nl], nl + 1
            row = parse_jsonl_line(lineno, line.encode("utf-8", "surrogateescape"), last, self.enc)
            if row is not None:
                rows += 1
                yield row
            if last:
                break
            lineno += 1
            if self.pos > _JSON_CHUNK:
                self.buf, self.pos = self.buf[self.pos:], 0
        if read_error(self.stream):
            yield 0, None, read_error(self.stream, rows)

    def rows(self) -> Iterator[Row]:
        c = self._next()
        if c is None:
            yield 0, None, (read_error(self.stream, 0) or
                            "the file is empty; expected a JSON array [{...}, ...] or an object")
            return
        if c == "[":
            yield from self._array()
            yield from self._tail()
            return
        if c != "{":
            yield 0, None, (f"file is not a JSON array or object (it starts with "
                            f"{self._excerpt(20)!r}); check it is JSON, or JSON Lines (.jsonl)")
            return
        yield from self._object()

    def _object(self) -> Iterator[Row]:
        self.inside = True
        self.keep = start = self.pos  # the whole object is one record if it holds no array of records
        self.pos += 1
        found, record, notes, nested = False, False, [], []
        kinds: dict[str, bool] = {}  # the keys read so far: whether the value is an array
        keys, empty_only = 0, True  # every value so far is an empty array: no sign of a record
        c = self._next()
        while c != "}":
            if c != '"':
                yield from self._broken("expected a key")
                return
            end = self._string_end(self.pos)
            if end is None:
                yield from self._broken("cut off in a key")
                return
            key = self.buf[self.pos:end].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            keys += 1
            self.pos = end
            if self._next() != ":":
                yield from self._broken(f"expected ':' after the key {key}")
                return
            self.pos += 1
            c = self._next()
            kinds[key_name(key)] = c == "["
            if c == "[" and not record:
                first = first_item(self, self.pos + LOOKAHEAD)
                if first == "{" and not found and (self._one_record(kinds)
                                                    or self._conversation(key_name(key))):
                    record, c = True, None  # its arrays are fields of it: values, passed over below
                elif first == "{":  # an array of objects: records
                    if not found:
                        found, self.keep = True, None
                    yield from self._array()
                    c = self._next()
                elif first == "]":  # an empty array: records if the object holds only arrays
                    yield from self._array()
                    c = self._next()
                else:
                    notes.append(key)
                    c = None
            if c is None or c not in ",}":
                empty_only = False
                end = self._value_end(",}")
                if end is None:
                    yield from self._broken("cut off")
                    return
                if (c == "{" and not record and _HOLDS_RECORDS.search(self.buf, self.pos, end)
                        and self._field_key.search(self.buf, self.pos, end)):
                    nested.append(key)  # {"splits": {"train": [{...}]}}: said, if not one record
                self.pos = end
                c = self.buf[end]
            if c == ",":
                self.pos += 1
                c = self._next()
                if c is None:
                    yield from self._broken("cut off")
                    return
        self.pos += 1
        one = not found and not (empty_only and keys)
        if one:
            # one record: the object itself (an empty array beside other values is a field of
            # it, {"prompt": ..., "tags": []}; only {"train": [], ...} holds no record)
            self.keep = None
            row = self._item(self.buf[start:self.pos])
            if nested and row[2] is None and find_prompt_key(row[1], self.field, self.aliases) is None:
                row = row[0], row[1], self._nested_note(nested, "; the object itself has no prompt field")
            yield row
        else:
            for key in notes:
                yield 0, None, (f"the value of key {key} is an array that does not hold objects: not "
                                "read (records are JSON objects)")
            for key in nested:
                yield 0, None, self._nested_note([key])
        yield from self._tail(record=one)  # kept whole from the file's start: nothing dropped

    @staticmethod
    def _nested_note(keys: list[str], more: str = "") -> str:
        return (f"the value of key {', '.join(keys)} is an object holding arrays of records: not read "
                f"(records are read from arrays at the top or one level down; give that array as a "
                f"file of its own){more}")

    def _one_record(self, kinds: dict[str, bool]) -> bool:
        """At the first array of objects (at ``pos``) of the object being read, with ``kinds`` its
        keys so far: whether the object is one record, its prompt field holding no array."""
        key = find_prompt_key(kinds, self.field, ())
        if key is None:  # it may come later
            rest = keys_after(self, self.pos + LOOKAHEAD)
            if rest is None:
                return False
            kinds = {**kinds, **rest}
            key = find_prompt_key(kinds, self.field, ())
        return key is not None and not kinds[key]

    def _conversation(self, key: str) -> bool:
        """At the first array of objects (at ``pos``) of the object being read, under ``key``:
        whether it is the object's chat conversation (``{"messages": [{"role": "user", ...}]}``,
        one conversation saved as .json), so the object is one record: ``key`` is a chat field
        or the prompt field, and the array's first item is a turn (a role and its text). A
        container's records under such a key (``{"conversations": [{"id": 1, "messages":
        [...]}]}``) are no turns: they are read as records."""
        if norm_key(key) not in (*CHAT_FIELDS, norm_key(self.field)):
            return False
        return chat_turns([first_object(self, self.pos + LOOKAHEAD)]) is not None

    def _broken(self, what: str) -> Iterator[Row]:
        start, self.keep = self.keep, None
        if start is not None and "\n" not in self.buf[start:self.pos]:
            # the first line, a record that does not read: JSON Lines when a next line is one
            nl, at = self._line_end(self.pos, self.pos + LOOKAHEAD), self.pos
            self.pos = nl + 1
            if nl >= 0 and object_lines_follow(self, LOOKAHEAD):
                self.pos = start
                yield from self._json_lines()
                return
            self.pos = at
        # cut off: the file ends there (reading ahead may have reached its end elsewhere)
        if what.startswith("cut off") or peek(self, self.pos, float("inf")) is None or read_error(self.stream):
            row, why = self._truncated(self.n + 1, f"the JSON object is {what} after item {self.n}")
            yield row, None, why
        else:
            yield self.n + 1, None, (f"the JSON object is not valid JSON ({what}) after item {self.n}: "
                                     f"{self._excerpt(40)!r}; the rest of the file was not read")

