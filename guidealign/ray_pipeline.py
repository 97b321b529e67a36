"""``guidealign run --executor ray``: every stage in pipeline order on a Ray cluster.

Per-prompt stages run on ``WorkerPool`` workers (one engine each, pulling shards); the
stages that are not split by shard run as one Ray task each.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


# (stage, "module:function", split by shard?) in pipeline order (guidealign.pipeline.STAGES).
PIPELINE_RAY = [
    ("ingest", "guidealign.ray_pipeline:ingest_stage", False),
    ("detect", "guidealign.gen.detect:run_detect", True),
    ("guidelines", "guidealign.gen.guidelines:run_guidelines", True),
    ("library", "guidealign.retrieval.library:run_library", False),
    ("train-retriever", "guidealign.retrieval.train:run_train_retriever", False),
    ("index", "guidealign.retrieval.index:run_index", False),
    ("retrieve", "guidealign.retrieval.retrieve:run_retrieve", True),
    ("respond", "guidealign.gen.respond:run_respond", True),
    ("sft", "guidealign.sft.train:run_sft", False),
    ("push", "guidealign.ray_pipeline:push_stage", False),
]


def ingest_stage(cfg, workdir, *, rank: int = 0, world_size: int = 1, progress: bool = True):
    """Ingest with the stage signature (it always runs as one task)."""
    from guidealign.ingest.run import ingest

    return ingest(cfg.inputs, workdir, cfg.ingest, progress=progress)


def push_stage(cfg, workdir, *, rank: int = 0, world_size: int = 1, progress: bool = True):
    from guidealign.hub.push import run_push

    return run_push(cfg, workdir)


def run_pipeline_ray(cfg, workdir: str | Path, *, stages: list[str] | None = None,
                     progress: bool = True, echo=print, init_kwargs: dict | None = None) -> dict:
    """``guidealign run --executor ray``: the stages in order; a per-prompt stage on
    ``WorkerPool`` workers (one engine each, kept from one stage to the next while the
    stages' resources are the same: detect -> guidelines), the others as one task. Every
    worker skips committed shards, so a rerun after a crash (of a worker or of this driver)
    continues."""
    from guidealign.executors import num_shards, run_on_ray
    from guidealign.ray_workers import ENGINE_STAGES, WorkerPool, resources_for

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    known = [name for name, _, _ in PIPELINE_RAY]
    stages = stages or [s for s in known if s != "push" or cfg.push.repo_id]
    unknown = set(stages) - set(known)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages: {known}")
    timings: dict[str, float] = {}
    pool, pool_key = None, None
    try:
        for name, fn, split in PIPELINE_RAY:
            if name not in stages:
                continue
            echo(f"== {name} (ray)")
            t0 = time.perf_counter()
            if split:
                key = (json.dumps(resources_for(cfg.executor, name), sort_keys=True),
                       name in ENGINE_STAGES)
                if pool is None or key != pool_key:
                    if pool is not None:
                        pool.close()
                    pool, pool_key = None, None
                    pool = WorkerPool(cfg, name, n_shards=num_shards(workdir / "prompts"),
                                      engine=key[1], init_kwargs=init_kwargs)
                    pool_key = key
                results = pool.run(fn, workdir, stage=name, progress=progress)
            else:
                if pool is not None:  # free the workers' engines and GPUs first
                    pool.close()
                    pool, pool_key = None, None
                results = run_on_ray(fn, cfg, workdir, n_tasks=1, progress=progress,
                                     init_kwargs=init_kwargs, stage=name)
            timings[name] = round(time.perf_counter() - t0, 2)
            for res in results:
                summary = getattr(res.report, "summary", None)
                if callable(summary):
                    echo(summary())
    finally:
        if pool is not None:
            pool.close()
    summary = {"stages": stages, "seconds": timings, "executor": "ray"}
    (workdir / "run.json").write_text(json.dumps(summary, indent=1))
    return summary
