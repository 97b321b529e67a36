"""Everything tokenized by gen/build.py's PromptBuilder is redone when its tokenization changes.

``TOKENIZATION`` names how PromptBuilder turns a chat into ids (v3: text right after a BOS is
tokenized from its start). The generation stages already held it (through
``chat_template_hash`` and ``respond_fingerprint``); the SFT model (its examples are built by
PromptBuilder) and the LLM judges' judgments (``render_chat`` builds their prompts) did not, so
a model trained, or answers judged, on the old ids were kept as current after an upgrade.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from guidealign.config import load_config


@pytest.fixture
def other_tokenization(monkeypatch):
    import guidealign.gen.build as build

    def switch():
        monkeypatch.setattr(build, "TOKENIZATION", build.TOKENIZATION + "-changed")
    return switch


def test_a_change_of_tokenization_retrains_the_sft_model(other_tokenization):
    from guidealign.sft.train import sft_fingerprint

    cfg, rep = load_config(None), SimpleNamespace(sources={"respond": ["sha"]})
    before = sft_fingerprint(cfg, rep)
    assert sft_fingerprint(cfg, rep) == before  # deterministic: only the switch below changes it
    other_tokenization()
    assert sft_fingerprint(cfg, rep) != before


@pytest.mark.parametrize("kind", ["pairwise", "harm"])
def test_a_change_of_tokenization_re_judges_with_an_llm_judge(other_tokenization, kind):
    from guidealign.eval.judging import judge_fp

    cfg = load_config(None, ["eval.harm_judge=llm"])
    before = judge_fp(cfg, kind)
    assert judge_fp(cfg, kind) == before
    other_tokenization()
    assert judge_fp(cfg, kind) != before


def test_the_harm_classifier_does_not_depend_on_the_prompt_builder(other_tokenization):
    """The classifier judge tokenizes (question, answer) with its own tokenizer, not
    PromptBuilder: its judgments stay."""
    from guidealign.eval.judging import judge_fp

    cfg = load_config(None, ["eval.harm_judge=classifier"])
    before = judge_fp(cfg, "harm")
    other_tokenization()
    assert judge_fp(cfg, "harm") == before


def test_a_change_of_tokenization_redoes_the_generation_stages(other_tokenization):
    """The generation stages' side of the same rule (held before): the template hash their
    fingerprints take includes TOKENIZATION."""
    from guidealign.gen.build import chat_template_hash

    tok = SimpleNamespace(chat_template="{{ messages[0]['content'] }}")
    before = chat_template_hash(tok)
    other_tokenization()
    assert chat_template_hash(tok) != before
