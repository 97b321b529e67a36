"""Shared fixtures. One real vLLM engine per test session (float32, so greedy output is
deterministic); tests that need it take the ``llm`` fixture."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO.parent / "shared" / "benchmarks"

# Tests never reach a hub: everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def engine_config(**over):
    from gen.engine import EngineConfig

    base = dict(dtype="float32", max_model_len=2048, max_num_seqs=32, seed=0)
    base.update(over)
    return EngineConfig(**base)


@pytest.fixture(scope="session")
def generator_path() -> str:
    from guidealign.models import prepare_generator

    return str(prepare_generator())


@pytest.fixture(scope="session")
def embedder_path() -> str:
    from guidealign.models import embedder_dir

    return str(embedder_dir())


@pytest.fixture(scope="session")
def llm(generator_path):
    """The real vLLM engine on the embedded SmolLM2 (float32, eager, prefix caching on)."""
    from gen.engine import build_llm

    engine = build_llm(engine_config(model=generator_path))
    yield engine


@pytest.fixture
def workdir(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d
