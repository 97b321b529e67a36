"""``guidealign launch STAGE [ARGS...]`` (``./run.sh launch``): run a stage on this node's GPUs.

It finds the GPUs this process may use (``CUDA_VISIBLE_DEVICES`` when set, else
``nvidia-smi -L``) and starts, as ``engine.tensor_parallel_size`` in the config says:

- tensor_parallel_size 1: one worker per GPU, worker j with ``CUDA_VISIBLE_DEVICES=<gpu j>``;
- tensor_parallel_size k > 1: one tensor-parallel engine per group of k GPUs (one engine
  on the whole node when k equals the GPU count);
- no GPU: one worker.

Each worker runs ``guidealign STAGE ARGS --rank R --world-size W`` with RANK, WORLD_SIZE
and LOCAL_RANK set. The node's own place comes from ``--node-rank/--nodes`` or, failing
those, from RANK/WORLD_SIZE, a SLURM array (SLURM_ARRAY_TASK_ID/COUNT) or SLURM tasks
(SLURM_PROCID/NTASKS), exactly as ``shards.resolve_rank`` reads them; then
``R = node_rank * workers_per_node + j`` and ``W = nodes * workers_per_node``.

Stages that are not split by shard (ingest, library, train-retriever, index, sft, push,
eval) run as one process per node, with all its GPUs and the node's rank.

``--dry-run`` prints the worker commands instead of running them. The exit status is
the first non-zero status of any worker; the other workers still finish their shards.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from guidealign.executors import SINGLE_TASK_STAGES


@dataclass
class Worker:
    rank: int
    world_size: int
    local_rank: int
    gpus: list[str]
    argv: list[str]
    env: dict = field(default_factory=dict)

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}".strip()


def detect_gpus(env: dict | None = None, nvidia_smi: str | None = "nvidia-smi") -> list[str]:
    """GPU ids this process may use, as CUDA_VISIBLE_DEVICES entries.

    ``CUDA_VISIBLE_DEVICES`` wins when it is set ("" / "-1" / "NoDevFiles" mean none; ids or
    GPU-/MIG- UUIDs are kept as they are); else one index per ``GPU n:`` line of
    ``nvidia-smi -L``; else none.
    """
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        raw = env["CUDA_VISIBLE_DEVICES"].strip()
        if raw in ("", "-1", "NoDevFiles"):
            return []
        return [g.strip() for g in raw.split(",") if g.strip()]
    exe = shutil.which(nvidia_smi, path=env.get("PATH")) if nvidia_smi else None
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [str(i) for i, line in enumerate(l for l in out.stdout.splitlines() if l.startswith("GPU "))]


def _opt_values(args: list[str], *names: str) -> list[str]:
    """Values of an option in a click-style argument list (``--x V`` and ``--x=V``)."""
    vals = []
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                vals.append(args[i + 1])
            elif a.startswith(n + "="):
                vals.append(a[len(n) + 1:])
    return vals


def tensor_parallel_size(stage_args: list[str]) -> int:
    """engine.tensor_parallel_size of the config the stage will load (--config, --set)."""
    from guidealign.config import load_config

    paths = _opt_values(stage_args, "--config", "-c")
    cfg = load_config(paths[-1] if paths else None, _opt_values(stage_args, "--set"))
    return int(cfg.engine.tensor_parallel_size)


def plan(stage: str, stage_args: list[str], *, gpus: list[str], tp: int, node_rank: int,
         nodes: int, python: str = sys.executable) -> list[Worker]:
    """The workers to start on this node."""
    if _opt_values(stage_args, "--rank") or _opt_values(stage_args, "--world-size"):
        raise click.UsageError("launch sets --rank/--world-size itself; use --node-rank/--nodes "
                               "(or SLURM / RANK / WORLD_SIZE) for this node's place")
    if tp < 1:
        raise click.UsageError(f"engine.tensor_parallel_size must be >= 1, got {tp}")
    if not gpus or stage in SINGLE_TASK_STAGES:
        groups = [gpus]  # one process: the CPU, or a stage that is not split by shard
    else:
        if len(gpus) < tp:
            raise click.UsageError(f"engine.tensor_parallel_size={tp} needs {tp} GPUs; this node "
                                   f"has {len(gpus)} ({','.join(gpus)})")
        n = len(gpus) // tp
        if len(gpus) % tp:
            click.echo(f"launch: {len(gpus) % tp} GPU(s) left idle: {len(gpus)} is not a multiple "
                       f"of tensor_parallel_size={tp}", err=True)
        groups = [gpus[j * tp:(j + 1) * tp] for j in range(n)]
    per_node = len(groups)
    world = nodes * per_node
    workers = []
    for j, g in enumerate(groups):
        rank = node_rank * per_node + j
        env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(j)}
        if gpus:
            env = {"CUDA_VISIBLE_DEVICES": ",".join(g), **env}
        argv = [python, "-m", "guidealign", stage, *stage_args,
                "--rank", str(rank), "--world-size", str(world)]
        workers.append(Worker(rank=rank, world_size=world, local_rank=j, gpus=list(g),
                              argv=argv, env=env))
    return workers


def run_workers(workers: list[Worker], log_dir: str | None = None) -> int:
    """Start all workers, forward SIGINT/SIGTERM to them, wait; first non-zero status wins."""
    procs = []
    logs = []
    for w in workers:
        env = dict(os.environ, **w.env)
        out = None
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(log_dir) / f"rank{w.rank:05d}.log", "ab")
            logs.append(out)
        click.echo(f"launch: rank {w.rank}/{w.world_size} gpus "
                   f"{','.join(w.gpus) or '-'}: {shlex.join(w.argv[2:])}", err=True)
        procs.append(subprocess.Popen(w.argv, env=env, stdout=out, stderr=subprocess.STDOUT if out else None))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for f in logs:
            f.close()
    failed = [(w.rank, c) for w, c in zip(workers, codes) if c != 0]
    for r, c in failed:
        click.echo(f"launch: rank {r} exited with status {c}", err=True)
    return failed[0][1] if failed else 0


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--dry-run", is_flag=True, help="Print the worker commands, run nothing.")
@click.option("--gpus", default="auto", show_default=True,
              help="'auto' (CUDA_VISIBLE_DEVICES, else nvidia-smi -L), 'none', or ids like 0,1,2,3.")
@click.option("--tp", type=int, default=None,
              help="Tensor-parallel size (default: engine.tensor_parallel_size of the config).")
@click.option("--node-rank", type=int, default=None, help="This node's rank (default: from env/SLURM).")
@click.option("--nodes", type=int, default=None, help="Number of nodes (default: from env/SLURM).")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None,
              help="Write each worker's output to LOG_DIR/rankNNNNN.log instead of this terminal.")
@click.argument("stage")
@click.argument("stage_args", nargs=-1, type=click.UNPROCESSED)
def launch(dry_run, gpus, tp, node_rank, nodes, log_dir, stage, stage_args):
    """Run STAGE on this node: one worker per GPU or per tensor-parallel group, with ranks.

    Everything after STAGE goes to `guidealign STAGE`, e.g.
    `guidealign launch detect -w runs/x -c configs/gpu-paper.yaml`.
    """
    from shards import resolve_rank

    stage_args = list(stage_args)
    if gpus == "auto":
        gpu_list = detect_gpus()
    elif gpus == "none":
        gpu_list = []
    else:
        gpu_list = [g for g in gpus.split(",") if g]
    env = os.environ
    if (node_rank is None and nodes is None and "RANK" not in env and "SLURM_ARRAY_TASK_ID" not in env
            and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1
            and "SLURM_STEP_ID" not in env):
        # the batch script of an `sbatch --ntasks=N` job runs once, yet says PROCID 0 of N:
        # taking that would leave (N-1)/N of the shards undone
        raise click.UsageError(
            f"this is the batch script of a {env['SLURM_NTASKS']}-task job, not one of its tasks: "
            "run the launcher under srun (`srun ./run.sh launch ...`), or submit a job array")
    try:
        node_rank, nodes = resolve_rank(node_rank, nodes)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if tp is None:
        tp = tensor_parallel_size(stage_args) if gpu_list else 1
    workers = plan(stage, stage_args, gpus=gpu_list, tp=tp, node_rank=node_rank, nodes=nodes)
    click.echo(f"launch: {stage} on node {node_rank}/{nodes}: {len(gpu_list)} GPU(s), "
               f"tensor_parallel_size {tp}, {len(workers)} worker(s)", err=True)
    if dry_run:
        for w in workers:
            click.echo(w.shell())
        return
    sys.exit(run_workers(workers, log_dir))


def main():
    launch(prog_name="guidealign launch")


if __name__ == "__main__":
    main()
