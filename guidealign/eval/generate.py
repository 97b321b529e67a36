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


def run_retrieval(cfg, workdir: Path, sub: Path, rank: int, world_size: int, progress: bool = True) -> Path:
    """Retrieve guidelines for the benchmark prompts from the run's library and index; where
    GPUs are visible (``executor.stage_process``, as ``run`` does for its encoder stages) in a
    child process, so that this process holds no CUDA context when the responder's engine
    starts (on EXCLUSIVE_PROCESS GPUs its workers could not open the GPU otherwise)."""
    from guidealign.core.gpu import visible_gpus
    from guidealign.core.stage_child import run_in_child, wanted

    base = Path(cfg.eval.retrieve_from) if cfg.eval.retrieve_from else workdir
    _missing_retrieval(base, cfg)
    _link_artifacts(base, sub)
    if wanted(cfg.executor.stage_process, visible_gpus):
        run_in_child(f"{__name__}:retrieve_benchmark", cfg, sub, rank=rank, world_size=world_size,
                     progress=progress)
    else:
        retrieve_benchmark(cfg, sub, rank=rank, world_size=world_size, progress=progress)
    return sub / "retrieve"


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
