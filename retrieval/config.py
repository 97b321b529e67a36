"""Config sections of the retrieval stages (owned by the retrieval package)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LibraryConfig:
    # Paper: guidelines whose fuzzy-match ratio is >= 0.75 are merged.
    fuzzy_threshold: float = 0.75


@dataclass
class RetrieverConfig:
    # Base bi-encoder: path, Hub id, or the embedded MiniLM.
    base_model: str = "embedded:all-minilm-l6-v2"


@dataclass
class IndexConfig:
    # "flat" (exact, default), "ivf" or "hnsw" for very large libraries.
    kind: str = "flat"


@dataclass
class RetrieveConfig:
    # Paper: top 20 candidates, near-duplicates (ratio >= 0.5) dropped, 6 kept.
    top_n: int = 20
    keep: int = 6
    dedup_ratio: float = 0.5
