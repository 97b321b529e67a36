"""Eval responses: the engines (responder and judge), and guided and unguided answers
through the run's own retrieve and respond stages.

Guided and unguided answers differ in the guidelines only, as in the paper: both get the
same system message (``eval.system_prompt``), the guided one with the retrieved guidelines
after it (``eval.guidelines_intro``); decoding, example conversations, the responder model
and its chat template are the respond stage's, shared by both runs.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path


def responder_engine(cfg):
    """The EngineConfig that answers: ``engine`` with ``respond.engine``'s keys over it."""
    from guidealign.gen.respond import respond_engine

    return respond_engine(cfg)


def judge_engine(cfg):
    """The judge's EngineConfig: the responder's engine settings with the judge model, the
    judge's chat template (``eval.judge_chat_template``; None = the judge model's own), never the
    responder's, and ``eval.judge_engine``'s keys over them."""
    from guidealign.config import judge_engine_config

    return judge_engine_config(cfg)


def judge_is_responder(cfg) -> bool:
    """Whether the responder's engine judges too: the same model (after resolving names), no
    other chat template (``eval.judge_chat_template`` None or the responder's) and no engine
    setting of its own (``eval.judge_engine``) that differs from the responder's."""
    from guidealign.core.models import resolve

    r, j = responder_engine(cfg), judge_engine(cfg)
    if j.chat_template not in (None, r.chat_template):
        return False
    if dataclasses.replace(j, model=r.model, chat_template=r.chat_template) != r:
        return False
    try:
        return resolve(j.model) == resolve(r.model)
    except Exception:  # noqa: BLE001 - an unknown embedded name: building its engine says so
        return j.model == r.model


class Engines:
    """The responder engine and the judge engine, built lazily. When the judge is the
    responder (same model and template) one engine serves both; otherwise the responder (if
    built here) is released before the judge starts, so that two engines never share one
    accelerator."""

    def __init__(self, cfg, llm=None, judge_llm=None):
        self.cfg = cfg
        self.llm, self.judge_llm = llm, judge_llm
        self._built: list[str] = []

    def generator(self):
        if self.llm is None:
            from guidealign.gen.engine import build_llm

            self.llm = build_llm(responder_engine(self.cfg))
            self._built.append("llm")
        return self.llm

    def judge(self):
        if self.judge_llm is not None:
            return self.judge_llm
        if judge_is_responder(self.cfg):
            self.judge_llm = self.generator()
            return self.judge_llm
        if "llm" in self._built:
            self._close("llm")
        from guidealign.gen.engine import build_llm

        self.judge_llm = build_llm(judge_engine(self.cfg))
        self._built.append("judge_llm")
        return self.judge_llm

    def _close(self, attr: str) -> None:
        """Stop the engine built here as ``attr`` (dropping it would leave its processes running)."""
        from guidealign.gen.engine import close_llm

        llm = getattr(self, attr)
        if self.judge_llm is llm:  # the judge was the responder's engine
            self.judge_llm = None
        close_llm(llm)
        setattr(self, attr, None)
        self._built.remove(attr)
        _free()

    def release_generator(self) -> None:
        """Stop the responder engine if it was built here (before a GPU model of another kind,
        the harm classifier, loads: the engine holds gpu_memory_utilization of the GPU); the
        judge rebuilds it if it needs it."""
        if "llm" in self._built:
            self._close("llm")

    def close(self) -> None:
        """Stop the engines built here; engines handed in stay up."""
        for attr in list(self._built):
            self._close(attr)


class LazyLLM:
    """Hands the respond stage an engine that starts only when it is first used, so that a
    rerun with nothing to answer starts none, and the engine it starts is the one the judge
    reuses (when the judge model is the responder model)."""

    def __init__(self, engines: Engines):
        self._engines = engines
        self._tok = None

    def get_tokenizer(self):
        """The responder's tokenizer without starting its engine (stages fingerprint their
        config with it before they know whether anything is left to do)."""
        if self._engines.llm is not None:
            return self._engines.llm.get_tokenizer()
        if self._tok is None:
            from guidealign.gen.outputs import load_tokenizer

            self._tok = load_tokenizer(responder_engine(self._engines.cfg))
        return self._tok

    def __getattr__(self, name):
        if name.startswith("_") and name != "_guidealign_stop":  # the engine's turn end (see ray_workers)
            raise AttributeError(name)
        return getattr(self._engines.generator(), name)


def _free():
    from guidealign.core.gpu import release_cached_gpu_memory

    release_cached_gpu_memory()


def eval_respond_cfg(cfg):
    """``cfg`` with the respond section set so that guided and unguided prompts share one
    system message (``eval.system_prompt``) and differ only in the guidelines; with an empty
    ``eval.system_prompt`` the respond section is used as configured."""
    e = cfg.eval
    if not e.system_prompt:
        return cfg
    if "{guidelines}" not in e.guidelines_intro:
        from guidealign.eval.settings import EvalError

        raise EvalError("eval.guidelines_intro needs a {guidelines} placeholder")
    sep = "" if e.system_prompt.endswith(("\n", " ")) else " "
    respond = dataclasses.replace(cfg.respond, guided_system=e.system_prompt + sep + e.guidelines_intro,
                                  unguided_system=e.system_prompt)
    return dataclasses.replace(cfg, respond=respond)


def _link_artifacts(src_workdir: Path, sub: Path) -> None:
    """Make the trained retrieval artifacts of the run visible inside the eval workdir.

    A link left by an earlier run to another workdir (``eval.retrieve_from`` changed, the run
    moved) is replaced, or removed when this workdir lacks the artifact, so that retrieval
    never reads another run's library. Each link is swapped in atomically (ranks may link at
    once); an artifact directory of the eval's own (not a link) is left alone."""
    for name in ("library", "retriever", "index"):
        s, d = src_workdir / name, sub / name
        if d.exists() and not d.is_symlink():
            continue
        if not s.exists():
            if d.is_symlink():
                d.unlink(missing_ok=True)
            continue
        target = s.resolve()
        if d.is_symlink() and Path(os.readlink(d)) == target:
            continue
        tmp = d.with_name(f".{name}.link-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, d)


def _missing_retrieval(base: Path, cfg) -> None:
    """Name the run's retrieval artifacts the guided answers need when one is not built: the
    error otherwise names eval's own link to it (WORKDIR/eval/<name>/index), which no stage builds."""
    from guidealign.shards.artifact import read_done

    need = ("library", "index") + (("retriever",) if cfg.index.model == "retriever" else ())
    missing = [n for n in need if read_done(base / n) is None]
    if missing:
        raise RuntimeError(
            f"the guided answers retrieve from {base}'s {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not built there: run the pipeline on {base} "
            "first (guidealign run, or its library, train-retriever and index stages), set "
            "eval.retrieve_from to a run that has them, or pass --guided-responses")


def retrieval_base(cfg, workdir: Path) -> Path:
    """The run whose library, index and retriever the guided answers retrieve from."""
    return Path(cfg.eval.retrieve_from) if cfg.eval.retrieve_from else Path(workdir)


def run_retrieve_settings(base: Path) -> dict | None:
    """The retrieve settings (``retrieve.RESULT_SETTINGS``) that the run in ``base`` recorded in
    its own retrieve stage's manifest, the one whose guidelines its responses were made with;
    None when it recorded none (retrieved before they were recorded, or never) or a damaged one."""
    from guidealign.config.retrieval import RetrieveConfig
    from guidealign.retrieval.retrieve import RESULT_SETTINGS
    from guidealign.shards.manifest import read_manifest

    rs = (read_manifest(Path(base) / "retrieve") or {}).get("retrieve_settings")
    if not isinstance(rs, dict):
        return None
    defaults, out = RetrieveConfig(), {}
    for k in RESULT_SETTINGS:
        v, d = rs.get(k), getattr(defaults, k)
        if isinstance(d, bool):
            ok = isinstance(v, bool)
        elif isinstance(d, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            return None
        out[k] = type(d)(v)
    return out


def benchmark_retrieve_settings(cfg, base: Path) -> tuple[object, dict]:
    """``cfg`` with the retrieve settings the benchmark's retrieval uses, and what decided them.

    Each of ``retrieve.RESULT_SETTINGS`` is the run's recorded value (what its retrieve stage
    used for the responses it was tuned on), unless the eval config sets another value than the
    default (a key at its default counts as not set): then the eval's, reported as a
    difference. A run that recorded none: the eval config's, reported as unchecked.
    Returns (cfg, {"settings": used, "run": the run's or None, "from_run": keys taken from the
    run, "overridden": {key: {"run": ..., "eval": ...}}, "notes": warnings for the report})."""
    from guidealign.config.retrieval import RetrieveConfig
    from guidealign.retrieval.retrieve import RESULT_SETTINGS

    rc, defaults = cfg.retrieve, RetrieveConfig()
    own = {k: getattr(rc, k) for k in RESULT_SETTINGS}
    run = run_retrieve_settings(base)
    info = {"settings": dict(own), "run": run, "from_run": [], "overridden": {}, "notes": []}
    if run is None:
        info["notes"].append(
            f"The run in {base} recorded no retrieve settings (its retrieve stage ran before they were "
            "recorded, or did not run): the benchmark's guidelines were retrieved with this eval "
            "config's (" + _fmt_settings(own) + "), which could not be checked against those the run's "
            "responses were made with. Run `guidealign retrieve` on the run with its own config "
            "(it redoes nothing and records them), then eval again.")
        return cfg, info
    used = {}
    for k in RESULT_SETTINGS:
        mine, theirs = own[k], run[k]
        if mine == theirs:
            used[k] = mine
        elif mine == getattr(defaults, k):  # not set in the eval config: the run's
            used[k] = theirs
            info["from_run"].append(k)
        else:
            used[k] = mine
            info["overridden"][k] = {"run": theirs, "eval": mine}
    if used["keep"] > used["top_n"]:
        # one of the pair from the run and the other from the eval config would keep more than
        # it retrieves (run_retrieve refuses that): the pair comes from the eval config
        for k in ("top_n", "keep"):
            used[k] = own[k]
            if own[k] != run[k]:
                info["overridden"][k] = {"run": run[k], "eval": own[k]}
            if k in info["from_run"]:
                info["from_run"].remove(k)
    if info["overridden"]:
        info["notes"].append(
            "The eval config sets " + ", ".join(f"retrieve.{k} = {v['eval']!r} (the run's: {v['run']!r})"
                                                for k, v in info["overridden"].items())
            + f": the benchmark's guidelines were retrieved with other settings than the run in {base} "
            "retrieved with for its responses, so the guided answers and the risk identification rate "
            "do not show the guidelines the run would give. Remove those keys from the eval config to "
            "use the run's.")
    info["settings"] = used
    return dataclasses.replace(cfg, retrieve=dataclasses.replace(rc, **used)), info


def _fmt_settings(d: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in d.items())


def log_retrieve_settings(info: dict, base: Path) -> None:
    """Say which retrieve settings the benchmark's retrieval uses: warnings for the unchecked
    and the overridden ones."""
    import logging

    log = logging.getLogger(__name__)
    if info["from_run"]:
        log.info("eval: retrieve settings of the run in %s: %s", base,
                 _fmt_settings({k: info["settings"][k] for k in info["from_run"]}))
    for note in info["notes"]:
        log.warning("eval: %s", note)


def run_retrieval(cfg, workdir: Path, sub: Path, rank: int, world_size: int, progress: bool = True) -> Path:
    """Retrieve guidelines for the benchmark prompts from the run's library and index, with the
    run's recorded retrieve settings (:func:`benchmark_retrieve_settings`); where
    GPUs are visible (``executor.stage_process``, as ``run`` does for its encoder stages) in a
    child process, so that this process holds no CUDA context when the responder's engine
    starts (on EXCLUSIVE_PROCESS GPUs its workers could not open the GPU otherwise)."""
    from guidealign.core.gpu import visible_gpus
    from guidealign.core.stage_child import run_in_child, wanted

    base = retrieval_base(cfg, workdir)
    _missing_retrieval(base, cfg)
    _link_artifacts(base, sub)
    cfg, info = benchmark_retrieve_settings(cfg, base)
    log_retrieve_settings(info, base)
    if wanted(cfg.executor.stage_process, visible_gpus):
        run_in_child(f"{__name__}:retrieve_benchmark", cfg, sub, rank=rank, world_size=world_size,
                     progress=progress)
    else:
        retrieve_benchmark(cfg, sub, rank=rank, world_size=world_size, progress=progress)
    return sub / "retrieve"


def library_overlap(sub: Path, base: Path, bench_ids) -> dict | None:
    """How many of the benchmark's prompts (``bench_ids``: ingest's ids, content hashes) are
    prompts of the library the guided answers retrieve from (guidelines were written for them,
    its ``prompt_ids``), and how many of those trained the retriever (``pairs/train.parquet``):
    such a prompt retrieves guidelines written for itself, which flatters the guided results.
    The library is the eval's own (a directory, not a link), else ``base``'s; None when it is
    not complete there."""
    import pyarrow.parquet as pq

    from guidealign.retrieval.library_store import library_dir, read_library
    from guidealign.shards.artifact import read_done

    own = library_dir(sub)
    lib_wd = sub if own.is_dir() and not own.is_symlink() else base
    if read_done(library_dir(lib_wd)) is None:
        return None
    bench = set(bench_ids)
    table, _ = read_library(lib_wd, columns=["prompt_ids"])
    library = {p for ps in table.column("prompt_ids").to_pylist() for p in ps or []}
    in_library = bench & library
    train = library_dir(lib_wd) / "pairs" / "train.parquet"
    trained = set(pq.read_table(train, columns=["prompt_id"]).column("prompt_id").to_pylist()) \
        if train.exists() else set()
    return {"library": str(library_dir(lib_wd).resolve()), "benchmark_prompts": len(bench),
            "in_library": len(in_library), "in_retriever_training": len(in_library & trained)}


def overlap_note(ov: dict) -> str | None:
    """The report's warning for benchmark prompts the library was built from; None for none."""
    if not ov or not ov["in_library"]:
        return None
    return (f"{ov['in_library']} of the {ov['benchmark_prompts']} benchmark prompts are prompts of the "
            f"library retrieved from ({ov['library']}): guidelines were written for them "
            f"({ov['in_retriever_training']} of them also trained the retriever), so they retrieve "
            "guidelines written for themselves, which flatters the guided results and the risk "
            "identification rate. Evaluate on prompts the library was not built from, or discount them.")


def retrieve_benchmark(cfg, sub, *, rank: int = 0, world_size: int = 1, progress: bool = True):
    """The retrieve stage over the benchmark's prompts in the eval directory ``sub``."""
    from guidealign.retrieval.retrieve import run_retrieve

    return run_retrieve(cfg, sub, rank=rank, world_size=world_size, progress=progress, src="prompts",
                        dst="retrieve", run_config=False)


def run_responses(cfg, workdir: Path, sub: Path, guided: bool, engines: Engines, rank: int,
                  world_size: int, progress: bool) -> Path:
    """Guided (retrieve -> respond) or unguided (prompts -> respond) responses."""
    from guidealign.gen.respond import run_respond

    dst = "respond_guided" if guided else "respond_unguided"
    src = "prompts"
    if guided:
        run_retrieval(cfg, workdir, sub, rank, world_size, progress)
        src = "retrieve"
    run_respond(eval_respond_cfg(cfg), sub, rank=rank, world_size=world_size, llm=LazyLLM(engines),
                guided=guided, src=src, dst=dst, progress=progress)
    return sub / dst
