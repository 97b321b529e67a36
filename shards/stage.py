"""The map-stage executor: shard i of the input becomes shard i of the output.

It is what every per-prompt stage (detect, guidelines, retrieve, respond) runs:
the worker of rank r handles the shards i with i % W == r, skips the ones whose
commit marker already carries the current fingerprint, and commits each new one
atomically. A crash therefore loses at most the shard in flight, and a rerun
neither repeats nor skips work.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
from tqdm import tqdm

from shards.fingerprint import fingerprint as make_fp
from shards.manifest import read_manifest, write_manifest
from shards.marker import is_done, read_marker
from shards.ranks import my_shards
from shards.read import read_table
from shards.write import write_shard

log = logging.getLogger(__name__)

# fn(table, index) -> table | (table, quarantine) | (table, quarantine, stats)
ShardFn = Callable[[pa.Table, int], object]


@dataclass
class StageReport:
    stage: str
    total: int = 0
    mine: int = 0
    skipped: int = 0
    processed: int = 0
    rows: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        return (f"{self.stage}: {self.processed} shard(s) written, {self.skipped} already done "
                f"(of {self.mine} for this rank, {self.total} in all); {self.rows} rows, "
                f"{self.quarantined} quarantined, {rate:.1f} rows/s")


def _unpack(result):
    if isinstance(result, pa.Table):
        return result, None, {}
    if len(result) == 2:
        return result[0], result[1], {}
    return result


def input_num_shards(src: str | Path) -> int:
    man = read_manifest(src)
    if man is None:
        raise RuntimeError(f"input {src} has no manifest: run the stage that writes it first")
    return int(man["num_shards"])


def shard_fingerprint(config_fp: str, src: str | Path, index: int) -> str:
    """A shard's fingerprint: the stage config plus the checksum of the input shard it read."""
    m = read_marker(src, index)
    if m is None:
        raise RuntimeError(f"input shard {index} of {src} is not committed; run that stage first "
                           "(with the same rank and world size)")
    return make_fp(config_fp, m.sha256)


def map_shards(
    stage: str,
    src: str | Path,
    dst: str | Path,
    config_fp: str,
    *,
    fn: ShardFn | None = None,
    make_fn: Callable[[], ShardFn] | None = None,
    rank: int = 0,
    world_size: int = 1,
    columns: list[str] | None = None,
    progress: bool = True,
) -> StageReport:
    """Run ``fn`` over this rank's input shards that are not done yet.

    ``make_fn`` builds ``fn`` lazily, on the first shard that needs work, so that an
    expensive engine is never started for a rerun that has nothing to do.
    """
    if (fn is None) == (make_fn is None):
        raise ValueError("give exactly one of fn and make_fn")
    n = input_num_shards(src)
    write_manifest(dst, stage=stage, num_shards=n, fingerprint=config_fp, input=str(src))
    report = StageReport(stage=stage, total=n)
    todo = my_shards(n, rank, world_size)
    report.mine = len(todo)
    bar = tqdm(todo, desc=stage, unit="shard", disable=not progress)
    for i in bar:
        fp = shard_fingerprint(config_fp, src, i)
        if is_done(dst, i, fp):
            report.skipped += 1
            continue
        if fn is None:
            fn = make_fn()
        t0 = time.perf_counter()
        table, quarantine, stats = _unpack(fn(read_table(src, i, columns), i))
        dt = time.perf_counter() - t0
        marker = write_shard(dst, i, table, fp, quarantine=quarantine, seconds=dt, stats=stats)
        report.processed += 1
        report.rows += marker.rows
        report.quarantined += marker.quarantined
        report.seconds += dt
        for k, v in (stats or {}).items():
            if isinstance(v, (int, float)):
                report.stats[k] = report.stats.get(k, 0) + v
    log.info(report.summary())
    return report
