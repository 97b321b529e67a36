"""Rank and world size: which worker owns which shard (shard i -> worker i mod W)."""
from __future__ import annotations

import os

_ENV_PAIRS = (
    ("RANK", "WORLD_SIZE"),
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
    ("SLURM_PROCID", "SLURM_NTASKS"),
)


def resolve_rank(rank: int | None = None, world_size: int | None = None,
                 env: dict | None = None) -> tuple[int, int]:
    """Explicit values win; then RANK/WORLD_SIZE, SLURM array, SLURM tasks; else (0, 1).

    A SLURM array may start at an offset (``--array=5-8``): SLURM_ARRAY_TASK_MIN is
    subtracted so ranks always run 0..W-1.
    """
    env = os.environ if env is None else env
    if rank is None or world_size is None:
        for rk, wk in _ENV_PAIRS:
            if rk in env and wk in env:
                r, w = int(env[rk]), int(env[wk])
                if rk == "SLURM_ARRAY_TASK_ID":
                    r -= int(env.get("SLURM_ARRAY_TASK_MIN", 0))
                rank = r if rank is None else rank
                world_size = w if world_size is None else world_size
                break
    rank = 0 if rank is None else int(rank)
    world_size = 1 if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


def my_shards(n_shards: int, rank: int, world_size: int) -> list[int]:
    return [i for i in range(n_shards) if i % world_size == rank]
