"""Config loading and fingerprints (Stop 48's review): YAML merge keys, numbers written as
text, finish reasons, process counts, dtype names, LoRA keys a full fine-tune never reads."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from guidealign.config import ConfigError, load_config


def test_a_yaml_merge_key_shares_settings_between_engines(tmp_path):
    """`<<: *anchor` is plain YAML; the duplicate-key check refused it as "not valid YAML"."""
    f = tmp_path / "c.yaml"
    f.write_text("engine: &w {dtype: bfloat16, max_model_len: 8192}\n"
                 "respond:\n  engine:\n    <<: *w\n    model: lmsys/vicuna-13b-v1.5\n")
    cfg = load_config(f)
    assert cfg.respond.engine == {"dtype": "bfloat16", "max_model_len": 8192, "model": "lmsys/vicuna-13b-v1.5"}


def test_a_list_as_a_key_and_a_key_given_twice_are_config_errors_naming_the_file(tmp_path):
    f = tmp_path / "odd.yaml"
    f.write_text("engine: {[a]: b}\n")
    with pytest.raises(ConfigError, match="a key must be text"):
        load_config(f)
    f.write_text("engine:\n  dtype: float32\n  dtype: bfloat16\n")
    with pytest.raises(ConfigError, match=r"odd\.yaml: the key 'dtype' is given twice"):
        load_config(f)


@pytest.mark.parametrize("override", ["sft.learning_rate=0755", "sft.learning_rate=1_0",
                                      "sft.learning_rate=inf", "sft.epochs=.inf",
                                      "sft.warmup_ratio=1", "detect.max_exemplars= ",
                                      "augment.rouge_threshold=1"])  # 1 kept exact duplicates: two rows of one id
def test_numbers_the_loader_does_not_read_as_numbers_are_refused(override):
    """float() took '0755' as 755.0, '1_0' as 10.0 and 'inf' as infinity; an infinite epoch
    count passed; warmup 1 was called in range; a blank value meant "all exemplars"."""
    with pytest.raises(ConfigError):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["sft.learning_rate='1e-4'", "sft.learning_rate=2e-5",
                                      "executor.stall_timeout_s=.inf", "engine.start_timeout_s='.inf'",
                                      "sft.warmup_ratio=0.99", "sft.num_processes=AUTO",
                                      "sft.num_processes='4'"])
def test_numbers_as_written_still_load(override):
    load_config(None, [override])  # a quoted '.inf' was a ValueError traceback; AUTO and '4' the launcher takes


def test_finish_reasons_and_process_counts_are_checked_at_load():
    """A misspelt reason ("lenght") dropped every answer it meant to keep; 0 or "four"
    processes loaded and failed only when SFT started."""
    with pytest.raises(ConfigError, match="keep_finish_reasons"):
        load_config(None, ["sft.keep_finish_reasons=[stop, lenght]"])
    for bad in ("0", "four"):
        with pytest.raises(ConfigError, match="num_processes"):
            load_config(None, [f"sft.num_processes={bad}"])
    assert load_config(None, ["sft.num_processes=4"]).sft.num_processes == 4


def test_a_dtype_and_its_other_name_generate_under_one_fingerprint():
    """float/float32 and half/float16 are one dtype to vLLM: renaming it redid every generation."""
    from guidealign.gen.outputs import output_fields

    fields = {d: output_fields(load_config(None, [f"engine.dtype={d}"]).engine)
              for d in ("float", "float32", "half", "float16", "bfloat16")}
    assert fields["float"] == fields["float32"] and fields["half"] == fields["float16"]
    assert fields["float32"] != fields["float16"] != fields["bfloat16"]


def test_lora_keys_do_not_retrain_a_full_fine_tune_but_do_retrain_a_lora_one():
    """A new fingerprint trains again and removes the old run's checkpoints: editing a LoRA key
    the recipe lists as unused in full mode threw away a 13B run."""
    from guidealign.sft.fingerprint import sft_fingerprint

    rep = SimpleNamespace(sources={"respond": {"shards": 1, "sha256": ["s1"]}})
    for mode, same in (("full", True), ("lora", False)):
        base = sft_fingerprint(load_config(None, [f"sft.mode={mode}"]), rep)
        for ov in ("sft.lora_r=32", "sft.lora_alpha=64", "sft.lora_dropout=0.1", "sft.merge_lora=false",
                   "sft.lora_target_modules=[q_proj]"):
            assert (sft_fingerprint(load_config(None, [f"sft.mode={mode}", ov]), rep) == base) is same, (mode, ov)
