"""Prompts with nothing to read, quarantined as empty ones.

A prompt of blank space alone is an "empty prompt"; so is one of blank space, control characters
(C0, DEL, C1) and format characters (Unicode's category Cf: zero-width spaces and joiners,
direction marks, byte-order marks, tag characters), which no reader sees and no model can
answer. Any other character counts as text, even one a font may draw as nothing (a combining
mark alone, a Hangul filler): the line is drawn where Unicode draws it, not by guessing at fonts.
"""
from __future__ import annotations

import re

import numpy as np

NO_TEXT = "empty prompt (only blank space, control or format characters)"

# Unicode's format characters (Cf), as of Unicode 15 (a superset of Python 3.11's Unicode 14)
_FORMAT = ("\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
           "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
           "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f")
# a character that is none of those (``\s``: Python's whitespace, as ``str.strip`` takes it)
_TEXT = re.compile("[^\\s\x00-\x1f\x7f-\x9f" + _FORMAT + "]")


def has_text(p: str) -> bool:
    """Whether ``p`` holds a character other than blank space, control and format characters
    (the search stops at the first one: the first character, for nearly every prompt)."""
    return _TEXT.search(p) is not None


def ascii_spans_without_text(starts: np.ndarray, ends: np.ndarray, data, controls: bool = True) -> np.ndarray:
    """For ASCII strings given as byte spans ``data[starts[i]:ends[i]]`` that do not start or end
    with a space: which of the non-empty ones hold no byte from "!" to "~" (control bytes and
    spaces only), as :func:`has_text` says of them. ``controls=False``: the bytes hold no control
    byte below 32 (a JSONL block without escapes, a CSV block without them), so only DEL is
    looked for. One or two passes over the bytes when none is there (the usual case)."""
    no_text = np.zeros(starts.size, dtype=bool)
    if data is None or not data.size or not starts.size:
        return no_text
    buf = np.frombuffer(data, np.uint8)
    # a span that starts with a byte above 32 and below 127 has text: only control bytes can
    # leave a span without any
    if buf.max() < 127 and (not controls or buf.min() >= 32):
        return no_text
    text = np.concatenate([[0], np.cumsum((buf > 32) & (buf < 127), dtype=np.int64)])
    return (text[ends] == text[starts]) & (ends > starts)
