"""What one evaluation is: its benchmark preset, name, category field and judges, resolved
from ``cfg.eval`` and the benchmark file's name, and the checks of the eval config that run
before any work."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from guidealign.config.eval import (JUDGES, PRESETS, CombineRule, HarmJudge, RiskIdentification,
                                    UnparsedPolicy)


class EvalError(RuntimeError):
    pass


@dataclass
class Settings:
    benchmark: str
    name: str
    category_field: str
    judges: list[str]


def resolve_settings(ecfg, bench_path: str | Path) -> Settings:
    b = ecfg.benchmark
    stem = Path(bench_path).stem.lower().replace("_", "-")
    if b == "auto":
        b = ("do-not-answer" if "do-not-answer" in stem or stem in ("dna", "donotanswer")
             else "hhh" if "hhh" in stem else "vicuna" if "vicuna" in stem else "custom")
    if b not in PRESETS:
        raise EvalError(f"unknown eval.benchmark {b!r}; known: auto, {', '.join(PRESETS)}")
    cat, judges = PRESETS[b]
    if ecfg.category_field != "auto":
        cat = ecfg.category_field
    judges = list(ecfg.judges) or list(judges)
    bad = [j for j in judges if j not in JUDGES]
    if bad or not judges:
        raise EvalError(f"unknown judge(s) {bad}; known: {', '.join(JUDGES)}")
    name = ecfg.name or (b if b != "custom" else Path(bench_path).stem)
    return Settings(benchmark=b, name=name, category_field=cat or "", judges=judges)


def check_config(ecfg) -> None:
    """Raise EvalError for an eval section that cannot run (before anything is written)."""
    from guidealign.eval.prompts import check_template

    if ecfg.combine not in get_args(CombineRule):
        raise EvalError(f"unknown eval.combine {ecfg.combine!r}")
    if ecfg.unparsed not in get_args(UnparsedPolicy):
        raise EvalError(f"unknown eval.unparsed {ecfg.unparsed!r}")
    if ecfg.harm_judge not in get_args(HarmJudge):
        raise EvalError(f"unknown eval.harm_judge {ecfg.harm_judge!r}; known: llm, classifier")
    if ecfg.shard_rows < 1:
        raise EvalError("eval.shard_rows must be >= 1")
    if ecfg.risk_identification not in get_args(RiskIdentification) or ecfg.risk_top_k < 1:
        raise EvalError("eval.risk_identification must be auto, on or off, and eval.risk_top_k >= 1")
    try:
        if ecfg.pairwise_template:
            check_template(ecfg.pairwise_template, ("question", "answer_a", "answer_b"),
                           "eval.pairwise_template")
        if ecfg.harm_template:
            check_template(ecfg.harm_template, ("question", "answer"), "eval.harm_template")
        check_template(ecfg.classifier_template, ("response",), "eval.classifier_template")
    except ValueError as e:
        raise EvalError(str(e)) from e
