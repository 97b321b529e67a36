"""``guidealign export``: write a stage's Parquet shards out as JSONL, shard by shard.

Shard ``i`` of ``WORKDIR/<dataset>/`` becomes ``OUT/shard-0000i.jsonl`` (one JSON object
per row, every column unless ``columns`` is given), committed like any shard: the file is
written to a temp name, fsynced and renamed, then ``OUT/shard-0000i.done.json`` records
its rows, bytes, sha256 and a fingerprint of the export settings plus the input shard's
checksum. The worker of rank r exports the shards i with i % W == r, so the export of
a large run spreads over a SLURM array or Ray tasks like any map stage, and a rerun only
writes shards that are missing or whose input changed. ``cat OUT/shard-*.jsonl`` gives
one file in shard order.

An input shard that is not committed yet, that is stale (committed under another config
or input, so readers may not take it) or damaged (its file cut short, missing, or not the
bytes its marker's sha256 commits), is left for a later run and reported; the export shard
made from it earlier is retired (marker first, then file), so ``cat`` never joins rows of
older data to the current ones. A dataset that is also an artifact (the library) is exported
only when ``guidealign status`` counts it done: with its ``_done.json``, and current.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import pyarrow.parquet as pq

from guidealign.config.sft import ExportFormat
from guidealign.shards import fingerprint, read_manifest, read_marker, read_table, write_manifest
from guidealign.shards.layout import marker_path, shard_path
from guidealign.shards.manifest import current_marker
from guidealign.shards.jsonl import jsonl_done, jsonl_path, write_jsonl_shard
from guidealign.shards.marker import intact
from guidealign.shards.write import file_sha256, fsync_dir, remove_temps, retire_shards_from
from guidealign.shards.ranks import my_shards

log = logging.getLogger(__name__)

FORMATS = get_args(ExportFormat)


@dataclass
class ExportReport:
    dataset: str
    out: str
    rank: int = 0
    world_size: int = 1
    total: int = 0
    mine: list[int] = field(default_factory=list)
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)   # input shards left for a later run: all below
    stale: list[int] = field(default_factory=list)     # of those, committed under another config/input
    damaged: list[int] = field(default_factory=list)   # of those, whose file does not match its marker
    retired: list[int] = field(default_factory=list)   # export shards removed: their input is not current
    rows: int = 0
    seconds: float = 0.0
    workdir: str = ""

    @property
    def uncommitted(self) -> list[int]:
        """The pending input shards that are not committed."""
        return [i for i in self.pending if i not in self.stale and i not in self.damaged]

    def summary(self) -> str:
        s = (f"export {self.dataset}: rank {self.rank}/{self.world_size}: shards {self.mine} of "
             f"{self.total}; wrote {self.written} ({self.rows} rows), {len(self.skipped)} already "
             f"done -> {self.out}")
        if self.uncommitted:
            s += f"; input shards {self.uncommitted} are not committed yet (rerun export later)"
        if self.damaged:
            s += (f"; input shards {self.damaged} are damaged (the file cut short, missing or not the "
                  f"one its marker commits): run `guidealign verify {self.workdir} --repair`, rerun the "
                  f"{self.dataset} stage, then export again")
        if self.stale:
            s += (f"; input shards {self.stale} are stale, committed under another config or input "
                  f"(rerun the {self.dataset} stage, then export again)")
        if self.retired:
            s += f"; removed the earlier export of shards {self.retired} (their input is not current)"
        return s


def _check_columns(src: Path, n: int, columns: list[str]) -> None:
    """Fail before writing anything when a requested column is not in the dataset."""
    for i in range(n):
        if read_marker(src, i) is not None and shard_path(src, i).exists():
            names = pq.read_schema(shard_path(src, i)).names
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"--columns: {missing} not in {src} (its columns: {names})")
            return


def _holds_a_run(out: Path, workdir: Path) -> str | None:
    """Why ``out`` is a run directory, or None: it is ``workdir``, or a folder that holds a run
    (its record run.json, or a stage's dataset or artifact directly under it)."""
    if not out.is_dir():
        return None
    if out.resolve() == workdir.resolve():
        return "is the run directory"
    if (out / "run.json").is_file():
        return "is a run directory (it holds run.json)"
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        # (earlier exports beside each other, WORKDIR/export/*, are no run)
        if (d / "_done.json").is_file() or (read_manifest(d) or {}).get("stage", "export") != "export":
            return f"holds the datasets of a run ({d.name}/)"
    return None


def _src_path(src: Path, i: int, man: dict | None) -> Path:
    return jsonl_path(src, i) if (man or {}).get("format") == "jsonl" else shard_path(src, i)


def _committed(src: Path, i: int, man: dict | None) -> bool:
    """Shard ``i`` of ``src`` has a marker and a file of the size it records."""
    return intact(read_marker(src, i), _src_path(src, i, man))


def _retire(out: Path, i: int) -> bool:
    """Remove export shard ``i`` (its marker first, then its file): its input shard is not one
    readers may take, so its rows are not the dataset's now. Whether there was one."""
    mpath, path = marker_path(out, i), jsonl_path(out, i)
    for p in (mpath, path):  # what a killed write of this shard left
        remove_temps(p)
    if not (mpath.exists() or path.exists()):
        return False
    if mpath.exists():
        mpath.unlink()
        fsync_dir(out)  # the marker durably gone before its file: never a marker without its file
    path.unlink(missing_ok=True)
    return True


def run_export(cfg, workdir: str | Path, *, dataset: str = "respond", out: str | Path | None = None,
               columns: list[str] | None = None, fmt: str = "jsonl", rank: int = 0,
               world_size: int = 1, progress: bool = True) -> ExportReport:
    """Export this rank's shards of ``WORKDIR/<dataset>`` to ``out`` (default WORKDIR/export/<dataset>)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if Path(dataset).is_absolute() or ".." in Path(dataset).parts:
        raise ValueError(f"dataset {dataset!r}: name a dataset under the run directory (e.g. respond)")
    src = Path(workdir) / dataset
    out = Path(out) if out is not None else Path(workdir) / "export" / dataset
    if why := _holds_a_run(out, Path(workdir)):
        raise ValueError(f"--out {out} {why}: the export would write its shards and _stage.json "
                         f"among the run's stage folders; export to a folder of its own (default: "
                         f"{Path(workdir) / 'export' / dataset})")
    held = (read_manifest(out) or {}).get("stage", "export")
    if out.resolve() == src.resolve() or held != "export":  # its _stage.json would be overwritten
        raise ValueError(f"--out {out} holds the dataset of stage {held!r}: export to a new folder "
                         "or to an earlier export")
    man = read_manifest(src)
    if man is None:
        raise FileNotFoundError(f"{src} is not a sharded dataset (no _stage.json): "
                                f"run the stage that writes it first")
    n = int(man["num_shards"])
    cfg_fp = fingerprint("export-v2", fmt, list(columns or []))
    if columns:
        _check_columns(src, n, columns)
    # what an export of a larger dataset left, which `cat OUT/shard-*.jsonl` would join to these
    # rows: gone before the manifest says n (as map_shards), so a crash between the two never
    # leaves an export complete under the new manifest with extra shards beside it
    retire_shards_from(out, n, ".jsonl")
    write_manifest(out, stage="export", num_shards=n, fingerprint=cfg_fp, input=str(src), format=fmt)
    rep = ExportReport(dataset=dataset, out=str(out), rank=rank, world_size=world_size, total=n,
                       mine=my_shards(n, rank, world_size), workdir=str(workdir))
    from tqdm import tqdm

    src_man = read_manifest(src)
    for i in tqdm(rep.mine, desc=f"export {dataset}", unit="shard", disable=not progress):
        # only a shard readers may take: not one committed under another config (or input), nor
        # one whose file is gone or cut short (pending, as an uncommitted one)
        src_marker = current_marker(src, i, src_man)
        if src_marker is None:
            rep.pending.append(i)
            if _committed(src, i, src_man):  # whole, but under another config or input
                rep.stale.append(i)
            elif read_marker(src, i) is not None:  # committed, but its file cut short or gone
                rep.damaged.append(i)
            if _retire(out, i):
                rep.retired.append(i)
            continue
        fp = fingerprint(cfg_fp, src_marker.sha256)
        if jsonl_done(out, i, fp):
            rep.skipped.append(i)
            continue
        t0 = time.perf_counter()
        # the bytes its marker commits, or the export would hand on rows a flipped bit changed (or
        # die on a file that no longer parses): the file is read whole below anyway
        if file_sha256(_src_path(src, i, src_man)) != src_marker.sha256:
            rep.pending.append(i)
            rep.damaged.append(i)
            if _retire(out, i):
                rep.retired.append(i)
            continue
        table = read_table(src, i, columns)
        write_jsonl_shard(out, i, table.to_pylist(), fp, seconds=time.perf_counter() - t0,
                          stats={"rank": rank, "world_size": world_size, "pid": os.getpid(),
                                 "host": os.uname().nodename})
        dt = time.perf_counter() - t0
        rep.written.append(i)
        rep.rows += table.num_rows
        rep.seconds += dt
        log.info("export %s shard %d: %d rows -> %s", dataset, i, table.num_rows, jsonl_path(out, i))
    return rep
