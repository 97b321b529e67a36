"""Prompts with nothing to read, quarantined as empty ones.

A prompt of blank space alone is an "empty prompt"; so is one of blank space, control characters
(C0, DEL, C1) and format characters (Unicode's category Cf: zero-width spaces and joiners,
direction marks, byte-order marks, tag characters), which no reader sees and no model can
answer. Any other character counts as text, even one a font may draw as nothing (a combining
mark alone, a Hangul filler): the line is drawn where Unicode draws it, not by guessing at fonts.
The same test decides whether an instruction's input holds text to join (``batch.with_input``).
"""
from __future__ import annotations

import re

import numpy as np

NO_TEXT = "empty prompt (only blank space, control or format characters)"

# the code points that are no text: Python's whitespace (``str.isspace``), the control
# characters (Cc) and the format characters (Cf) as of Unicode 15 (a superset of Python 3.11's
# Unicode 14: U+13439-1343F were added as format characters)
_NO_TEXT_RANGES = (
    (0x0, 0x20), (0x7F, 0xA0), (0xAD, 0xAD), (0x600, 0x605), (0x61C, 0x61C), (0x6DD, 0x6DD),
    (0x70F, 0x70F), (0x890, 0x891), (0x8E2, 0x8E2), (0x1680, 0x1680), (0x180E, 0x180E),
    (0x2000, 0x200F), (0x2028, 0x202F), (0x205F, 0x2064), (0x2066, 0x206F), (0x3000, 0x3000),
    (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0001, 0xE0001), (0xE0020, 0xE007F),
)
# one character of text: Python's regex (the row reader) and RE2's (Arrow's compute functions)
_TEXT = re.compile("[^" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in _NO_TEXT_RANGES) + "]")
TEXT_RE2 = "[^" + "".join(f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in _NO_TEXT_RANGES) + "]"


def has_text(p: str) -> bool:
    """Whether ``p`` holds a character other than blank space, control and format characters
    (the search stops at the first one: the first character, for nearly every prompt)."""
    return _TEXT.search(p) is not None


def ascii_spans_without_text(starts: np.ndarray, ends: np.ndarray, data, controls: bool = True) -> np.ndarray:
    """For ASCII strings given as byte spans ``data[starts[i]:ends[i]]`` that do not start or end
    with a space: which of the non-empty ones hold no byte from "!" to "~" (control bytes and
    spaces only), as :func:`has_text` says of them. ``controls=False``: the bytes hold no control
    byte below 32 (a JSONL block without escapes, a CSV block without them), so only DEL is
    looked for. One or two passes over the bytes when neither is there (the usual case); else
    only the spans that start with a control byte or DEL are looked at, one by one."""
    no_text = np.zeros(starts.size, dtype=bool)
    if data is None or not data.size or not starts.size:
        return no_text
    buf = np.frombuffer(data, np.uint8)
    if buf.max() < 127 and (not controls or buf.min() >= 32):
        return no_text
    # a span without text starts with a byte that is none (it does not start with a space)
    nonempty = np.flatnonzero(ends > starts)
    first = buf[starts[nonempty]]
    for i in nonempty[(first < 33) | (first > 126)].tolist():
        span = buf[starts[i]:ends[i]]
        no_text[i] = not bool(((span > 32) & (span < 127)).any())
    return no_text
