"""The stage table: every stage of guide-align, listed once.

The CLI (one command per stage), ``guidealign run`` (the ``in_run`` stages, in this order),
``status`` (its row order), ``launch`` (one worker per GPU for ``map`` stages), SLURM
(through launch) and Ray (worker pools for ``map`` stages, one task for the others) all
read this table.

Every stage function has the same signature::

    fn(cfg, workdir, *, rank=0, world_size=1, progress=True, **options) -> report

``map`` stages turn input shard i into output shard i and split the shards across ranks;
``reduce`` stages read every shard of their input and write a sharded dataset, and
``artifact`` stages build one model, index or report; both run on rank 0 while the
other ranks wait for the result inside the same function. Stages with ``engine`` take
``llm=`` (the worker's vLLM engine; built lazily when None). A stage's code, config section
and command are named in its row: ``fn`` is ``module:function``, ``config`` the section
of the YAML config, ``name`` the ``guidealign <name>`` command.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Stage:
    name: str        # the command (`guidealign <name>`) and the name `run --stages` takes
    fn: str          # the stage function, "module:function"
    src: str         # what it reads under WORKDIR ("inputs": the input files)
    dst: str         # what it writes under WORKDIR
    kind: str        # "map" | "reduce" | "artifact" (see the module docstring)
    engine: bool     # takes llm= (a vLLM engine)
    in_run: bool     # one of `guidealign run`'s stages
    config: str      # its config section
    # an artifact stage that still splits its own work across ranks (eval: its generation
    # and judging), so, like a map stage, it needs every rank to run
    split_inside: bool = False
    # its function may run torch on a GPU in the calling process (an encoder): on a GPU node
    # `run` calls it in a child process (executor.stage_process), see guidealign/core/stage_child.py
    cuda_here: bool = False

    @property
    def splits_across_ranks(self) -> bool:
        """Every rank does part of the work: one rank alone leaves the rest undone (or waits
        for it forever)."""
        return self.kind == "map" or self.split_inside

    def function(self) -> Callable:
        mod, _, attr = self.fn.partition(":")
        return getattr(importlib.import_module(mod), attr)


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "guidealign.ingest.stage:run_ingest", "inputs", "prompts", "reduce", False, True, "ingest"),
    Stage("detect", "guidealign.gen.detect:run_detect", "prompts", "detect", "map", True, True, "detect"),
    Stage("guidelines", "guidealign.gen.guidelines:run_guidelines", "detect", "guidelines", "map", True, True,
          "guidelines"),
    Stage("library", "guidealign.retrieval.library:run_library", "guidelines", "library", "reduce", False, True,
          "library", cuda_here=True),
    Stage("train-retriever", "guidealign.retrieval.train:run_train_retriever", "library", "retriever",
          "artifact", False, True, "retriever", cuda_here=True),
    Stage("index", "guidealign.retrieval.index:run_index", "library", "index", "artifact", False, True, "index",
          cuda_here=True),
    Stage("retrieve", "guidealign.retrieval.retrieve:run_retrieve", "prompts", "retrieve", "map", False, True,
          "retrieve", cuda_here=True),
    Stage("respond", "guidealign.gen.respond:run_respond", "retrieve", "respond", "map", True, True, "respond"),
    Stage("sft", "guidealign.sft.train:run_sft", "respond", "sft", "artifact", False, True, "sft"),
    Stage("push", "guidealign.hub.push:run_push", "respond", "push", "artifact", False, True, "push"),
    # not part of `run`
    Stage("augment", "guidealign.gen.augment:run_augment", "risk types", "augment", "map", True, False, "augment"),
    Stage("export", "guidealign.hub.export:run_export", "respond", "export", "map", False, False, "push"),
    Stage("eval", "guidealign.eval.run:run_eval", "respond", "eval", "artifact", False, False, "eval",
          split_inside=True),
)

BY_NAME = {s.name: s for s in STAGES}


def get(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {[s.name for s in STAGES]}") from None


def run_stages(cfg) -> list[Stage]:
    """`guidealign run`'s stages in order (push only when push.repo_id or push.model_repo_id is
    set: the model repo alone pushes the model alone)."""
    return [s for s in STAGES if s.in_run
            and (s.name != "push" or cfg.push.repo_id or cfg.push.model_repo_id)]
