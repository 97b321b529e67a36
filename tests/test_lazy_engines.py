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
