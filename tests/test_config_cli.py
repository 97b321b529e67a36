"""Config loading/overrides and the CLI conventions (click group, status)."""
from __future__ import annotations

import json

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


def test_shipped_configs_load():
    from pathlib import Path

    for y in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
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
