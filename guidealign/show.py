"""``guidealign show``: a few examples of prompt -> risk verdict -> guidelines -> response.

Reads one shard of each stage (shard i of every per-prompt stage holds the same prompts, when
they read the same prompt set), so it costs the same on a run of any size. Responses to
another set than detect's (``inputs_sft``: the paper's fine-tuning prompts) show no verdict.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from guidealign.shards import committed, read_marker, read_table


def _current(dataset: Path) -> list[int]:
    """Committed shards, less those committed under an earlier config or input (stale:
    ``guidealign status`` does not count them, the next run redoes them)."""
    from guidealign.shards.manifest import stale_shards

    stale = stale_shards(dataset)
    return [i for i in committed(dataset) if i not in stale]


def _detect_rows(dataset: Path, index: int, columns: list[str]) -> tuple[dict, set]:
    """(detect's rows of shard ``index`` by id, when current; the ids it holds when it was
    committed under an earlier config, stale)."""
    if index not in committed(dataset):
        return {}, set()
    t = read_table(dataset, index)
    if "id" not in t.schema.names:
        return {}, set()
    if index not in _current(dataset):
        return {}, set(t.column("id").to_pylist())
    cols = [c for c in columns if c in t.schema.names]
    return {r["id"]: r for r in t.select(["id", *cols]).to_pylist()}, set()


def _prompt_set(dataset: Path) -> Path | None:
    """The prompt set ``dataset``'s rows come from: the inputs its manifests record, followed
    up the chain (respond <- retrieve <- prompts-sft); None when a manifest records none."""
    from guidealign.shards.manifest import input_of, read_manifest

    d = dataset
    for _ in range(16):
        man = read_manifest(d)
        src = None if man is None else input_of(d, man)
        if src is None:
            return None if d == dataset else d.resolve()
        d = src
    return None


def _detect_damage(w: Path, stage: str, index: int) -> str | None:
    """Why detect's verdicts for shard ``index`` of ``stage`` cannot be read: detect's shard
    ``index`` is damaged (its rows unreadable, so "not run" would be wrong); None when it is
    not, or when ``stage`` answers another prompt set than detect's (inputs_sft, an eval's)."""
    why = _damaged(w / "detect", index)
    if why is None:
        return None
    mine, detects = _prompt_set(w / stage), _prompt_set(w / "detect")
    if mine is not None and detects is not None and mine != detects:
        return None
    return (f"its shard is damaged, its verdicts unreadable (shard {index} of {w / 'detect'} {why}): "
            f"run `guidealign verify {w} --repair`, then rerun detect")


def _damaged(dataset: Path, index: int) -> str | None:
    """What is wrong with committed shard ``index``'s file, when its size is not the one its
    marker records (cut short, or grown); None when it matches or is not committed."""
    from guidealign.shards.layout import shard_path

    marker = read_marker(dataset, index)
    if marker is None:
        return None
    try:
        size = shard_path(dataset, index).stat().st_size
    except FileNotFoundError:
        return "is committed but its file is missing"
    if size != marker.bytes:
        return f"is committed but its file has {size} bytes, not the {marker.bytes} its marker records (cut short?)"
    return None


def _damage_note(w: Path, stage: str) -> str | None:
    """One line naming the shards of ``stage`` whose file does not match its marker (which
    show skips, as readers do) and pointing to ``verify --repair``; None when there are none."""
    from guidealign.shards.manifest import damaged_shards

    bad = sorted(damaged_shards(w / stage))
    if not bad:
        return None
    names = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
    why = _damaged(w / stage, bad[0])
    detail = "" if why is None else f" (it {why})" if len(bad) == 1 else f" (shard {bad[0]} {why})"
    return (f"shard{'s' if len(bad) > 1 else ''} {names} of {w / stage} "
            f"{'are' if len(bad) > 1 else 'is'} damaged{detail}; run `guidealign verify {w} --repair`, "
            f"then rerun the stage to write {'them' if len(bad) > 1 else 'it'} again")


def _datasets_in(d: Path, depth: int = 2) -> list[Path]:
    """The datasets (folders with a ``_stage.json``) under ``d``, at most ``depth`` levels down:
    eval/ holds a folder per benchmark, and each its own datasets (eval/hhh/respond_guided); not
    the hidden folders (an artifact being built, shards.artifact.build_dir)."""
    from guidealign.shards.manifest import MANIFEST

    out: list[Path] = []
    if depth <= 0 or not d.is_dir():
        return out
    for p in sorted(d.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            out += [p] if (p / MANIFEST).is_file() else []
            out += _datasets_in(p, depth - 1)
    return out


def not_a_dataset(w: Path, stage: str, arg: str = "--stage") -> str | None:
    """Why ``stage`` (the command's ``arg``) names no dataset of ``w`` (not there: a typo, or a
    stage not run yet; a folder of datasets such as eval/ or eval/<benchmark>/), with the
    datasets there; None when it may be one."""
    from guidealign.shards.layout import shard_indices
    from guidealign.shards.manifest import MANIFEST

    d = w / stage
    if not w.is_dir() or (d / MANIFEST).is_file() or shard_indices(d):
        return None  # a dataset (its manifest maybe damaged: the usual message fits)

    def names(found: list[Path]) -> str:
        shown = [str(q.relative_to(w)) for q in found]
        return ", ".join(shown[:12]) + (" ..." if len(shown) > 12 else "")

    if inside := _datasets_in(d):
        return f"{d} holds datasets, not one: give {arg} one of them ({names(inside)})"
    if d.is_dir():
        return None
    # the datasets beside the one meant: in the nearest folder there (eval/hhh for eval/hhh/x)
    near = next((p for p in d.parents if p.is_dir()), w)
    have = _datasets_in(near if w in near.parents else w)
    return (f"{d} does not exist: {stage} has not run in {w} yet, or is misspelt"
            + (f" (the datasets there: {names(have)})" if have else ""))


def examples(workdir: str | Path, n: int = 3, shard: int | None = None,
             stage: str = "respond") -> list[dict]:
    w = Path(workdir)
    done = _current(w / stage)
    damage = _damage_note(w, stage)
    if not done:
        if damage:
            raise RuntimeError(f"nothing to show: {damage}")
        raise RuntimeError(not_a_dataset(w, stage) or f"{w / stage} has no committed shard of its "
                           "current config yet")
    if shard is None:  # the first that holds rows: a shard of 0 rows printed an empty line
        i = next((k for k in done if getattr(read_marker(w / stage, k), "rows", 0)), None)
        if i is None:
            raise RuntimeError(f"{w / stage}: its {len(done)} committed shard(s) hold no rows "
                               "(see its quarantine, `guidealign status`)" + (f"; {damage}" if damage else ""))
    else:
        i = shard
    if i not in done:
        if (why := _damaged(w / stage, i)):
            raise RuntimeError(f"{w / stage}: shard {i} {why}; run `guidealign verify {w} --repair`, "
                               "then rerun the stage to write it again")
        shown = ", ".join(map(str, done[:10])) + (" ..." if len(done) > 10 else "")
        raise RuntimeError(f"{w / stage}: shard {i} is not committed under the current config "
                           f"(committed: {shown})")
    marker = read_marker(w / stage, i) if shard is not None else None
    if shard is not None and not getattr(marker, "rows", 1):
        # (else an empty line and exit 0, as if the shard asked for had been shown)
        q = getattr(marker, "quarantined", 0)
        full = [k for k in done if getattr(read_marker(w / stage, k), "rows", 0)]
        shown = ", ".join(map(str, full[:10])) + (" ..." if len(full) > 10 else "")
        raise RuntimeError(f"{w / stage}: shard {i} holds no rows"
                           + (f" (its {q} row(s) were set aside: {w / stage / 'quarantine'})" if q else "")
                           + (f"; shards with rows: {shown}" if full else ""))
    table = read_table(w / stage, i)
    if "response" not in table.schema.names:  # else every example said "response: (empty)"
        raise RuntimeError(f"{w / stage} holds no responses (columns: {', '.join(table.schema.names)}): "
                           f"show reads a response stage (respond, or an eval's); `guidealign export "
                           f"{stage} -w {w}` writes this one as JSONL")
    resp = table.to_pylist()
    det, stale = _detect_rows(w / "detect", i, ["risky", "rationale", "parse_status", "finish_reason",
                                                "skip_reason"])
    det_damage = _detect_damage(w, stage, i)
    out = []
    for r in resp[:n]:
        d = det.get(r.get("id"))
        out.append({"id": r.get("id"), "prompt": r.get("prompt"), "detected": d is not None,
                    "detect_stale": d is None and r.get("id") in stale,
                    "detect_damaged": det_damage if d is None else None,
                    "risky": (d or {}).get("risky"), "rationale": (d or {}).get("rationale"),
                    # why a detect row has no verdict: skipped, an engine error, or unparsed
                    "detect_status": (d or {}).get("parse_status"),
                    "detect_finish": (d or {}).get("finish_reason"),
                    "detect_reason": (d or {}).get("skip_reason"),
                    "guidelines": [g for g in (r.get("guideline_texts") or []) if g is not None],
                    "response": r.get("response"), "finish_reason": r.get("finish_reason"),
                    "note": r.get("note"), "skipped": damage and f"skipped: {damage}"})
    return out


def _verdict_line(r: dict, clip) -> str:
    """The detect line: the verdict and rationale, or why there is none (a skipped prompt and
    an engine error are not an unparsed output)."""
    if r.get("risky") is not None:
        return f"- detect: {'risky' if r['risky'] else 'not risky'}. {clip(r.get('rationale'), 300)}"
    status, finish = r.get("detect_status"), r.get("detect_finish")
    reason = (r.get("detect_reason") or "").strip()
    if "skipped" in (status, finish):
        return f"- detect: skipped ({reason or 'no reason recorded'})"
    if "error" in (status, finish):
        return f"- detect: failed ({reason or 'engine error'})"
    return f"- detect: unparsed. {clip(r.get('rationale'), 300)}"


def render(rows: list[dict], width: int = 100, max_chars: int = 600) -> str:
    def clip(s, limit=max_chars):
        s = (s or "").strip().replace("\n", " ")
        return s if len(s) <= limit else s[:limit] + " [...]"

    # the damaged shards show skipped (every row names them): one line, before the examples
    parts = list(dict.fromkeys(r["skipped"] for r in rows if r.get("skipped")))
    for r in rows:
        if r.get("detected", True):
            det = _verdict_line(r, clip)
        elif r.get("detect_damaged"):  # not "not run": detect's shard is there, unreadable
            det = f"- detect: {r['detect_damaged']}"
        elif r.get("detect_stale"):
            det = "- detect: its shard is from an earlier config (stale): rerun detect"
        else:  # responses for another prompt set than detect's (inputs_sft), or detect not run
            det = "- detect: not run on this prompt (detect/ does not hold it)"
        lines = [f"### {r.get('prompt')}", det,
                 "- retrieved guidelines:"]
        lines += [f"  {k}. {g}" for k, g in enumerate(r.get("guidelines") or [], 1)] or ["  (none)"]
        lines.append(f"- response ({r.get('finish_reason') or 'no finish reason'}):")
        if r.get("note"):  # an engine error, or what was done to the prompt (truncation)
            lines.append(f"  note: {clip(r['note'])}")
        body = textwrap.wrap(clip(r.get("response")), width)
        lines += ["  " + ln for ln in body] or ["  (empty)"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
