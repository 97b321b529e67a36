"""Config loading/overrides and the CLI conventions (click group, status)."""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.config import Config, ConfigError, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("engine:\n  dtype: float32\n  max_model_len: 1024\ningest:\n  shard_rows: 7\n")
    cfg = load_config(y, ["engine.max_model_len=512", "detect.sampling.temperature=0"])
    assert isinstance(cfg, Config)
    assert cfg.engine.dtype == "float32" and cfg.engine.max_model_len == 512
    assert cfg.ingest.shard_rows == 7 and cfg.detect.sampling.temperature == 0.0
    assert load_config().ingest.shard_rows == 10_000  # documented default
    assert load_config(None, ["retriever.learning_rate=1e-4"]).retriever.learning_rate == 1e-4


def test_unknown_key_and_bad_type_are_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("engine:\n  max_model_lenn: 3\n")
    with pytest.raises(ConfigError, match="max_model_lenn"):
        load_config(y)
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["ingest.shard_rows=lots"])


@pytest.mark.parametrize("key", ["max_length", "truncation_mode", "per_device_train_batch_size",
                                 "gradient_accumulation_steps", "completion_only_loss", "output_dir",
                                 "auto_find_batch_size"])
def test_trainer_args_may_not_change_what_sft_sets_itself(key):
    """TRL's max_length in trainer_args cut examples SFT had counted as fitting (its
    drop_overlong measured against sft.max_seq_length), a batch key made another global batch:
    such keys are refused when the config loads, naming the setting to use; others still pass."""
    with pytest.raises(ConfigError, match=rf"sft\.trainer_args\.{key}: set by SFT"):
        load_config(None, [f"sft.trainer_args={{{key}: 1, deepspeed: ds.json}}"])
    assert load_config(None, ["sft.trainer_args={deepspeed: ds.json}"]).sft.trainer_args == {"deepspeed": "ds.json"}


def test_shipped_configs_load():
    """Every recipe under configs/ loads: its keys exist, its values have their types and are in
    range (``load_config`` raises otherwise)."""
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    # found wherever the tests run from (a glob relative to the cwd found none elsewhere)
    assert {"demo.yaml", "gpu-paper.yaml", "eval-paper.yaml"} <= {y.name for y in recipes}
    for y in recipes:
        load_config(y)


def test_cli_ingest_then_status_json(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)) + '{"prompt": ""}\n')
    r = CliRunner().invoke(cli, ["ingest", str(f), "-w", str(tmp_path / "w"), "--set",
                                 "ingest.shard_rows=2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "5 prompts in 3 shard(s)" in r.output and "1 quarantined" in r.output
    r = CliRunner().invoke(cli, ["status", str(tmp_path / "w"), "--json"])
    rows = json.loads(r.output)
    assert rows[0]["stage"] == "prompts"
    assert (rows[0]["shards_done"], rows[0]["shards_total"], rows[0]["rows"], rows[0]["quarantined"]) \
        == (3, 3, 5, 1)
    r = CliRunner().invoke(cli, ["status", str(tmp_path / "w")])
    assert "prompts" in r.output and "3/3" in r.output


def test_cli_unreadable_input_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(cli, ["ingest", str(tmp_path / "nope.jsonl"), "-w", str(tmp_path / "w")])
    assert r.exit_code != 0 and "nope.jsonl: no such file" in r.output


def test_cli_bad_override_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(cli, ["ingest", "x", "-w", str(tmp_path), "--set", "nosuch.key=1"])
    assert r.exit_code == 2 and "unknown key" in r.output


def test_penalties_reach_vllm_sampling_params():
    """respond.sampling's repetition and frequency penalties (the demo recipe's loop breakers)
    are what the engine gets; off (1.0 / 0.0) by default."""
    pytest.importorskip("vllm")
    from guidealign.gen.engine import sampling_params

    cfg = load_config("configs/demo.yaml", ["respond.sampling.frequency_penalty=0.25"])
    p = sampling_params(cfg.respond.sampling)
    assert (p.repetition_penalty, p.frequency_penalty, p.temperature, p.max_tokens) == (1.1, 0.25, 0.0, 768)
    d = sampling_params(Config().respond.sampling)
    assert (d.repetition_penalty, d.frequency_penalty) == (1.0, 0.0)


@pytest.mark.parametrize("key", ["retriever.warmup_ratio", "sft.warmup_ratio"])
def test_a_warmup_ratio_of_one_or_more_is_refused(key):
    """Trainers get the ratio as warmup_steps, and transformers reads a value >= 1 as a number
    of steps: a ratio of 1.0 meant one warmup step."""
    from guidealign.config import ConfigError, load_config

    assert load_config(None, [f"{key}=0.5"]) is not None
    for bad in ("1.0", "2", "-0.1"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}={bad}"])


# --- found in a review of the config layer (Stop 34) --------------------------------------------

def _file(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_a_section_with_every_key_commented_out_keeps_its_own_defaults(tmp_path):
    """`respond:\\n  sampling:\\n    # temperature: 0.0` put the Sampling class's defaults (T=0.7,
    400 tokens) over respond's own (greedy, 512): respond silently sampled."""
    want = Config().respond.sampling
    assert (want.temperature, want.max_tokens) == (0.0, 512)
    cfg = load_config(_file(tmp_path, "respond:\n  sampling:\n    # temperature: 0.3\n"))
    assert cfg.respond.sampling == want
    assert load_config(None, ["respond.sampling=null"]).respond.sampling == want
    assert load_config(None, ["eval.judge_sampling={}"]).eval.judge_sampling == Config().eval.judge_sampling


def test_an_empty_free_form_mapping_clears_it(tmp_path):
    """`--set respond.engine={}` (the docs: {} = answer with `engine`) left the recipe's responder,
    and a trainer_args with every key commented out was refused as "expected a mapping"."""
    paper = "configs/gpu-paper.yaml"
    cfg = load_config(paper, ["respond.engine={}", "sft.trainer_args={}"])
    assert cfg.respond.engine == {} and cfg.sft.trainer_args == {}
    assert load_config(paper, ["respond.engine.max_model_len=2048"]).respond.engine["model"]  # merged
    assert load_config(_file(tmp_path, "sft:\n  trainer_args:\n    # fsdp: full_shard\n")).sft.trainer_args == {}


@pytest.mark.parametrize("override, says", [
    ("library.shard_rows=0", "library.shard_rows: must be a count, >= 1, got 0"),
    ("retrieve.keep=0", "retrieve.keep: must be a count"),
    ("engine.tensor_parallel_size=0", "engine.tensor_parallel_size: must be a count"),
    ("respond.engine.tensor_parallel_size=0", "respond.engine.tensor_parallel_size: must be a count"),
    ("sft.micro_batch_size=0", "sft.micro_batch_size: must be a count"),
    ("engine.gpu_memory_utilization=5", "engine.gpu_memory_utilization: must be in [0, 1]"),
    ("engine.gpu_memory_utilization=0", "engine.gpu_memory_utilization: must be > 0"),
    ("library.heldout_fraction=1.5", "library.heldout_fraction: must be in [0, 1)"),
    ("executor.claim_ttl_s=-1", "executor.claim_ttl_s: must be > 0"),
    ("detect.sampling.max_tokens=-5", "detect.sampling.max_tokens: must be a count"),
    ("detect.sampling.temperature=-1", "detect.sampling.temperature: must be >= 0"),
    ("library.use_gpu=banana", "library.use_gpu"),
    # retrieval settings a stage refused only when it started, after detect and guidelines ran
    ("retrieve.keep=30", "retrieve.keep: must be at most retrieve.top_n (20), got 30"),
    ("retriever.recall_at=[0,5]", "retriever.recall_at: must be a list of distinct counts, each >= 1"),
    # a count listed twice added its hits twice (recall@1 of 1.0 for 0.5)
    ("retriever.recall_at=[1,1,5]", "retriever.recall_at: must be a list of distinct counts, each >= 1"),
    ("retriever.risk_top_k=0", "retriever.risk_top_k: must be a count"),
    ("library.fuzzy_threshold=0", "library.fuzzy_threshold: must be > 0"),
    ("index.ef_search=0", "index.ef_search: must be a count"),
    ("index.hnsw_m=0", "index.hnsw_m: must be a count"),
    ("index.nlist=-3", "index.nlist: must be >= 0"),
    ("library.exact_search_max=-1", "library.exact_search_max: must be >= 0"),
    # accepted before; sft.max_examples=-3 kept 0 examples, detect.max_exemplars=-1 ran zero-shot
    ("sft.max_examples=-3", "sft.max_examples: must be >= 0"),
    ("detect.max_exemplars=-1", "detect.max_exemplars: must be >= 0"),
    ("respond.max_guidelines=-2", "respond.max_guidelines: must be >= 0"),
    ("sft.epochs=0", "sft.epochs: must be > 0"),
    ("sft.lora_alpha=0", "sft.lora_alpha: must be > 0"),
    ("sft.weight_decay=-1", "sft.weight_decay: must be >= 0"),
    ("augment.max_rounds=0", "augment.max_rounds: must be a count"),
    ("engine.cpu_kvcache_gib=0", "engine.cpu_kvcache_gib: must be a count"),
    ("push.backoff_s=-1", "push.backoff_s: must be >= 0"),
    ("executor.ray_start_timeout_s=-1", "executor.ray_start_timeout_s: must be >= 0"),
    ("sft.warmup_ratio=2", "sft.warmup_ratio: must be in [0, 1)"),
    ("respond.sampling.repetition_penalty=0", "respond.sampling.repetition_penalty: must be > 0"),
    ("respond.sampling.frequency_penalty=3", "respond.sampling.frequency_penalty: must be in [-2, 2]"),
    ("sft.learning_rate=.nan", "sft.learning_rate: must be a number (not NaN)"),
])
def test_out_of_range_values_are_refused_when_the_config_loads(override, says):
    """They loaded, passed `check` (some with a ZeroDivisionError traceback there) and were
    refused hours later by the stage that reads them, or not at all (an empty library)."""
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config("configs/demo.yaml", [override])
    r = CliRunner().invoke(cli, ["check", "-c", "configs/demo.yaml", "--set", override])
    assert r.exit_code == 2 and says.split(":")[0] in r.output and "Traceback" not in r.output


def test_yaml_keeps_number_like_text_and_refuses_a_key_given_twice(tmp_path):
    """YAML 1.1 turned `revision: 0755` into "493", `name: 2024_05_01` into "20240501" and
    `--set respond.engine.model=0123` into "83"; a key given twice kept the last silently."""
    cfg = load_config(_file(tmp_path, "push:\n  revision: 0755\neval:\n  name: 2024_05_01\n"),
                      ["sft.data=[2024_05, 010]", "respond.engine.model=0123"])
    assert cfg.push.revision == "0755" and cfg.eval.name == "2024_05_01"
    assert cfg.sft.data == ["2024_05", "010"] and cfg.respond.engine["model"] == "0123"
    assert load_config(_file(tmp_path, "sft:\n  learning_rate: 1e-5\n")).sft.learning_rate == 1e-5
    with pytest.raises(ConfigError, match="'engine' is given twice"):
        load_config(_file(tmp_path, "engine: {dtype: float32}\nsft: {}\nengine: {seed: 3}\n"))



def test_the_printed_config_loads_back_as_it_was_for_text_that_reads_as_a_number(tmp_path):
    """`config show` wrote `pretty_name: 1e5` unquoted (text to YAML 1.1, a number to our
    loader), so the effective config it printed did not load back."""
    from guidealign.config import dump_yaml

    cfg = load_config(None, ["push.pretty_name=1e5", "push.revision=9e12345", "eval.name=0755"])
    again = load_config(_file(tmp_path, dump_yaml(cfg)))
    assert (again.push.pretty_name, again.push.revision, again.eval.name) == ("1e5", "9e12345", "0755")
    assert again == cfg
    r = CliRunner().invoke(cli, ["config", "show", "--set", "index.use_gpu=Auto"])
    assert r.exit_code != 0 and "expected bool or 'auto', got 'Auto'" in r.output

def test_text_rules_of_engine_keys_hold_under_respond_engine_and_on_off_load_unquoted(tmp_path):
    cfg = load_config(None, ["respond.engine.chat_template=no", "respond.engine.model=1.10"])
    assert cfg.respond.engine == {"chat_template": "no", "model": "1.10"}
    cfg = load_config(_file(tmp_path, "eval:\n  risk_identification: off\n"))
    assert cfg.eval.risk_identification == "off"


def test_unknown_keys_of_mixed_types_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(_file(tmp_path, "engine: {1: x, foo: y}\n"))


def test_a_misspelt_stage_in_run_is_a_usage_error_before_the_preflight(tmp_path):
    r = CliRunner().invoke(cli, ["run", "-w", str(tmp_path / "w"), "-c", "configs/demo.yaml",
                                 "--stages", "bogus"])
    assert r.exit_code == 2 and "unknown stage" in r.output and "guidealign check" not in r.output


def test_inputs_given_twice_differently_are_refused_and_check_sees_ingest_inputs(tmp_path):
    """With both `inputs` and `ingest.inputs` set, ingest read only `inputs` (the other silently
    ignored), and `check` warned "none configured" for a config with only `ingest.inputs`."""
    with pytest.raises(ConfigError, match="set one of them"):
        load_config(None, ["inputs=[a.jsonl]", "ingest.inputs=[b.jsonl]"])
    load_config(None, ["inputs=[a.jsonl]", "ingest.inputs=[a.jsonl]"])  # the same: fine
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi"}\n')
    r = CliRunner().invoke(cli, ["check", "--set", f"ingest.inputs=[{f}]"], env={"COLUMNS": "200"})
    assert "none configured" not in r.output and "1 file(s)" in r.output, r.output


def test_null_for_a_text_key_that_cannot_be_unset_is_refused():
    """`--set push.repo_id=null` set the repo id to the text "null" (a push would go there)."""
    with pytest.raises(ConfigError, match="cannot be null"):
        load_config(None, ["push.repo_id=null"])
    assert load_config(None, ["push.repo_id=''"]).push.repo_id == ""
    assert load_config(None, ["push.repo_id='null'"]).push.repo_id == "null"  # quoted: the word
    assert load_config(None, ["engine.chat_template=null"]).engine.chat_template is None  # optional
