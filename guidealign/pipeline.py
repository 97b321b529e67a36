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

from guidealign.config import Config

log = logging.getLogger(__name__)

STAGES = ["ingest", "detect", "guidelines", "library", "train-retriever", "index",
          "retrieve", "respond", "sft", "push"]
_ENGINE_STAGES = ("detect", "guidelines", "respond")


def _wait_file(path: Path, timeout: float, poll: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out waiting for {path} (written by rank 0)")
        time.sleep(poll)


def _engine_needed(workdir: Path, stages: list[str]) -> bool:
    from shards.manifest import is_complete

    return any(s in stages and not is_complete(workdir / s) for s in _ENGINE_STAGES)


def run_pipeline(cfg: Config, workdir: str | Path, *, rank: int = 0, world_size: int = 1,
                 stages: list[str] | None = None, progress: bool = True,
                 echo=print) -> dict:
    from gen.detect import run_detect
    from gen.guidelines import run_guidelines
    from gen.respond import run_respond
    from guidealign.ingest import ingest
    from retrieval.index import run_index
    from retrieval.library import run_library
    from retrieval.retrieve import run_retrieve
    from retrieval.train import run_train_retriever
    from sft.push import run_push
    from sft.train import run_sft
    from shards import wait_complete

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stages = stages or [s for s in STAGES if s != "push" or cfg.push.repo_id]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages: {STAGES}")
    wait = max(cfg.executor.wait_timeout_s, 0.0) or (0.0 if world_size == 1 else 24 * 3600)
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
        if llm is None and _engine_needed(workdir, stages):
            from gen.engine import build_llm

            llm = build_llm(cfg.engine)
        return llm

    if lead:
        step("ingest", lambda: ingest(cfg.inputs, workdir, cfg.ingest, progress=progress))
    elif "ingest" in stages:
        wait_complete(workdir / "prompts", timeout=wait)
    kw = dict(rank=rank, world_size=world_size, progress=progress)
    step("detect", lambda: run_detect(cfg, workdir, llm=engine(), **kw))
    step("guidelines", lambda: run_guidelines(cfg, workdir, llm=engine(), **kw))
    if lead:
        step("library", lambda: run_library(cfg, workdir, **kw))
        step("train-retriever", lambda: run_train_retriever(cfg, workdir, **kw))
        step("index", lambda: run_index(cfg, workdir, **kw))
    elif "index" in stages:
        _wait_file(workdir / "index" / "_done.json", wait)
    step("retrieve", lambda: run_retrieve(cfg, workdir, **kw))
    step("respond", lambda: run_respond(cfg, workdir, llm=engine(), **kw))
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
