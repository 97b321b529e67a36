"""The one vLLM engine that a worker uses for all its shards.

``build_llm`` runs vLLM's engine core in a process of its own (V1 multiprocessing, spawn),
so nothing the engine does to its process reaches the caller: vLLM's CPU worker replaces
``torch.set_num_threads`` with a no-op and binds OpenMP threads to cores, and vLLM writes
``LD_PRELOAD`` and other variables into ``os.environ`` while it configures itself. The
caller's environment is restored once the engine is up, so later subprocesses inherit
nothing from it, and every later stage's thread setting holds. On a machine without a GPU
it also sets the vLLM CPU settings (KV-cache size, thread binding of the engine process).

``generate`` hands a whole shard's prompts to vLLM at once (its scheduler does the
batching) and never lets one bad prompt kill the batch; an engine that stops finishing requests
is killed after ``engine.progress_timeout_s`` (``deadline``).

Scripts that build an engine need the ``if __name__ == "__main__":`` guard: the engine
process is started with ``spawn``, which imports the main module again.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from guidealign.config.engine import EngineConfig, Sampling  # noqa: F401 - used here
from guidealign.gen.deadline import EngineStalled, watched_generate  # noqa: F401 - EngineStalled re-exported

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing
        return False


def apply_cpu_env(cfg: EngineConfig) -> None:
    """vLLM CPU settings that worked on small machines; explicit env vars still win."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_gib))
    # A model step or the engine's start-up can take minutes on a few busy cores; vLLM's own
    # limits (300 s, 600 s) then declare a healthy engine dead.
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
    os.environ.setdefault("VLLM_ENGINE_READY_TIMEOUT_S", "1800")
    bind = cfg.cpu_threads_bind
    if bind == "auto":
        cores = sorted(os.sched_getaffinity(0))
        bind = f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1)) \
            else ",".join(map(str, cores))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)


@contextmanager
def engine_isolation():
    """Build an engine without letting it change this process: the engine core runs in its
    own (spawned) process, and on exit ``os.environ`` is put back exactly as it was and
    ``torch.set_num_threads`` is the original function again. The engine's IPC sockets go to
    this process's ``sockets.socket_dir`` (vLLM leaves them behind in the temp directory)."""
    saved_env = dict(os.environ)
    # Own process for the engine core (the in-process engine patches the caller); spawn,
    # because a forked child inherits this process's OpenMP and CUDA state.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    if not os.environ.get("VLLM_RPC_BASE_PATH"):  # its sockets in a directory that goes with us
        from guidealign.gen.sockets import socket_dir

        d = socket_dir()
        if d is not None:
            os.environ["VLLM_RPC_BASE_PATH"] = str(d)
        else:
            log.warning("no temp directory short enough for vLLM's socket paths (107 bytes): "
                        "its sockets go to its default place, where they stay after the engine")
    try:
        yield
    finally:
        for k in set(os.environ) - set(saved_env):
            del os.environ[k]
        for k, v in saved_env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v
        torch = sys.modules.get("torch")
        if torch is not None and torch.set_num_threads is not torch._C.set_num_threads:
            torch.set_num_threads = torch._C.set_num_threads


# the smallest KV block vLLM's CPU attention accepts (its default, 128, wastes prefix-cache hits)
CPU_BLOCK_SIZE = 32
# vLLM's default on CUDA GPUs, asked for by name: the block a stage pads its shared prefix to is
# part of every prompt and of the stage's fingerprint, so it must not be whatever a later vLLM
# (or its attention backend) picks
GPU_BLOCK_SIZE = 16


class EngineStartTimeout(RuntimeError):
    """The engine did not start within ``engine.start_timeout_s``; its processes were killed."""


def _start_timeout_message(cfg: EngineConfig) -> str:
    return (f"the vLLM engine for {cfg.model} did not start within engine.start_timeout_s="
            f"{cfg.start_timeout_s:g} s (a worker stuck in NCCL's setup, a model load that does not "
            f"finish); its processes were killed. Raise engine.start_timeout_s for a slow file system.")


def build_llm(cfg: EngineConfig):
    """Start vLLM's offline engine for ``cfg`` (the model name is resolved to a local path)
    with its engine core in a process of its own (see :func:`engine_isolation`)."""
    from guidealign.core import reaper
    from guidealign.core.models import not_loadable, resolve

    before = reaper.child_pids()
    from guidealign.core.gpu import (check_tensor_parallel, release_cached_gpu_memory, require_usable_gpus,
                                     visible_gpus)

    require_usable_gpus()  # GPUs visible but unusable by torch: stop, never fall back to the CPU
    if has_cuda():
        # an earlier stage in this process (retrieve's embedder) may hold cached GPU memory
        # that vLLM counts as taken: "free memory less than desired GPU memory utilization"
        release_cached_gpu_memory()
        # before any engine process starts: with the "mp" backend set below, vLLM itself does
        # not compare tensor_parallel_size with the GPUs this process has (MIG: one per process)
        import torch

        gpus = visible_gpus() or [str(i) for i in range(torch.cuda.device_count())]  # no nvidia-smi
        check_tensor_parallel(cfg.tensor_parallel_size, gpus)
    with engine_isolation():
        cpu = not has_cuda()
        if cpu:
            apply_cpu_env(cfg)
        from vllm import LLM

        eager = cfg.enforce_eager if cfg.enforce_eager is not None else cpu
        kwargs = dict(
            model=resolve(cfg.model),
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enforce_eager=eager,
            seed=cfg.seed,
            max_num_seqs=cfg.max_num_seqs,
            disable_log_stats=False,
        )
        kwargs["block_size"] = _block_size(cfg, cpu)
        if cfg.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        if not cpu:
            kwargs.update(tensor_parallel_size=cfg.tensor_parallel_size,
                          gpu_memory_utilization=cfg.gpu_memory_utilization)
            if cfg.tensor_parallel_size > 1:
                # multiprocessing workers on the GPUs this process was given; inside a Ray task,
                # vLLM's Ray backend would try to reserve GPUs the task already holds
                kwargs["distributed_executor_backend"] = "mp"
        log.info("starting vLLM: %s", kwargs)
        with reaper.start_deadline(cfg.start_timeout_s, before) as expired:
            try:
                llm = LLM(**kwargs)
            except BaseException as e:
                if expired():
                    raise EngineStartTimeout(_start_timeout_message(cfg)) from e
                if isinstance(e, OSError):  # not local, not in the Hub cache (an offline node)
                    raise not_loadable(cfg.model, e) from e
                raise
        if expired():  # time ran out before its processes started, or just as it came up
            reaper.kill(reaper.child_pids() - before)
            raise EngineStartTimeout(_start_timeout_message(cfg))
    # the engine's processes end with this one, even when it is SIGKILLed
    llm._guidealign_procs = reaper.child_pids() - before
    llm._guidealign_watchdog = reaper.guard(llm._guidealign_procs)
    llm._guidealign_progress_s = cfg.progress_timeout_s  # gen/deadline.py
    use_template(llm, cfg.chat_template, model=cfg.model)  # the configured one, or the model's own
    return llm


def use_template(llm, spec: str | None, *, model: str):
    """Set the chat template ``spec`` on the engine's tokenizer (returned), and remember where
    that template's assistant turns end (:func:`sampling_params` stops there)."""
    from guidealign.gen.templates import apply_template, turn_end_stop

    tok = apply_template(llm.get_tokenizer(), spec, model=model)
    llm._guidealign_stop = turn_end_stop(tok, spec)
    return tok


def close_llm(llm, timeout: float = 60.0) -> int:
    """Stop the engine's processes now and free their memory (CPU RAM, GPU memory); returns
    how many of them are still alive ``timeout`` seconds later (0 after a normal shutdown).

    Dropping the last reference to the ``LLM`` is not enough: vLLM's client threads keep
    the engine and its processes alive until this process exits, so a stage after it (SFT,
    a judge on another model) would share the accelerator with an idle engine."""
    from guidealign.core import reaper

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    alive = reaper.wait_exit(getattr(llm, "_guidealign_procs", set()), timeout)
    reaper.release(getattr(llm, "_guidealign_watchdog", None))  # it kills any still alive
    llm._guidealign_procs = set()
    return alive


def sampling_params(s: Sampling, seed: int | None = None, llm=None):
    """vLLM's SamplingParams for ``s``; with ``llm``, generation also stops where the engine's
    chat template ends an assistant turn (:func:`use_template`)."""
    from vllm import SamplingParams

    stop_ids, stop_texts = getattr(llm, "_guidealign_stop", ([], []))
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                          stop=list(s.stop) + [t for t in stop_texts if t not in s.stop] or None,
                          stop_token_ids=list(stop_ids) or None, seed=seed,
                          repetition_penalty=s.repetition_penalty,
                          frequency_penalty=s.frequency_penalty)


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop", "length", or "error"
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    # prompt tokens found in vLLM's prefix cache (per request, unlike the process-wide metrics
    # registry, which follows only the newest engine of a process)
    cached_tokens: int = 0


def _to_generation(out) -> Generation:
    c = out.outputs[0]
    return Generation(text=c.text, finish_reason=str(c.finish_reason),
                      prompt_tokens=len(out.prompt_token_ids or []),
                      output_tokens=len(c.token_ids),
                      cached_tokens=int(getattr(out, "num_cached_tokens", 0) or 0))


def generate(llm, prompts: list, params) -> list[Generation]:
    """Generate for all prompts in one call; if vLLM raises, split the batch in halves
    until the bad prompt(s) are isolated, which get finish_reason "error" and the message.

    ``params`` is one SamplingParams for all prompts or a list with one per prompt."""
    if not prompts:
        return []
    if isinstance(params, list) and len(params) != len(prompts):
        raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
    try:
        outs = watched_generate(llm, prompts, params)
        return [_to_generation(o) for o in outs]
    except Exception as e:  # noqa: BLE001 - request errors are isolated per prompt
        if not is_request_error(e):
            raise  # an engine fault: the shard is not committed, a rerun resumes it
        if len(prompts) == 1:
            log.warning("prompt failed in vLLM: %s", e)
            return [Generation(text="", finish_reason="error", error=f"{type(e).__name__}: {e}")]
        mid = len(prompts) // 2
        p1, p2 = (params[:mid], params[mid:]) if isinstance(params, list) else (params, params)
        return generate(llm, prompts[:mid], p1) + generate(llm, prompts[mid:], p2)


class AllPromptsFailed(RuntimeError):
    """Every prompt of a shard failed in vLLM: a fault of the run (its settings, the engine,
    a missing structured-outputs backend), not of the prompts, so the shard is not committed."""


def check_not_all_failed(stage: str, errors: list, probe=None) -> None:
    """Raise :class:`AllPromptsFailed` when every prompt sent came back with a request error
    (``errors``: one entry per prompt sent, None when it did not fail): at least two, or the
    only one when ``probe`` (:func:`request_probe`: does a short request with the same settings
    fail too?) says the settings fail, not the prompt. ``generate`` isolates one bad prompt so
    that it never kills its shard; when all of them fail, committing the shard would record the
    fault as every prompt's result (detect: no verdict, so guidelines treats them as unknown),
    and a rerun would keep that."""
    if not errors or any(e is None for e in errors):
        return
    if len(errors) >= 2 or (probe is not None and not probe()):
        what = (f"all {len(errors)} prompts of the shard failed in vLLM" if len(errors) > 1 else
                "the only prompt the shard sent failed in vLLM, and so does a short request with the "
                "same settings")
        raise AllPromptsFailed(f"{stage}: {what} (first error: {errors[0]}); the shard is not committed")


def request_probe(llm, params):
    """For :func:`check_not_all_failed` on a shard that sent one prompt: whether a short
    request with the same settings (``params``, the first of a list) goes through, so that its
    failure was the prompt's (too long, say) and not the run's (a structured-outputs backend
    that does not work, bad sampling settings)."""
    def ok() -> bool:
        p = params[0] if isinstance(params, list) else params
        q = p.clone() if hasattr(p, "clone") else p
        if getattr(q, "max_tokens", None):
            q.max_tokens = min(q.max_tokens, 4)
        ids = llm.get_tokenizer().encode("Hello.", add_special_tokens=False)
        return generate(llm, [{"prompt_token_ids": ids}], q)[0].finish_reason != "error"
    return ok


def is_request_error(e: BaseException) -> bool:
    """An error caused by one request (validation: too long, bad parameters), as opposed
    to an engine fault, after which the engine cannot be trusted and the job must stop."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # pragma: no cover - older vLLM
        VLLMClientError = ()  # noqa: N806
    return isinstance(e, (ValueError, TypeError, VLLMClientError))


def prefix_cache_counters(llm) -> tuple[int, int]:
    """(queries, hits) of vLLM's prefix cache so far, in tokens; (0, 0) when unavailable."""
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001
        return 0, 0
    q = h = 0
    for m in metrics:
        if m.name == "vllm:prefix_cache_queries":
            q += int(getattr(m, "value", 0))
        elif m.name == "vllm:prefix_cache_hits":
            h += int(getattr(m, "value", 0))
    return q, h


def cache_block_size(llm) -> int:
    """Tokens per KV-cache block when ``llm`` caches prefixes (the unit a prefix-cache hit
    covers), else 0. Prompt builders pad shared prefixes to it (gen/build.py)."""
    try:
        cc = llm.llm_engine.vllm_config.cache_config
        return int(cc.block_size) if cc.enable_prefix_caching else 0
    except (AttributeError, TypeError, ValueError):
        return 0


def prefix_align(cfg: EngineConfig) -> int:
    """What :func:`cache_block_size` of the engine :func:`build_llm` starts for ``cfg`` will be,
    for the fingerprints of stages that pad their shared prefix to it (``align_prefix``): the
    padding is part of every prompt. 0 without prefix caching."""
    if not cfg.enable_prefix_caching:
        return 0
    return _block_size(cfg, cpu=not has_cuda())


def prompt_align(llm, cfg: EngineConfig) -> int:
    """The block a stage pads its shared prefix to with ``llm`` (:func:`cache_block_size`), after
    checking that it is the one its fingerprint names (:func:`prefix_align`): vLLM may start with
    another block size than asked for (some attention backends force their own), and prompts
    padded to it under the fingerprint of another would mix two paddings in one stage's shards.
    An engine that does not say (a stand-in in tests) is taken at its word, 0 or not."""
    actual = cache_block_size(llm)
    try:
        llm.llm_engine.vllm_config.cache_config
    except AttributeError:
        return actual
    want = prefix_align(cfg)
    if actual != want:
        if not actual:
            raise ValueError("the engine does not cache prefixes (vLLM turned prefix caching off for this "
                             "model or attention backend), so nothing is padded to a KV block, unlike what "
                             "this stage's fingerprint was made for; set engine.enable_prefix_caching: false")
        raise ValueError(f"the engine caches prefixes in blocks of {actual} tokens, not the {want} this "
                         f"stage's fingerprint was made for (vLLM or its attention backend chose "
                         f"another block size); set engine.block_size: {actual}")
    return actual


def _block_size(cfg: EngineConfig, cpu: bool) -> int:
    """The KV block size build_llm asks vLLM for: the configured one, else ours (the CPU's
    smallest, or vLLM's GPU default, named)."""
    return cfg.block_size or (CPU_BLOCK_SIZE if cpu else GPU_BLOCK_SIZE)


def prompt_seed(base: int, key: str) -> int:
    """A per-prompt sampling seed from the engine seed and a stable key (the prompt id)."""
    import hashlib

    h = hashlib.blake2b(f"{base}:{key}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


_warned_cpu_seed = False


def params_for(s: Sampling, base_seed: int, keys: list[str], per_prompt: bool, llm=None):
    """One SamplingParams for all prompts, or one per prompt with its own seed
    (only when sampling: at temperature 0 seeds change nothing)."""
    if not per_prompt or s.temperature == 0:
        return sampling_params(s, llm=llm)
    if not has_cuda():
        # vLLM CPU (0.32) crashes on seeded requests whose prefill is chunked ("CPU Generator
        # does not use offset"), so on the CPU prompts share the engine's seeded generator.
        global _warned_cpu_seed
        if not _warned_cpu_seed:
            log.info("per-prompt seeds are not supported by vLLM on the CPU; sampled outputs "
                        "depend on batching there (greedy outputs do not)")
            _warned_cpu_seed = True
        return sampling_params(s, llm=llm)
    return [sampling_params(s, seed=prompt_seed(base_seed, k), llm=llm) for k in keys]


def run_engine_stage(stage: str, cfg, src, dst, fp: str, make_shard_fn, *, llm=None,
                     columns: list[str] | None = None, rank: int = 0, world_size: int = 1,
                     progress: bool = True, missing_hint: str = ""):
    """A generation stage over shards: the engine is built on the first shard that needs work
    (or ``llm`` is used), ``make_shard_fn(cfg, llm)`` gives the per-shard function, and the
    report carries the prefix-cache hit rate of the work done."""
    from guidealign.shards import map_shards, read_manifest

    if read_manifest(src) is None:
        raise ValueError(f"{src} has no manifest: {missing_hint or 'run the stage before first'}")
    holder = {"llm": llm}

    def make_fn():
        if holder["llm"] is None:
            holder["llm"] = build_llm(cfg.engine)
        return make_shard_fn(cfg, holder["llm"])

    try:
        rep = map_shards(stage, src, dst, fp, make_fn=make_fn, rank=rank, world_size=world_size,
                         columns=columns, progress=progress, record={"model": cfg.engine.model})
    finally:
        if llm is None and holder["llm"] is not None:
            # built here, so nobody else will stop it: an engine left running holds
            # gpu_memory_utilization of its GPUs through the later stages (SFT on the node's GPUs)
            close_llm(holder["llm"])
            holder["llm"] = None
    q, h = rep.stats.get("prefix_cache_queries", 0), rep.stats.get("prefix_cache_hits", 0)
    rep.stats["prefix_cache_hit_rate"] = round(h / q, 4) if q else None
    from guidealign.gen.yieldstats import with_yield

    return with_yield(rep, dst)  # rows parsed, cut, share of tokens kept (gen/yieldstats.py)
