"""The held-out split of the library's (prompt, guideline) pairs: which prompts the retriever
is evaluated on and never trained on."""
from __future__ import annotations

import hashlib
import re

from guidealign.retrieval.embed import normalize_text

_WORD = re.compile(r"\w+")


def is_heldout(prompt_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(prompt_id.encode(), digest_size=8).digest(), "big")
    return h / 2.0 ** 64 < fraction


def heldout_flags(prompt_ids: list[str], texts: list[str], fraction: float) -> list[bool]:
    """Which prompts go to the held-out split: by a hash of the prompt id, the same for every
    prompt whose text differs from another's only in case (or width or spacing: the library's
    ``normalize_text``), so that no such twin sits in the other split (the encoder's tokenizer
    may lower-case, and a held-out query would then be a training anchor). A twin group takes
    the split of its smallest id; a prompt without twins keeps its own."""
    group: dict[str, str] = {}
    keys = [normalize_text(t or "") for t in texts]
    for pid, k in zip(prompt_ids, keys):
        if k not in group or pid < group[k]:
            group[k] = pid
    return [is_heldout(group[k], fraction) for k in keys]


def twin_key(text: str) -> str:
    """A prompt's words alone (``normalize_text``, then punctuation and symbols left out):
    "Explain how to pick a lock." and "explain how to pick a lock?" share it."""
    return " ".join(_WORD.findall(normalize_text(text or "")))


def trained_twins(heldout_texts: list[str], train_texts: list[str]) -> list[bool]:
    """Which held-out prompts have a twin among the training prompts by :func:`twin_key` (a
    red-team set holds many such variants, and the split hashes ids, so a variant that differs
    in punctuation alone can land in the other split: as a held-out query it would be a
    training anchor, and the held-out figures would flatter the retriever)."""
    trained = {twin_key(t) for t in train_texts}
    return [twin_key(t) in trained for t in heldout_texts]
