"""The engines handed to stages before they are started (Ray's worker engine, eval's responder)."""
from __future__ import annotations

from types import SimpleNamespace


def test_lazy_engines_pass_on_where_the_template_ends_a_turn():
    """Detect and guidelines on Ray get the worker's ``LazyEngine``; the stop at the end of an
    assistant turn that ``build_llm`` puts on the engine (``_guidealign_stop``: token ids and
    texts of the chat template's turn end, where it is not the tokenizer's EOS) must reach
    their sampling params through it. It was refused as a private name, so generation ran past
    the turn's end to max_tokens. The same for eval's lazy responder. Other private names stay
    the wrapper's own (asking for them starts no engine)."""
    import pytest

    from guidealign.config.engine import Sampling
    from guidealign.eval.generate import LazyLLM
    from guidealign.gen.engine import sampling_params
    from guidealign.ray_workers import LazyEngine

    engine = SimpleNamespace(_guidealign_stop=([7], ["</turn>"]))
    lazy = LazyEngine(None)
    lazy._llm = engine  # built
    p = sampling_params(Sampling(max_tokens=8), llm=lazy)
    assert p.stop_token_ids == [7] and "</turn>" in p.stop
    responder = LazyLLM(SimpleNamespace(generator=lambda: engine))
    assert sampling_params(Sampling(max_tokens=8), llm=responder).stop_token_ids == [7]
    unbuilt = LazyEngine(None)
    with pytest.raises(AttributeError):
        unbuilt._guidealign_procs
    assert not unbuilt.built


def test_an_engine_that_turned_prefix_caching_off_is_refused_with_the_setting_that_works():
    """vLLM turns prefix caching off by itself for some models and backends (MLA on the CPU,
    non-causal layers): such an engine pads nothing, unlike what detect's and guidelines'
    fingerprints (``prefix_align``) were made for. The stage says to set
    ``engine.enable_prefix_caching: false`` (it said ``engine.block_size: 0``, which means the
    default again and failed the same way); with that setting the stage starts, unpadded."""
    import pytest

    from guidealign.config.engine import EngineConfig
    from guidealign.gen.engine import prompt_align

    def engine(caching: bool, block: int = 32):
        cache = SimpleNamespace(block_size=block, enable_prefix_caching=caching)
        return SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache)))

    with pytest.raises(ValueError, match="set engine.enable_prefix_caching: false"):
        prompt_align(engine(False), EngineConfig(block_size=32))
    assert prompt_align(engine(False), EngineConfig(block_size=32, enable_prefix_caching=False)) == 0
    with pytest.raises(ValueError, match="set engine.block_size: 64"):
        prompt_align(engine(True, 64), EngineConfig(block_size=32))
    assert prompt_align(engine(True, 32), EngineConfig(block_size=32)) == 32


def test_the_progress_deadline_reaches_the_engine_behind_a_lazy_wrapper():
    """Ray's worker engine and eval's lazy responder keep their private names to themselves, so
    the deadline (``engine.progress_timeout_s``, ``gen/deadline.py``) read 0 through them and
    stages on Ray and eval's respond ran without it. It is read from the LLM whose ``generate``
    the wrapper hands out: the call gets the progress bar that feeds the deadline."""
    from guidealign.eval.generate import LazyLLM
    from guidealign.gen.deadline import watched_generate
    from guidealign.ray_workers import LazyEngine

    class Engine:  # what build_llm returns, as far as the deadline reads it
        _guidealign_progress_s = 600.0
        _guidealign_procs = {(2 ** 22 + 7, 0.0)}  # no such process: nothing to kill

        def __init__(self):
            self.bars = []

        def generate(self, prompts, params, use_tqdm=False):
            self.bars.append(use_tqdm)
            if callable(use_tqdm):
                bar = use_tqdm(total=len(prompts))
                bar.update(len(prompts))
            return [f"out {p}" for p in prompts]

    engine = Engine()
    lazy = LazyEngine(None)
    lazy._llm = engine  # built
    responder = LazyLLM(SimpleNamespace(generator=lambda: engine))
    for llm in (lazy, responder, engine):
        assert watched_generate(llm, ["a", "b"], None) == ["out a", "out b"]
    assert len(engine.bars) == 3 and all(callable(b) for b in engine.bars)
    engine._guidealign_progress_s = 0  # off: the plain call
    assert watched_generate(lazy, ["a"], None) == ["out a"] and engine.bars[-1] is False


def test_run_starts_one_shared_engine_when_detect_is_redone_after_a_settings_change(
        generator_path, tok, tmp_path, monkeypatch):
    """`run` decided from the manifests whether the shared engine was needed: after a change to
    detect's settings its old manifest still read complete, so detect built (and stopped) an
    engine of its own and guidelines, stale behind it, started the shared one again: two
    engine starts (minutes each for a large model on every rank). The shared engine is now
    built by the first stage with a shard to do and kept for the next; a rerun with nothing to
    do starts none."""
    from standins import FakeLLM, small_gen_cfg
    from synthetic import write_prompt_shards

    from guidealign.gen import engine
    from guidealign.pipeline import run_pipeline

    built, closed, verdict = [], [], ["No"]

    def answer(prompt):  # (the same text for both stages: each reads what it needs)
        return f"1. Be careful: Check the facts first.\nVerdict: {verdict[0]}", "stop"

    monkeypatch.setattr(engine, "build_llm", lambda ecfg: built.append(ecfg) or FakeLLM(tok, answer))
    monkeypatch.setattr(engine, "close_llm", lambda llm, timeout=60.0: closed.append(llm) or 0)
    write_prompt_shards(tmp_path / "prompts", [{"id": f"p{i}", "prompt": f"Question {i}?"} for i in range(4)],
                        shard_rows=2)

    def run(*sets):
        built.clear()
        run_pipeline(small_gen_cfg(generator_path, "detect.sampling.temperature=0",
                                   "guidelines.sampling.temperature=0", *sets),
                     tmp_path, stages=["detect", "guidelines"], progress=False, echo=lambda *a: None)
        return len(built)

    assert run() == 1 and len(closed) == 1  # fresh: one engine for both stages, stopped at the end
    assert run() == 0  # nothing to do: no engine
    verdict[0] = "Yes"  # detect's new settings change its output, so guidelines are redone too
    assert run("detect.sampling.max_tokens=300") == 1  # detect redone, guidelines behind it: one
    assert len(closed) == 2
