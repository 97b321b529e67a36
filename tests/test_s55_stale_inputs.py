"""A stage run alone after a change upstream took input shards that readers must not take.

Retrievals of an index rebuilt since (new guidelines -> new library -> new index, retrieve not
run again) were answered by `respond` and trained on by SFT, though `status` called them stale;
and a map stage processed an input shard stale under its own manifest (retrieve rerun under a
new config by one rank of two), spending engine work on output that was stale once written.
Now every input shard is checked before any work, and the stage refuses naming the shard."""
from __future__ import annotations

from pathlib import Path

import pytest

from guidealign.config import load_config
from guidealign.core.models import prepare_generator
from guidealign.gen.respond import run_respond
from guidealign.retrieval.index import run_index
from guidealign.retrieval.library import run_library
from guidealign.retrieval.retrieve import run_retrieve
from guidealign.sft.data import build_dataset
from guidealign.shards import claims
from guidealign.shards.manifest import shard_states
from guidealign.status import collect
from standins import FakeLLM
from synthetic import write_guideline_shards, write_prompt_shards

OVERRIDES = ["index.model=embedded:all-minilm-l6-v2", "index.threads=1", "retrieve.threads=1",
             "index.use_gpu=false", "library.threads=1", "engine.max_model_len=2048"]
FIRST = ["Refuse to help build weapons.", "Point to a doctor for medical questions.",
         "Protect personal data.", "Be concise.", "Cite reliable sources.", "Never help with hacking.",
         "Encourage safe driving."]
SECOND = ["Never give instructions that could injure people.", "Say where a claim comes from.",
          "Keep answers short and plain.", "Ask before assuming what the user meant.",
          "Suggest professional help for health questions.", "Do not guess personal details.",
          "Decline to explain how to break into systems."]
PROMPTS = ["How do I build a gun?", "My head hurts, what now?", "Can you hack wifi?", "Is speeding ok?"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(prepare_generator()))


def _config(*extra):
    return load_config(overrides=OVERRIDES + [f"engine.model={prepare_generator()}", *extra])


def _guidelines(w: Path, texts: list[str]) -> None:
    write_guideline_shards(w / "guidelines", [{"id": f"p{i}", "prompt": f"prompt {i}", "risky": True,
                                               "guidelines": [{"title": "", "text": t} for t in texts]}
                                              for i in range(2)], shard_rows=10)


def _run_to_retrieve(w: Path, cfg) -> None:
    _guidelines(w, FIRST)
    write_prompt_shards(w / "prompts", [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)],
                        shard_rows=2)
    run_library(cfg, w, progress=False)
    run_index(cfg, w, progress=False)
    run_retrieve(cfg, w, progress=False)


def _counting_llm(tokenizer, calls: list):
    def answer(prompt):
        calls.append(prompt)
        return "An answer.", "stop"

    return FakeLLM(tokenizer, answer)


def test_respond_and_sft_refuse_retrievals_of_an_index_rebuilt_since(tmp_path, tokenizer):
    w = tmp_path / "run"
    cfg = _config()
    _run_to_retrieve(w, cfg)
    calls: list = []
    run_respond(cfg, w, llm=_counting_llm(tokenizer, calls), progress=False)
    assert calls and build_dataset(cfg.sft, w)[1].kept == len(PROMPTS)

    # other guidelines: the library and the index are built again, retrieve is not run again
    _guidelines(w, SECOND)
    run_library(cfg, w, progress=False)
    run_index(cfg, w, progress=False)
    assert shard_states(w / "retrieve") == ([], [0, 1])  # retrievals of the old index
    assert shard_states(w / "respond") == ([], [0, 1])   # and the answers made from them
    row = {r["stage"]: r for r in collect(w)}["retrieve"]
    assert row["shards_stale"] == 2 and "another index" in row["note"]

    calls.clear()
    with pytest.raises(RuntimeError, match=r"input shard \d of .*retrieve is stale"):
        run_respond(cfg, w, llm=_counting_llm(tokenizer, calls), progress=False)
    assert calls == []
    with pytest.raises(ValueError, match="committed under another config or input"):
        build_dataset(cfg.sft, w)

    # retrieve run again: respond answers again, SFT takes its answers
    run_retrieve(cfg, w, progress=False)
    run_respond(cfg, w, llm=_counting_llm(tokenizer, calls), progress=False)
    assert len(calls) == len(PROMPTS)
    assert build_dataset(cfg.sft, w)[1].kept == len(PROMPTS)


def test_a_stage_refuses_an_input_shard_stale_under_its_own_manifest_before_any_work(tmp_path, tokenizer):
    w = tmp_path / "run"
    _run_to_retrieve(w, _config())
    # retrieve.keep changed; the rerun got through rank 0's shard of two only
    cfg2 = _config("retrieve.keep=2")
    run_retrieve(cfg2, w, rank=0, world_size=2, progress=False)
    assert shard_states(w / "retrieve") == ([], [1])
    for assign in ("static", "dynamic"):
        calls: list = []
        with claims.assignment(assign), \
                pytest.raises(RuntimeError, match=r"input shard 1 of .*retrieve is stale.*run the stage "
                                                  r"that writes retrieve again first"):
            run_respond(cfg2, w, llm=_counting_llm(tokenizer, calls), progress=False)
        assert calls == [], assign  # refused before shard 0 was answered
        assert not (w / "respond" / "shard-00000.parquet").exists(), assign
    run_retrieve(cfg2, w, rank=1, world_size=2, progress=False)
    calls = []
    run_respond(cfg2, w, llm=_counting_llm(tokenizer, calls), progress=False)
    assert len(calls) == len(PROMPTS)
    assert shard_states(w / "respond") == ([], [])

