"""The held-out split of the library's (prompt, guideline) pairs: which prompts the retriever
is evaluated on and never trained on."""
from __future__ import annotations

import hashlib

from guidealign.retrieval.embed import normalize_text


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
