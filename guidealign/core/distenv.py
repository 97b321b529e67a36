"""Keep torch.distributed out of processes that are not meant to be distributed.

A stage learns its rank from ``--rank/--world-size`` (``guidealign launch`` passes them).
The environment variables of torchrun/accelerate/MPI mean something else to torch: with
``LOCAL_RANK`` or ``WORLD_SIZE`` set, accelerate (inside every Trainer) sets up a process
group and waits for ranks that never join. So ``launch`` removes them from every worker's
environment, and the single-process trainers (the retriever) remove them from their own.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# torchrun / torch.distributed / accelerate / MPI launchers' per-process variables.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
             "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
             "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
             "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
             "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
             "MV2_COMM_WORLD_LOCAL_RANK")


def distributed_vars(env: dict | None = None) -> list[str]:
    env = os.environ if env is None else env
    return [k for k in DIST_VARS if k in env]


def single_process(reason: str = "") -> list[str]:
    """Remove the distributed variables from this process's environment (before torch or
    accelerate read them); returns the names removed."""
    gone = distributed_vars()
    for k in gone:
        os.environ.pop(k, None)
    if gone:
        log.warning("%sremoved %s from the environment: this stage runs as one process "
                    "(its rank comes from --rank/--world-size)", f"{reason}: " if reason else "",
                    ", ".join(gone))
    return gone


def one_device(training_args, what: str = "retriever") -> int:
    """Train on one device: without a process group, transformers' Trainer wraps the model in
    DataParallel over every visible GPU (the real batch becomes batch x GPUs); keep it on the
    first. Returns the device count the Trainer will use (0 on the CPU)."""
    _ = training_args.device  # settles _n_gpu (transformers sets it while choosing the device)
    if getattr(training_args, "_n_gpu", 0) > 1:
        log.info("%s: training on %s only (%d GPUs visible)", what, training_args.device,
                 training_args._n_gpu)
        training_args._n_gpu = 1
    return int(getattr(training_args, "_n_gpu", 0))
