"""``guidealign run``: the ``in_run`` stages of the stage table, in order, each skipping
what is already done.

Every rank calls every stage function: ``map`` stages (detect, guidelines, retrieve,
respond) process that rank's shards; the others (ingest, library, train-retriever, index,
sft, push) build on rank 0 while the other ranks wait inside the same function for the
result. One vLLM engine serves the engine stages of a rank; it is freed before training.
With ``executor.kind: ray`` (and one process) the same stages run on Ray: a ``map`` stage
on worker actors that keep their engine from one stage to the next, the others as one
task. A rerun after any crash keeps every committed shard and artifact and redoes the rest;
an artifact killed while it was built (library, train-retriever, index) is built again from its
start (SFT resumes from its last checkpoint).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import gc
import json
import logging
import time
from pathlib import Path

from guidealign.config import Config
from guidealign.stages import STAGES, Stage, run_stages

log = logging.getLogger(__name__)


def choose(cfg: Config, names: list[str] | None) -> list[Stage]:
    """The stages to run: ``names`` (in pipeline order) or every ``in_run`` stage."""
    default = run_stages(cfg)
    if not names:
        return default
    known = [s.name for s in STAGES if s.in_run]
    unknown = sorted(set(names) - set(known))
    if unknown:
        near = [m for u in unknown for m in difflib.get_close_matches(u, known, n=1)]
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ValueError(f"unknown stage(s) {unknown}{hint}; stages: {known}")
    return [s for s in STAGES if s.name in names]


def run_pipeline(cfg: Config, workdir: str | Path, *, rank: int = 0, world_size: int = 1,
                 stages: list[str] | None = None, progress: bool = True, echo=print,
                 init_kwargs: dict | None = None) -> dict:
    """Every chosen stage in order on this rank (or on Ray). When it raises, it leaves a
    failure marker in WORKDIR/_failed/ that makes the other ranks' waits stop at once."""
    from guidealign.shards.failure import guard

    chosen = choose(cfg, stages)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.executor.kind == "ray" and world_size == 1:
        timings = _run_on_ray(cfg, workdir, chosen, progress, echo, init_kwargs)
        extra = {"executor": "ray"}
    else:
        with guard(workdir, rank, world_size, stage="run",
                   stall_timeout_s=cfg.executor.stall_timeout_s):
            timings = _run_here(cfg, workdir, chosen, rank, world_size, progress, echo)
        extra = {"rank": rank, "world_size": world_size}
    summary = {"stages": [s.name for s in chosen], "seconds": timings, **extra,
               "total_seconds": round(time.perf_counter() - t0, 2)}
    if rank == 0:
        (workdir / "run.json").write_text(json.dumps(summary, indent=1))
    return summary


def _echo_reports(echo, reports) -> None:
    for rep in reports:
        summary = getattr(rep, "summary", None)
        if callable(summary):
            echo(summary())


def _run_here(cfg: Config, workdir: Path, chosen: list[Stage], rank: int, world_size: int,
              progress: bool, echo) -> dict:
    from guidealign.executors import claims_assignment, record_config
    from guidealign.core.stage_child import run_in_child
    from guidealign.shards.failure import set_step

    from guidealign.ray_workers import LazyEngine

    timings: dict[str, float] = {}
    llm = None  # the shared engine: built by the first of its stages with a shard to do, kept for the rest
    own = bool(cfg.respond.engine)  # the responder has an engine of its own (respond.engine)
    shared = [s for s in chosen if s.engine and not (own and s.name == "respond")]
    child, exclusive = _gpu_placement(cfg, chosen)
    try:
        with claims_assignment(cfg):
            for i, stage in enumerate(chosen):
                kw = {}
                if stage in shared:
                    # (a stage with nothing to do reads its tokenizer only: no engine starts, and
                    # the one a stage starts serves the next: detect redone after a change to its
                    # settings and guidelines after it share one)
                    if llm is None:
                        llm = LazyEngine(cfg.engine)
                    kw["llm"] = llm
                elif llm is not None and engine_goes_before(stage, chosen[i:], shared, exclusive):
                    if llm.built:
                        _stop_engine(llm, echo, f"before {stage.name}")
                    llm = None
                echo(f"== {stage.name}")
                set_step(stage.name)  # a failure marker names the stage, not only "run"
                t = time.perf_counter()
                if child and stage.cuda_here:
                    rep = run_in_child(stage.fn, cfg, workdir, rank=rank, world_size=world_size,
                                       progress=progress)
                else:
                    rep = stage.function()(cfg, workdir, rank=rank, world_size=world_size,
                                           progress=progress, **kw)
                timings[stage.name] = round(time.perf_counter() - t, 2)
                if rank == 0:
                    record_config(cfg, workdir, stage.name)
                _echo_reports(echo, [rep])
    finally:
        if llm is not None and llm.built:
            _stop_engine(llm, echo, "at the end of the run")
    return timings


def engine_goes_before(stage: Stage, rest: list[Stage], shared: list[Stage], exclusive: bool) -> bool:
    """Whether the shared engine is stopped before ``stage`` (not one of ``shared``; ``rest``:
    it and the stages after it), to free its memory and GPUs: for another engine, when no
    stage left uses it, and, on GPUs that admit one process (``exclusive``), for an encoder
    stage (it is started again for respond)."""
    return stage.engine or not any(s in shared for s in rest) or (exclusive and stage.cuda_here)


def _gpu_placement(cfg: Config, chosen: list[Stage]) -> tuple[bool, bool]:
    """(call the ``cuda_here`` stages in child processes, the GPUs admit one process at a time)."""
    from guidealign.core.gpu import exclusive_gpus, visible_gpus
    from guidealign.core.stage_child import wanted

    if not any(s.cuda_here for s in chosen):
        return False, False
    visible = functools.cache(visible_gpus)  # nvidia-smi asked at most once, and only if needed
    child = wanted(cfg.executor.stage_process, visible)
    exclusive = exclusive_gpus(visible()) if child and visible() else []
    if exclusive:
        log.warning("GPU(s) %s in EXCLUSIVE_PROCESS compute mode: the engine is stopped before the "
                    "encoder stages and started again for respond", ",".join(exclusive))
    return child, bool(exclusive)


def _stop_engine(llm, echo, when: str) -> None:
    """Stop the (built) shared engine's processes (dropping the ``LLM`` would leave them running)
    and say so."""
    left = llm.close()
    echo(f"engine stopped {when}: " + (f"{left} of its processes still alive after 60 s, killed"
                                       if left else "its processes have exited"))
    gc.collect()


def _pool_key(cfg: Config, stage: Stage) -> tuple:
    """Workers are kept for the next stage only when it asks for the same resources and the
    same engine (the responder's engine may be another model: respond.engine)."""
    from guidealign.ray_workers import engine_config, resources_for

    engine = (json.dumps(dataclasses.asdict(engine_config(cfg, stage.name)), sort_keys=True)
              if stage.engine else None)
    return json.dumps(resources_for(cfg.executor, stage.name), sort_keys=True), engine


def _run_on_ray(cfg: Config, workdir: Path, chosen: list[Stage], progress: bool, echo,
                init_kwargs: dict | None) -> dict:
    """A ``map`` stage on ``WorkerPool`` workers (one engine each, kept from one stage to the
    next while the stages' resources are the same: detect -> guidelines), the others as one
    task. Every worker skips committed shards, so a rerun after a crash (of a worker or of
    this driver) continues."""
    from guidealign.executors import _input_shards, record_config, run_on_ray
    from guidealign.ray_workers import WorkerPool

    timings: dict[str, float] = {}
    pool, pool_key = None, None
    try:
        for stage in chosen:
            echo(f"== {stage.name} (ray)")
            t0 = time.perf_counter()
            if stage.kind == "map":
                key = _pool_key(cfg, stage)
                if pool is None or key != pool_key:
                    if pool is not None:
                        pool.close()
                    pool, pool_key = None, None
                    pool = WorkerPool(cfg, stage.name, n_shards=_input_shards(stage, cfg, workdir, {}),
                                      engine=stage.engine, init_kwargs=init_kwargs)
                    pool_key = key
                results = pool.run(stage.fn, workdir, stage=stage.name, progress=progress)
            else:
                if pool is not None:  # free the workers' engines and GPUs first
                    pool.close()
                    pool, pool_key = None, None
                results = run_on_ray(stage.fn, cfg, workdir, n_tasks=1, progress=progress,
                                     init_kwargs=init_kwargs, stage=stage.name)
            timings[stage.name] = round(time.perf_counter() - t0, 2)
            record_config(cfg, workdir, stage.name)
            _echo_reports(echo, [r.report for r in results])
    except BaseException:  # Ctrl-C, a failed stage: the workers end now, not after their stage
        if pool is not None:
            pool.close(interrupted=True)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()
    return timings
