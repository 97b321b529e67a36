"""The respond stage: answers guided by retrieved guidelines (placeholder for its config)."""
from __future__ import annotations

from dataclasses import dataclass, field

from gen.engine import Sampling


@dataclass
class RespondConfig:
    # The paper decodes greedily.
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0, max_tokens=512))
