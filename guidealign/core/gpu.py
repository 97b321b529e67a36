"""Fail loudly when GPUs are visible but torch cannot use them.

A CUDA torch wheel needs a driver at least as new as its CUDA runtime; with an older driver
(or a CPU torch in a GPU job) ``torch.cuda.is_available()`` is simply False, and the engine
would quietly take its CPU branch on a GPU node: a 70B model on the CPU, for days.
:func:`require_usable_gpus` turns that into an error that says what is wrong.
"""
from __future__ import annotations

import os
import shutil
import subprocess


class GpuUnusable(RuntimeError):
    """GPUs are visible to this process, but torch cannot use them."""


def visible_gpus(env: dict | None = None, nvidia_smi: str | None = "nvidia-smi") -> list[str]:
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
