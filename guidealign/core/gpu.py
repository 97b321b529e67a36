"""Fail loudly when GPUs are visible but torch cannot use them.

A CUDA torch wheel needs a driver at least as new as its CUDA runtime; with an older driver
(or a CPU torch in a GPU job) ``torch.cuda.is_available()`` is simply False, and the engine
would quietly take its CPU branch on a GPU node: a 70B model on the CPU, for days.
:func:`require_usable_gpus` turns that into an error that says what is wrong.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess


class GpuUnusable(RuntimeError):
    """GPUs are visible to this process, but torch cannot use them."""


def visible_gpus(env: dict | None = None, nvidia_smi: str | None = "nvidia-smi") -> list[str]:
    """GPU ids this process may use, as CUDA_VISIBLE_DEVICES entries.

    ``CUDA_VISIBLE_DEVICES`` wins when it is set ("" / "-1" / "NoDevFiles" mean none; ids or
    GPU-/MIG- UUIDs are kept as they are); else what ``nvidia-smi -L`` lists (see
    :func:`parse_nvidia_smi_list`); else none.
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
    return parse_nvidia_smi_list(out.stdout)


_MIG_UUID = re.compile(r"UUID:\s*(MIG-[^)\s]+)")


def parse_nvidia_smi_list(text: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES entries for the devices ``nvidia-smi -L`` lists: a GPU's index, or,
    for a GPU in MIG mode, the UUIDs of its MIG devices (the ``  MIG ...`` lines under it). A
    process sees one MIG device only, so each MIG device must be a worker of its own; the
    parent GPU's index would give its worker just the first one, and leave the others idle."""
    out: list[str] = []
    gpu, migs = None, []
    for line in text.splitlines():
        if line.startswith("GPU "):
            if gpu is not None:
                out += migs or [gpu]
            gpu, migs = line.split(":", 1)[0].split()[1], []
        elif gpu is not None and line.strip().startswith("MIG "):
            m = _MIG_UUID.search(line)
            if m:
                migs.append(m.group(1))
    if gpu is not None:
        out += migs or [gpu]
    return out


def is_mig(gpu: str) -> bool:
    """A MIG device id (``MIG-<uuid>`` or the older ``MIG-GPU-<uuid>/gi/ci``)."""
    return gpu.strip().upper().startswith("MIG-")


def devices_per_process(gpus: list[str]) -> int:
    """How many CUDA devices one process given ``gpus`` (as CUDA_VISIBLE_DEVICES) can use:
    all of them, except that CUDA enumerates a single MIG device per process."""
    if any(is_mig(g) for g in gpus):
        return 1
    return len(gpus)


def check_tensor_parallel(tp: int, gpus: list[str]) -> None:
    """Raise a clear error when an engine of ``tp`` GPUs cannot run on ``gpus`` (its
    CUDA_VISIBLE_DEVICES entries). vLLM checks this only when it picks its executor itself;
    with ``distributed_executor_backend="mp"`` (set by gen.engine) the workers past the last
    device fail with "invalid device ordinal" instead."""
    n = devices_per_process(gpus)
    if tp <= n:
        return
    if any(is_mig(g) for g in gpus):
        raise ValueError(
            f"engine.tensor_parallel_size={tp} needs {tp} GPUs in one process, but the GPUs given "
            f"({','.join(gpus)}) are MIG devices and a process can use only one of them: set "
            "engine.tensor_parallel_size: 1 (one worker per MIG device), or run on whole GPUs")
    raise ValueError(
        f"engine.tensor_parallel_size={tp} needs {tp} GPUs, but this process may use {n} "
        f"({','.join(gpus) or 'none'}, from CUDA_VISIBLE_DEVICES or nvidia-smi): start it with "
        f"`guidealign launch` (which gives each engine {tp} GPUs) or lower tensor_parallel_size")


def _driver(nvidia_smi: str | None, env: dict) -> str:
    exe = shutil.which(nvidia_smi, path=env.get("PATH")) if nvidia_smi else None
    if not exe:
        return "nvidia-smi not found"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else f"nvidia-smi: {out.stderr.strip()}"


def require_usable_gpus(env: dict | None = None, nvidia_smi: str | None = "nvidia-smi",
                        cuda_available=None) -> int:
    """Number of GPUs torch can use; raises :class:`GpuUnusable` when GPUs are visible (see
    :func:`visible_gpus`) and torch sees none. ``cuda_available`` replaces
    ``torch.cuda.is_available`` (tests). Returns 0 when no GPU is visible."""
    env = os.environ if env is None else env
    gpus = visible_gpus(env, nvidia_smi)
    if not gpus:
        return 0
    import torch

    ok = torch.cuda.is_available() if cuda_available is None else cuda_available()
    if ok:
        return torch.cuda.device_count() if cuda_available is None else len(gpus)
    build = getattr(torch.version, "cuda", None)
    raise GpuUnusable(
        f"GPUs are visible ({','.join(gpus)}) but torch {torch.__version__} cannot use them "
        f"(torch built for CUDA {build or 'none: a CPU build'}; driver: {_driver(nvidia_smi, env)}). "
        "Refusing to run the engine on the CPU. Install the gpu extra into a fresh environment "
        "(GUIDEALIGN_EXTRA=gpu ./run.sh setup) with a torch whose CUDA version this driver supports, "
        "or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU on purpose.")


def torch_device() -> str:
    """The device a model that picks its own goes on: "cuda" where torch can use a GPU, "cpu"
    where none is visible; raises :class:`GpuUnusable` where GPUs are visible but torch cannot
    use them (a CPU wheel, an old driver) instead of encoding or training on the CPU of a GPU node."""
    if require_usable_gpus():
        return "cuda"
    import torch  # none listed (no nvidia-smi in the container): torch may still see one

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_compute_modes(text: str) -> dict[str, str]:
    """``nvidia-smi --query-gpu=index,uuid,compute_mode --format=csv,noheader`` -> {index or
    uuid: mode} ("Default", "Exclusive_Process", "Prohibited"); lines that do not read are left out."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 3 and parts[0] and parts[2] and not parts[2].startswith("["):
            out[parts[0]] = out[parts[1]] = parts[2]
    return out


def exclusive_gpus(gpus: list[str], nvidia_smi: str | None = "nvidia-smi", env: dict | None = None) -> list[str]:
    """Which of ``gpus`` (CUDA_VISIBLE_DEVICES entries) are in EXCLUSIVE_PROCESS compute mode
    (one process at a time may hold a context on them), as nvidia-smi reports; [] when it
    cannot tell (no nvidia-smi, MIG devices it does not list)."""
    env = os.environ if env is None else env
    exe = shutil.which(nvidia_smi, path=env.get("PATH")) if nvidia_smi else None
    if not exe or not gpus:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index,uuid,compute_mode", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    modes = parse_compute_modes(out.stdout) if out.returncode == 0 else {}
    return [g for g in gpus if modes.get(g, "").lower() == "exclusive_process"]


def parse_memory_query(text: str) -> dict[str, tuple[float, float]]:
    """``nvidia-smi --query-gpu=index,uuid,memory.used,memory.total --format=csv,noheader,nounits``
    -> {index or uuid: (MiB used, MiB total)}; lines that do not read (``[N/A]``) are left out."""
    out: dict[str, tuple[float, float]] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            used, total = float(parts[2]), float(parts[3])
        except ValueError:
            continue
        out[parts[0]] = out[parts[1]] = (used, total)
    return out


def gpu_memory(nvidia_smi: str = "nvidia-smi") -> dict[str, tuple[float, float]]:
    """Memory in use per GPU, by index and by UUID ({} when nvidia-smi cannot tell)."""
    exe = shutil.which(nvidia_smi)
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "--query-gpu=index,uuid,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_memory_query(out.stdout) if out.returncode == 0 else {}


def wait_gpus_free(gpus: list[str], *, max_used: float = 0.2, timeout_s: float = 300.0,
                   poll_s: float = 5.0, memory=gpu_memory, sleep=None, clock=None) -> list[str]:
    """Wait until each GPU of ``gpus`` uses at most ``max_used`` of its memory, or ``timeout_s``
    passed; returns the GPUs still busy (the caller warns). For SFT after the node's engines:
    another worker's engine that just committed its last shard may still hold its memory
    (gpu_memory_utilization) for a few seconds while it stops. GPUs nvidia-smi does not report
    (MIG devices) are not waited for."""
    import time

    sleep, clock = sleep or time.sleep, clock or time.monotonic
    end = clock() + timeout_s
    while True:
        mem = memory()
        busy = [g for g in gpus if g in mem and mem[g][1] > 0 and mem[g][0] / mem[g][1] > max_used]
        if not busy or clock() >= end:
            return busy
        sleep(poll_s)


def release_cached_gpu_memory() -> None:
    """Hand back what this process's torch keeps cached on its GPUs (an embedder's or a
    classifier's batches, a closed engine's leftovers): vLLM refuses to start when the free
    memory is below gpu_memory_utilization x total, and SFT waits for free GPUs. No-op
    without CUDA (torch not even imported when this process never used it)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
