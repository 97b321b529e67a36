"""Field names: the prompt column's (header spellings folded for matching, the configured field
before its aliases) and repeated column names made unique. Shared by every reader (the JSON
object reader too), so it sits below them."""
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


# the prompt key whose record may carry its input in another field (Alpaca's "input", Dolly's
# "context"): an instruction like "Summarize the text below." is only the whole prompt with it
INSTRUCTION = "instruction"


def find_input_keys(keys, prompt_key: str | None, inputs) -> tuple[str, ...]:
    """The keys of the inputs an ``instruction`` prompt may be joined with, in the order of
    ``inputs`` (any case/spacing); none when the prompt key is not ``instruction``."""
    if prompt_key is None or norm_key(prompt_key) != INSTRUCTION or not inputs:
        return ()
    by_norm: dict[str, str] = {}
    for k in keys:
        if k != prompt_key:
            by_norm.setdefault(norm_key(k), k)
    return tuple(dict.fromkeys(by_norm[n] for n in map(norm_key, inputs) if n in by_norm))


def unique_names(names: list[str]) -> list[str]:
    """Column names with each repeat renamed ``name.1``, ``name.2``, ... (as pandas reads
    them): a record is a dict, so a repeated name would keep only its last column's value. The
    first column of a name keeps it (so it is the prompt column when the name is the prompt's)."""
    if len(set(names)) == len(names):
        return list(names)
    taken = set(names)
    seen: set[str] = set()
    out = []
    for name in names:
        new, k = name, 0
        while new in seen:
            k += 1
            new = f"{name}.{k}"
            if new in taken:
                new = name  # another column's own name: try the next number
        seen.add(new)
        out.append(new)
    return out
