"""Rank and world size: which worker owns which shard (shard i -> worker i mod W)."""
from __future__ import annotations

import os

_ENV_PAIRS = (
    ("RANK", "WORLD_SIZE"),
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
    ("SLURM_PROCID", "SLURM_NTASKS"),
)


def resolve_rank(rank: int | None = None, world_size: int | None = None,
                 env: dict | None = None, names: tuple[str, str] = ("--rank", "--world-size")
                 ) -> tuple[int, int]:
    """Explicit values win; then RANK/WORLD_SIZE, SLURM array, SLURM tasks; else (0, 1).

    A SLURM array may start at an offset (``--array=5-8``) and step (``--array=0-14:2``):
    rank = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP, so ranks
    always run 0..W-1 (:func:`slurm_array_rank`). An array task's step of several tasks
    (srun) numbers its tasks within the task's rank (:func:`_array_step_tasks`).
    A world size above 1 given without the rank is refused unless the environment's rank
    belongs to a world of that size (``names``: the two options, for the message).
    """
    env = os.environ if env is None else env
    if rank is None or world_size is None:
        given_world = world_size
        env_world = None
        for rk, wk in _ENV_PAIRS:
            if rk == "RANK" and (rk in env) != (wk in env) and not (
                    rank is not None and world_size is not None):
                # one of the pair alone was taken for no launcher at all: every process (RANK=0,
                # 1, 2, ... without WORLD_SIZE) ran as rank 0 of 1 and did every shard
                have, lack = (rk, wk) if rk in env else (wk, rk)
                raise ValueError(f"{have} is set but {lack} is not: set both (a launcher's pair), "
                                 f"or give {names[0]} and {names[1]}")
            if rk == "SLURM_ARRAY_TASK_ID" and rk in env and wk not in env and not (
                    rank is not None and world_size is not None):
                # without the count, the SLURM task pair below said rank 0 of 1 in every array
                # task: each did every shard
                raise ValueError(f"SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not (a Slurm "
                                 f"that does not set it): give {names[0]} and {names[1]}")
            if rk in env and wk in env:
                r, w = _env_int(env, rk), _env_int(env, wk)
                if rk == "SLURM_ARRAY_TASK_ID":
                    r = slurm_array_rank(env)
                    r, w = _array_step_tasks(env, r, w)
                rank = r if rank is None else rank
                world_size = w if world_size is None else world_size
                env_world = w
                break
        if given_world is not None and int(given_world) > 1 and env_world != int(given_world):
            # a world size of N with this process's rank from nowhere (rank 0) or from an
            # environment of another size: some ranks of N would never run, their shards undone
            raise ValueError(f"{names[1]} {given_world} without {names[0]}: "
                             + (f"the environment's rank belongs to a world of {env_world}"
                                if env_world is not None else "this process's rank is unknown")
                             + f"; give both {names[0]} and {names[1]} (or neither)")
    rank = 0 if rank is None else int(rank)
    world_size = 1 if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


def _env_int(env, name: str) -> int:
    """The whole number in environment variable ``name``, or an error that names it (a bare
    "invalid literal for int()" left the user guessing which variable)."""
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not a whole number") from None


def batch_script_tasks(env: dict | None = None) -> int:
    """N when this process is the batch script of an N-task SLURM job (``sbatch --ntasks=N``,
    N > 1), else 0. That script runs once, outside any step, yet its environment says PROCID 0
    of N: a map stage run there as rank 0 of N would leave (N-1)/N of its shards undone. Under
    ``srun`` (a step), in an array task, or with RANK/WORLD_SIZE set by a launcher, it is 0."""
    env = os.environ if env is None else env
    if (("RANK" in env and "WORLD_SIZE" in env) or "SLURM_ARRAY_TASK_ID" in env
            or env.get("SLURM_STEP_ID") or "SLURM_PROCID" not in env):
        return 0
    n = int(env.get("SLURM_NTASKS") or 1)
    return n if n > 1 else 0


def batch_script_refusal(explicit_ranks: bool, what: str = "the command",
                         ranks: str = "--rank/--world-size (--world-size 1: this process alone, "
                                      "or the Ray executor)", env: dict | None = None) -> str | None:
    """Why work that every rank shares must not start here, or None when it may: this is the
    batch script of a multi-task job (:func:`batch_script_tasks`) and the command was given no
    rank of its own (``explicit_ranks``: --rank/--world-size, --node-rank/--nodes)."""
    n = 0 if explicit_ranks else batch_script_tasks(env)
    if not n:
        return None
    return (f"this is the batch script of a {n}-task job, not one of its tasks: run {what} under "
            f"srun (`srun guidealign ...`, `srun ./run.sh launch ...`), submit a job array, or give {ranks}")


def array_refusal(explicit_ranks: bool, what: str = "run", env: dict | None = None) -> str | None:
    """Why the whole pipeline must not run as the tasks of a Slurm job array, or None: array
    tasks are not gang-scheduled, and its ranks wait for each other both ways (rank 0 for the
    others' shards, they for rank 0's library and index), so tasks the array holds back deadlock
    the ones it started. ``explicit_ranks`` (--rank/--world-size given): the user's own layout."""
    env = os.environ if env is None else env
    if explicit_ranks or "SLURM_ARRAY_TASK_ID" not in env or ("RANK" in env and "WORLD_SIZE" in env):
        return None  # (RANK/WORLD_SIZE win over the array's numbering: resolve_rank)
    try:
        count = int(env.get("SLURM_ARRAY_TASK_COUNT") or 1)
    except ValueError:
        return None
    if count <= 1:
        return None
    return (f"this is task {env['SLURM_ARRAY_TASK_ID']} of a {count}-task job array: array tasks are "
            f"not started together, and {what}'s ranks wait for each other, so tasks the array holds "
            "back stall the others; submit it as one job over N nodes (examples/slurm/guidealign.sbatch), "
            "or stage by stage (examples/slurm/submit-stages.sh: map stages as arrays, the others as "
            "single jobs)")


def _array_step_tasks(env: dict, r: int, w: int) -> tuple[int, int]:
    """An array task that runs a step of several tasks (``sbatch --array=0-3 --ntasks=2`` +
    ``srun``): each is one rank, ``array rank * NTASKS + PROCID`` of ``COUNT * NTASKS``; the
    array's numbering alone gives every task of the step the same rank. The batch script
    itself (no SLURM_STEP_ID) stays the array task's one rank."""
    if not env.get("SLURM_STEP_ID") or "SLURM_PROCID" not in env:
        return r, w
    n = int(env.get("SLURM_NTASKS") or 1)
    if n <= 1:
        return r, w
    return r * n + int(env["SLURM_PROCID"]), w * n


def slurm_array_rank(env: dict) -> int:
    """This array task's rank 0..COUNT-1 from SLURM_ARRAY_TASK_ID/MIN/MAX/STEP. An array of
    task ids that is not one evenly stepped range (``--array=0,3,4``) has no such numbering:
    an error, instead of ranks that skip some shards and repeat others."""
    tid = int(env["SLURM_ARRAY_TASK_ID"])
    count = int(env["SLURM_ARRAY_TASK_COUNT"])
    lo = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    step = int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
    hi = int(env.get("SLURM_ARRAY_TASK_MAX", lo + step * (count - 1)))
    if step < 1 or (tid - lo) % step or (hi - lo) != step * (count - 1):
        raise ValueError(
            f"SLURM array task {tid} (min {lo}, max {hi}, step {step}, count {count}): the "
            "array is not one evenly stepped range of ids, so its tasks cannot be numbered "
            "0..COUNT-1; submit --array=0-N (optionally :STEP or %LIMIT), or pass --rank and "
            "--world-size")
    return (tid - lo) // step


def my_shards(n_shards: int, rank: int, world_size: int) -> list[int]:
    return [i for i in range(n_shards) if i % world_size == rank]
