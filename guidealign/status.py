"""``guidealign status``: progress of every stage in a run directory.

Sharded stages have ``_stage.json`` (total shards) and one marker per committed shard.
Artifact stages (a trained model, an index) have a ``_done.json`` completion marker; the
library is both, and done only with both. A stage whose ``_stage.json`` is damaged still gets
a row, with a note that points to ``guidealign verify``.
Generation stages (detect, guidelines, respond) also show their yield (gen/yieldstats.py):
rows parsed, rows cut at the length cap, and the share of generated tokens kept.
"""
from __future__ import annotations

import io
from pathlib import Path

from guidealign.shards import read_manifest, read_marker
from guidealign.shards.layout import shard_indices

from guidealign.stages import STAGES

# row order: the prompt sets, then every stage's output in the stage table's order
ORDER = ["prompts", "prompts-sft"] + [s.dst for s in STAGES if s.dst != "prompts"]

# datasets built whole as an artifact (shards.artifact.build_dir): readers take them only
# through their _done.json, which build_dir and `verify --repair` may have removed
ARTIFACT_DATASETS = ("library",)
# artifacts built in place, complete only with their _done.json (index and retriever are
# renamed into place before it is written; SFT trains in its folder)
_BUILT_WHOLE = ("retriever", "index", "sft")


def _damaged_row(d: Path) -> dict | None:
    """A row for a directory whose ``_stage.json`` does not read (damaged) or is absent while
    shard markers are there; None when neither (no stage)."""
    from guidealign.shards.manifest import MANIFEST

    markers = len(shard_indices(d))
    if (d / MANIFEST).exists():
        why = f"{MANIFEST} is damaged"
    elif markers:
        why = f"no {MANIFEST}"
    else:
        return None
    return {"stage": d.name, "shards_done": 0, "shards_total": None, "shards_stale": 0,
            "shards_damaged": 0, "rows": 0, "quarantined": 0, "seconds": 0.0, "rows_per_s": None,
            "note": f"{why} ({markers} shard marker(s) on disk): run `guidealign verify`; "
                    "the next run of the stage writes it again"}


def _stage_row(d: Path, built_whole: bool = False) -> dict | None:
    """``built_whole``: ``d`` is complete only with its ``_done.json`` (an eval's benchmark
    folder, eval/<benchmark>, written last when it is judged and reported), as _BUILT_WHOLE are."""
    from guidealign.shards.artifact import DONE, read_done
    from guidealign.shards.manifest import MANIFEST

    man = read_manifest(d)
    done_file = d / DONE
    if man is None and not done_file.exists() and (built_whole or d.name in _BUILT_WHOLE) \
            and any(d.iterdir()):
        # being built, or its build was killed (or `verify --repair` took its record): not done
        return {"stage": d.name, "shards_done": 0, "shards_total": 1, "shards_stale": 0,
                "shards_damaged": 0, "rows": 0, "quarantined": 0, "seconds": 0.0, "rows_per_s": None,
                "note": f"no {DONE}: being built, or its build stopped; the next run builds it"
                if not built_whole else f"no {DONE}: being answered or judged, or its run stopped; "
                "the next eval of the benchmark finishes it"}
    if man is None and (not done_file.exists() or (d / MANIFEST).exists()):
        return _damaged_row(d)
    row = {"stage": d.name, "shards_done": 0, "shards_total": 0, "shards_stale": 0,
           "shards_damaged": 0, "rows": 0, "quarantined": 0, "seconds": 0.0, "rows_per_s": None}
    if man is not None:
        from guidealign.shards.manifest import damaged_shards, stale_shards

        row["shards_total"] = int(man.get("num_shards", 0))
        # a shard committed under an earlier config or input (stale), or whose file does not
        # match its marker (damaged: cut short, missing), is not done: the next run redoes it
        # and readers skip it, so its rows are not counted either
        stale = stale_shards(d, man)
        damaged = damaged_shards(d, man, among=stale)
        row["shards_stale"], row["shards_damaged"] = len(stale - damaged), len(damaged)
        # ingest's prompts: the duplicates it dropped, so rows + quarantined + duplicates add up
        # to the rows read (each shard's marker records those dropped while it was filled)
        dups = 0 if "duplicates" in man else None
        for i in shard_indices(d):
            m = read_marker(d, i)
            if m is None or i >= row["shards_total"] or i in stale:
                continue
            row["shards_done"] += 1
            row["rows"] += m.rows
            row["quarantined"] += m.quarantined
            row["seconds"] += m.seconds
            if dups is not None:
                dups += _int(m.stats.get("duplicates"))
        if dups is not None:
            row["duplicates"] = dups
        if _lacks_done(d, man):
            row.update(shards_done=0, rows=0, quarantined=0, seconds=0.0,
                       note=f"no valid {DONE}: the next run builds it again")
    if man is None:
        # an artifact: done when its completion record reads (a damaged one is none: the
        # stage builds the artifact again)
        info = read_done(d)
        row["shards_total"] = 1
        if info is not None:
            row["shards_done"] = 1
            row["rows"] = int(info.get("rows", 0))
            row["seconds"] = float(info.get("seconds", 0.0))
    # (retrievals of another index are stale shard by shard already: named here too)
    why = _made_from_other(d, man) \
        if row["shards_done"] or row["shards_stale"] or row["shards_damaged"] else None
    if why is not None:
        row.update(shards_stale=row["shards_done"] + row["shards_stale"], shards_done=0, rows=0,
                   quarantined=0, seconds=0.0, note=f"{why}: the next run builds it again")
    if man is not None:
        from guidealign.gen.yieldstats import dataset_counts, kept_share

        c = dataset_counts(d, stale=stale)
        if c is not None:
            row["yield"] = dict(c, tokens_kept_share=kept_share(c))
    if row["seconds"] > 0:
        row["rows_per_s"] = round(row["rows"] / row["seconds"], 2)
    row["seconds"] = round(row["seconds"], 2)
    return row


def _int(v) -> int:
    """A count from a marker's free-form stats (0 when absent or not a count)."""
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _lacks_done(d: Path, man: dict) -> bool:
    """A dataset that is also an artifact (the library) is done only with its completion record:
    without a valid one it is being built, its build stopped, or `verify --repair` took it."""
    from guidealign.shards.artifact import DONE, read_done

    return ((d / DONE).exists() or man.get("stage") in ARTIFACT_DATASETS) and read_done(d) is None


def not_ready(d: str | Path) -> str | None:
    """Why a sharded dataset that is also an artifact (the library) is not one readers may take
    whole, as `status` says it (no valid _done.json, or built from input that has changed since);
    None when it is, or when ``d`` is no such dataset (its shards are checked one by one)."""
    from guidealign.shards.artifact import DONE

    d = Path(d)
    man = read_manifest(d)
    if man is None or not ((d / DONE).exists() or man.get("stage") in ARTIFACT_DATASETS):
        return None
    if _lacks_done(d, man):
        return f"no valid {DONE} (being built, or its build stopped)"
    return _made_from_other(d, man)


def _made_from_other(d: Path, man: dict | None) -> str | None:
    """Why an artifact (or retrievals) is stale though complete: it was built from input that
    has changed since (the library from other guideline shards, the retriever or the index from
    another library, the index from other retriever weights, retrievals from another index),
    which the stage sees and builds again; None when current or when it cannot be told (an
    artifact written before it recorded what it was made from)."""
    from guidealign.shards.artifact import read_done
    from guidealign.shards.manifest import checksums_digest, input_checksums, input_of, searched_another_index

    if searched_another_index(d, man):  # retrievals: of the index there now?
        return "retrieved from another index than the one there now"
    done = read_done(d)
    if done is None:
        return None
    if done.get("model_weights") and (d.parent / "retriever").is_dir():  # an index: of these weights?
        from guidealign.retrieval.train import weights_digest

        now = weights_digest(read_done(d.parent / "retriever"))
        if now is not None and now != done["model_weights"]:
            return "embedded by other retriever weights than those there now"
    if done.get("input_checksums") and man is not None:
        src = input_of(d, man)
        if src is not None and read_manifest(src) is not None \
                and checksums_digest(input_checksums(src)) != done["input_checksums"]:
            return f"built from other {src.name} shards than those there now"
    if done.get("data_paths"):  # a model: of these responses?
        from guidealign.hub.targets import changed_training_data

        changed = changed_training_data(done.get("data"), d.parent, done["data_paths"])
        if changed:
            return f"trained on other {', '.join(Path(c).name for c in changed)} shards than those there now"
    if done.get("library_version"):
        lib = read_done(d.parent / "library")
        if lib is not None and lib.get("version") != done["library_version"]:
            return "built from another library than the one there now"
    return None


def failed_ranks(workdir: str | Path, rows: list[dict] | None = None) -> list[str]:
    """One line per failure marker in ``workdir`` (a rank whose last run failed: its next run
    clears it), oldest first: which rank, in which stage, where, and the error's last line. A
    marker whose stage is complete now (in ``rows``, ``collect``'s), with a commit after it, is
    left out: a later run of another layout (fewer ranks) finished the stage without that rank."""
    import time

    from guidealign.shards.failure import read_markers

    out = []
    for m in read_markers(workdir):
        if _finished_since(Path(workdir), m, rows or []):
            continue
        who = f"rank {m['rank']}" if m.get("rank") is not None else f"process {m.get('pid')}"
        if m.get("world_size"):
            who += f" of {m['world_size']}"
        lines = [ln for ln in str(m.get("error", "")).strip().splitlines() if ln.strip()]
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(m.get("created", 0))))
        where = m.get("stage") or "a stage"
        if m.get("step"):  # a whole run, in this stage
            where += f" (in {m['step']})"
        out.append((float(m.get("created", 0)),
                    f"{who} failed in {where} on {m.get('host', '?')} at {when}: "
                    f"{lines[-1] if lines else 'no error recorded'}"))
    return [line for _, line in sorted(out)]


def _finished_since(workdir: Path, marker: dict, rows: list[dict]) -> bool:
    """Whether the stage a failure marker names is complete now, with a commit newer than it; for
    a marker of a whole run ("run", or its preflight), whether a run finished after it (rank 0
    writes run.json when its run succeeds: a rerun in another layout leaves the failed layout's
    ranks' markers behind)."""
    from guidealign.executors import _stage_name
    from guidealign.stages import BY_NAME

    name = str(marker.get("stage"))
    if name in ("run", "preflight"):
        try:
            return (workdir / "run.json").stat().st_mtime > float(marker.get("created", 0.0))
        except OSError:
            return False
    stage = BY_NAME.get(_stage_name(name))  # a stage run in a child process is "run_ingest"
    if stage is None:
        return False
    # eval and export write one folder per benchmark or exported dataset (eval/hhh, ...), and
    # their markers do not say which: the stage is complete when every one of them is (one
    # without a row, an eval still answering, is not)
    names = [stage.dst]
    if stage.dst in _NESTED:
        top = workdir / stage.dst
        names = [f"{stage.dst}/{p.name}" for p in sorted(top.iterdir()) if p.is_dir()
                 and not p.name.startswith(".")] if top.is_dir() else []
    by_stage = {r["stage"]: r for r in rows}
    mine = [by_stage.get(n) for n in names]
    if not mine or any(r is None or not r["shards_total"] or r["shards_done"] != r["shards_total"]
                       for r in mine):
        return False
    records = [q for n in names for q in (workdir / n).glob("*done.json")]
    newest = max((q.stat().st_mtime for q in records), default=0.0)
    return newest > float(marker.get("created", 0.0))


# stages that hold one sub-dataset per name (eval/<benchmark>/, export/<dataset>/)
_NESTED = ("eval", "export")


def collect(workdir: str | Path) -> list[dict]:
    # not the hidden folders: an artifact being built, or left by a killed build
    # (.library.tmp-*, .index.old-*: shards.artifact.build_dir), is no stage
    dirs = [p for p in Path(workdir).iterdir() if p.is_dir() and not p.name.startswith(".")]
    dirs.sort(key=lambda p: (ORDER.index(p.name) if p.name in ORDER else len(ORDER), p.name))
    out = []
    for d in dirs:
        row = _stage_row(d)
        if row is not None:
            out.append(row)
        if d.name in _NESTED:
            for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
                r = _stage_row(sub, built_whole=d.name == "eval")
                if r is not None:
                    r["stage"] = f"{d.name}/{sub.name}"
                    out.append(r)
    for row in out:
        if row.get("shards_damaged"):  # not stale: the disk, or a copy, damaged them
            n = row["shards_damaged"]
            damage = (f"{n} damaged shard{'s' if n > 1 else ''} (the file cut short, grown or missing, "
                      f"against its marker): run `guidealign verify {workdir} --repair`, then rerun the "
                      f"stage to write {'them' if n > 1 else 'it'} again")
            row["note"] = f"{row['note']}; {damage}" if row.get("note") else damage
    _note_incomplete_inputs(out)
    for row in out:  # the same keys in every row (`status --json`): null where there is none
        row.setdefault("note", None)
        row.setdefault("yield", None)
        row.setdefault("duplicates", None)
    return out


def _note_incomplete_inputs(rows: list[dict]) -> None:
    """A stage shown done whose input (the stage table's ``src``) has shards stale or missing
    now, or is itself made from such input, gets a note: it is current only for the input it
    was made from, and the next run redoes what changes (after detect is redone, guidelines
    show stale shards while the library, retriever and index after them still showed done)."""
    by_dst = {r["stage"]: r for r in rows}
    waiting: dict[str, str] = {}  # dst -> the first stage up the chain that is not complete
    for st in STAGES:
        row, up = by_dst.get(st.dst), by_dst.get(st.src)
        if row is None or up is None:
            continue
        if _incomplete(up):
            first = st.src
        else:
            first = waiting.get(st.src)
        if first is None:
            continue
        waiting[st.dst] = first
        if not row.get("note") and row["shards_total"] and row["shards_done"] == row["shards_total"]:
            row["note"] = (f"made from {st.src}" + (f", itself made from {first}," if first != st.src else "")
                           + f" which has stale or missing shards now: current for the input it was made "
                           f"from; the next run redoes it where that input changes")


def _incomplete(r: dict) -> bool:
    """Whether a row has shards stale or missing; so has one without a shard total (its
    ``_stage.json`` damaged, or dropped by ingest while it writes the prompts again)."""
    return r["shards_total"] is None or bool(r["shards_stale"]) or r["shards_done"] < r["shards_total"]


def _not_done(r: dict) -> str:
    """What follows a row's done/total: " (1 stale, 1 damaged)", or "" when neither."""
    parts = [f"{r[k]} {word}" for k, word in (("shards_stale", "stale"), ("shards_damaged", "damaged"))
             if r.get(k)]
    return f" ({', '.join(parts)})" if parts else ""


def render(rows: list[dict], width: int = 120) -> str:
    """The table (rich); "stale": shards committed under an earlier config or input, which
    the next run redoes (not counted as done, nor their rows); "damaged": shards whose file
    does not match its marker (cut short, missing: its note points to `guidealign verify
    --repair`), not counted either; ingest's prompts add duplicates (rows dropped as exact
    duplicates: rows + quarantined + duplicates are the rows read); generation stages add parsed
    (rows with a usable output), cut (rows that stopped at the length cap) and kept (share of
    generated tokens in usable rows)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    table.add_column("stage")
    # ingest's dropped duplicates, beside its rows and quarantined (together: the rows read)
    dups = any(r.get("duplicates") is not None for r in rows)
    for name in ("shards", "rows", "quarantined") + (("duplicates",) if dups else ()) \
            + ("rows/s", "parsed", "cut", "kept"):
        table.add_column(name, justify="right")
    for r in rows:
        y = r.get("yield") or {}
        share = y.get("tokens_kept_share")
        table.add_row(
            r["stage"], f"{r['shards_done']}/{'?' if r['shards_total'] is None else r['shards_total']}"
            + _not_done(r),
            str(r["rows"]), str(r["quarantined"]),
            *([str(r["duplicates"]) if r.get("duplicates") is not None else "-"] if dups else []),
            f"{r['rows_per_s']:.1f}" if r["rows_per_s"] is not None else "-",
            str(y.get("yield_rows_parsed", "-")), str(y.get("yield_rows_cut", "-")),
            f"{100 * share:.1f}%" if share is not None else "-")
    out = io.StringIO()
    Console(width=width, file=out, color_system=None).print(table)
    notes = [f"{r['stage']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join([out.getvalue().rstrip()] + notes)
