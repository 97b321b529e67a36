"""Stop 56 review of SFT: what an unmerged LoRA adapter names as its base model, clear errors
before the model loads (no answer token within max_seq_length, examples longer than the base
model's context), and a dataset listed twice in sft.data."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from test_sft import respond_rows, write_respond
from test_templates_check import tiny_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_llama(d: Path, context: int = 2048) -> Path:
    """A two-layer Llama with a byte-level tokenizer saved in ``d`` (trains in seconds)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tiny_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(d)
    return d


def tiny_gpt2(d: Path, context: int) -> Path:
    """A two-layer GPT-2 (learned positions) with a byte-level tokenizer saved in ``d``."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tiny_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=context,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(d)
    return d


def tiny_sft_cfg(base: str, *overrides):
    from guidealign.config import load_config

    return load_config(None, [f"sft.base_model={base}", "sft.chat_template=vicuna_v1.1", "sft.num_processes=1",
                              "sft.precision=float32", "sft.max_steps=1", "sft.global_batch_size=2",
                              "sft.micro_batch_size=2", "sft.save_steps=0", "sft.max_seq_length=1024",
                              "sft.warmup_ratio=0.0", *overrides])


def train_adapter(workdir: Path, base: str) -> dict:
    from guidealign.sft.train import run_sft

    write_respond(workdir, [respond_rows(2)[0]])
    run_sft(tiny_sft_cfg(base, "sft.mode=lora", "sft.merge_lora=false"), workdir, progress=False)
    return json.loads((workdir / "sft" / "model" / "adapter_config.json").read_text())


def local_paths_in(model_dir: Path, root: Path) -> list[str]:
    return [f.name for f in model_dir.iterdir() if f.is_file() and str(root) in f.read_text(errors="replace")]


def test_an_adapter_of_a_hub_cache_snapshot_names_its_hub_id_and_commit(tmp_path, workdir):
    """peft writes the directory the base model was loaded from into adapter_config.json: for a
    base given as a snapshot folder of the Hugging Face cache (what `huggingface-cli download`
    prints), the pushed adapter named /…/models--acme--tiny-llama/snapshots/<commit>, a path of
    the training machine that no other machine can load the base from. It names the Hub model,
    pinned at the snapshot's commit, and no file of the model folder holds a local path."""
    base = tiny_llama(tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / COMMIT)
    conf = train_adapter(workdir, str(base))
    assert conf["base_model_name_or_path"] == "acme/tiny-llama"
    assert conf["revision"] == COMMIT
    assert local_paths_in(workdir / "sft" / "model", tmp_path) == []


def test_an_adapter_of_the_embedded_model_names_smollm2_on_the_hub(tmp_path, workdir, monkeypatch):
    """The embedded base (sft.base_model's default) is loaded from ~/.cache/guide-align/models/…:
    the adapter named that path; it names HuggingFaceTB/SmolLM2-135M-Instruct. (The embedded
    model is stood in for by a tiny one in such a folder, so that the test trains in seconds.)"""
    import guidealign.core.models as models

    stand_in = tiny_llama(tmp_path / "cache" / "guide-align" / "models" / "smollm2-135m-instruct-v1")
    real = models.resolve
    monkeypatch.setattr(models, "resolve", lambda name: str(stand_in) if name == models.GENERATOR else real(name))
    conf = train_adapter(workdir, models.GENERATOR)
    assert conf["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert local_paths_in(workdir / "sft" / "model", tmp_path) == []


def test_an_adapter_of_a_local_base_without_a_hub_id_says_so(tmp_path, workdir, caplog):
    """A local directory that is no Hub cache snapshot has no name another machine loads: the
    adapter keeps its path (it loads on this machine) and a warning says the adapter names a
    local path and how to give the Hub id."""
    base = tiny_llama(tmp_path / "my-base")
    with caplog.at_level(logging.WARNING, logger="guidealign.sft.base_model"):
        conf = train_adapter(workdir, str(base))
    assert conf["base_model_name_or_path"] == str(base)
    said = [r.getMessage() for r in caplog.records if "no known Hub id" in r.getMessage()]
    assert said and str(base) in said[0] and "sft.base_model" in said[0]


def test_prompts_that_fill_max_seq_length_alone_are_a_clear_error_before_the_model_loads(tmp_path, workdir,
                                                                                         monkeypatch):
    """sft.drop_overlong false: TRL cuts an overlong example at max_seq_length and drops it when
    no answer token is left. With every prompt longer than max_seq_length (Vicuna's system line
    alone is ~150 of this byte-level tokenizer's tokens) training failed after the model was
    loaded (for 13B: minutes) with torch's "num_samples should be a positive integer value, but
    got num_samples=0". It says why, and how to fix it, before any model is loaded."""
    import guidealign.sft.train as train

    base = tiny_llama(tmp_path / "base")
    write_respond(workdir, [respond_rows(4)[0]])

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train, "build_trainer", no_model)
    cfg = tiny_sft_cfg(str(base), "sft.max_seq_length=64", "sft.drop_overlong=false")
    with pytest.raises(ValueError, match=r"no training example has an answer token within sft.max_seq_length "
                                         r"\(64 tokens\).*raise sft.max_seq_length"):
        train.run_sft(cfg, workdir, progress=False)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_examples_longer_than_the_base_models_context_are_refused_before_the_model_loads(tmp_path, workdir,
                                                                                        monkeypatch, arch):
    """sft.max_seq_length (1024 here) above the base model's context (128 positions): the
    examples (~290 tokens) went to the trainer whole. GPT-2's learned positions failed in the
    middle of training ("IndexError: index out of range in self"); Llama's RoPE trained them on
    positions it never saw, with no word. Both are refused before the model is loaded, naming
    the context and the setting to change; a max_seq_length within the context trains."""
    import guidealign.sft.train as train

    base = (tiny_gpt2 if arch == "gpt2" else tiny_llama)(tmp_path / "base", context=128)
    write_respond(workdir, [respond_rows(4)[0]])
    real = train.build_trainer

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train, "build_trainer", no_model)
    with pytest.raises(ValueError, match=r"sft.max_seq_length \(1024\) is longer than the base model's context "
                                         r"\(128 tokens\), and 4 training example\(s\)"):
        train.run_sft(tiny_sft_cfg(str(base)), workdir, progress=False)
    monkeypatch.setattr(train, "build_trainer", real)
    cfg = tiny_sft_cfg(str(base), "sft.max_seq_length=128", "sft.drop_overlong=false", 'sft.system_prompt="Hi."')
    assert train.run_sft(cfg, workdir, progress=False)["steps"] == 1


def test_a_dataset_listed_twice_in_sft_data_is_refused(tmp_path, workdir):
    """sft.data [respond, <the same folder by its absolute path>]: every example was read and
    trained twice, and the report showed two datasets. It is refused, naming both entries; two
    folders of one name (runs a and b, each with its own respond) are still two datasets."""
    from guidealign.config import load_config
    from guidealign.sft.data import build_dataset

    write_respond(workdir, [respond_rows(3)[0]])
    twice = [f"sft.data=[respond, {workdir / 'respond'}]"]
    with pytest.raises(ValueError, match=r"lists the dataset .*respond twice \('respond' and '/.*respond'\)"):
        build_dataset(load_config(None, twice).sft, workdir)
    other = tmp_path / "other"
    write_respond(other, [respond_rows(3)[0]])
    ds, rep = build_dataset(load_config(None, [f"sft.data=[respond, {other / 'respond'}]"]).sft, workdir)
    assert len(ds) == rep.kept == 6 and len(rep.sources) == 2
