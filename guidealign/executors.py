"""Executors: run one stage over all its shards, here or on a Ray cluster.

A stage is a row of the stage table (guidealign/stages.py) whose function has the signature
``fn(cfg, workdir, *, rank, world_size, progress, **options)``; ``execute`` runs a stage by
name (what every stage command calls), ``run_stage`` runs any such function.
The ``local`` executor calls it once with the rank and world size it is given, under the
shard assignment ``cfg.executor.assign`` names (static ``i mod W``, or dynamic claiming,
``shards.claims``). The ``ray`` executor runs a sharded stage on long-lived worker actors,
one engine each, that pull shards (``guidealign.ray_workers``), and a stage that is not
split by shard (ingest, library, ...) as one Ray task. Resources: per stage
(``executor.ray_resources_by_stage``), else ``executor.ray_resources``;
``executor.ray_address`` names the cluster to join, or None to start a local instance.

Nothing here keeps state of its own: the stage's shard commit markers decide what is
done. A worker that died is restarted by Ray (``executor.ray_max_restarts``) and its call
retried; a stage that raised is reported, and rerunning the same command redoes only the
shards without a marker.

Stages given as a callable must be importable on the Ray workers (a module-level
function of an installed package), or be given as a ``"module:function"`` string.
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, get_args

from guidealign.config import ExecutorKind

log = logging.getLogger(__name__)

KINDS = get_args(ExecutorKind)

# ray.remote option names that may appear in cfg.executor.ray_resources as they are;
# any other key is a custom Ray resource (e.g. {"accelerator_a100": 1}).
_RAY_OPTION_KEYS = {"num_cpus", "num_gpus", "memory", "accelerator_type", "resources",
                    "scheduling_strategy", "label_selector"}


class ExecutorError(RuntimeError):
    """Some tasks of a stage failed; the others committed their shards."""


@dataclass
class TaskResult:
    rank: int
    world_size: int
    node: str
    pid: int
    gpus: str | None
    seconds: float
    report: Any = None
    builds: int = 0  # engine builds in the worker so far (ray workers)
    worker: int | None = None  # which ray worker (actor) ran it


def resolve_stage_fn(fn: Callable | str) -> Callable:
    """A callable as is; ``"pkg.module:function"`` imported."""
    if callable(fn):
        return fn
    mod, sep, attr = str(fn).partition(":")
    if not sep:
        raise ValueError(f"stage function {fn!r} is not 'module:function'")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def ray_task_options(resources: dict | None, max_retries: int = 2) -> dict:
    """``cfg.executor.ray_resources`` -> keyword arguments for ``ray.remote(...).options``."""
    opts: dict = {"max_retries": max_retries}
    custom: dict = {}
    for k, v in (resources or {}).items():
        if k in _RAY_OPTION_KEYS:
            if k == "resources":
                custom.update(v or {})
            else:
                opts[k] = v
        else:
            custom[k] = v
    if custom:
        opts["resources"] = custom
    return opts


def init_ray(address: str | None = None, **kwargs):
    """Join the cluster at ``address`` ("auto", "ray://...", "host:port"), or start a local one.

    Reuses a Ray connection that this process already has (tests, notebooks).
    """
    import ray

    if ray.is_initialized():
        return ray
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs.setdefault("include_dashboard", False)
    ray.init(address=address, **kwargs)
    return ray


def _task_body(fn_ref, cfg, workdir: str, rank: int, world_size: int, cwd: str | None,
               kwargs: dict) -> TaskResult:
    """What one Ray task runs: the stage for one rank, in the driver's working directory."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    t0 = time.perf_counter()
    print(f"[guidealign ray] rank {rank}/{world_size} on {socket.gethostname()} "
          f"pid {os.getpid()} gpus {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}", flush=True)
    fn = resolve_stage_fn(fn_ref)
    from guidealign.shards.failure import guard

    with guard(workdir, rank, world_size, stage=_stage_name(fn_ref),
               stall_timeout_s=cfg.executor.stall_timeout_s):
        report = fn(cfg, workdir, rank=rank, world_size=world_size, progress=False, **kwargs)
    return TaskResult(rank=rank, world_size=world_size, node=socket.gethostname(),
                      pid=os.getpid(), gpus=os.environ.get("CUDA_VISIBLE_DEVICES"),
                      seconds=time.perf_counter() - t0, report=report)


def run_on_ray(fn: Callable | str, cfg, workdir: str | Path, *, n_tasks: int,
               progress: bool = True, max_retries: int = 2, init_kwargs: dict | None = None,
               stage: str | None = None, **stage_kwargs) -> list[TaskResult]:
    """Run ``fn`` as ``n_tasks`` Ray tasks (task i: ``rank=i, world_size=n_tasks``) with the
    resources of ``stage`` (default: the function's name). For stages not split by shard;
    sharded stages run on ``WorkerPool`` workers (``run_stage``).

    Returns the tasks' results in rank order. Raises ``ExecutorError`` naming the failed
    ranks once every task has finished (the others' shards stay committed).
    """
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    ex = cfg.executor
    ray = init_ray(ex.ray_address, **(init_kwargs or {}))
    from guidealign.ray_workers import resources_for, worker_env

    opts = ray_task_options(resources_for(ex, stage or _stage_name(fn)), max_retries=max_retries)
    # max_calls=1: each task in a Ray worker process of its own that exits after it. Ray makes
    # that the default only for a function declared with GPUs in ``ray.remote(...)`` itself, not
    # for GPUs asked for in ``.options``: an idle worker that ran train-retriever or index kept its
    # CUDA context and cached GPU memory for the rest of the run, where respond's engines count
    # it as taken. (A task without GPUs on a GPU node sees them all: Ray leaves
    # CUDA_VISIBLE_DEVICES unset, and the encoders take the first.)
    remote = ray.remote(max_calls=1)(_task_body).options(name=f"guidealign-{_fn_name(fn)}", **opts,
                                                         runtime_env={"env_vars": worker_env()})
    workdir = str(Path(workdir).absolute())
    cwd = os.getcwd()
    from guidealign.shards.failure import clear_all_failed

    clear_all_failed(workdir)  # this driver starts every rank: no marker is this run's yet
    log.info("ray: %d task(s) of %s with %s", n_tasks, _fn_name(fn), opts)
    refs = {remote.remote(fn, cfg, workdir, r, n_tasks, cwd, stage_kwargs): r for r in range(n_tasks)}
    results: dict[int, TaskResult] = {}
    errors: dict[int, BaseException] = {}
    pending = list(refs)
    from tqdm import tqdm

    with tqdm(total=n_tasks, desc=f"ray {_fn_name(fn)}", unit="task", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                r = refs[ref]
                try:
                    results[r] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a task error is reported with its rank
                    errors[r] = e
                    log.error("ray task rank %d failed: %s", r, e)
                bar.update(1)
    if errors:
        first = min(errors)
        raise ExecutorError(
            f"{len(errors)} of {n_tasks} Ray task(s) failed (ranks {sorted(errors)}); the other "
            f"shards are committed, so rerunning the same command redoes only the missing ones. "
            f"First error (rank {first}): {errors[first]}")
    return [results[r] for r in range(n_tasks)]


def _fn_name(fn) -> str:
    return fn if isinstance(fn, str) else getattr(fn, "__name__", "stage")


def _stage_name(fn) -> str:
    """``gen.detect:run_detect`` / ``run_train_retriever`` -> ``detect`` / ``train-retriever``."""
    name = _fn_name(fn).rpartition(":")[2].rpartition(".")[2]
    return name.removeprefix("run_").removesuffix("_stage").replace("_", "-")


def claims_assignment(cfg):
    """The ``with`` block in which map stages use ``cfg.executor.assign``."""
    from guidealign.shards import claims

    return claims.assignment(cfg.executor.assign, cfg.executor.claim_ttl_s)


def num_shards(dataset: str | Path) -> int:
    """Shards of a planned dataset (from its manifest)."""
    from guidealign.shards import read_manifest

    man = read_manifest(dataset)
    if man is None:
        raise RuntimeError(f"{dataset} has no manifest: run the stage that writes it first")
    return int(man["num_shards"])


def run_stage(fn: Callable | str, cfg, workdir: str | Path, *, rank: int | None = None,
              world_size: int | None = None, src: str | Path | None = None,
              stage: str | None = None, n_workers: int | None = None, engine: bool | None = None,
              progress: bool = True, init_kwargs: dict | None = None, **stage_kwargs):
    """Run a sharded stage with the executor that ``cfg.executor.kind`` names.

    ``local``: one call for this process's rank (explicit, else from RANK/WORLD_SIZE or
    SLURM), returning the stage's report. ``ray``: one call per ``WorkerPool`` worker
    (``n_workers``, else ``executor.ray_workers``, else what the cluster holds, at most one
    per shard of ``src``, default ``WORKDIR/prompts``); returns their ``TaskResult`` list.
    ``stage`` names the stage for its resources (default: from the function's name);
    ``engine``: hand each worker's engine to the stage as ``llm=`` (default: engine stages).
    """
    kind = cfg.executor.kind
    if kind == "local":
        from guidealign.shards import resolve_rank

        r, w = resolve_rank(rank, world_size)
        with claims_assignment(cfg):
            return resolve_stage_fn(fn)(cfg, workdir, rank=r, world_size=w, progress=progress,
                                        **stage_kwargs)
    if kind == "ray":
        from guidealign.ray_workers import WorkerPool

        stage = stage or _stage_name(fn)
        n_shards = num_shards(src if src is not None else Path(workdir) / "prompts")
        with WorkerPool(cfg, stage, n_workers, n_shards=n_shards, engine=engine,
                        init_kwargs=init_kwargs) as pool:
            return pool.run(fn, workdir, progress=progress, **stage_kwargs)
    raise ValueError(f"executor.kind must be one of {KINDS}, got {kind!r}")


# --- one stage by name: what every stage command calls --------------------------------------

def record_config(cfg, workdir, stage: str) -> None:
    """WORKDIR/_configs/<stage>.json: the config ``stage`` ran with, secrets out, which its
    dataset cards show (``shards.config_record``); a failure to write it is only logged."""
    from guidealign.config import to_dict
    from guidealign.hub.card import without_secrets
    from guidealign.shards.config_record import write_stage_config

    try:
        write_stage_config(workdir, stage, without_secrets(to_dict(cfg)))
    except OSError as e:
        log.warning("%s: could not record its config in %s: %s", stage, workdir, e)


def execute(name: str, cfg, workdir: str | Path, *, rank: int | None = None,
            world_size: int | None = None, progress: bool = True, **options) -> list:
    """Run the stage ``name`` of the stage table with ``options`` (the command's own options,
    passed to the stage function). Returns the stage's reports: one here, one per worker on Ray.

    ``executor.kind`` "local", or an explicit ``rank``, or a world size above 1 from the
    environment (RANK/WORLD_SIZE, a SLURM array, ``launch``): this process runs its rank, under
    ``executor.assign`` and the fail-fast guard (a raising rank stops the others' waits).
    "ray" otherwise: a ``map`` stage on ``WorkerPool`` workers (one engine each for engine
    stages), any other stage as one Ray task.
    """
    from guidealign.shards import claims, resolve_rank
    from guidealign.sft.launcher import started_by_run_sft
    from guidealign.shards.failure import guard
    from guidealign.shards.ranks import batch_script_refusal
    from guidealign.stages import get

    stage = get(name)
    ex = cfg.executor
    if ex.kind not in KINDS:
        raise ValueError(f"executor.kind must be one of {KINDS}, got {ex.kind!r}")
    if stage.splits_across_ranks and (why := batch_script_refusal(rank is not None or world_size is not None)):
        raise ValueError(why)  # rank 0 of n alone would do 1/n of the work
    r, w = resolve_rank(rank, world_size)
    claims.Assignment(ex.assign, ex.claim_ttl_s)  # a bad value fails before any work
    if started_by_run_sft():
        # a training process of run_sft's torchrun: RANK is its place in the training job, not a
        # pipeline rank; the pipeline rank that started torchrun holds the heartbeat and writes
        # the failure marker (as rank K this one cleared and wrote pipeline rank K's), with this
        # process's error from the error file torchrun gave it
        from guidealign.sft.launcher import record_training_error

        try:
            return [stage.function()(cfg, workdir, rank=r, world_size=w, progress=progress, **options)]
        except Exception as e:
            record_training_error(e)
            raise
    if ex.kind == "ray" and rank is None and w == 1:
        reports = _execute_on_ray(stage, cfg, workdir, progress, options)
    else:
        with guard(workdir, r, w, stage=name, stall_timeout_s=ex.stall_timeout_s), claims_assignment(cfg):
            reports = [stage.function()(cfg, workdir, rank=r, world_size=w, progress=progress, **options)]
    if r == 0:
        record_config(cfg, workdir, name)
    return reports


def _execute_on_ray(stage, cfg, workdir, progress: bool, options: dict) -> list:
    if stage.kind != "map":
        results = run_on_ray(stage.fn, cfg, workdir, n_tasks=1, progress=progress, stage=stage.name,
                             **options)
        return [r.report for r in results]
    from guidealign.ray_workers import WorkerPool, describe

    n = _input_shards(stage, cfg, Path(workdir), options)
    with WorkerPool(cfg, stage.name, n_shards=n, engine=stage.engine) as pool:
        print(f"{stage.name}: {pool.n} Ray worker(s) ({cfg.executor.assign} assignment), "
              f"resources {pool.options}", file=sys.stderr, flush=True)
        results = pool.run(stage.fn, workdir, progress=progress, **options)
    print(describe(results), file=sys.stderr, flush=True)
    return [r.report for r in results]


def _input_shards(stage, cfg, workdir: Path, options: dict) -> int:
    """Shards of a map stage's input: at most one Ray worker per shard."""
    if stage.name == "augment":
        from guidealign.gen.augment import load_risk_types

        return len(load_risk_types(cfg)[0])
    return num_shards(workdir / stage_input(stage, cfg, options))


def stage_input(stage, cfg, options: dict) -> str:
    """The dataset under WORKDIR that a map stage reads, as its stage function picks it."""
    from guidealign.config import prompt_set

    src = options.get("src") or options.get("dataset")
    if src:
        return src
    if stage.name == "detect":
        return cfg.detect.input
    if stage.name == "retrieve":
        return prompt_set(cfg, cfg.retrieve.prompts)
    if stage.name == "respond" and options.get("guided", True) is False:
        return prompt_set(cfg, cfg.respond.prompts)  # the unguided baseline reads prompts
    return stage.src
