"""Config section of the evaluation stage (owned by the eval package)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    # Judge model: path, Hub id, or the embedded SmolLM2 (mechanics only).
    judge_model: str = "embedded:smollm2-135m-instruct"
