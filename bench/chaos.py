"""Crash every stage at random moments and check that resume loses, repeats and changes nothing.

    .venv/bin/python bench/chaos.py                       # every stage, 20 kills each
    .venv/bin/python bench/chaos.py --kills 3 --stages ingest,detect,library
    .venv/bin/python bench/chaos.py --prompts 16 --shard-rows 2 --json out.json

First an uninterrupted reference run of the whole pipeline (ingest ... sft) on the first
``--prompts`` sample prompts, with many small shards, the embedded models, float32 and
temperature 0 (so every output is reproducible), each stage a ``guidealign <stage>``
subprocess whose wall time is measured. Then, per chaos stage, in a fresh run directory that
holds copies of the reference's upstream outputs: start the stage, SIGKILL its process group
(the first time right after the stage writes its first shard marker, mid-stage, the case resume
must get right; then after seeded random delays within the measured uninterrupted time),
and repeat until ``--kills`` kills have landed (a run that finishes before its kill ends an episode: it is compared with
the reference and the stage output is removed for the next episode). The last episode is run
to completion, rerun once more (a finished stage must do nothing), compared with the
reference and checked with ``guidealign verify``'s checker.

Printed per stage: kills (``partial``: kills that left the stage incomplete; ``mid``: of those,
kills after some of its shards were written), rows lost, rows
duplicated, rows whose text/ids differ from the reference, orphan temp files left at the end,
shards (or artifacts) rewritten after they were committed, verify failures. Exit status 1 when
any row is lost, duplicated or differs, or a committed shard is rewritten.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Stage:
    name: str                     # CLI command
    out: str                      # output dir under WORKDIR
    kind: str                     # map | dataset (reduce, sharded) | artifact
    key: str = "id"
    cols: tuple = ()              # compared exactly
    float_cols: tuple = ()        # compared within --tol


STAGES = [
    Stage("ingest", "prompts", "map", cols=("prompt", "source")),
    Stage("detect", "detect", "map", cols=("risky", "rationale", "raw", "finish_reason")),
    Stage("guidelines", "guidelines", "map", cols=("risky", "kind", "guidelines", "raw")),
    Stage("library", "library", "dataset", key="guideline_id",
          cols=("title", "text", "kind", "members", "prompt_ids")),
    Stage("train-retriever", "retriever", "artifact"),
    Stage("index", "index", "artifact"),
    Stage("retrieve", "retrieve", "map", cols=("guideline_ids", "guideline_texts"),
          float_cols=("scores",)),
    Stage("respond", "respond", "map", cols=("guideline_ids", "response", "finish_reason")),
    Stage("sft", "sft", "artifact"),
]
BY_NAME = {s.name: s for s in STAGES}


@dataclass
class Result:
    stage: str
    kills: int = 0
    partial: int = 0              # kills after which the stage was left incomplete
    mid: int = 0                  # ... with some of its shards written
    episodes: int = 0             # runs that reached completion and were compared
    lost: int = 0
    duplicated: int = 0
    extra: int = 0                # rows the reference does not have
    differ: int = 0               # rows whose compared columns differ
    orphans: int = 0              # temp files left after the final run
    rewritten: int = 0            # committed shards/artifacts whose marker changed on resume
    verify_failures: int = 0
    artifact_identical: bool | None = None
    ref_seconds: float = 0.0
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def bad(self) -> bool:
        return bool(self.lost or self.duplicated or self.extra or self.differ or self.rewritten)


# --- running stages ---------------------------------------------------------------------
def stage_cmd(st: Stage, workdir: Path, args) -> list[str]:
    cmd = [str(REPO / ".venv" / "bin" / "guidealign"), st.name, "-w", str(workdir),
           "-c", str(REPO / args.config), "--no-progress"]
    if st.name == "ingest":
        cmd.insert(2, str(args.input))
    for s in overrides(args):
        cmd += ["--set", s]
    return cmd


def overrides(args) -> list[str]:
    out = [f"ingest.shard_rows={args.shard_rows}", "engine.dtype=float32",
           "detect.sampling.temperature=0", "guidelines.sampling.temperature=0",
           "respond.sampling.temperature=0", "library.shard_rows=4",
           f"library.threads={args.threads}", f"retriever.threads={args.threads}",
           f"index.threads={args.threads}", f"retrieve.threads={args.threads}",
           f"sft.num_threads={args.threads}", "retriever.epochs=1",
           # responses cut at --respond-tokens still train: SFT's crash and resume are what is
           # tested, and with every response cut (the model's wording decides) it had no example
           "sft.keep_finish_reasons=[stop, length]"]
    for stage, n in (("detect", args.detect_tokens), ("guidelines", args.guidelines_tokens),
                     ("respond", args.respond_tokens)):
        if n:
            out.append(f"{stage}.sampling.max_tokens={n}")
    return out + list(args.set)


def env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return e


def run_stage(st: Stage, workdir: Path, args, log: Path, kill_after: float | str | None = None):
    """Run the stage; SIGKILL its process group after ``kill_after`` s, or with
    ``kill_after="commit"`` as soon as a new shard marker or ``_done.json`` appears (for a
    reduce stage: its shards moved into place, not yet committed). Returns (killed, rc, s)."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n=== {' '.join(stage_cmd(st, workdir, args))} (kill after {kill_after})\n")
        f.flush()
        before = written_records(st, workdir) if kill_after == "commit" else None
        p = subprocess.Popen(stage_cmd(st, workdir, args), cwd=REPO, env=env(), stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
        rc = _wait(p, kill_after, lambda: written_records(st, workdir) != before)
        if rc is not None:
            return False, rc, time.perf_counter() - t0
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        _reap_group(p.pid)
        return True, -9, time.perf_counter() - t0


def _wait(p: subprocess.Popen, kill_after, wrote) -> int | None:
    """``p``'s exit status, or None when it is to be killed: after ``kill_after`` s, or with
    ``kill_after="commit"`` once ``wrote()`` (polled every 20 ms) is true."""
    while True:
        try:
            return p.wait(timeout=0.02 if kill_after == "commit" else kill_after)
        except subprocess.TimeoutExpired:
            if kill_after != "commit" or wrote():
                return None


def _reap_group(pgid: int) -> None:
    """Wait until every process of the killed group is gone (an engine process included)."""
    for _ in range(100):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.05)


# --- state of a stage's output ----------------------------------------------------------
def commit_records(st: Stage, workdir: Path) -> dict:
    """What is committed now: {shard index: (sha256, created)} and/or {"_done": text}. A map
    stage commits shard by shard; a reduce stage or an artifact is built in a temp dir, moved
    into place and committed by its ``_done.json`` (until then it is rebuilt on resume, and
    nothing waits for it), so before that nothing of it counts as committed."""
    out = written_records(st, workdir)
    return out if st.kind == "map" or "_done" in out else {}


def written_records(st: Stage, workdir: Path) -> dict:
    """The shard markers and ``_done.json`` present now, committed or not."""
    from guidealign.shards.layout import shard_indices
    from guidealign.shards.marker import read_marker

    d = workdir / st.out
    out = {}
    for i in shard_indices(d):
        m = read_marker(d, i)
        if m is not None:
            out[i] = (m.sha256, m.created)
    done = d / "_done.json"
    if done.exists():
        out["_done"] = done.read_text()
    return out


def is_complete(st: Stage, workdir: Path) -> bool:
    from guidealign.shards.manifest import is_complete as complete

    d = workdir / st.out
    if st.kind == "map":
        return complete(d)
    return (d / "_done.json").exists()


def orphan_temps(workdir: Path) -> list[str]:
    from guidealign.shards.verify import is_temp_name

    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if is_temp_name(p.name))


def dataset_rows(d: Path, st: Stage) -> list[dict]:
    from guidealign.shards.read import committed, read_table

    rows = []
    for i in committed(d):
        rows.extend(read_table(d, i).to_pylist())
    return rows


def artifact_digest(d: Path) -> dict:
    from guidealign.shards.artifact_files import file_checksums

    skip = {"_done.json", "metrics.json", "report.json", "README.md"}  # hold timings
    return {k: v["sha256"] for k, v in file_checksums(d).items()
            if Path(k).name not in skip and not k.startswith("checkpoints/")}


def compare(st: Stage, ref: Path, got: Path, args, res: Result) -> None:
    if st.kind == "artifact":
        rd, gd = json.loads((ref / st.out / "_done.json").read_text()), \
            json.loads((got / st.out / "_done.json").read_text())
        n_ref, n_got = int(rd.get("rows", 0)), int(gd.get("rows", 0))
        res.lost += max(0, n_ref - n_got)
        res.extra += max(0, n_got - n_ref)
        if st.out == "index":
            a = dataset_like_rows(ref / "index" / "rows.parquet")
            b = dataset_like_rows(got / "index" / "rows.parquet")
            _compare_rows(a, b, "guideline_id", ("text", "kind"), (), args, res)
        same = artifact_digest(ref / st.out) == artifact_digest(got / st.out)
        res.artifact_identical = same if res.artifact_identical is None else \
            (res.artifact_identical and same)
        return
    a, b = dataset_rows(ref / st.out, st), dataset_rows(got / st.out, st)
    _compare_rows(a, b, st.key, st.cols, st.float_cols, args, res)


def dataset_like_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _close(x, y, tol) -> bool:
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(u, v, tol) for u, v in zip(x, y))
    if x is None or y is None:
        return x is y
    return abs(float(x) - float(y)) <= tol


def _compare_rows(a: list[dict], b: list[dict], key: str, cols, float_cols, args, res) -> None:
    ref = {r[key]: r for r in a}
    ids = [r[key] for r in b]
    res.duplicated += len(ids) - len(set(ids))
    res.lost += len(set(ref) - set(ids))
    res.extra += len(set(ids) - set(ref))
    got = {r[key]: r for r in b}
    for k in set(ref) & set(got):
        x, y = ref[k], got[k]
        if any(x.get(c) != y.get(c) for c in cols) or \
                any(not _close(x.get(c), y.get(c), args.tol) for c in float_cols):
            res.differ += 1
            if len(res.notes) < 5:
                res.notes.append(f"{key}={k} differs")


# --- the chaos loop ---------------------------------------------------------------------
def prepare_dir(st: Stage, ref: Path, dst: Path) -> None:
    """A fresh run directory holding the reference's outputs of every stage before ``st``."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for up in STAGES[:STAGES.index(st)]:
        if (ref / up.out).exists():
            shutil.copytree(ref / up.out, dst / up.out, symlinks=True)


def reset_stage(st: Stage, workdir: Path) -> None:
    shutil.rmtree(workdir / st.out, ignore_errors=True)
    for p in workdir.iterdir():  # artifact temp dirs live beside the final dir
        if p.name.startswith(f".{st.out}."):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


def check_rewrites(before: dict, after: dict, res: Result) -> None:
    for k, v in before.items():
        if k in after and after[k] != v:
            res.rewritten += 1
            res.notes.append(f"committed {'_done.json' if k == '_done' else f'shard {k}'} "
                             "rewritten on resume")


def chaos_stage(st: Stage, ref: Path, root: Path, ref_seconds: float, args, rng) -> Result:
    res = Result(stage=st.name, ref_seconds=round(ref_seconds, 1))
    w = root / f"chaos-{st.name}"
    prepare_dir(st, ref, w)
    log = root / f"chaos-{st.name}.log"
    t0 = time.perf_counter()
    before = commit_records(st, w)
    while True:
        finishing = res.kills >= args.kills
        delay = None if finishing else "commit" if res.kills == 0 else rng.uniform(0.0, ref_seconds)
        killed, rc, _ = run_stage(st, w, args, log, kill_after=delay)
        after = commit_records(st, w)
        check_rewrites(before, after, res)
        before = after
        if killed:
            res.kills += 1
            if not is_complete(st, w):
                res.partial += 1
                res.mid += any(k != "_done" for k in written_records(st, w))
            continue
        if rc != 0:
            res.notes.append(f"run exited {rc}; see {log}")
            res.differ += 1
            break
        res.episodes += 1
        if finishing:
            # a finished stage must do nothing when rerun (and must not fail)
            killed, rc, _ = run_stage(st, w, args, log)
            if rc != 0:
                res.notes.append(f"rerun of the finished stage exited {rc}; see {log}")
                res.differ += 1
            check_rewrites(before, commit_records(st, w), res)
            compare(st, ref, w, args, res)
            break
        compare(st, ref, w, args, res)
        reset_stage(st, w)
        before = {}
    res.orphans = len(orphan_temps(w))
    from guidealign.shards.verify import verify_run

    vr = verify_run(w)
    res.verify_failures = len([p for p in vr.failing if p.kind != "orphan"])
    res.seconds = round(time.perf_counter() - t0, 1)
    return res


def build_reference(root: Path, args, upto: list[Stage]) -> dict[str, float]:
    """The uninterrupted run, stage by stage; with ``--reuse``, stages a previous reference in
    the same work dir completed with the same settings are kept (their times too)."""
    ref, record = root / "reference", root / "reference.json"
    settings = [overrides(args), args.prompts, args.config]
    old = json.loads(record.read_text()) if args.reuse and record.exists() else {}
    if old.get("settings") != settings:
        old = {}
        if ref.exists():
            shutil.rmtree(ref)
    ref.mkdir(parents=True, exist_ok=True)
    secs = dict(old.get("seconds", {}))
    for st in upto:
        if st.name in secs and is_complete(st, ref):
            print(f"reference {st.name}: reused ({secs[st.name]:.1f} s)", flush=True)
            continue
        killed, rc, s = run_stage(st, ref, args, root / "reference.log")
        if rc != 0:
            raise SystemExit(f"reference run of {st.name} failed (exit {rc}); see {root}/reference.log")
        secs[st.name] = s
        record.write_text(json.dumps({"settings": settings, "seconds": secs}))
        print(f"reference {st.name}: {s:.1f} s", flush=True)
    return secs


def render(results: list[Result]) -> str:
    head = ("stage", "kills", "partial", "mid", "episodes", "lost", "dup", "extra", "differ", "orphans",
            "rewritten", "verify", "artifact same", "ref s", "chaos s")
    rows = [head] + [(r.stage, r.kills, r.partial, r.mid, r.episodes, r.lost, r.duplicated, r.extra,
                      r.differ, r.orphans, r.rewritten, r.verify_failures,
                      "-" if r.artifact_identical is None else ("yes" if r.artifact_identical else "no"),
                      r.ref_seconds, r.seconds) for r in results]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(widths[i]) if i else str(v).ljust(widths[i])
                       for i, v in enumerate(row)) for row in rows]
    for r in results:
        lines += [f"  {r.stage}: {n}" for n in r.notes[:5]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs per stage (default 20)")
    ap.add_argument("--stages", default=",".join(s.name for s in STAGES),
                    help="comma-separated chaos stages (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=24, help="sample prompts to use (default 24)")
    ap.add_argument("--shard-rows", type=int, default=3, help="ingest.shard_rows (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the reduce stages")
    ap.add_argument("--detect-tokens", type=int, default=48, help="detect max_tokens (0: config)")
    ap.add_argument("--guidelines-tokens", type=int, default=0, help="guidelines max_tokens")
    ap.add_argument("--respond-tokens", type=int, default=64, help="respond max_tokens")
    ap.add_argument("--tol", type=float, default=0.0, help="tolerance for float columns")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temp dir, removed")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--reuse", action="store_true",
                    help="keep reference stages a previous run in --workdir completed with the "
                         "same settings")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    chosen = [BY_NAME[n] for n in args.stages.split(",") if n]
    unknown = [n for n in args.stages.split(",") if n and n not in BY_NAME]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; known: {list(BY_NAME)}")
    import tempfile

    root = args.workdir or Path(tempfile.mkdtemp(prefix="ga-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    lines = (REPO / "data" / "samples" / "prompts.jsonl").read_text().splitlines()[:args.prompts]
    args.input = root / "prompts.jsonl"
    args.input.write_text("\n".join(lines) + "\n")
    last = max(STAGES.index(s) for s in chosen)
    t0 = time.perf_counter()
    print(f"chaos: {len(lines)} prompts, {args.shard_rows} per shard, {args.kills} kills per stage, "
          f"seed {args.seed}, in {root}", flush=True)
    ref_secs = build_reference(root, args, STAGES[:last + 1])
    rng = random.Random(args.seed)
    results = []
    for st in chosen:
        r = chaos_stage(st, root / "reference", root, ref_secs[st.name], args, rng)
        results.append(r)
        print(f"{st.name}: {r.kills} kills, {r.lost} lost, {r.duplicated} dup, {r.differ} differ, "
              f"{r.rewritten} rewritten, {r.orphans} orphans ({r.seconds:.0f} s)", flush=True)
    print()
    print(render(results))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    if not args.keep and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if any(r.bad for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
