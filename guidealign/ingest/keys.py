"""The prompt column's name: header spellings folded for matching, the configured field before
its aliases. Shared by every reader (the JSON object reader too), so it sits below them."""
from __future__ import annotations


def norm_key(key) -> str:
    """Header spelling folded for matching: " Prompt\\ufeff" -> "prompt"."""
    return str(key).replace("\ufeff", "").strip().casefold()


def find_prompt_key(keys, field: str, aliases) -> str | None:
    """The key that holds the prompt: ``field`` in any case/spacing, else the first alias present."""
    by_norm: dict[str, str] = {}
    for k in keys:
        by_norm.setdefault(norm_key(k), k)
    for want in (field, *aliases):
        k = by_norm.get(norm_key(want))
        if k is not None:
            return k
    return None
