"""The engine cannot change the process that started it: after the real vLLM engine is up,
every later stage's thread setting holds (and is recorded in its markers), and no variable
vLLM set reaches os.environ or a later subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import guidealign.shards as shards
from guidealign.config import load_config
from guidealign.retrieval.index import run_index
from guidealign.retrieval.library import run_library
from guidealign.retrieval.retrieve import run_retrieve
from synthetic import synthetic_library, write_guideline_shards, write_prompt_shards
from conftest import ENV_AFTER_ENGINE, ENV_BEFORE_ENGINE

pytestmark = pytest.mark.slow


def _small_run(w, threads: int):
    texts, _ = synthetic_library(60, 20, seed=3)
    rows = [{"id": f"p{i:02d}", "prompt": f"prompt {i}", "risky": i % 2 == 0,
             "guidelines": [{"title": "T", "text": t} for t in texts[3 * i:3 * i + 3]]}
            for i in range(20)]
    write_guideline_shards(w / "guidelines", rows, shard_rows=10)
    write_prompt_shards(w / "prompts", [{"id": f"q{i}", "prompt": f"question {i} about {texts[i]}"}
                                        for i in range(12)], shard_rows=4)
    cfg = load_config(overrides=["index.model=embedded:all-minilm-l6-v2", f"index.threads={threads}",
                                 f"retrieve.threads={threads}", f"library.threads={threads}"])
    run_library(cfg, w, progress=False)
    run_index(cfg, w, progress=False)
    run_retrieve(cfg, w, progress=False)
    return cfg


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_setting_holds_after_the_engine_ran(llm, tmp_path, threads):
    import torch

    from guidealign.gen.engine import Sampling, generate, sampling_params

    # the engine is up (session fixture) and has generated before the stage runs
    out = generate(llm, ["Say hi."], sampling_params(Sampling(temperature=0, max_tokens=4)))
    assert out[0].finish_reason in ("stop", "length")
    assert torch.set_num_threads is torch._C.set_num_threads

    w = tmp_path / "run"
    _small_run(w, threads)
    assert torch.get_num_threads() == threads
    markers = [shards.read_marker(w / "retrieve", i) for i in shards.committed(w / "retrieve")]
    assert len(markers) == 3
    assert {m.threads for m in markers} == {threads}
    import json

    assert json.loads((w / "index" / "_done.json").read_text())["threads"] == threads
    # the engine, in its own process, still answers after the caller changed its threads
    again = generate(llm, ["Say hi."], sampling_params(Sampling(temperature=0, max_tokens=4)))
    assert again[0].text == out[0].text


def test_no_environment_leaks_from_the_engine(llm):
    # compared right around the engine's start (other tests may set variables of their own later)
    assert ENV_BEFORE_ENGINE, "the session engine fixture records the environment it started in"
    assert ENV_AFTER_ENGINE == ENV_BEFORE_ENGINE
    # vLLM preloads tcmalloc and torch's libgomp for its engine process; a child started now
    # inherits neither
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('LD_PRELOAD', ''))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == os.environ.get("LD_PRELOAD", "")
    assert "tcmalloc" not in child.stdout and "libgomp" not in child.stdout
