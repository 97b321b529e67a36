"""One SFT process per GPU: who trains, in how many processes, and how they are started.

The pipeline's own ranks (``guidealign run --rank R --world-size W``, ``launch``'s
RANK/WORLD_SIZE/LOCAL_RANK, SLURM's task ids) describe data workers, not a training job: SFT
ignores them. ``run_sft`` on pipeline rank 0 decides the process count
(``sft.num_processes``: "auto" = one per visible GPU, else a number; on the CPU, gloo
processes) and, for more than one, starts ``torchrun --standalone --nproc-per-node N
-m guidealign sft ...`` with :data:`LAUNCHED_ENV` set; those processes (or ones a user
started with torchrun/accelerate) train with the distributed environment their launcher gave.
A single process trains in-process with the pipeline's distributed variables hidden.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

from guidealign.config.sft import process_count
from guidealign.core.distenv import DIST_VARS as _LAUNCHER_VARS

log = logging.getLogger(__name__)

# Set by run_sft for the processes it starts; torchrun passes it on.
LAUNCHED_ENV = "GUIDEALIGN_SFT_LAUNCHED"
# All GPUs of this node (CUDA_VISIBLE_DEVICES form), when a launcher gave this worker only a
# group of them (`launch run` with tensor_parallel_size 4 on 8 GPUs): SFT, which runs after
# every engine of the node is done, trains on all of them.
NODE_GPUS_ENV = "GUIDEALIGN_NODE_GPUS"
# Variables a training process reads to join a process group; under a pipeline worker they
# come from `launch`/SLURM/MPI and mean something else (guidealign/distenv.py lists them).

DIST_VARS = tuple(_LAUNCHER_VARS) + ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
# how long an interrupted run_sft waits for torchrun to stop its workers (torch's own wait for
# them is 30 s) before it kills torchrun and every process under it
TORCHRUN_GRACE_S = 60.0


def under_launcher(env=None) -> bool:
    """True in a process started by run_sft's torchrun, or by a user's torchrun/accelerate."""
    env = os.environ if env is None else env
    return started_by_run_sft(env) or "TORCHELASTIC_RUN_ID" in env


def started_by_run_sft(env=None) -> bool:
    """True in a training process of run_sft's own torchrun (not a user's launcher)."""
    return (os.environ if env is None else env).get(LAUNCHED_ENV) == "1"


def launcher_world_size(env=None) -> int:
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1") or 1) if under_launcher(env) else 1


def node_gpus(env=None) -> list[str] | None:
    env = os.environ if env is None else env
    raw = env.get(NODE_GPUS_ENV, "").strip()
    return [g for g in raw.split(",") if g.strip()] or None


def visible_gpus() -> int:
    """GPUs SFT can train on, one process each. A process sees one MIG device only, and
    torchrun gives all its processes the same CUDA_VISIBLE_DEVICES, so MIG devices count as
    one (more would fail with "invalid device ordinal" on LOCAL_RANK 1)."""
    from guidealign.core.gpu import devices_per_process

    if node_gpus():
        return devices_per_process(node_gpus())
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - torch missing or broken CUDA: the CPU
        return 0


def resolve_num_processes(scfg, gpus: int | None = None) -> int:
    """``sft.num_processes`` as a count: "auto" = the visible GPUs (1 without any), or as many
    of them as the global batch splits evenly over (see :func:`_fitting`)."""
    gpus = visible_gpus() if gpus is None else gpus
    n = process_count(scfg.num_processes)
    if n is None:  # auto
        return _fitting(scfg, max(1, gpus))
    if n < 1:
        raise ValueError(f"sft.num_processes must be >= 1, not {n}")
    if gpus and n > gpus:
        raise ValueError(f"sft.num_processes={n} but only {gpus} GPU(s) are visible")
    return n


def _fitting(scfg, gpus: int) -> int:
    """The most processes, at most ``gpus``, that ``sft.global_batch_size`` splits over in whole
    micro-batches (the accumulation steps must come out whole): 1600 on 4-example micro-batches
    runs on 8 GPUs, and on 5 of a 6- or 7-GPU node (each process failed at the start before)."""
    per_micro = scfg.global_batch_size // max(1, scfg.micro_batch_size)
    if scfg.global_batch_size % max(1, scfg.micro_batch_size):
        return gpus  # no count fits: accumulation_steps says why, with the numbers
    n = next((k for k in range(gpus, 0, -1) if per_micro % k == 0), gpus)
    if n == 1 < gpus:  # one process: no sharding, a 13B full fine-tune would run out of memory later
        raise ValueError(f"sft.global_batch_size {scfg.global_batch_size} in micro-batches of "
                         f"{scfg.micro_batch_size} splits over no 2 to {gpus} processes: choose a global "
                         f"batch that does (a multiple of {scfg.micro_batch_size * gpus}) or set "
                         "sft.num_processes")
    if n < gpus:
        log.warning("sft: %d of the %d GPUs train (sft.num_processes: auto): global_batch_size %d in "
                    "micro-batches of %d splits evenly over %d processes, not over %d",
                    n, gpus, scfg.global_batch_size, scfg.micro_batch_size, n, gpus)
    return n


@contextlib.contextmanager
def without_pipeline_dist_env():
    """Hide the pipeline's distributed variables while a single process trains."""
    saved = {k: os.environ.pop(k) for k in DIST_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def child_env(n: int, gpus: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env[LAUNCHED_ENV] = "1"
    if node_gpus():
        env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus())
    if not gpus:  # CPU: share the cores between the gloo processes
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    return env


def torchrun_argv(n: int, config_path: Path, workdir: Path, *, force: bool, progress: bool,
                  log_dir: Path | None = None) -> list[str]:
    """torchrun of ``guidealign sft``; with ``log_dir``, torchrun's directory for each training
    process's error file (``record_training_error``; output still goes to this terminal)."""
    logs = ["--log-dir", str(log_dir)] if log_dir is not None else []
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(n), *logs, "-m", "guidealign", "sft", "-w", str(workdir),
            "-c", str(config_path)]
    if force:
        argv.append("--force")
    if not progress:
        argv.append("--no-progress")
    return argv


def launch(cfg, workdir: Path, n: int, *, force: bool, progress: bool) -> None:
    """Run SFT in ``n`` processes under torchrun and wait; the effective config goes with them."""
    import copy

    from guidealign.config import dump_yaml

    gpus = visible_gpus()
    c = copy.deepcopy(cfg)
    c.executor.kind = "local"  # the processes train; they are not Ray tasks
    out = Path(workdir) / "sft"
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / LAUNCH_CONFIG
    cfg_path.write_text(dump_yaml(c))
    logs = out / TORCHRUN_LOGS
    shutil.rmtree(logs, ignore_errors=True)  # the last launch's logs only
    argv = torchrun_argv(n, cfg_path, Path(workdir), force=force, progress=progress, log_dir=logs)
    rc = run_to_end(argv, child_env(n, gpus))
    if rc != 0:
        raise RuntimeError(f"SFT under torchrun ({n} processes) failed with status {rc}"
                           f"{worker_error(logs)} (command: {' '.join(argv)})")


# under WORKDIR/sft/ (not part of the model's checksums): torchrun's log directory of the last
# launch, with each failed training process's error file, and the config the launch handed its
# processes (the next launch writes it again)
TORCHRUN_LOGS = "_torchrun"
LAUNCH_CONFIG = "launch-config.yaml"


def record_training_error(e: BaseException) -> None:
    """In a training process of run_sft's torchrun: write ``e`` to the error file torchrun gave
    this process (``TORCHELASTIC_ERROR_FILE``, torch elastic's own format), so that torchrun's
    summary and :func:`worker_error` carry it; without it they say only "exit code 1". Never
    masks ``e``."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    except Exception as err:  # noqa: BLE001
        log.debug("could not record the training error for torchrun: %s", err)


def worker_error(log_dir: Path, callstack_lines: int = 8) -> str:
    """``"; training process R failed first: <its error>"`` from the error files the training
    processes wrote under ``log_dir`` (:func:`record_training_error`), the earliest by its
    own timestamp, with the end of its traceback; "" when none wrote one (killed by a signal
    or the OOM killer: torchrun's summary above says which)."""
    found = []
    for p in Path(log_dir).glob("*/attempt_*/*/error.json"):
        try:
            msg = json.loads(p.read_text())["message"]
            found.append((int(msg["extraInfo"]["timestamp"]), p.stat().st_mtime, p, msg))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not found:
        return ""
    _, _, path, msg = min(found, key=lambda f: f[:2])
    stack = str(msg["extraInfo"].get("py_callstack") or "").rstrip().splitlines()[-callstack_lines:]
    return (f"; training process {path.parent.name} failed first: {msg.get('message')}"
            + ("\n" + "\n".join(stack) if stack else "") + f"\n(its error file: {path})")


def run_to_end(argv: list[str], env: dict | None = None, grace: float = TORCHRUN_GRACE_S) -> int:
    """Run ``argv`` (torchrun) and wait for it; its status.

    torchrun starts each worker in a session of its own, so a signal to this process's group
    (Ctrl-C in a terminal, ``launch`` stopping a rank) never reaches the workers, and torchrun
    killed in the middle of stopping them leaves them training. So torchrun gets a session of
    its own too and is signalled by this process only: when the wait is interrupted (Ctrl-C,
    SIGTERM, an exception) it gets one SIGTERM (it stops its workers, then exits) and ``grace``
    seconds; then it and every process under it are killed (at once when asked again). Should
    this process die without that chance (SIGKILL), a watchdog kills them."""
    from guidealign.core import reaper

    p = watchdog = None
    old = _sigterm_raises()
    try:
        p = subprocess.Popen(argv, env=env, start_new_session=True)
        watchdog = reaper.guard_process(p.pid)
        return p.wait()
    except BaseException:
        if p is not None:
            stop_tree(p, grace)
        raise
    finally:
        reaper.release(watchdog)
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _sigterm_raises():
    """SIGTERM raises SystemExit(143) in this (main) thread, so the wait's cleanup runs; the
    handler it replaces, or None where signals cannot be handled (another thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def raise_exit(signum, _frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, raise_exit)


def stop_tree(p: subprocess.Popen, grace: float) -> None:
    """SIGTERM ``p``, wait up to ``grace`` seconds (less when asked again), then kill it and what
    was running under it when it was asked to stop."""
    import psutil

    try:
        tree = psutil.Process(p.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    except (KeyboardInterrupt, SystemExit):  # asked again: no more waiting
        pass
    for q in [*tree]:
        with contextlib.suppress(psutil.Error):
            tree += q.children(recursive=True)  # started while torchrun was stopping
    for q in tree:
        with contextlib.suppress(psutil.Error):
            q.kill()  # psutil checks the pid still names the process it found
    if p.poll() is None:
        p.kill()
    p.wait()
