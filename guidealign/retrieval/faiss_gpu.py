"""Whether FAISS searches on this machine's GPUs, and sending an index there.

GPU FAISS only where it works: ``use_gpu`` is "auto" (the default), true or false. Before
the first GPU search a process runs a probe (:func:`probe_gpus`): a small flat index is
cloned onto every GPU, searched, and its answers compared with the same search on the CPU.
FAISS GPU wheels carry kernels for some GPU generations only (``faiss-gpu-cu12``: sm_70 and
sm_80, so "no kernel image" on an H100/H200), and can bring a CUDA runtime other than
torch's. FAISS reports such a CUDA error through an assertion that aborts the process
(``CUDA_VERIFY`` -> ``FAISS_ASSERT``), which no ``except`` can catch, so the probe runs in a
child process and a child that dies is a failed probe. The GPU count is taken in that child
too (FAISS's device count is a CUDA call that aborts the same way, e.g. on a driver older than
its runtime): the process that runs the stages only asks whether its FAISS build has GPU code.
When the probe fails, "auto" searches on the CPU and logs why (a flat index over tens of thousands of guidelines is cheap there);
true raises; false never tries. Flat and IVF indexes that pass are sharded over all GPUs for
searching (retrieve, and the dedup candidate search); HNSW stays on the CPU (FAISS has no GPU
HNSW), and so does a search whose k, or an IVF index whose nprobe, is over FAISS GPU's
k-selection limit (:data:`GPU_MAX_K`), which the GPU index would refuse.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger(__name__)

# FAISS GPU's k-selection limit (getMaxKSelection() with CUDA >= 9): a GPU index refuses a
# search for more neighbours, and an IVF index with a larger nprobe cannot be cloned
GPU_MAX_K = 2048
PROBE_TIMEOUT_S = 300.0  # CUDA contexts on every GPU and the first kernels: well under this


def has_gpu_code() -> bool:
    """Whether this FAISS build has GPU indexes at all (faiss-gpu); no CUDA call."""
    import faiss

    return hasattr(faiss, "StandardGpuResources")


def faiss_gpu_count() -> int:
    """GPUs FAISS itself sees (0 for faiss-cpu builds), untested: a CUDA call, made only in the
    probe's child process."""
    import faiss

    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # faiss-cpu builds without the symbol
        return 0


def _clone_to_gpus(index, n: int):
    import faiss

    co = faiss.GpuMultipleClonerOptions()
    co.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=n)


@dataclass
class GpuProbe:
    ok: bool
    gpus: int
    reason: str


_PROBE: GpuProbe | None = None


def probe_search(clone, n: int) -> GpuProbe:
    """The probe's test search, in this process, with ``clone(index, n) -> index``."""
    import faiss

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((512, 32)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[:16] + 0.01 * rng.standard_normal((16, 32)).astype(np.float32)
    cpu = faiss.IndexFlatIP(32)
    cpu.add(xb)
    want_d, want_i = cpu.search(xq, 5)
    try:
        got_d, got_i = clone(cpu, n).search(xq, 5)
    except Exception as e:  # noqa: BLE001 - a CUDA runtime mismatch, OOM, a faiss-cpu build...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return GpuProbe(False, n, f"a test search on {n} GPU(s) failed: {type(e).__name__}: {first}")
    if np.array_equal(got_i, want_i) and np.allclose(got_d, want_d, atol=1e-3):
        return GpuProbe(True, n, f"a test search on {n} GPU(s) matched the CPU")
    return GpuProbe(False, n, f"a test search on {n} GPU(s) returned other neighbours than the "
                    "same search on the CPU")


NO_GPU = "FAISS sees no GPU (a faiss-cpu build, or no GPU visible)"


def probe_child_main(n: int | None) -> None:
    """The child process of :func:`probe_in_child`: the GPUs counted (``n`` None), then the real
    cloner; the result as JSON."""
    n = faiss_gpu_count() if n is None else n
    res = probe_search(_clone_to_gpus, n) if n else GpuProbe(False, 0, NO_GPU)
    print(json.dumps(asdict(res)), flush=True)


def probe_in_child(n: int | None = None, argv: list[str] | None = None,
                   timeout: float = PROBE_TIMEOUT_S) -> GpuProbe:
    """:func:`probe_search` on ``n`` GPUs (None: as many as FAISS counts there) in a child
    process (``argv`` replaces its command in tests): a child that aborts, exits with an error
    or hangs is a failed probe."""
    argv = argv or [sys.executable, "-c", "import sys; from guidealign.retrieval.faiss_gpu import "
                    "probe_child_main; probe_child_main(None if sys.argv[1] == 'all' else int(sys.argv[1]))",
                    "all" if n is None else str(n)]
    what = "the GPU count and test search" if n is None else f"the test search on {n} GPU(s)"
    n = n or 0  # what a failed probe reports
    # no faulthandler dump of the child's Python stack after FAISS's own last words
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return GpuProbe(False, n, f"{what} did not finish within {timeout:g} s")
    lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
    dump = next((i for i, ln in enumerate(lines) if ln.startswith("Fatal Python error")), len(lines))
    last_err = lines[dump - 1] if dump else ""  # (no dump: dump is len(lines))
    if p.returncode:
        how = (f"was killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0
               and -p.returncode in signal.valid_signals() else f"exited with status {p.returncode}")
        return GpuProbe(False, n, f"{what} {how}" + (f": {last_err}" if last_err else ""))
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1])
        return GpuProbe(bool(res["ok"]), int(res["gpus"]), str(res["reason"]))
    except (IndexError, ValueError, KeyError, TypeError):
        return GpuProbe(False, n, f"{what} gave no result: {p.stdout.strip()[-200:]!r}")


def probe_gpus(clone=None, n: int | None = None) -> GpuProbe:
    """Can FAISS search on this machine's GPUs? Clone a small flat index onto them, search,
    and compare with the CPU's answer (same neighbours, scores within 1e-3), in a child
    process (see the module doc).

    ``clone(index, n) -> index`` and ``n`` replace the GPU cloner and count (tests; the search
    then runs in this process); without them the result is computed once per process, and a
    FAISS build without GPU code starts no child.
    """
    global _PROBE
    if clone is None and n is None and _PROBE is not None:
        return _PROBE
    cpu_build = False
    if clone is not None:
        res = probe_search(clone, n) if n else GpuProbe(False, 0, NO_GPU)
    elif n == 0 or (n is None and not has_gpu_code()):
        res = GpuProbe(False, 0, NO_GPU)
        cpu_build = n is None  # faiss-cpu, the gpu extra's own: searching on the CPU is the plan
    else:
        res = probe_in_child(n)
    if clone is None:
        _PROBE = res
        log.log(logging.INFO if res.ok or cpu_build else logging.WARNING, "FAISS GPU probe: %s", res.reason)
    return res


def gpu_mode(use_gpu) -> str:
    """``use_gpu`` (true, false, "auto") -> "require", "off" or "auto"."""
    if use_gpu is True or str(use_gpu).lower() in ("true", "yes", "on", "require"):
        return "require"
    if use_gpu is False or use_gpu is None or str(use_gpu).lower() in ("false", "no", "off"):
        return "off"
    if str(use_gpu).lower() == "auto":
        return "auto"
    raise ValueError(f"use_gpu must be true, false or \"auto\", not {use_gpu!r}")


def num_gpus(use_gpu="auto") -> int:
    """GPUs FAISS searches on: those of a passed probe, else 0 (see :func:`gpu_mode`)."""
    mode = gpu_mode(use_gpu)
    if mode == "off":
        return 0
    res = probe_gpus()
    if not res.ok and mode == "require":
        raise RuntimeError(f"use_gpu is true but FAISS cannot search on the GPUs: {res.reason}. "
                           "Set use_gpu: auto (CPU FAISS then) or install a FAISS build for this GPU")
    return res.gpus if res.ok else 0


def search_gpus(kind: str, use_gpu="auto", *, k: int = 0, nprobe: int = 0, warn: bool = True) -> int:
    """GPUs a search of an index of ``kind`` runs on: those of a passed probe, else 0; also 0 for
    HNSW, and where ``k`` (the most neighbours a search asks for) or an IVF ``nprobe`` is over
    :data:`GPU_MAX_K`, which the GPU index would refuse (said in a warning unless ``warn`` is false)."""
    n = num_gpus(use_gpu)
    if n == 0 or kind == "hnsw":
        return 0
    over = [f"{name} {v}" for name, v in (("k", k), ("nprobe", nprobe)) if v > GPU_MAX_K]
    if over:
        if warn:
            log.warning("FAISS searches on the CPU: %s over the GPU index limit of %d", ", ".join(over),
                        GPU_MAX_K)
        return 0
    return n


def to_gpus(index, kind: str, use_gpu="auto", clone=None, *, k: int = 0):
    """Shard ``index`` over all GPUs (flat/IVF only) when :func:`search_gpus` says so; else the
    index itself. ``k``: the most neighbours a search will ask for."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    n = search_gpus(kind, use_gpu, k=k, nprobe=ivf.nprobe if ivf is not None else 0)
    return (clone or _clone_to_gpus)(index, n) if n else index
