"""One list per config key with a fixed set of values.

The config loader refuses a value outside a key's ``Literal`` (guidealign/config); the stage
code checks again, since stage functions can be called with a hand-built config. Each
stage-side check is called here with every value of the Literal (all accepted) and with one
that is not (refused), so a value added to one list but not to the other fails this test.
"""
from __future__ import annotations

import dataclasses
import typing

import pytest

from guidealign.config import Config

BAD = "not-a-choice"


class Stop(Exception):
    """Raised by a stand-in just past a stage-side check: the value got through it."""


def literal_keys() -> dict[str, tuple]:
    """Every Literal-typed key of the config: dotted key -> its values."""
    out = {}

    def walk(cls, prefix):
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) is typing.Literal:
                out[prefix + name] = typing.get_args(tp)
            elif dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")
    walk(Config, "")
    return out


def _cfg(key: str, value) -> Config:
    cfg = Config()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    return cfg


# A checker calls one real stage-side check with a value: it returns when the value is accepted
# and raises the check's own error when it is refused.

def detect_mode(v, request, monkeypatch):
    from guidealign.gen.detect import make_shard_fn

    class LLM:  # what make_shard_fn asks the engine for right after its check
        def get_tokenizer(self):
            raise Stop

    with pytest.raises(Stop):
        make_shard_fn(_cfg("detect.mode", v), LLM())


def unknown_verdict(v, request, monkeypatch):
    from guidealign.gen.guidelines import kind_for

    assert kind_for(None, v) == (None if v == "skip" else v)


def overlong(v, request, monkeypatch):
    from guidealign.gen.build import PromptBuilder

    assert PromptBuilder(request.getfixturevalue("tok"), 512, overlong=v).overlong == v


def hash_kernel(v, request, monkeypatch):
    from guidealign.config.ingest import IngestConfig
    from guidealign.ingest import blake2_llvm
    from guidealign.ingest.readers import IngestError
    from guidealign.ingest.run import _hash_kernel

    monkeypatch.setattr(blake2_llvm, "available", lambda: False)  # no kernel thread started
    try:
        _hash_kernel(IngestConfig(hash_kernel=v), [])
    except IngestError as e:
        if "needs llvmlite" not in str(e):  # llvm without llvmlite: past the check
            raise


def sft_mode(v, request, monkeypatch):
    pytest.importorskip("trl")
    from guidealign.sft import train

    def stop(*a, **k):  # called right after the mode check
        raise Stop
    monkeypatch.setattr(train, "accumulation_steps", stop)
    with pytest.raises(Stop):
        train.build_trainer(_cfg("sft.mode", v), "unused", None, world=1)


def sft_precision(v, request, monkeypatch):
    from guidealign.sft.precision import choose_precision

    assert choose_precision(v, cuda=False, native_bf16=False) == ("float32" if v == "auto" else v)


def eval_config(key):
    def check(v, request, monkeypatch):
        from guidealign.config.eval import EvalConfig
        from guidealign.eval.settings import check_config

        check_config(dataclasses.replace(EvalConfig(), **{key: v}))
    return check


def combine_rule(v, request, monkeypatch):
    from guidealign.eval.aggregate import combine_orders

    combine_orders("win", "tie", v)  # win + tie: every rule must decide it, none returns early


def unparsed_policy(v, request, monkeypatch):
    from guidealign.eval.aggregate import aggregate_pairwise

    aggregate_pairwise([{"id": "q", "order": "guided_first", "outcome": "win"}], unparsed=v)


def assignment(v, request, monkeypatch):
    from guidealign.shards.claims import Assignment

    assert Assignment(kind=v).kind == v


def stage_process(v, request, monkeypatch):
    from guidealign.core.stage_child import wanted

    wanted(v, lambda: [])


def execute_kind(v, request, monkeypatch):
    import guidealign.shards
    from guidealign import executors

    def stop(*a, **k):  # called right after the kind check
        raise Stop
    monkeypatch.setattr(guidealign.shards, "resolve_rank", stop)
    with pytest.raises(Stop):
        executors.execute("ingest", _cfg("executor.kind", v), "unused")


def check_row(v, request, monkeypatch):
    from guidealign.check import other_rows

    bad = [r for r in other_rows(_cfg("executor.kind", v)) if (r.check, r.item) == ("executor", "kind")]
    if bad:
        raise ValueError(bad[0].detail)


def cli_executor(v, request, monkeypatch):
    from guidealign.cli.options import stage_options

    choice = next(p.type for p in stage_options(lambda **k: None).__click_params__ if p.name == "executor")
    choice.convert(v, None, None)


def library_candidates(v, request, monkeypatch):
    from guidealign.config.retrieval import LibraryConfig
    from guidealign.retrieval import embed, library_candidates as candidates

    def stop(*a, **k):
        raise Stop
    monkeypatch.setattr(candidates, "set_threads", lambda n: None)
    monkeypatch.setattr(embed, "load_encoder", stop)  # "model": no encoder is loaded
    try:
        candidates.library_vectors(["a prompt"], LibraryConfig(candidates=v))
    except Stop:
        pass


def index_kind(v, request, monkeypatch):
    pytest.importorskip("faiss")
    import numpy as np

    from guidealign.config.retrieval import IndexConfig
    from guidealign.retrieval.index import build_faiss

    build_faiss(np.eye(8, 16, dtype="float32"), IndexConfig(kind=v))


def shard_cut(v, request, monkeypatch):
    from guidealign.ingest.cuts import shard_cuts

    shard_cuts(10, v)


# key -> its stage-side checks: (checker, what the check raises for another value)
CHECKS = {
    "detect.mode": [(detect_mode, ValueError, "detect.mode must be one of")],
    "guidelines.unknown_verdict": [(unknown_verdict, ValueError, "unknown_verdict must be safety, quality or skip")],
    "engine.overlong": [(overlong, ValueError, "engine.overlong must be 'truncate' or 'skip'")],
    "ingest.hash_kernel": [(hash_kernel, Exception, "ingest.hash_kernel must be auto, llvm or hashlib")],
    "ingest.shard_cut": [(shard_cut, ValueError, "ingest.shard_cut must be position or content")],
    "sft.mode": [(sft_mode, ValueError, "sft.mode must be 'full' or 'lora'")],
    "sft.precision": [(sft_precision, ValueError, "sft.precision must be auto, bf16, fp16 or float32")],
    "eval.harm_judge": [(eval_config("harm_judge"), Exception, "unknown eval.harm_judge")],
    "eval.combine": [(eval_config("combine"), Exception, "unknown eval.combine"),
                     (combine_rule, ValueError, "unknown combine rule")],
    "eval.unparsed": [(eval_config("unparsed"), Exception, "unknown eval.unparsed"),
                      (unparsed_policy, ValueError, "unknown eval.unparsed")],
    "eval.risk_identification": [(eval_config("risk_identification"), Exception,
                                  "eval.risk_identification must be auto, on or off")],
    "executor.assign": [(assignment, ValueError, "executor.assign must be one of")],
    "executor.stage_process": [(stage_process, ValueError, "executor.stage_process must be auto, child or inline")],
    "executor.kind": [(execute_kind, ValueError, "executor.kind must be one of"),
                      (check_row, ValueError, "is not local or ray"),
                      (cli_executor, Exception, "is not one of|not a valid|invalid choice")],
    "library.candidates": [(library_candidates, ValueError, "library.candidates must be 'ngram' or 'model'")],
    "index.kind": [(index_kind, ValueError, "index.kind must be flat, ivf or hnsw")],
}
# Literal keys whose stage-side check cannot be called cheaply, with the reason.
NOT_CALLED = {
    "retriever.loss": "checked by branching inside training (needs an embedding model); no list of its own",
    "engine.dtype": "vLLM checks it when the engine starts; tests/test_review_s46_config.py compares the "
                    "Literal with vLLM's ModelDType",
}


def test_every_literal_key_is_covered():
    keys = set(literal_keys())
    covered = set(CHECKS) | set(NOT_CALLED)
    assert keys == covered, (f"Literal keys without a stage-side check here: {sorted(keys - covered)}; "
                             f"keys here that are no Literal: {sorted(covered - keys)}")


def test_the_loader_refuses_another_value():
    from guidealign.config import ConfigError, load_config

    for key in literal_keys():
        with pytest.raises(ConfigError, match="expected one of"):
            load_config(None, [f"{key}={BAD}"])


def test_public_lists_are_the_config_values():
    from guidealign.config import ShardAssign
    from guidealign.config.eval import CombineRule
    from guidealign.config.gen import DetectMode
    from guidealign.eval.aggregate import RULES
    from guidealign.gen.detect import MODES
    from guidealign.shards.claims import ASSIGNMENTS

    assert MODES == typing.get_args(DetectMode)
    assert RULES == typing.get_args(CombineRule)
    # storage (shards/) is a layer below config and cannot import it: it keeps its own list
    assert ASSIGNMENTS == typing.get_args(ShardAssign)


def test_export_format_choices_are_the_formats_export_writes():
    from guidealign.cli import cli
    from guidealign.config.sft import ExportFormat
    from guidealign.hub.export import FORMATS

    choice = next(p.type for p in cli.commands["export"].params if p.name == "fmt")
    assert tuple(choice.choices) == FORMATS == typing.get_args(ExportFormat)


@pytest.mark.parametrize("key, i", [(k, i) for k in sorted(CHECKS) for i in range(len(CHECKS[k]))])
def test_stage_check_accepts_exactly_the_config_values(key, i, request, monkeypatch):
    check, error, message = CHECKS[key][i]
    for v in literal_keys()[key]:
        check(v, request, monkeypatch)  # accepted
    with pytest.raises(error, match=message):
        check(BAD, request, monkeypatch)
