"""The map-stage executor: shard i of the input becomes shard i of the output.

It is what every per-prompt stage (detect, guidelines, retrieve, respond) runs:
with static assignment (the default) the worker of rank r handles the shards i with
i % W == r (each under a claim, ``shards.claims``, so that a second process writing the same
dataset, two runs started at once, waits for it instead of writing it again); with dynamic assignment (``shards.claims``) every worker claims the next
shard nobody holds, until all are committed, and takes over the shards of workers whose
heartbeat stopped. Either way it skips the shards whose commit marker already carries
the current fingerprint and commits each new one atomically. A crash therefore loses at
most the shard in flight, and a rerun neither repeats nor skips work.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

from guidealign.shards import claims
from guidealign.shards.failure import raise_if_conflict
from guidealign.shards.fingerprint import fingerprint as make_fp
from guidealign.shards.manifest import cached_manifest, read_manifest, shard_current, write_manifest
from guidealign.shards.marker import is_done, read_marker
from guidealign.shards.ranks import my_shards
from guidealign.shards.read import read_table
from guidealign.shards.write import retire_shards_from, write_shard

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


def shard_fingerprint(config_fp: str, src: str | Path, index: int, inputs: dict | None = None) -> str:
    """A shard's fingerprint: the stage config plus the checksum of the input shard it read.

    An input shard that readers must not take (committed under another config, made from input
    that changed since, retrievals of an index rebuilt since: ``shard_states``'s stale ones) is
    refused: a stage run alone after a change upstream would otherwise spend its work (an engine's)
    on it, or keep its output made from it as done. ``inputs``: a dict the caller keeps across
    the shards of one stage (the manifests read)."""
    m = read_marker(src, index)
    if m is None:
        raise RuntimeError(f"input shard {index} of {src} is not committed; run that stage first "
                           "(with the same rank and world size)")
    inputs = {} if inputs is None else inputs
    if not shard_current(src, index, m, cached_manifest(src, inputs), inputs):
        raise RuntimeError(f"input shard {index} of {src} is stale: it was made under another config, "
                           "from input that has changed since, or (retrievals) from another index than "
                           f"the one there now (`guidealign status` says which); run the stage that "
                           f"writes {Path(src).name} again first")
    return make_fp(config_fp, m.sha256)


def _refuse_empty(stage: str, src: str | Path, n: int) -> None:
    """A stage with an expensive function (an engine) refuses an input that holds no row at all:
    it would start the engine (minutes of a GPU node for a large model) to write empty shards,
    and the stages after it fail on nothing anyway. A shard not committed yet decides nothing
    (the fingerprint check says so, with its own message)."""
    markers = [read_marker(src, i) for i in range(n)]
    if all(m is not None and m.rows == 0 for m in markers):
        quarantined = sum(m.quarantined for m in markers)
        raise RuntimeError(
            f"{stage}: its input {src} holds no rows ({n} empty shard(s)"
            + (f", {quarantined} row(s) quarantined: each one's reason in {Path(src) / 'quarantine'}" if quarantined else "")
            + "): nothing to generate; fix the input (or the stage before it) and run again")


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
    assign: str | None = None,
    claim_ttl_s: float | None = None,
    record: dict | None = None,
) -> StageReport:
    """Run ``fn`` over this rank's input shards that are not done yet.

    ``make_fn`` builds ``fn`` lazily, on the first shard that needs work, so that an
    expensive engine is never started for a rerun that has nothing to do.
    ``assign``: "static" (shards i with i % world_size == rank) or "dynamic" (claim
    shards until every one is committed); None takes ``shards.claims.current_assignment()``.
    ``record``: facts about the run kept in the manifest (e.g. the model that generates), for
    provenance only: they decide nothing (the fingerprint does).
    """
    if (fn is None) == (make_fn is None):
        raise ValueError("give exactly one of fn and make_fn")
    # a rank outside 0..W-1 would process no shard (static) and report success
    if isinstance(rank, bool) or isinstance(world_size, bool) or world_size < 1 \
            or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    n = input_num_shards(src)
    if make_fn is not None:
        _refuse_empty(stage, src, n)
    # an earlier run over a larger input left shards n and up; readers take every shard. They
    # go before the manifest says n: a crash between the two must leave a dataset that is
    # incomplete under its old manifest, never one complete under the new with extras beside.
    retire_shards_from(dst, n)
    write_manifest(dst, stage=stage, num_shards=n, fingerprint=config_fp, input=str(src), **(record or {}))
    report = StageReport(stage=stage, total=n)
    policy = claims.current_assignment()
    if assign is not None or claim_ttl_s is not None:
        policy = claims.Assignment(assign or policy.kind,
                                   policy.ttl_s if claim_ttl_s is None else claim_ttl_s, policy.poll_s)
    if policy.kind == "dynamic":
        return _map_dynamic(stage, src, dst, config_fp, fn, make_fn, rank, world_size, columns,
                            progress, policy, report)
    todo = my_shards(n, rank, world_size)
    report.mine = len(todo)
    from tqdm import tqdm  # here, not at the top: ~15 ms of import that ingest (no stage loop) skips

    bar = tqdm(todo, desc=stage, unit="shard", disable=not progress)
    inputs: dict = {}  # every input shard checked before any work (an engine's start)
    fps = {i: shard_fingerprint(config_fp, src, i, inputs) for i in todo}
    owner, told = claims.owner_record()["owner"], set()
    try:
        for i in bar:
            fp = fps[i]
            if is_done(dst, i, fp):
                report.skipped += 1
                continue
            raise_if_conflict()  # another process runs this rank: no shard is written twice
            fn = _static_shard(stage, fn, make_fn, src, dst, i, fp, columns, report, policy, owner, told)
    finally:  # killed ranks' claims of shards committed since; the folder when empty
        claims.clear_claims(dst, policy.ttl_s)
    log.info(report.summary())
    return report


def _static_shard(stage, fn, make_fn, src, dst, i: int, fp: str, columns, report: StageReport,
                  policy: claims.Assignment, owner: str, told: set):
    """Do shard ``i`` of this (static) rank under its claim; returns ``fn`` (built on the first
    shard that needs it)."""
    while True:
        claim = _claim_static(stage, dst, i, fp, policy, owner, told)
        if claim is None:  # committed meanwhile by the other process that held it
            report.skipped += 1
            return fn
        with claim:
            if is_done(dst, i, fp):
                report.skipped += 1
                return fn
            if fn is None:
                fn = make_fn()
            if _process(fn, src, dst, i, fp, columns, report, claim):
                return fn
        # taken over while this rank computed it (its heartbeat stalled past the TTL): wait for
        # the taker's commit, or claim it again when the taker is gone too


def _claim_static(stage: str, dst, i: int, fp: str, policy: claims.Assignment, owner: str,
                  told: set):
    """Shard ``i``'s claim for this rank's write of it, waiting while another live process
    holds it; None once that one committed it. Two commands of one stage started on one run
    directory at once (the same rank and world size on one host, which no rank conflict tells
    from two evals side by side) each wrote every shard, the engine's work done twice and each
    write clearing the other's temp file. A claim a killed rank left is taken over as under
    the dynamic assignment: at once on its own host, after ``executor.claim_ttl_s`` elsewhere."""
    while True:
        claim = claims.try_claim(dst, i, policy.ttl_s, owner)
        if claim is not None:
            return claim
        if is_done(dst, i, fp):
            return None
        raise_if_conflict()
        held = claims.holder(dst, i)
        who = (held.get("host", "?"), held.get("pid", "?"))
        if who not in told:  # once per other process, not once per shard
            told.add(who)
            log.warning("%s: shard %d of %s is claimed by another process (%s, pid %s): waiting "
                        "for it (two runs on one run directory? a rank killed on that host: its "
                        "claim is taken over after executor.claim_ttl_s)", stage, i, dst, *who)
        time.sleep(policy.poll)


def _process(fn, src, dst, i: int, fp: str, columns, report: StageReport, claim=None) -> bool:
    """Run ``fn`` on input shard ``i`` and commit the result; False when the claim was lost."""
    t0 = time.perf_counter()
    table, quarantine, stats = _unpack(fn(read_table(src, i, columns), i))
    dt = time.perf_counter() - t0
    if claim is not None and not claim.held():
        log.warning("%s: shard %d was taken over while this worker processed it (its "
                    "heartbeat stalled); dropping this result", report.stage, i)
        return False
    if claim is not None and is_done(dst, i, fp):
        # the worker this claim was taken over from finished it after all (its heartbeat had
        # stalled, not its work): its commit stands, this result is dropped, not written twice
        log.warning("%s: shard %d was committed by the worker whose stale claim this one took "
                    "over; dropping this result", report.stage, i)
        return True
    marker = write_shard(dst, i, table, fp, quarantine=quarantine, seconds=dt, stats=stats)
    report.processed += 1
    report.rows += marker.rows
    report.quarantined += marker.quarantined
    report.seconds += dt
    for k, v in (stats or {}).items():
        if isinstance(v, (int, float)):
            report.stats[k] = report.stats.get(k, 0) + v
    return True


def _map_dynamic(stage, src, dst, config_fp, fn, make_fn, rank, world_size, columns, progress,
                 policy: claims.Assignment, report: StageReport) -> StageReport:
    """Claim uncommitted shards one at a time until every shard is committed.

    Shards held by live workers are waited for (polling), so that a worker that dies mid-shard
    is replaced once its claim goes stale. ``report.skipped`` counts the shards committed
    before this worker started; ``report.mine`` the shards it processed.
    """
    n = report.total
    owner = claims.owner_record()["owner"]
    start = (rank * n) // max(world_size, 1)  # workers start at different places
    order = [(start + k) % n for k in range(n)]
    inputs: dict = {}  # every input shard checked before any work (an engine's start)
    fps = {i: shard_fingerprint(config_fp, src, i, inputs) for i in order}
    first_pass = True
    from tqdm import tqdm

    bar = tqdm(total=n, desc=f"{stage} (dynamic)", unit="shard", disable=not progress)
    pending = list(order)
    while pending:
        left = []
        for i in pending:
            if is_done(dst, i, fps[i]):
                report.skipped += first_pass
                bar.update(1)
                continue
            claim = claims.try_claim(dst, i, policy.ttl_s, owner)
            if claim is None:
                left.append(i)
                continue
            with claim:
                if is_done(dst, i, fps[i]):  # committed by another worker since we looked
                    bar.update(1)
                    continue
                if fn is None:
                    fn = make_fn()
                if _process(fn, src, dst, i, fps[i], columns, report, claim):
                    bar.update(1)
                else:
                    left.append(i)  # the worker that took it over commits it; wait for that
        first_pass = False
        pending = left
        if pending:
            time.sleep(policy.poll)
    bar.close()
    report.mine = report.processed
    claims.clear_claims(dst, policy.ttl_s)  # every shard is committed: dead workers' claims go
    log.info(report.summary())
    return report
