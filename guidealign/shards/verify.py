"""Check a run directory against its own commit records (``guidealign verify``).

Every committed shard is re-read and re-checksummed against its marker (sha256, bytes,
rows; its quarantine file's rows, and its sha256 when the marker records one), every
artifact's ``_done.json`` file list (when the stage recorded one, see
:mod:`shards.artifact_files`) is re-checksummed, and files that belong to nothing are
listed: temp files left by a crash, shard files without a marker, markers without a shard.

Problem kinds: ``corrupt`` and ``missing`` (committed data that is not what its record says),
``orphan`` (files no commit record owns). ``pending`` (shards a manifest names that are not
committed yet, or are committed under an earlier config or input: stale, which readers skip)
and ``note`` are informational and never fail a check.

:func:`repair` removes the commit records of bad shards and artifacts (and the orphans), so
that rerunning the stage redoes exactly those.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from guidealign.shards.artifact_files import DONE, check_files
from guidealign.shards.jsonl import jsonl_path
from guidealign.shards.layout import marker_path, quarantine_path, shard_path
from guidealign.shards.manifest import MANIFEST, read_manifest
from guidealign.shards.marker import read_marker
from guidealign.shards.write import file_sha256

FAILING = ("corrupt", "missing", "orphan")
_MARKER_RE = re.compile(r"^shard-(\d{5,})\.done\.json$")
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
_JSONL_RE = re.compile(r"^shard-(\d{5,})\.jsonl$")  # an export's shards (shards.jsonl)
_PID_TMP_RE = re.compile(r"\.(\d+)\.tmp$|\.old-(\d+)$")
# a temp file of a JSON record (a manifest, a marker, _done.json, a heartbeat): never read, and
# nothing cleans it but --repair (a shard's temps go with its next write; a manifest may have
# writers on other hosts at once, so no writer removes another's)
_RECORD_TMP_RE = re.compile(r"^\..+\.json\.[0-9a-f]{12}\.\d+\.tmp$")


@dataclass
class Problem:
    kind: str                 # corrupt | missing | orphan | pending | note
    path: str                 # relative to the run directory
    detail: str
    remove: list[str] = field(default_factory=list)  # what --repair deletes (relative paths)


@dataclass
class DirSummary:
    path: str
    kind: str                 # dataset | artifact | dataset+artifact | folder (temp files only)
    shards_ok: int = 0
    shards_committed: int = 0
    shards_total: int | None = None
    files_ok: int = 0
    files_listed: int | None = None   # None: _done.json records no checksums
    problems: int = 0


@dataclass
class VerifyReport:
    workdir: str
    dirs: list[DirSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def failing(self) -> list[Problem]:
        return [p for p in self.problems if p.kind in FAILING]

    @property
    def ok(self) -> bool:
        return not self.failing

    def to_dict(self) -> dict:
        return {"workdir": self.workdir, "ok": self.ok,
                "counts": {k: sum(p.kind == k for p in self.problems)
                           for k in ("corrupt", "missing", "orphan", "pending", "note")},
                "dirs": [asdict(d) for d in self.dirs],
                "problems": [asdict(p) for p in self.problems]}


def is_temp_name(name: str) -> bool:
    """Names the writers use for work in flight: ``.x.PID.tmp``, ``.x.tmp-*``, ``.x.old-PID``,
    ``.tmp-*``."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name
                                     or name.startswith(".tmp-") or ".old-" in name)


def _pid_alive(name: str) -> bool:
    m = _PID_TMP_RE.search(name)
    if not m:
        return False
    pid = int(m.group(1) or m.group(2))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _parquet_rows(path: Path) -> int:
    """Rows of a Parquet file, reading every page (so corruption in the data shows up)."""
    return pq.read_table(path).num_rows


def _file_rows(path: Path) -> int:
    """Rows of a shard file: a Parquet one, or a JSONL one (every line parsed)."""
    if path.suffix != ".jsonl":
        return _parquet_rows(path)
    n = 0
    with open(path, "rb") as f:
        for line in f:
            json.loads(line)  # a line that does not parse is corruption
            n += 1
    return n


def _shard_file(d: Path, i: int) -> Path:
    """The file shard ``i``'s marker commits: its Parquet file, or the JSONL one of an export."""
    p = shard_path(d, i)
    j = jsonl_path(d, i)
    if p.exists() or j.exists():
        return p if p.exists() else j
    # neither there: the one its dataset is written as (an export's manifest says "jsonl")
    return j if (read_manifest(d) or {}).get("format") == "jsonl" else p


def _marker_index(path: Path) -> int | None:
    """The shard index a marker file names, or None when it cannot be read."""
    try:
        n = json.loads(path.read_text()).get("index")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _check_shard(root: Path, d: Path, i: int, rep: VerifyReport, summary: DirSummary) -> bool:
    """Check committed shard ``i`` of ``d``; True when it matches its marker."""
    rel = lambda p: Path(p).relative_to(root).as_posix()  # noqa: E731
    mpath, spath, qpath = marker_path(d, i), _shard_file(d, i), quarantine_path(d, i)
    m = read_marker(d, i)
    bad: list[tuple[str, str, str]] = []
    if m is None:
        # torn, or JSON without a field a marker needs (read_marker: absent either way): the
        # shard it committed is then uncommitted, so it and its quarantine go with it (else
        # they are orphans the next verify fails on)
        other = _marker_index(mpath)
        why = (f"the marker of shard {other}, not of {i} (copied or moved over it, with its file: its "
               "rows would be read twice)" if other is not None and other != i else
               "marker unreadable or incomplete (a torn write, or a field missing or of the wrong type)")
        rep.problems.append(Problem("corrupt", rel(mpath), why, remove=[rel(mpath), rel(spath), rel(qpath)]))
        return False
    summary.shards_committed += 1
    if summary.shards_total is not None and i >= summary.shards_total:
        bad.append(("orphan", rel(mpath),
                    f"committed shard {i} is beyond the manifest's {summary.shards_total} shards "
                    "(left from an earlier run)"))
    if not spath.exists():
        bad.append(("missing", rel(spath), f"marker commits {m.rows} rows but the file is absent"))
    else:
        size = spath.stat().st_size
        if size != m.bytes:
            bad.append(("corrupt", rel(spath), f"{size} bytes, marker says {m.bytes}"))
        elif file_sha256(spath) != m.sha256:
            bad.append(("corrupt", rel(spath), "sha256 differs from the marker"))
        else:
            try:
                rows = _file_rows(spath)
            except Exception as e:  # noqa: BLE001 - any read error means corrupt
                bad.append(("corrupt", rel(spath), f"unreadable: {e}"))
            else:
                if rows != m.rows:
                    bad.append(("corrupt", rel(spath), f"{rows} rows, marker says {m.rows}"))
    if m.quarantined:
        if not qpath.exists():
            bad.append(("missing", rel(qpath), f"marker records {m.quarantined} quarantined rows "
                                                "but the quarantine file is absent"))
        else:
            want_sha = m.quarantine_sha256  # "" in markers written before it was recorded
            try:
                if want_sha and file_sha256(qpath) != want_sha:
                    raise ValueError("sha256 differs from the marker")
                rows = _parquet_rows(qpath)
                if rows != m.quarantined:
                    raise ValueError(f"{rows} rows, marker says {m.quarantined}")
            except Exception as e:  # noqa: BLE001
                bad.append(("corrupt", rel(qpath), f"quarantine file: {e}"))
    elif qpath.exists():
        bad.append(("orphan", rel(qpath), "quarantine file of a shard whose marker records none"))
    if not bad:
        summary.shards_ok += 1
        return True
    remove = [rel(mpath), rel(spath), rel(qpath)]
    for kind, path, detail in bad:
        rep.problems.append(Problem(kind, path, detail, remove=remove))
    return False


def _check_dataset(root: Path, d: Path, rep: VerifyReport, summary: DirSummary) -> None:
    rel = lambda p: Path(p).relative_to(root).as_posix()  # noqa: E731
    man = read_manifest(d)
    if (d / MANIFEST).exists() and man is None:
        # damaged JSON, or JSON that is not what a stage writes (a flipped bit, a hand edit)
        rep.problems.append(Problem("corrupt", rel(d / MANIFEST),
                                    "manifest is not valid JSON or holds no shard count",
                                    remove=[rel(d / MANIFEST)]))
    summary.shards_total = int(man["num_shards"]) if man else None
    markers, shards = set(), {}
    for p in d.iterdir():
        if (m := _MARKER_RE.match(p.name)):
            markers.add(int(m.group(1)))
        elif (m := _SHARD_RE.match(p.name) or _JSONL_RE.match(p.name)):
            shards[p] = int(m.group(1))
    ok = [i for i in sorted(markers) if _check_shard(root, d, i, rep, summary)]
    for p, i in sorted(shards.items()):
        if i not in markers:
            rep.problems.append(Problem("orphan", rel(p),
                                        "shard file without a commit marker (crash before commit)",
                                        remove=[rel(p), rel(quarantine_path(d, i))]))
    qdir = d / "quarantine"
    if qdir.is_dir():
        for p in sorted(qdir.iterdir()):
            if (m := _SHARD_RE.match(p.name)) and int(m.group(1)) not in markers:
                rep.problems.append(Problem("orphan", rel(p),
                                            "quarantine file without a commit marker",
                                            remove=[rel(p)]))
    if man:
        pending = [i for i in range(summary.shards_total) if i not in markers]
        if pending:
            rep.problems.append(Problem(
                "pending", rel(d), f"{len(pending)} of {summary.shards_total} shard(s) not "
                f"committed yet, e.g. {pending[:5]}: rerun the stage"))
        # intact, but committed under an earlier config or from input that has changed since:
        # readers skip them and `status` counts them stale, so the dataset is not complete
        # either (a check that said only "OK" read as a finished run)
        from guidealign.shards.manifest import stale_shards

        stale = sorted(set(ok) & stale_shards(d, man))
        if stale:
            rep.problems.append(Problem(
                "pending", rel(d), f"{len(stale)} of {summary.shards_total} shard(s) committed under an "
                f"earlier config or input (stale, as `guidealign status` counts them), e.g. {stale[:5]}: "
                "rerun the stage to redo them"))


def _check_artifact(root: Path, d: Path, rep: VerifyReport, summary: DirSummary) -> bool:
    """Returns False when ``_done.json`` itself is unreadable."""
    rel = lambda p: Path(p).relative_to(root).as_posix()  # noqa: E731
    try:
        done = json.loads((d / DONE).read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        rep.problems.append(Problem("corrupt", rel(d / DONE), f"unreadable: {e}",
                                    remove=[rel(d / DONE)]))
        return False
    if not isinstance(done, dict):
        # valid JSON but no record (a flipped "{"): readers take it for none (read_done)
        rep.problems.append(Problem("corrupt", rel(d / DONE), "not a JSON object: "
                                    f"{type(done).__name__}", remove=[rel(d / DONE)]))
        return False
    files = done.get("files")
    if not isinstance(files, dict):
        rep.problems.append(Problem("note", rel(d), "no checksums recorded in _done.json: "
                                    "its files are not checked"))
        return True
    summary.files_listed = len(files)
    found = check_files(d, files)
    summary.files_ok = len(files) - len({r for _, r, _ in found})
    for kind, r, detail in found:
        rep.problems.append(Problem(kind, rel(d / r), detail, remove=[rel(d / DONE)]))
    return True


def _holds_dataset(d: Path) -> bool:
    """A manifest, a marker or a shard file (a first write killed before its marker left only
    files: its quarantine folder is still that dataset's, not a dataset of its own)."""
    return (d / MANIFEST).exists() or any(_MARKER_RE.match(p.name) or _SHARD_RE.match(p.name)
                                          or _JSONL_RE.match(p.name) for p in d.iterdir())


def verify_run(workdir: str | Path) -> VerifyReport:
    """Check every dataset and artifact under ``workdir`` (see the module doc)."""
    root = Path(workdir).resolve()
    rep = VerifyReport(workdir=str(root))
    temps: dict[str, int] = {}  # failing temp files by the directory they lie in (relative)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        here = d.relative_to(root).as_posix() or "."
        for name in sorted(dirnames + filenames):
            if is_temp_name(name):
                p = d / name
                if _pid_alive(name):
                    rep.problems.append(Problem("note", p.relative_to(root).as_posix(),
                                                "temp file of a running process: left alone"))
                elif _RECORD_TMP_RE.match(name):  # a kill while a record was written: harmless
                    rep.problems.append(Problem("note", p.relative_to(root).as_posix(),
                                                "temp file of an interrupted write of a JSON record (never "
                                                "read; --repair removes it)",
                                                remove=[p.relative_to(root).as_posix()]))
                else:
                    rep.problems.append(Problem("orphan", p.relative_to(root).as_posix(),
                                                "temp file left by an interrupted write",
                                                remove=[p.relative_to(root).as_posix()]))
                    temps[here] = temps.get(here, 0) + 1
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        names = set(filenames)
        is_dataset = MANIFEST in names or any(_MARKER_RE.match(n) or _SHARD_RE.match(n)
                                              for n in names)
        is_artifact = DONE in names
        if d.name == "quarantine" and _holds_dataset(d.parent):
            continue  # a dataset's rejected rows: checked with their shards
        if not (is_dataset or is_artifact):
            continue
        kind = "dataset+artifact" if is_dataset and is_artifact else \
            ("dataset" if is_dataset else "artifact")
        summary = DirSummary(path=here, kind=kind)
        before = len(rep.failing)  # (this directory's temp files are not the artifact's parts)
        if is_dataset:
            _check_dataset(root, d, rep, summary)
        if is_artifact:
            _check_artifact(root, d, rep, summary)
        bad = rep.failing[before:]
        summary.problems = len(bad)
        if is_artifact and bad:  # the artifact is only as good as its parts: rebuild it
            done_rel = (d / DONE).relative_to(root).as_posix()
            for p in bad:
                if done_rel not in p.remove:
                    p.remove.append(done_rel)
        rep.dirs.append(summary)
    _count_temps(rep, temps)
    return rep


def _count_temps(rep: VerifyReport, temps: dict[str, int]) -> None:
    """Count each directory's failing temp files in the problems of the checked directory that
    holds it (itself, or the nearest one above: a dataset's quarantine/, an artifact's model
    folder); one outside every checked directory (the run directory's own, _ranks/) gets a row
    of its own, kind "folder", so that no failing check shows 0 problems in every row."""
    rows = {s.path: s for s in rep.dirs}
    for where, n in temps.items():
        parts = [] if where == "." else where.split("/")
        above = ["/".join(parts[:k]) or "." for k in range(len(parts), -1, -1)]
        owner = next((rows[a] for a in above if a in rows), None)
        if owner is None:
            owner = rows[where] = DirSummary(path=where, kind="folder")
            rep.dirs.append(owner)
        owner.problems += n


def repair(report: VerifyReport) -> list[str]:
    """Delete what each failing problem names in ``remove`` (markers first, so a crash in the
    middle of a repair still leaves nothing committed that is bad), and what a note names (a
    dead writer's temp file of a JSON record). Returns the removed paths."""
    root = Path(report.workdir)
    paths: list[str] = []
    for p in report.failing + [q for q in report.problems if q.kind == "note" and q.remove]:
        for r in p.remove:
            if r not in paths:
                paths.append(r)
    records = [r for r in paths if r.endswith(".done.json") or r.endswith(DONE)]
    removed = []
    for r in records + [r for r in paths if r not in records]:
        target = root / r
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists() or target.is_symlink():
            target.unlink()
        else:
            continue
        removed.append(r)
    return removed


__all__ = ["Problem", "DirSummary", "VerifyReport", "verify_run", "repair", "is_temp_name",
           "FAILING"]
