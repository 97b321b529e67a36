"""``guidealign launch STAGE [ARGS...]`` (``./run.sh launch``): run a stage on this node's GPUs.

It finds the GPUs this process may use (``CUDA_VISIBLE_DEVICES`` when set, else
``nvidia-smi -L``) and starts, as the tensor_parallel_size of the stage's engines says
(``engine.tensor_parallel_size``; respond: the responder's; ``--tp N`` sets it, and passes
``--set ...tensor_parallel_size=N`` to the workers so that their engines match their GPUs):

- tensor_parallel_size 1: one worker per GPU, worker j with ``CUDA_VISIBLE_DEVICES=<gpu j>``;
- tensor_parallel_size k > 1: one tensor-parallel engine per group of k GPUs (one engine
  on the whole node when k equals the GPU count);
- no GPU: one worker.

Each worker runs ``guidealign STAGE ARGS --rank R --world-size W``: its rank comes through
the command line only. RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and the other variables
of torchrun/MPI launchers are removed from every worker's environment (``env -u`` in the
dry run), since they would make accelerate set up a process group inside a stage that is
one process. The node's own place comes from ``--node-rank/--nodes`` or, failing those,
from RANK/WORLD_SIZE, a SLURM array (SLURM_ARRAY_TASK_ID/COUNT) or SLURM tasks
(SLURM_PROCID/NTASKS), exactly as ``shards.resolve_rank`` reads them; then
``R = node_rank * workers_per_node + j`` and ``W = nodes * workers_per_node``.

Stages whose work rank 0 does alone (ingest, library, train-retriever, index, sft, push)
run as one process per node with the node's rank; train-retriever sees only the node's
first GPU (the retriever trains on one device), the others all of them. eval splits its
generation and judging across ranks (the stage table's ``splits_across_ranks``): one worker
per engine, as a map stage.

``launch`` never installs anything (``./run.sh setup`` does, once, before the job).
``--dry-run`` prints the worker commands instead of running them. When a worker fails,
launch writes its failure marker (WORKDIR/_failed/, unless the worker wrote one) and stops
the other workers (SIGTERM, then SIGKILL after ``--grace`` seconds), so that an
allocation does not idle; the exit status is the failed worker's.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from guidealign.core.distenv import DIST_VARS
from guidealign.core.gpu import visible_gpus as detect_gpus
from guidealign.stages import BY_NAME

# Single-process stages that use one device whatever the node has.
ONE_DEVICE_STAGES = {"train-retriever"}


@dataclass
class Worker:
    rank: int
    world_size: int
    local_rank: int
    gpus: list[str]
    argv: list[str]
    env: dict = field(default_factory=dict)  # set for this worker (on top of launch's own)
    unset: list[str] = field(default_factory=list)  # removed from launch's own environment

    def shell(self) -> str:
        parts = ["env", *(f"-u {k}" for k in self.unset)] if self.unset else []
        parts += [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*parts, shlex.join(self.argv)])

    def environ(self, base: dict | None = None) -> dict:
        base = dict(os.environ if base is None else base)
        for k in self.unset:
            base.pop(k, None)
        return {**base, **self.env}


def _opt_values(args: list[str], *names: str) -> list[str]:
    """Values of an option in a click-style argument list: ``--x V``, ``--x=V``, and for a
    short name ``-c V`` and ``-cV`` (click takes both: a worker would read a config that a
    parse of ``-c V`` alone missed)."""
    vals = []
    for i, a in enumerate(args):
        for n in names:
            short = len(n) == 2 and n[0] == "-" and n[1] != "-"
            if a == n and i + 1 < len(args):
                vals.append(args[i + 1])
            elif not short and a.startswith(n + "="):
                vals.append(a[len(n) + 1:])
            elif short and a.startswith(n) and len(a) > 2:
                vals.append(a[2:])
    return vals


def _stage_config(stage_args: list[str]):
    """The config a worker will load (--config, --set)."""
    from guidealign.config import load_config

    paths = _opt_values(stage_args, "--config", "-c")
    return load_config(paths[-1] if paths else None, _opt_values(stage_args, "--set"))


def tensor_parallel_size(stage_args: list[str], stage: str = "") -> int:
    """The tensor_parallel_size of the engine(s) ``stage`` runs, from the config it will load
    (--config, --set): respond's own engine (``respond.engine`` over ``engine``) for respond,
    the larger of the two for ``run`` (its workers run both), the larger of the responder's and
    the judge's for eval, else ``engine``'s."""
    from guidealign.ray_workers import engine_config

    cfg = _stage_config(stage_args)
    writer = int(cfg.engine.tensor_parallel_size)
    responder = int(engine_config(cfg, "respond").tensor_parallel_size)
    if stage == "respond":
        return responder
    if stage == "eval":  # its workers answer with the responder's engine, then judge
        from guidealign.config import judge_engine_config

        return max(responder, int(judge_engine_config(cfg).tensor_parallel_size))
    return max(writer, responder) if stage == "run" else writer


def tp_overrides(stage_args: list[str], stage: str, tp: int) -> list[str]:
    """The ``--set`` that give the engines of ``stage``'s workers ``--tp``'s size: --tp groups the
    GPUs, and an engine that kept the config's size would not fit its group (larger) or leave
    GPUs idle (smaller). ``engine.tensor_parallel_size``, and the responder's own
    (``respond.engine.tensor_parallel_size``) where the config sets it, for the stages that
    start the responder (respond, run, eval); only those that differ from ``tp``; a size the
    config gives the judge (``eval.judge_engine``) only where it is larger than ``tp``."""
    cfg = _stage_config(stage_args)
    keys = {"engine.tensor_parallel_size": cfg.engine.tensor_parallel_size}
    if stage in ("respond", "run", "eval") and "tensor_parallel_size" in cfg.respond.engine:
        keys["respond.engine.tensor_parallel_size"] = cfg.respond.engine["tensor_parallel_size"]
        if stage == "respond":  # the writer's engine does not run there
            del keys["engine.tensor_parallel_size"]
    out = [a for k, v in keys.items() if v != tp for a in ("--set", f"{k}={tp}")]
    judge = cfg.eval.judge_engine.get("tensor_parallel_size")
    if stage == "eval" and judge is not None and int(judge) > tp:
        # the judge's own size, set on purpose (a small judge's heads may not split over the
        # group: the embedded one has 9), is only lowered to fit the group, never raised
        out += ["--set", f"eval.judge_engine.tensor_parallel_size={tp}"]
    return out


def plan(stage: str, stage_args: list[str], *, gpus: list[str], tp: int, node_rank: int,
         nodes: int, python: str = sys.executable, env: dict | None = None) -> list[Worker]:
    """The workers to start on this node (``env``: launch's own environment)."""
    env = os.environ if env is None else env
    unset = [k for k in DIST_VARS if k in env]
    if _opt_values(stage_args, "--rank") or _opt_values(stage_args, "--world-size"):
        raise click.UsageError("launch sets --rank/--world-size itself; use --node-rank/--nodes "
                               "(or SLURM / RANK / WORLD_SIZE) for this node's place")
    if tp < 1:
        raise click.UsageError(f"engine.tensor_parallel_size must be >= 1, got {tp}")
    if not gpus or (stage in BY_NAME and not BY_NAME[stage].splits_across_ranks):
        # one process: the CPU, or a stage whose work rank 0 does alone (eval splits its own
        # work across ranks: a worker per engine, as a map stage)
        groups = [gpus[:1] if stage in ONE_DEVICE_STAGES else gpus]
    else:
        if len(gpus) < tp:
            raise click.UsageError(f"engine.tensor_parallel_size={tp} needs {tp} GPUs; this node "
                                   f"has {len(gpus)} ({','.join(gpus)})")
        n = len(gpus) // tp
        if len(gpus) % tp:
            click.echo(f"launch: {len(gpus) % tp} GPU(s) left idle: {len(gpus)} is not a multiple "
                       f"of tensor_parallel_size={tp}", err=True)
        groups = [gpus[j * tp:(j + 1) * tp] for j in range(n)]
        from guidealign.core.gpu import check_tensor_parallel

        try:  # MIG devices: one per process, so no tensor-parallel group (refused before any work)
            for g in groups:
                check_tensor_parallel(tp, g)
        except ValueError as e:
            raise click.UsageError(str(e)) from e
    per_node = len(groups)
    world = nodes * per_node
    workers = []
    for j, g in enumerate(groups):
        rank = node_rank * per_node + j
        wenv = {"CUDA_VISIBLE_DEVICES": ",".join(g)} if gpus else {}
        if gpus and stage == "run":
            # SFT, run by rank 0 once the engines are done, trains on every GPU of the node
            wenv["GUIDEALIGN_NODE_GPUS"] = ",".join(gpus)
        argv = [python, "-m", "guidealign", stage, *stage_args,
                "--rank", str(rank), "--world-size", str(world)]
        workers.append(Worker(rank=rank, world_size=world, local_rank=j, gpus=list(g),
                              argv=argv, env=wenv, unset=list(unset)))
    return workers


def _stop(procs: list, grace: float) -> None:
    """SIGTERM every running worker's process group, then SIGKILL what is left after ``grace``."""
    import time

    running = [p for p in procs if p.poll() is None]
    for p in running:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in running:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
        p.wait()


def _signal_group(p, sig) -> None:
    try:  # each worker leads its own process group: its engine's children go with it
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass


def run_workers(workers: list[Worker], log_dir: str | None = None, *, workdir: str | None = None,
                grace: float = 30.0, poll: float = 0.5) -> int:
    """Start all workers and wait. When one fails, record it in ``workdir``'s failure markers
    (for ranks on other nodes) and stop the others: their work depends on the failed rank's
    shards. SIGINT/SIGTERM to launch are forwarded. Returns the first failed worker's status
    (128 + N for one killed by signal N, as a shell reports it: sys.exit(-15) would be 241)."""
    import time

    procs = []
    logs = []
    started = time.time()  # the workers' markers are written on this node: one clock

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                _signal_group(p, signum)

    # before the workers start: a process inherits an ignored SIGINT (launch started by a
    # non-interactive shell's `&`), never a handler, so with launch's handler in place each
    # worker takes the Ctrl-C launch forwards
    # SIGHUP too: the terminal or ssh session of an interactive launch closing
    # (not when SIGHUP is ignored: `nohup launch ...` means the workers outlive the session)
    sigs = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP)
                                             is not signal.SIG_IGN else [])
    old = {s: signal.signal(s, forward) for s in sigs}
    failed: list[tuple[int, int]] = []
    if workdir:
        # the failure markers of the ranks about to start are an earlier attempt's: under a fixed
        # GUIDEALIGN_RUN_ID (no SLURM job to tell attempts apart) they count as this run's, and
        # a rank that reached its first wait before the failed rank cleared its own was stopped
        from guidealign.shards.failure import clear_failed

        for w in workers:
            clear_failed(workdir, w.rank)
    try:
        for w in workers:
            out = None
            if log_dir:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                out = open(Path(log_dir) / f"rank{w.rank:05d}.log", "ab")
                logs.append(out)
            click.echo(f"launch: rank {w.rank}/{w.world_size} gpus "
                       f"{','.join(w.gpus) or '-'}: {shlex.join(w.argv[2:])}", err=True)
            procs.append(subprocess.Popen(w.argv, env=w.environ(), stdout=out, start_new_session=True,
                                          stderr=subprocess.STDOUT if out else None,
                                          preexec_fn=_die_with_parent))
        while True:
            codes = [p.poll() for p in procs]
            for w, c in zip(workers, codes):
                if c not in (None, 0) and all(r != w.rank for r, _ in failed):
                    failed.append((w.rank, c))
                    click.echo(f"launch: rank {w.rank} exited with status {c}", err=True)
                    if workdir:
                        _record_failure(workdir, w, c, started)
            if all(c is not None for c in codes):
                break
            if failed:
                left = [w.rank for w, c in zip(workers, codes) if c is None]
                click.echo(f"launch: stopping rank(s) {left} after rank {failed[0][0]} failed",
                           err=True)
                _stop(procs, grace)
                break
            time.sleep(poll)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for f in logs:
            f.close()
    if not failed:
        return 0
    code = failed[0][1]
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N (not -N)


def _record_failure(workdir: str, w: Worker, code: int, started: float = 0.0) -> None:
    """A failure marker for a worker that died without writing its own (killed, segfault).
    A marker of that rank written before ``started`` (when launch started the workers) is an
    earlier attempt's that the worker died before clearing (a requeued job): it is replaced,
    since the other ranks of this attempt ignore it and would wait for the stall clock."""
    import json

    from guidealign.shards.failure import failure_path, mark_failed

    try:
        p = failure_path(workdir, w.rank)
        try:
            mine = float(json.loads(p.read_text()).get("created", 0.0)) >= started
        except (OSError, ValueError, AttributeError, TypeError):  # none, or unreadable
            mine = False
        if not mine:
            why = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            mark_failed(workdir, w.rank, f"worker {why} (seen by launch on this node)",
                        stage=w.argv[3] if len(w.argv) > 3 else "", world_size=w.world_size)
    except OSError as e:
        click.echo(f"launch: could not write the failure marker: {e}", err=True)


def _refuse_gpu_recipe_on_cpu(stage: str, stage_args: list[str]) -> None:
    """A config whose engines are tensor-parallel is a GPU recipe: found no GPU (a job submitted
    without them), launch would plan one CPU worker for it, whose 13B-70B engine then loads
    for hours on the host or fails. ``--gpus none`` says a CPU run is meant."""
    import yaml

    from guidealign.config import ConfigError

    try:
        want = tensor_parallel_size(stage_args, stage)
    except (ConfigError, OSError, yaml.YAMLError, UnicodeDecodeError):
        return  # the worker reports a config it cannot load
    if want > 1:
        raise click.UsageError(
            f"the config's engine for {stage} is tensor-parallel over {want} GPUs, but no GPU is "
            "visible here (CUDA_VISIBLE_DEVICES names none, or is not set and nvidia-smi lists none): submit the job "
            "with GPUs (sbatch --gres=gpu:N or --gpus-per-node=N), or pass --gpus none to run CPU "
            "workers anyway")


def _die_with_parent() -> None:
    """In a worker, before it runs: SIGTERM when launch dies. Each worker has a session of its
    own (launch signals its whole group), so a launch killed without running its handler
    (SIGKILL: the OOM killer, Slurm's KillWait) left every worker and its engine running,
    unwatched, on the GPUs. Linux only (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _takes_engine(stage: str) -> bool:
    """Whether ``stage``'s workers start a vLLM engine (run's and eval's do, through their stages)."""
    return stage in ("run", "eval") or (stage in BY_NAME and BY_NAME[stage].engine)


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--dry-run", is_flag=True, help="Print the worker commands, run nothing.")
@click.option("--gpus", default="auto", show_default=True,
              help="'auto' (CUDA_VISIBLE_DEVICES, else nvidia-smi -L), 'none', or ids like 0,1,2,3.")
@click.option("--tp", type=int, default=None,
              help="Tensor-parallel size: GPUs per worker, and each worker's engines get it too "
                   "(--set engine.tensor_parallel_size=N, and respond.engine.tensor_parallel_size=N "
                   "where the config sets it; a judge's own size, eval.judge_engine.tensor_parallel_size, "
                   "is only lowered to N, never raised). "
                   "Default: the config's engine.tensor_parallel_size; for respond the responder's (respond.engine over engine), for run the larger, "
                   "for eval the larger of the responder's and the judge's.")
@click.option("--node-rank", type=int, default=None, help="This node's rank (default: from env/SLURM).")
@click.option("--nodes", type=int, default=None, help="Number of nodes (default: from env/SLURM).")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None,
              help="Write each worker's output to LOG_DIR/rankNNNNN.log instead of this terminal.")
@click.option("--grace", type=float, default=30.0, show_default=True,
              help="When a worker fails: seconds between SIGTERM and SIGKILL for the others.")
@click.argument("stage")
@click.argument("stage_args", nargs=-1, type=click.UNPROCESSED)
def launch(dry_run, gpus, tp, node_rank, nodes, log_dir, grace, stage, stage_args):
    """Run STAGE on this node: one worker per GPU or per tensor-parallel group, with ranks.

    Everything after STAGE goes to `guidealign STAGE`, e.g.
    `guidealign launch detect -w runs/x -c configs/gpu-paper.yaml`.
    """
    from guidealign.shards import resolve_rank
    from guidealign.shards.ranks import array_refusal, batch_script_refusal

    if stage not in BY_NAME and stage != "run":  # each worker would fail on it, after the plan
        raise click.UsageError(f"no stage {stage!r}: run, or one of {', '.join(BY_NAME)}")
    stage_args = list(stage_args)
    if gpus == "auto":
        gpu_list = detect_gpus()
        if gpu_list and "SLURM_JOB_ID" in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ and not any(
                os.environ.get(k) for k in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")):
            # Slurm sets CUDA_VISIBLE_DEVICES for the GPUs it gives a job; without it, what
            # nvidia-smi lists on a node without device isolation are other jobs' GPUs
            raise click.UsageError(
                f"this Slurm job ({os.environ['SLURM_JOB_ID']}) was given no GPUs (CUDA_VISIBLE_DEVICES is "
                f"not set), yet nvidia-smi lists {len(gpu_list)} on the node: request them (--gres=gpu:N or "
                "--gpus-per-node=N), or name the ones to use with --gpus or CUDA_VISIBLE_DEVICES "
                "(--gpus none: CPU workers)")
    elif gpus == "none":
        gpu_list = []
    else:
        gpu_list = [g.strip() for g in gpus.split(",") if g.strip()]
        inherited = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        uuid = ("GPU-", "MIG-")  # ids compared only in one form: an index is not its UUID's text
        same_form = len({g.startswith(uuid) for g in inherited + gpu_list}) == 1
        if inherited and same_form and (outside := [g for g in gpu_list if g not in inherited]):
            # a worker's CUDA_VISIBLE_DEVICES replaces the job's: ids outside it are GPUs this job
            # was not given (another job's, on a node without device isolation)
            raise click.UsageError(
                f"--gpus {gpus} names GPU(s) {','.join(outside)} that this job may not use: "
                f"CUDA_VISIBLE_DEVICES is {os.environ['CUDA_VISIBLE_DEVICES']}; name ids from it, "
                "or leave --gpus out to use all of them")
    if why := batch_script_refusal(node_rank is not None or nodes is not None, "the launcher",
                                   "--node-rank/--nodes"):
        raise click.UsageError(why)
    if stage == "run" and (why := array_refusal(node_rank is not None or nodes is not None, "launch run")):
        raise click.UsageError(why)
    try:
        node_rank, nodes = resolve_rank(node_rank, nodes, names=("--node-rank", "--nodes"))
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if tp is None and not _takes_engine(stage):
        tp = 1  # retrieve, export, ...: no engine, so one worker per GPU (not the engine's groups)
    if (tp is None and gpu_list) or (tp is not None and tp >= 1 and _takes_engine(stage)):
        import yaml

        from guidealign.config import ConfigError, config_error

        try:
            if tp is None:
                tp = tensor_parallel_size(stage_args, stage)
            else:  # appended last: it wins over the worker's own --set
                stage_args += tp_overrides(stage_args, stage, tp)
        except (ConfigError, OSError, yaml.YAMLError, UnicodeDecodeError) as e:
            raise click.UsageError(f"config: {config_error(e)}") from e
    if gpus == "auto" and not gpu_list and _takes_engine(stage):
        _refuse_gpu_recipe_on_cpu(stage, stage_args)
    tp = 1 if tp is None else tp
    workers = plan(stage, stage_args, gpus=gpu_list, tp=tp, node_rank=node_rank, nodes=nodes)
    click.echo(f"launch: {stage} on node {node_rank}/{nodes}: {len(gpu_list)} GPU(s), "
               f"tensor_parallel_size {tp}, {len(workers)} worker(s)", err=True)
    if dry_run:
        for w in workers:
            click.echo(w.shell())
        return
    wd = _opt_values(stage_args, "--workdir", "-w")
    sys.exit(run_workers(workers, log_dir, workdir=wd[-1] if wd else None, grace=grace))


def main():
    launch(prog_name="guidealign launch")


if __name__ == "__main__":
    main()
