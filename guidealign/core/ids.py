"""The prompt id rule: NFKC, whitespace runs -> one space, stripped; blake2b-64 of the UTF-8 bytes.

Ids are the 16 hex chars of ``prompt_hash``; they must never change for the same text, so this
row-by-row function is the reference every faster path is tested against.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

_WS = re.compile(r"\s+")

# The characters str.isspace() (and so str.strip() and re's \s) takes: none past U+3000, the
# ideographic space (tests/test_s57_ingest_inputs.py checks every code point), so the loop stops there
WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())


def normalize(prompt: str) -> str:
    """NFKC, whitespace runs -> one space, stripped: the text a prompt id hashes. Case is kept
    (ids are case-sensitive); the guideline comparison form
    (:func:`guidealign.retrieval.embed.normalize_text`) is this, case-folded."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", prompt)).strip()


def prompt_hash(prompt: str) -> bytes:
    return hashlib.blake2b(normalize(prompt).encode("utf-8", "surrogatepass"), digest_size=8).digest()
