"""``guidealign run``: every stage in order, each skipping what is already done.

Per-prompt stages (detect, guidelines, retrieve, respond) run on every rank over that
rank's shards. Stages that need all shards of the stage before them (library,
train-retriever, index, sft, push) run on rank 0 after waiting for their inputs; the
other ranks wait for rank 0's result. A rerun after any crash continues where it stopped.
"""
from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

from guidealign.config import Config, wait_timeout

log = logging.getLogger(__name__)

STAGES = ["ingest", "detect", "guidelines", "library", "train-retriever", "index",
          "retrieve", "respond", "sft", "push"]
_ENGINE_STAGES = ("detect", "guidelines", "respond")


def _wait_file(path: Path, timeout: float, poll: float = 5.0, *, accept=None,
               workdir: Path | None = None) -> dict:
    """Wait for rank 0's ``_done.json`` at ``path``, until ``accept(done)`` (default: any),
    aborting when a rank of the run failed or nothing moved for executor.stall_timeout_s."""
    from guidealign.shards.failure import Watch, waiting

    deadline = time.monotonic() + timeout
    watch = Watch(workdir or path.parent.parent, str(path))
    with waiting(str(path)):
        while True:
            try:
                done = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                done = None
            if done is not None and (accept is None or accept(done)):
                return done
            why = "not written yet" if done is None else (accept.__doc__ or "not accepted").strip()
            what = f"{path} ({why})"
            if time.monotonic() >= deadline:
                raise RuntimeError(f"timed out waiting for {what} (written by rank 0)")
            watch.check(None if done is None else done.get("fingerprint"), what)
            time.sleep(poll)


def _wait_index(cfg: Config, workdir: Path, timeout: float, poll: float = 5.0) -> dict:
    """What a non-lead rank waits for before retrieve: rank 0's index, accepted only when it
    was built from the library of the current guideline shards and library config (a rerun
    with a changed config never retrieves from the previous run's index)."""
    from guidealign.retrieval.library import library_dir, library_fingerprint
    from guidealign.shards import wait_complete

    src = workdir / cfg.library.src
    wait_complete(src, timeout=timeout, poll=poll)  # current guideline shards only
    want = library_fingerprint(cfg.library, src)

    def current(done: dict) -> bool:
        """built from another library version than the current one"""
        try:
            lib = json.loads((library_dir(workdir) / "_done.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return lib.get("fingerprint") == want and done.get("library_version") == lib.get("version")

    return _wait_file(workdir / "index" / "_done.json", timeout, poll, accept=current, workdir=workdir)


def _engine_needed(workdir: Path, stages: list[str]) -> bool:
    from guidealign.shards.manifest import is_complete

    return any(s in stages and not is_complete(workdir / s) for s in _ENGINE_STAGES)


def run_pipeline(cfg: Config, workdir: str | Path, *, rank: int = 0, world_size: int = 1,
                 stages: list[str] | None = None, progress: bool = True,
                 echo=print) -> dict:
    """Every stage in order on this rank. When it raises, it leaves a failure marker in
    WORKDIR/_failed/ that makes the other ranks' waits stop at once (shards/failure.py)."""
    from guidealign.shards.failure import guard

    with guard(workdir, rank, world_size, stage="run", stall_timeout_s=cfg.executor.stall_timeout_s):
        return _run_stages(cfg, workdir, rank=rank, world_size=world_size, stages=stages,
                           progress=progress, echo=echo)


def _run_stages(cfg: Config, workdir: str | Path, *, rank: int = 0, world_size: int = 1,
                stages: list[str] | None = None, progress: bool = True,
                echo=print) -> dict:
    from guidealign.gen.detect import run_detect
    from guidealign.gen.guidelines import run_guidelines
    from guidealign.gen.respond import run_respond
    from guidealign.ingest.run import ingest
    from guidealign.retrieval.index import run_index
    from guidealign.retrieval.library import run_library
    from guidealign.retrieval.retrieve import run_retrieve
    from guidealign.retrieval.train import run_train_retriever
    from guidealign.hub.push import run_push
    from guidealign.sft.train import run_sft
    from guidealign.shards import wait_complete

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stages = stages or [s for s in STAGES if s != "push" or cfg.push.repo_id]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages: {STAGES}")
    # several ranks: no clock of its own; a wait ends on a failed rank or stalled progress
    wait = wait_timeout(cfg, world_size)
    lead = rank == 0
    timings: dict[str, float] = {}
    reports: dict[str, object] = {}
    llm = None

    def step(name, fn):
        if name not in stages:
            return
        t = time.perf_counter()
        echo(f"== {name}")
        reports[name] = fn()
        timings[name] = round(time.perf_counter() - t, 2)
        summary = getattr(reports[name], "summary", None)
        if callable(summary):
            echo(summary())

    def engine():
        nonlocal llm
        own = cfg.respond.engine  # respond.engine: the responder has its own engine
        if llm is None and _engine_needed(workdir, [s for s in stages if not (own and s == "respond")]):
            from guidealign.gen.engine import build_llm

            llm = build_llm(cfg.engine)
        return llm

    if lead:
        step("ingest", lambda: ingest(cfg.inputs, workdir, cfg.ingest, progress=progress))
        if cfg.inputs_sft and "ingest" in stages:  # the paper's second set: fine-tuning prompts
            reports["ingest-sft"] = ingest(cfg.inputs_sft, workdir, cfg.ingest, progress=progress,
                                           dataset="prompts-sft")
            echo(reports["ingest-sft"].summary())
    elif "ingest" in stages:
        wait_complete(workdir / "prompts", timeout=wait)
        if cfg.inputs_sft:
            wait_complete(workdir / "prompts-sft", timeout=wait)
    kw = dict(rank=rank, world_size=world_size, progress=progress)
    step("detect", lambda: run_detect(cfg, workdir, llm=engine(), **kw))
    step("guidelines", lambda: run_guidelines(cfg, workdir, llm=engine(), **kw))
    if lead:
        step("library", lambda: run_library(cfg, workdir, **kw))
        step("train-retriever", lambda: run_train_retriever(cfg, workdir, **kw))
        step("index", lambda: run_index(cfg, workdir, **kw))
    elif "index" in stages:
        _wait_index(cfg, workdir, wait)
    step("retrieve", lambda: run_retrieve(cfg, workdir, **kw))
    if cfg.respond.engine and llm is not None and "respond" in stages:  # free it for the responder
        del llm
        llm = None
        gc.collect()
    step("respond", lambda: run_respond(cfg, workdir, llm=None if cfg.respond.engine else engine(), **kw))
    if llm is not None:  # free the engine's memory before training
        del llm
        llm = None
        gc.collect()
    if lead:
        if "sft" in stages:
            wait_complete(workdir / "respond", timeout=wait)
        step("sft", lambda: run_sft(cfg, workdir, **kw))
        step("push", lambda: run_push(cfg, workdir))
    summary = {"stages": stages, "seconds": timings, "rank": rank, "world_size": world_size}
    if lead:
        (workdir / "run.json").write_text(json.dumps(summary, indent=1))
    return summary
