"""Config sections of the gen stages (owned by the gen package)."""
from __future__ import annotations

from dataclasses import dataclass, field

from gen.engine import Sampling


@dataclass
class DetectConfig:
    # Paper: temperature 0.7, up to 400 new tokens.
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, max_tokens=400))


@dataclass
class GuidelinesConfig:
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, max_tokens=400))


@dataclass
class AugmentConfig:
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, max_tokens=400))
