"""Ray workers that keep their engine: one long-lived actor per engine, pulling shards.

A sharded stage on Ray runs as W actors (``executor.ray_workers``, or as many as the
cluster's resources hold, at most one per shard). Actor k calls the stage function once,
``fn(cfg, workdir, rank=k, world_size=W, llm=<its engine>)``: with ``executor.assign:
dynamic`` every actor claims free shards until all are committed (``shards.claims``), so no
engine idles while shards remain and a dead actor's shard is taken over; with ``static``
actor k takes the shards i with i % W == k. The engine (``gen.engine.build_llm``) is built
once per actor, lazily, on the first shard that needs work, and kept for every later shard
and every later stage run on the same actors (``WorkerPool``).

Each actor asks for ``resources_for(executor, stage)`` (``executor.ray_resources_by_stage``
falling back to ``executor.ray_resources``); engine stages must get at least
``engine.tensor_parallel_size`` GPUs per actor on a cluster with GPUs. vLLM inside an actor
starts its own processes with the spawn method (forking a Ray worker is unsafe).
"""
from __future__ import annotations

import gc
import logging
import math
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Environment of every worker actor: vLLM must not fork inside a Ray worker.
WORKER_ENV = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
# The driver's settings that decide where models come from and which run this is: a worker of
# a running cluster has the environment of its raylet (`ray start` on that node), not the driver's
# (the Hub token too: push and gated models such as Llama-2 run on workers), and the NCCL and
# vLLM settings a tensor-parallel engine on that cluster needs (NCCL_SOCKET_IFNAME, ...)
FORWARDED_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                 "HF_TOKEN_PATH", "GUIDEALIGN_HOME", "GUIDEALIGN_RUN_ID")
FORWARDED_PREFIXES = ("NCCL_", "VLLM_")
# ... except the driver node's own address: each worker's node has its own
NOT_FORWARDED = ("VLLM_HOST_IP", "VLLM_PORT")


def worker_env(env: dict | None = None) -> dict:
    """The environment variables set on every Ray worker: WORKER_ENV and the driver's
    FORWARDED_ENV and FORWARDED_PREFIXES (those set; WORKER_ENV wins)."""
    env = os.environ if env is None else env
    fwd = {k: v for k, v in env.items()
           if k in FORWARDED_ENV or k.startswith(FORWARDED_PREFIXES) and k not in NOT_FORWARDED}
    return {**fwd, **WORKER_ENV}


def resources_for(ex, stage: str) -> dict:
    """The Ray resources of one worker of ``stage``."""
    by_stage = ex.ray_resources_by_stage or {}
    res = by_stage.get(stage, ex.ray_resources)
    return dict(res or {})


def engine_config(cfg, stage: str | None):
    """The engine a worker of ``stage`` builds: for respond the responder's (``respond.engine``
    over ``engine``, as the local path uses), for the other engine stages ``engine``."""
    if stage == "respond" and cfg.respond.engine:
        from guidealign.gen.respond import respond_engine

        return respond_engine(cfg)
    return cfg.engine


def check_engine_resources(stage: str, resources: dict, tensor_parallel_size: int,
                           cluster_gpus: float) -> None:
    """An engine stage on a cluster with GPUs (or asking for any) needs >= TP GPUs per worker."""
    gpus = float(resources.get("num_gpus", 0) or 0)
    if cluster_gpus <= 0 and gpus <= 0:
        return  # a CPU cluster: the engine runs on the CPU
    if gpus < tensor_parallel_size:
        raise ValueError(
            f"{stage}: each Ray worker gets {gpus:g} GPU(s), but engine.tensor_parallel_size is "
            f"{tensor_parallel_size}; set executor.ray_resources_by_stage.{stage}.num_gpus (or "
            f"executor.ray_resources.num_gpus) to at least {tensor_parallel_size}")


def capacity(cluster: dict, opts: dict) -> int:
    """How many workers with ``opts`` (ray.remote options) the resources ``cluster`` holds."""
    need = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0),
            "memory": opts.get("memory", 0), **(opts.get("resources") or {})}
    fits = [math.floor(cluster.get(k, 0) / v + 1e-9) for k, v in need.items() if v]
    return min(fits) if fits else 1


def node_capacity(nodes: list[dict], opts: dict) -> int:
    """How many workers with ``opts`` the alive nodes of ``ray.nodes()`` hold, node by node: an
    actor runs on one node, so the cluster's totals overcount (two nodes of 8 GPUs and 24 CPUs
    hold two workers of 4 GPUs and 16 CPUs, not the three the totals give)."""
    return sum(capacity(n.get("Resources") or {}, opts) for n in nodes if n.get("Alive"))


class LazyEngine:
    """The worker's engine, built by ``gen.engine.build_llm`` on first real use; ``builds``
    counts the builds. ``get_tokenizer()`` before that loads only the tokenizer, so stages can
    fingerprint their config without starting an engine for a rerun that has nothing to do."""

    def __init__(self, engine_cfg):
        self._cfg = engine_cfg
        self._llm = None
        self._tok = None
        self.builds = 0

    def build(self):
        if self._llm is None:
            from guidealign.gen.engine import build_llm

            self._llm = build_llm(self._cfg)
            self.builds += 1
        return self._llm

    @property
    def built(self) -> bool:
        return self._llm is not None

    def get_tokenizer(self):
        if self._llm is not None:
            return self._llm.get_tokenizer()
        if self._tok is None:
            from guidealign.gen.outputs import load_tokenizer

            self._tok = load_tokenizer(self._cfg)
        return self._tok

    def close(self) -> int:
        """Stop the engine, if built; returns how many of its processes outlived the normal
        shutdown (killed; see ``gen.engine.close_llm``)."""
        left = 0
        if self._llm is not None:
            from guidealign.gen.engine import close_llm

            left = close_llm(self._llm)  # dropping it would leave the engine's processes running
        self._llm = None
        gc.collect()
        return left

    def __getattr__(self, name):  # everything else needs the real engine
        # private names are the wrapper's own, but where the engine's chat template ends an
        # assistant turn (gen.engine.sampling_params stops there): refused, detect and
        # guidelines on Ray generated past the turn end
        if name.startswith("_") and name != "_guidealign_stop":
            raise AttributeError(name)
        return getattr(self.build(), name)


class StageWorker:
    """The Ray actor (wrapped with ``ray.remote`` at run time): one engine, many stage calls."""

    def __init__(self, cfg, cwd: str | None, worker: int, stage: str | None = None):
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)
        self.cfg = cfg
        self.worker = worker
        self.engine = LazyEngine(engine_config(cfg, stage))

    def run(self, fn_ref, workdir: str, rank: int, world_size: int, kwargs: dict,
            with_engine: bool, assign: dict):
        from guidealign.executors import TaskResult, _stage_name, resolve_stage_fn
        from guidealign.shards import claims
        from guidealign.shards.failure import guard

        t0 = time.perf_counter()
        print(f"[guidealign ray] worker {self.worker} ({rank}/{world_size}, {assign['kind']}) on "
              f"{socket.gethostname()} pid {os.getpid()} gpus "
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', '-')}", flush=True)
        fn = resolve_stage_fn(fn_ref)
        if with_engine:
            kwargs = dict(kwargs, llm=self.engine)
        # the fail-fast guard as on any rank: heartbeats, a failure marker that stops the other
        # workers' waits, and executor.stall_timeout_s for every wait (not the 30-min default)
        with guard(workdir, rank, world_size, stage=_stage_name(fn_ref),
                   stall_timeout_s=self.cfg.executor.stall_timeout_s), \
                claims.assignment(assign["kind"], assign["ttl_s"]):
            report = fn(self.cfg, workdir, rank=rank, world_size=world_size, progress=False, **kwargs)
        return TaskResult(rank=rank, world_size=world_size, node=socket.gethostname(),
                          pid=os.getpid(), gpus=os.environ.get("CUDA_VISIBLE_DEVICES"),
                          seconds=time.perf_counter() - t0, report=report,
                          builds=self.engine.builds, worker=self.worker)

    def ready(self) -> bool:
        """Answers once the actor runs (the pool drops actors Ray could not place)."""
        return True

    def close(self) -> int:
        """Drop the engine (its processes exit); returns how many times it was built."""
        builds = self.engine.builds
        self.engine.close()
        return builds


class WorkerPool:
    """W ``StageWorker`` actors with the same resources, kept across stage calls.

    ``with WorkerPool(cfg, stage, n_workers) as pool: pool.run(fn, workdir, ...)``; leaving
    the block drops the engines and kills the actors (their GPUs are free for what follows).
    """

    def __init__(self, cfg, stage: str, n_workers: int | None = None, *,
                 n_shards: int | None = None, engine: bool | None = None,
                 init_kwargs: dict | None = None):
        from guidealign.executors import init_ray, ray_task_options

        self.cfg, self.stage = cfg, stage
        if engine is None:  # a stage of the table with `engine` (its function takes llm=)
            from guidealign.stages import BY_NAME

            engine = stage in BY_NAME and BY_NAME[stage].engine
        self.engine = engine
        ex = cfg.executor
        self.ray = init_ray(ex.ray_address, **(init_kwargs or {}))
        resources = resources_for(ex, stage)
        if self.engine:
            check_engine_resources(stage, resources, engine_config(cfg, stage).tensor_parallel_size,
                                   self.ray.cluster_resources().get("GPU", 0))
        opts = ray_task_options(resources)
        opts.pop("max_retries")
        n = n_workers or ex.ray_workers or node_capacity(self.ray.nodes(), opts)
        if n < 1:
            raise ValueError(f"{stage}: the Ray cluster has no room for one worker with {opts} "
                             f"(cluster: {self.ray.cluster_resources()}); set executor.ray_workers "
                             "and executor.ray_start_timeout_s to wait for an autoscaler")
        self.n = min(n, n_shards) if n_shards else n
        restarts = max(ex.ray_max_restarts, 0)
        self.options = dict(opts, max_restarts=restarts, max_task_retries=restarts,
                            runtime_env={"env_vars": worker_env()})
        actor = self.ray.remote(StageWorker)
        cwd = os.getcwd()
        self.actors = [actor.options(name=None, **self.options).remote(cfg, cwd, k, stage)
                       for k in range(self.n)]
        self._drop_unplaced(stage, float(ex.ray_start_timeout_s))
        log.info("%s: %d Ray worker(s) with %s", stage, self.n, self.options)

    def _drop_unplaced(self, stage: str, timeout: float) -> None:
        """Keep the actors that started, waiting while they keep starting: an actor still not
        started ``timeout`` seconds after the pool's start or after the last actor that started
        is dropped (0: wait for all). One that Ray cannot place (the resources held by another
        job, or free in total but on no single node) would never take its call: its static
        shards would never be done and the driver would wait for it for ever. Timing from the
        last start keeps actors that are placed but slow to start (busy cores, workers brought
        up one by one): one clock from the pool's start dropped placeable workers on two busy
        cores. The stage runs with the others (ranks renumbered, so W is the number that
        runs); none started is an error."""
        refs = [a.ready.remote() for a in self.actors]
        started: set = set()
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1, timeout=timeout if timeout > 0 else None)
            if not done:  # none started for ``timeout`` seconds
                break
            started.update(done)
        keep = [a for a, r in zip(self.actors, refs) if r in started]
        for a, r in zip(self.actors, refs):
            if r not in started:
                self.ray.kill(a, no_restart=True)
        if not keep:
            raise RuntimeError(f"{stage}: none of {len(refs)} Ray worker(s) with {self.options} started within "
                               f"{timeout:g}s (executor.ray_start_timeout_s): the cluster has no free node "
                               f"that fits one (cluster: {self.ray.cluster_resources()}, free: "
                               f"{self.ray.available_resources()})")
        if len(keep) < len(refs):
            log.warning("%s: %d of %d Ray worker(s) not started %gs after the last one that did "
                        "(executor.ray_start_timeout_s; resources busy, or no node fits one); "
                        "running with %d", stage, len(refs) - len(keep), len(refs), timeout, len(keep))
        self.actors, self.n = keep, len(keep)

    def run(self, fn, workdir: str | Path, *, stage: str | None = None, engine: bool | None = None,
            progress: bool = True, **stage_kwargs) -> list:
        """Call ``fn`` once on every worker (worker k: rank k of W); returns their TaskResults.

        Raises ``ExecutorError`` naming the failed workers once all have returned."""
        from guidealign.executors import ExecutorError, _fn_name

        stage = stage or self.stage
        engine = self.engine if engine is None else engine
        ex = self.cfg.executor
        assign = {"kind": ex.assign, "ttl_s": ex.claim_ttl_s}
        from guidealign.shards import claims

        claims.Assignment(ex.assign, ex.claim_ttl_s)  # a bad value fails here, not on every worker
        workdir = str(Path(workdir).absolute())
        from guidealign.shards.failure import clear_all_failed

        clear_all_failed(workdir)  # this driver starts every rank: no marker is this run's yet
        refs = {a.run.remote(fn, workdir, k, self.n, stage_kwargs, engine, assign): k
                for k, a in enumerate(self.actors)}
        results, errors = {}, {}
        from tqdm import tqdm

        with tqdm(total=self.n, desc=f"ray {stage}", unit="worker", disable=not progress) as bar:
            pending = list(refs)
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                for ref in done:
                    k = refs[ref]
                    try:
                        results[k] = self.ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - reported with its worker
                        errors[k] = e
                        log.error("ray worker %d failed in %s: %s", k, stage, e)
                    bar.update(1)
        if errors:
            first = min(errors)
            raise ExecutorError(
                f"{_fn_name(fn)}: {len(errors)} of {self.n} Ray worker(s) failed (workers "
                f"{sorted(errors)}); committed shards are kept, so rerunning the same command "
                f"redoes only the missing ones. First error (worker {first}): {errors[first]}")
        return [results[k] for k in range(self.n)]

    def close(self, interrupted: bool = False) -> None:
        """Close every worker's engine (all asked at once, 120 s for them all), then end the
        actors. ``interrupted`` (an exception, Ctrl-C, is on its way out): end them at once; an
        actor still running its stage would take its close call only after it (each close
        waited 120 s in turn, while the engines went on generating)."""
        if not interrupted and self.actors:
            refs = [a.close.remote() for a in self.actors]
            try:
                self.ray.wait(refs, num_returns=len(refs), timeout=120)
            except Exception as e:  # noqa: BLE001 - a dead actor has nothing to close
                log.debug("closing Ray workers: %s", e)
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception as e:  # noqa: BLE001 - already gone
                log.debug("ending a Ray worker: %s", e)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(interrupted=exc_type is not None)


def describe(results: list) -> str:
    """One line per worker: shards written, engine builds, node."""
    lines = []
    for r in results:
        rep = r.report
        done = getattr(rep, "processed", None)
        lines.append(f"worker {r.worker}: {done if done is not None else '-'} shard(s) written, "
                     f"engine built {r.builds}x, {r.node} pid {r.pid}, {r.seconds:.1f}s")
    return "\n".join(lines)


__all__ = ["WorkerPool", "StageWorker", "LazyEngine", "resources_for", "engine_config",
           "check_engine_resources", "capacity", "node_capacity", "describe"]
