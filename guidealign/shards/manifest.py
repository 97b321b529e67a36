"""A dataset's manifest (``_stage.json``): how many shards the stage has in all.

Map stages write it before their first shard, so that every rank, and
``guidealign status``, knows the total; completeness is read off the markers.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from guidealign.shards.fingerprint import fingerprint as make_fp
from guidealign.shards.marker import is_done, read_marker
from guidealign.shards.nfs import read_text
from guidealign.shards.write import write_json_atomic

MANIFEST = "_stage.json"


def write_manifest(dataset: str | Path, *, stage: str, num_shards: int, fingerprint: str,
                   **extra) -> None:
    if extra.get("input"):  # found again from the dataset after a move or copy of the run, from any cwd
        extra = {**extra, "input_rel": os.path.relpath(extra["input"], dataset)}
    man = {"stage": stage, "num_shards": num_shards, "fingerprint": fingerprint, **extra}
    if read_manifest(dataset) == json.loads(json.dumps(man, default=str)):  # as write_json_atomic writes it
        return  # every rank writes it at the stage's start; the others read it meanwhile
    write_json_atomic(Path(dataset) / MANIFEST, man)


def remove_manifest(dataset: str | Path) -> None:
    """Drop the manifest, durably: what a stage does before it rewrites shards that readers
    cannot check against an input (ingest), so that a run killed midway leaves no manifest
    calling a mix of old and new shards complete."""
    from guidealign.shards.write import fsync_dir

    p = Path(dataset) / MANIFEST
    if p.exists():
        p.unlink(missing_ok=True)
        fsync_dir(p.parent)


def read_manifest(dataset: str | Path) -> dict | None:
    """The stage's manifest; None when it is absent or not a manifest (damaged JSON, or JSON
    without a shard count: the stage writes it again, ``guidealign verify`` reports it)."""
    try:
        man = json.loads(read_text(Path(dataset) / MANIFEST))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    n = man.get("num_shards") if isinstance(man, dict) else None
    return man if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def input_checksums(src: str | Path) -> list[str]:
    """The checksum each shard of ``src`` (its manifest's count) was committed with ("" for a
    shard not committed): what a stage built whole from ``src`` (the library) was made from."""
    n = int(read_manifest(src)["num_shards"])
    out = []
    for i in range(n):
        m = read_marker(src, i)
        out.append(m.sha256 if m else "")
    return out


def checksums_digest(checksums: list[str]) -> str:
    """What a ``_done.json`` records of the :func:`input_checksums` its artifact was built from
    (``status`` compares it with the input's checksums now)."""
    return make_fp("input-checksums", checksums)


def input_of(dataset: str | Path, man: dict) -> Path | None:
    """The input dataset ``dataset`` (with manifest ``man``) was made from, when it can be told."""
    return _input_dir(Path(dataset), man)


def _input_dir(dataset: Path, man: dict) -> Path | None:
    """The input dataset a map stage read, found from any cwd: ``input_rel`` (the input's path
    relative to the dataset), so a moved or copied run reads its own input; None (cannot tell)
    when it is gone, so the shards are not all judged stale for a path that is gone."""
    rel = man.get("input_rel")
    if isinstance(rel, str) and rel:
        p = Path(os.path.normpath(dataset / rel))
        return p if p.exists() else None
    src = man.get("input")  # a manifest from before input_rel: the path as the stage was given it
    if not src:
        return None
    p = Path(src)
    if p.exists():
        return p
    # the run directory was moved, or the path is relative to another cwd: the input in the run
    # directory (beside the dataset, or beside its folder: export/<name>), never the dataset itself
    for base in (dataset.parent, dataset.parent.parent):
        c = base / p.name
        if c.exists() and c.resolve() != dataset.resolve():
            return c
    return None


def _made_from(dataset: Path, index: int, config_fp: str | None, man: dict | None):
    """(config fingerprint, input dataset, marker of input shard ``index`` or None) that shard
    ``index`` is checked against; None when unknowable (no manifest, config fingerprint or input)."""
    if man is None:
        return None
    config_fp = config_fp or man.get("fingerprint")
    src = _input_dir(dataset, man)
    if not config_fp or src is None:
        return None
    return config_fp, src, read_marker(src, index)


def _allowed(config_fp: str, m_in) -> set[str]:
    return {config_fp} | ({make_fp(config_fp, m_in.sha256)} if m_in is not None else set())


def expected_fingerprints(dataset: str | Path, index: int, config_fp: str | None = None,
                          man: dict | None = None) -> set[str] | None:
    """The fingerprints shard ``index`` may carry to be current; None when unknowable.

    ``config_fp`` (default: the manifest's, which the latest run of the stage wrote; pass the
    caller's own to be strict) must be in it: a map stage's shard carries
    ``fingerprint(config_fp, <sha256 of input shard i>)`` (``shards.stage.shard_fingerprint``),
    an artifact table written whole (the library) ``config_fp`` itself. Datasets without a
    recorded input (ingest, augment, eval) use other schemes and are taken as they are.
    """
    dataset = Path(dataset)
    made = _made_from(dataset, index, config_fp, read_manifest(dataset) if man is None else man)
    return None if made is None else _allowed(made[0], made[2])


def _current(dataset: Path, index: int, m, config_fp: str | None, man: dict | None,
             inputs: dict | None = None, depth: int = 0, check_file: bool = True) -> bool:
    """Whether shard ``index``, committed by marker ``m``, is one readers may take: its
    fingerprint current (with none to compare, as for ingest, augment and eval, taken as it is),
    its file intact (an export's shards are JSONL files, every other dataset's Parquet) and,
    when it was made from input shard ``index``, that input shard current too, up the chain.

    The last matters with ranks: a shard matches the input shard it was made from until that
    one is redone, so after a config change upstream, a rank that has not yet redone its
    upstream shard leaves downstream ones that match the old input, and a rank waiting for the
    downstream stage must not take them. ``inputs``: the input datasets' manifests read so far
    (by path), so a whole stage is checked with one read of each."""
    from guidealign.shards.jsonl import jsonl_done

    inputs = {} if inputs is None else inputs
    if searched_another_index(dataset, man, inputs):
        return False
    made = _made_from(dataset, index, config_fp, man)
    if made is not None and m.fingerprint not in _allowed(made[0], made[2]):
        return False
    done = jsonl_done if man is not None and man.get("format") == "jsonl" else is_done
    if check_file and not done(dataset, index, m.fingerprint):
        return False
    if made is None or m.fingerprint == made[0] or depth >= 32:
        return True  # taken as it is, or written whole (not from input shard ``index``)
    _, src, m_in = made  # m_in is there: m's fingerprint was made from its checksum
    return _current(src, index, m_in, None, cached_manifest(src, inputs), inputs, depth + 1)


def cached_manifest(dataset: str | Path, cache: dict) -> dict | None:
    """``dataset``'s manifest, read once per ``cache`` (a dict kept across the shards of one
    stage: see :func:`_current`)."""
    if str(dataset) not in cache:
        cache[str(dataset)] = read_manifest(dataset)
    return cache[str(dataset)]


def searched_another_index(dataset: Path, man: dict | None, cache: dict | None = None) -> bool:
    """Whether ``dataset`` holds retrievals (its manifest records the index they searched) and
    the index beside it is another one now: rebuilt since from other guidelines, another
    library or index config, or other retriever weights. Its shards are then stale, and so is
    every shard made from them (respond's), though their markers still match. ``cache``: the
    index's record, kept there for the other shards of a stage."""
    if not man or not man.get("index_fingerprint"):
        return False
    from guidealign.shards.artifact import read_done

    where = Path(dataset).parent / "index"
    cache = {} if cache is None else cache
    key = f"index record: {where}"
    if key not in cache:
        cache[key] = read_done(where)
    index = cache[key]
    return index is not None and (index.get("fingerprint"), index.get("model_weights")) \
        != (man["index_fingerprint"], man.get("index_weights"))


def current_marker(dataset: str | Path, index: int, man: dict | None = None):
    """Shard ``index``'s marker when a reader may take the shard (committed, intact, with a
    current fingerprint: see :func:`shard_states`), else None."""
    dataset = Path(dataset)
    man = man if man is not None else read_manifest(dataset)
    m = read_marker(dataset, index)
    return m if m is not None and _current(dataset, index, m, None, man) else None


def shard_current(dataset: str | Path, index: int, m, man: dict | None, inputs: dict | None = None) -> bool:
    """Whether shard ``index``, committed by marker ``m`` (read by the caller, who checked the
    file against it), carries a current fingerprint, its input shards too (see :func:`_current`).
    ``inputs``: a dict kept by the caller across the shards of one dataset (manifests read)."""
    return _current(Path(dataset), index, m, None, man, inputs, check_file=False)


def shard_states(dataset: str | Path, config_fp: str | None = None,
                 man: dict | None = None) -> tuple[list[int], list[int]] | None:
    """(missing, stale) shard indices; None when the stage has not been planned.

    Stale: committed with another fingerprint (an earlier config or other input), or with a
    file whose size does not match its marker, or made from an input shard that is itself
    stale now (see :func:`_current`). Readers must not take such a shard.
    ``man``: the manifest, when the caller has read it (else it is read here).
    """
    dataset = Path(dataset)
    man = man if man is not None else read_manifest(dataset)
    if man is None:
        return None
    missing, stale, inputs = [], [], {}
    for i in range(int(man["num_shards"])):
        m = read_marker(dataset, i)
        if m is None:
            missing.append(i)
        elif not _current(dataset, i, m, config_fp, man, inputs):
            stale.append(i)
    return missing, stale


def stale_shards(dataset: str | Path, man: dict | None = None) -> set[int]:
    """Committed shards readers must not take (see :func:`shard_states`); none when unplanned.
    ``man``: the manifest, when the caller has read it."""
    st = shard_states(dataset, man=man)
    return set(st[1]) if st is not None else set()


def damaged_shards(dataset: str | Path, man: dict | None = None, among=None) -> set[int]:
    """Committed shards whose file does not match its marker in size (cut short, grown, or
    missing): damaged, which ``guidealign verify --repair`` removes, not committed under another
    config or input. :func:`shard_states` counts them with the stale (readers take neither);
    this tells them apart for ``status``, ``show`` and the dataset card. None when unplanned.
    ``among``: the shards to look at (the stale ones, when the caller has them: every damaged
    shard is one), else all of the manifest's."""
    from guidealign.shards.jsonl import jsonl_path
    from guidealign.shards.layout import shard_path
    from guidealign.shards.marker import intact

    dataset = Path(dataset)
    man = man if man is not None else read_manifest(dataset)
    if man is None:
        return set()
    path = jsonl_path if man.get("format") == "jsonl" else shard_path
    out = set()
    for i in range(int(man["num_shards"])) if among is None else sorted(among):
        m = read_marker(dataset, i)
        if m is not None and not intact(m, path(dataset, i)):
            out.add(i)
    return out


def missing_shards(dataset: str | Path, config_fp: str | None = None) -> list[int] | None:
    """Shards not yet committed with the current fingerprint (None when the stage has not
    been planned)."""
    st = shard_states(dataset, config_fp)
    return None if st is None else sorted(st[0] + st[1])


def is_complete(dataset: str | Path, config_fp: str | None = None) -> bool:
    """Every shard named by the manifest is committed with the current fingerprint."""
    return missing_shards(dataset, config_fp) == []


def _describe(st) -> str:
    if st is None:
        return "has no manifest (stage not run)"
    missing, stale = st
    parts = []
    if missing:
        parts.append(f"misses {len(missing)} shard(s), e.g. {missing[:5]}")
    if stale:
        parts.append(f"has {len(stale)} stale shard(s) (committed under another config or "
                     f"input), e.g. {stale[:5]}")
    return " and ".join(parts)


def wait_complete(dataset: str | Path, timeout: float = 0, poll: float = 5.0, *,
                  config_fp: str | None = None, stall_timeout: float | None = None,
                  workdir: str | Path | None = None, manifest_fp: str | None = None) -> dict:
    """Block until every shard of ``dataset`` is committed with the current fingerprint.

    ``config_fp``: the stage config fingerprint the shards must have been made with (default:
    the manifest's). ``manifest_fp``: the fingerprint the manifest must carry, for datasets whose
    shards cannot be checked against an input (ingest: a complete manifest of an earlier run over
    other files is not the one to wait for). ``timeout=0`` checks once and raises at once when incomplete. While it
    waits it aborts when another rank of the run left a failure marker in ``workdir``
    (default: the dataset's parent), and ends when nothing moved for ``stall_timeout``
    seconds (default: executor.stall_timeout_s of the running stage); see shards.failure.
    ``timeout`` stays a hard cap (``float("inf")``: none).
    """
    from guidealign.shards.watch import Watch, waiting

    dataset = Path(dataset)
    deadline = time.monotonic() + timeout
    watch = Watch(workdir or dataset.parent, str(dataset), stall_timeout)
    with waiting(str(dataset)):
        while True:
            # the manifest is read once a poll: what is checked, counted and returned is one
            # version of it, even while another run replaces it
            man = read_manifest(dataset)
            st = shard_states(dataset, config_fp, man) if man is not None else None
            if st is not None and manifest_fp and man.get("fingerprint") != manifest_fp:
                st = None  # another run's manifest: this one has not finished planning
            if st is not None and not st[0] and not st[1]:
                return man
            why = _describe(st) if st is not None or not manifest_fp else \
                "has no manifest of this run's inputs and settings yet (none, or an earlier run's)"
            if timeout <= 0 or time.monotonic() >= deadline:
                raise RuntimeError(f"{dataset} is incomplete: it {why}")
            n_ok = 0 if st is None else int(man["num_shards"]) - len(st[0]) - len(st[1])
            watch.check(n_ok, f"{dataset} {why}")
            time.sleep(poll)


__all__ = ["write_manifest", "read_manifest", "remove_manifest", "missing_shards", "is_complete",
           "wait_complete", "shard_states", "stale_shards", "damaged_shards", "expected_fingerprints",
           "current_marker", "shard_current", "cached_manifest"]
