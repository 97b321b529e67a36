"""Yield of the generation stages: how much of what the engine generated is kept.

Per shard, a generation stage records five counts in its marker's stats:

- ``yield_rows_in``: rows the shard read,
- ``yield_rows_parsed``: rows whose output is usable downstream (detect: a verdict;
  guidelines: at least one guideline; respond: an answer SFT keeps),
- ``yield_rows_cut``: rows whose output stopped at the length cap (``max_tokens``),
- ``yield_tokens_generated``: output tokens the engine generated for the shard,
- ``yield_tokens_kept``: output tokens of the usable rows.

``map_shards`` sums numeric stats into the stage report, and ``guidealign status`` sums
them over the committed markers. Respond counts an answer as usable when the run's SFT
keeps it (``sft.keep_finish_reasons``, at least ``sft.min_response_chars`` long). Markers written before a stage
recorded these counts are read from their shards' columns instead (rows in: the output
rows and the quarantined ones), with SFT's default rule: an answer is kept when it
finished on its own ("stop") and is not empty.
"""
from __future__ import annotations

from pathlib import Path

KEYS = ("yield_rows_in", "yield_rows_parsed", "yield_rows_cut",
        "yield_tokens_generated", "yield_tokens_kept")

# What SFT keeps by default (sft.keep_finish_reasons).
RESPOND_KEEP = ("stop",)


def counts(rows: list[dict], usable) -> dict:
    """The five yield counts of a shard's output rows; ``usable(row)`` says a row is kept.
    Rows need ``finish_reason`` and ``output_tokens``."""
    out = dict.fromkeys(KEYS, 0)
    for r in rows:
        out["yield_rows_in"] += 1
        n = int(r.get("output_tokens") or 0)
        out["yield_tokens_generated"] += n
        if r.get("finish_reason") == "length":
            out["yield_rows_cut"] += 1
        if usable(r):
            out["yield_rows_parsed"] += 1
            out["yield_tokens_kept"] += n
    return out


def detect_usable(r: dict) -> bool:
    return r.get("risky") is not None


def guidelines_usable(r: dict) -> bool:
    return bool(r.get("guidelines"))


# how a respond row's note says its prompt was cut (gen/respond.py): the answer is to the
# prompt's tail, so SFT drops it
USER_TEXT_CUT = "user text truncated"


def input_truncated(row: dict) -> bool:
    """Whether respond answered only the tail of this row's prompt (its ``note`` says so)."""
    note = row.get("note")
    return isinstance(note, str) and USER_TEXT_CUT in note


def respond_usable(r: dict, keep=RESPOND_KEEP, min_chars: int = 1) -> bool:
    """Whether SFT keeps this answer (sft/data.py ``drop_reason``): a kept finish reason, a
    string response of at least ``min_chars`` characters after strip
    (``sft.keep_finish_reasons``, ``sft.min_response_chars``; 0 keeps empty answers too), and a
    prompt respond did not cut (SFT's check of the length in its own tokens is not counted here)."""
    resp = r.get("response")
    return (r.get("finish_reason") in keep and isinstance(resp, str)
            and len(resp.strip()) >= min_chars and not input_truncated(r))


_USABLE = {"detect": detect_usable, "guidelines": guidelines_usable, "respond": respond_usable,
           "respond-baseline": respond_usable}
_COLUMNS = {"detect": ["risky", "finish_reason", "output_tokens"],
            "guidelines": ["guidelines", "finish_reason", "output_tokens"],
            "respond": ["response", "finish_reason", "output_tokens"],
            "respond-baseline": ["response", "finish_reason", "output_tokens"]}
# read as well when a shard has them
_OPTIONAL = {"respond": ["note"], "respond-baseline": ["note"]}


def has_counts(stats: dict | None) -> bool:
    return bool(stats) and all(k in stats for k in KEYS)


def shard_counts(dataset: str | Path, index: int, marker=None, stage: str | None = None) -> dict | None:
    """A committed shard's yield counts: from its marker's stats, else from its columns
    (detect, guidelines, respond); None for other datasets."""
    from guidealign.shards import read_marker, read_table

    dataset = Path(dataset)
    m = marker if marker is not None else read_marker(dataset, index)
    if m is None:
        return None
    if has_counts(m.stats):
        return {k: m.stats[k] for k in KEYS}
    stage = stage or dataset.name
    usable = _USABLE.get(stage)
    if usable is None:
        return None
    try:
        rows = read_table(dataset, index, _COLUMNS[stage]).to_pylist()
    except Exception:  # noqa: BLE001 - an older layout without these columns: no yield
        return None
    for col in _OPTIONAL.get(stage, ()):
        try:
            extra = read_table(dataset, index, [col]).column(col).to_pylist()
        except Exception:  # noqa: BLE001 - a shard without it
            continue
        for r, v in zip(rows, extra):
            r[col] = v
    out = counts(rows, usable)
    out["yield_rows_in"] += m.quarantined  # read, and set aside before generation
    return out


def dataset_counts(dataset: str | Path, stage: str | None = None, stale: set[int] | None = None) -> dict | None:
    """Yield counts summed over a dataset's current shards (None: not a generated dataset).
    Stale shards (committed under an earlier config or input, or torn; the next run redoes
    them) are left out, as readers leave them out; ``stale``: those indices when the caller
    already has them (``shard_states``), so the markers are not read for them again."""
    from guidealign.shards import read_manifest
    from guidealign.shards.layout import shard_indices
    from guidealign.shards.manifest import stale_shards

    dataset = Path(dataset)
    man = read_manifest(dataset)
    if man is None:
        return None
    if stale is None:
        stale = stale_shards(dataset, man)
    total, seen = dict.fromkeys(KEYS, 0), False
    for i in shard_indices(dataset):
        if i >= int(man.get("num_shards", 0)) or i in stale:
            continue
        c = shard_counts(dataset, i, stage=stage)
        if c is None:
            continue
        seen = True
        for k in KEYS:
            total[k] += int(c[k])
    return total if seen else None


def kept_share(c: dict) -> float | None:
    g = c.get("yield_tokens_generated", 0)
    return round(c.get("yield_tokens_kept", 0) / g, 4) if g else None


def describe(c: dict | None, scope: str = "") -> str:
    if not c:
        return f"yield{scope}: -"
    share = kept_share(c)
    tok = (f"{100 * share:.1f}% of {c['yield_tokens_generated']} generated tokens kept"
           if share is not None else "no tokens generated")
    return (f"yield{scope}: {c['yield_rows_in']} rows in, {c['yield_rows_parsed']} parsed, "
            f"{c['yield_rows_cut']} cut at the length cap; {tok}")


def with_yield(rep, dataset: str | Path):
    """The stage report with the dataset's yield (all committed shards) added to its stats
    and its summary (``rep`` is a shards.StageReport; its class is left as it is)."""
    from guidealign.shards.manifest import shard_states

    states = shard_states(dataset)
    c = dataset_counts(dataset, rep.stage, stale=set(states[1]) if states else None)
    if c is None:
        return rep
    rep.stats["yield"] = dict(c, tokens_kept_share=kept_share(c))
    # the whole dataset's, not this rank's: while other ranks have shards to commit, it says so
    n = rep.total
    scope = "" if not states or not (states[0] or states[1]) else \
        f" of the dataset so far ({n - len(states[0]) - len(states[1])} of {n} shards committed)"
    base = rep.summary

    def summary() -> str:
        return f"{base()}\n  {describe(c, scope)}"

    rep.summary = summary
    return rep
