"""Executors: run one sharded stage over all its shards, here or on a Ray cluster.

A stage is a function ``run_<stage>(cfg, workdir, *, rank, world_size, progress)``.
The ``local`` executor calls it once with the rank and world size it is given. The
``ray`` executor starts one Ray task per shard of the stage's input: task ``i`` calls
the stage with ``rank=i, world_size=n_shards``, so it owns exactly shard ``i``
(``shards.my_shards``). Each task asks for ``cfg.executor.ray_resources`` (e.g.
``{"num_gpus": 1}``); ``cfg.executor.ray_address`` names the cluster to join, or None
to start a local instance.

Nothing here keeps state of its own: the stage's shard commit markers decide what is
done. A task whose worker died is retried by Ray (``max_retries``); a task that raised
is reported, and rerunning the same command redoes only the shards without a marker.

Stages given as a callable must be importable on the Ray workers (a module-level
function of an installed package), or be given as a ``"module:function"`` string.
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

KINDS = ("local", "ray")

# Stages that are not split by shard (they read every shard, or make one artifact):
# under ``--executor ray`` they run as a single task (rank 0 of 1) with the task resources.
SINGLE_TASK_STAGES = {"ingest", "library", "train-retriever", "index", "sft", "push", "eval"}
# Commands that do their own Ray scheduling (stage by stage) instead of being one task.
SELF_SCHEDULING = {"run"}

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
    report = fn(cfg, workdir, rank=rank, world_size=world_size, progress=False, **kwargs)
    return TaskResult(rank=rank, world_size=world_size, node=socket.gethostname(),
                      pid=os.getpid(), gpus=os.environ.get("CUDA_VISIBLE_DEVICES"),
                      seconds=time.perf_counter() - t0, report=report)


def run_on_ray(fn: Callable | str, cfg, workdir: str | Path, *, n_tasks: int,
               progress: bool = True, max_retries: int = 2, init_kwargs: dict | None = None,
               **stage_kwargs) -> list[TaskResult]:
    """Run ``fn`` as ``n_tasks`` Ray tasks (task i: ``rank=i, world_size=n_tasks``).

    Returns the tasks' results in rank order. Raises ``ExecutorError`` naming the failed
    ranks once every task has finished (the others' shards stay committed).
    """
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    ex = cfg.executor
    ray = init_ray(ex.ray_address, **(init_kwargs or {}))
    opts = ray_task_options(ex.ray_resources, max_retries=max_retries)
    remote = ray.remote(_task_body).options(name=f"guidealign-{_fn_name(fn)}", **opts)
    workdir = str(Path(workdir).absolute())
    cwd = os.getcwd()
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


def num_shards(dataset: str | Path) -> int:
    """Shards of a planned dataset (from its manifest)."""
    from shards import read_manifest

    man = read_manifest(dataset)
    if man is None:
        raise RuntimeError(f"{dataset} has no manifest: run the stage that writes it first")
    return int(man["num_shards"])


def run_stage(fn: Callable | str, cfg, workdir: str | Path, *, rank: int | None = None,
              world_size: int | None = None, src: str | Path | None = None,
              n_tasks: int | None = None, progress: bool = True, **stage_kwargs):
    """Run a stage with the executor that ``cfg.executor.kind`` names.

    ``local``: one call for this process's rank (explicit, else from RANK/WORLD_SIZE or
    SLURM), returning the stage's report. ``ray``: one task per shard of ``src`` (the
    stage's input dataset; default ``WORKDIR/prompts``, whose shard count every per-prompt
    stage shares), or ``n_tasks`` tasks; returns the list of ``TaskResult``.
    """
    kind = cfg.executor.kind
    if kind == "local":
        from shards import resolve_rank

        r, w = resolve_rank(rank, world_size)
        return resolve_stage_fn(fn)(cfg, workdir, rank=r, world_size=w, progress=progress,
                                    **stage_kwargs)
    if kind == "ray":
        if n_tasks is None:
            n_tasks = num_shards(src if src is not None else Path(workdir) / "prompts")
        return run_on_ray(fn, cfg, workdir, n_tasks=n_tasks, progress=progress, **stage_kwargs)
    raise ValueError(f"executor.kind must be one of {KINDS}, got {kind!r}")


# --- the CLI side: `guidealign <stage> --executor ray` ---------------------------------------

_PATH_PARAMS = ("workdir", "config_path", "out", "benchmark_file", "guided_responses",
                "unguided_responses")


def _command_path(ctx) -> list[str]:
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return names[::-1]


def _invoke_command(path: list[str], params: dict, cwd: str | None):
    """Run a registered guidealign command's callback with ``params`` (inside a Ray task)."""
    import click

    from guidealign.cli import cli

    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    cmd = cli
    for name in path:
        cmd = cmd.get_command(click.Context(cmd), name)
        if cmd is None:
            raise RuntimeError(f"no guidealign command {' '.join(path)!r} on this worker")
    print(f"[guidealign ray] {' '.join(path)} rank {params.get('rank')}/{params.get('world_size')} "
          f"on {socket.gethostname()} pid {os.getpid()} "
          f"gpus {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}", flush=True)
    with click.Context(cmd, info_name=path[-1]) as ctx:
        return ctx.invoke(cmd.callback, **params)


def cli_num_tasks(stage: str, cfg, workdir: Path, params: dict) -> int:
    """How many Ray tasks a stage command gets: one per shard it will write.

    Per-prompt stages have as many shards as their input (``--src``, default the prompts);
    ``export`` as its DATASET; ``augment`` one per risk type; the others are one task.
    """
    if stage in SINGLE_TASK_STAGES:
        return 1
    if stage == "augment":
        from gen.augment import load_risk_types

        return len(load_risk_types(cfg)[0])
    src = params.get("dataset") if stage == "export" else params.get("src")
    return num_shards(workdir / (src or "prompts"))


def dispatch_command(ctx, cfg, params: dict) -> bool:
    """Called by every stage command: with ``executor.kind == "ray"`` (and no explicit
    ``--rank``, nor a world size above 1 from the environment: RANK/WORLD_SIZE, SLURM),
    run the command as Ray tasks and return True; else return False and let the command
    run here.

    Each task runs the same command with ``--rank i --world-size n --executor local``.
    """
    if cfg.executor.kind not in KINDS:
        import click

        raise click.UsageError(f"executor.kind must be one of {KINDS}, got {cfg.executor.kind!r}")
    if cfg.executor.kind != "ray" or params.get("rank") is not None:
        return False
    import click

    from shards import resolve_rank

    try:
        _, env_world = resolve_rank(None, params.get("world_size"))
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if env_world > 1:
        # one of several workers already (RANK/WORLD_SIZE, a SLURM array, launch): run here
        return False

    path = _command_path(ctx)
    stage = path[-1] if path else "stage"
    if stage in SELF_SCHEDULING:
        return False
    try:
        n = cli_num_tasks(stage, cfg, Path(params["workdir"]), params)
    except RuntimeError as e:
        raise click.UsageError(f"--executor ray: {e}") from e
    task_params = dict(params, rank=None, world_size=None)
    for k in _PATH_PARAMS:
        if task_params.get(k):
            task_params[k] = str(Path(task_params[k]).absolute())
    task_params["executor"] = "local"
    task_params["no_progress"] = True

    ray = init_ray(cfg.executor.ray_address)
    opts = ray_task_options(cfg.executor.ray_resources)
    remote = ray.remote(_invoke_command).options(name=f"guidealign-{stage}", **opts)
    cwd = os.getcwd()
    click.echo(f"{stage}: {n} Ray task(s), resources {opts}", err=True)
    refs = {remote.remote(path, dict(task_params, rank=r, world_size=n), cwd): r for r in range(n)}
    failed = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001
                failed[refs[ref]] = e
    if failed:
        first = min(failed)
        raise click.ClickException(
            f"{stage}: {len(failed)} of {n} Ray task(s) failed (ranks {sorted(failed)}); "
            f"committed shards are kept, rerun the command to redo the rest. "
            f"Rank {first}: {failed[first]}")
    click.echo(f"{stage}: {n} Ray task(s) done", err=True)
    return True


# --- `guidealign run --executor ray`: every stage, each as Ray tasks ------------------------

# (stage, "module:function", split by shard?) in pipeline order (guidealign.pipeline.STAGES).
PIPELINE_RAY = [
    ("ingest", "guidealign.executors:ingest_stage", False),
    ("detect", "gen.detect:run_detect", True),
    ("guidelines", "gen.guidelines:run_guidelines", True),
    ("library", "retrieval.library:run_library", False),
    ("train-retriever", "retrieval.train:run_train_retriever", False),
    ("index", "retrieval.index:run_index", False),
    ("retrieve", "retrieval.retrieve:run_retrieve", True),
    ("respond", "gen.respond:run_respond", True),
    ("sft", "sft.train:run_sft", False),
    ("push", "guidealign.executors:push_stage", False),
]


def ingest_stage(cfg, workdir, *, rank: int = 0, world_size: int = 1, progress: bool = True):
    """Ingest with the stage signature (it always runs as one task)."""
    from guidealign.ingest import ingest

    return ingest(cfg.inputs, workdir, cfg.ingest, progress=progress)


def push_stage(cfg, workdir, *, rank: int = 0, world_size: int = 1, progress: bool = True):
    from sft.push import run_push

    return run_push(cfg, workdir)


def run_pipeline_ray(cfg, workdir: str | Path, *, stages: list[str] | None = None,
                     progress: bool = True, echo=print, init_kwargs: dict | None = None) -> dict:
    """``guidealign run --executor ray``: the stages in order; a per-prompt stage as one Ray
    task per prompt shard, the others as one task. Every task skips committed shards, so a
    rerun after a crash (of a task or of this driver) continues."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    known = [name for name, _, _ in PIPELINE_RAY]
    stages = stages or [s for s in known if s != "push" or cfg.push.repo_id]
    unknown = set(stages) - set(known)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages: {known}")
    timings: dict[str, float] = {}
    for name, fn, split in PIPELINE_RAY:
        if name not in stages:
            continue
        echo(f"== {name} (ray)")
        t0 = time.perf_counter()
        n = num_shards(workdir / "prompts") if split else 1
        results = run_on_ray(fn, cfg, workdir, n_tasks=n, progress=progress, init_kwargs=init_kwargs)
        timings[name] = round(time.perf_counter() - t0, 2)
        for res in results:
            summary = getattr(res.report, "summary", None)
            if callable(summary):
                echo(summary())
    summary = {"stages": stages, "seconds": timings, "executor": "ray"}
    (workdir / "run.json").write_text(__import__("json").dumps(summary, indent=1))
    return summary
