"""Config sections of SFT and push (owned by the sft package)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SFTConfig:
    # Base model to fine-tune: path, Hub id, or the embedded SmolLM2.
    base_model: str = "embedded:smollm2-135m-instruct"


@dataclass
class PushConfig:
    # Hub repo id, e.g. "org/guide-align-responses"; empty disables push in `guidealign run`.
    repo_id: str = ""
    private: bool = True
