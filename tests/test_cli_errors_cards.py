"""CLI user errors are one-line errors with a non-zero exit (no traceback), and dataset cards
carry a license the Hub accepts. Fast: no engine, no model, no Hub."""
from __future__ import annotations

import yaml
from click.testing import CliRunner

import pytest

from guidealign.cli import cli


def _invoke(args):
    return CliRunner().invoke(cli, args, catch_exceptions=True)


def _clean_error(r, code):
    """Exited through click with ``code``: a SystemExit, not an escaped exception."""
    assert r.exit_code == code, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output


@pytest.mark.parametrize("args, says", [
    (["library"], "guidelines is incomplete"),
    (["index"], "library is incomplete"),
    (["retrieve"], "index is not complete"),
    (["run", "--no-check", "--stages", "library"], "guidelines is incomplete"),
])
def test_stage_before_its_input_is_a_one_line_error(tmp_path, args, says):
    r = _invoke([*args, "-w", str(tmp_path / "wd"), "--no-progress"])
    _clean_error(r, 1)
    assert "Error:" in r.output and says in r.output


@pytest.mark.parametrize("content, says", [
    (b"engine: [a\n", "not valid YAML"),
    (b"\xff\xfe\x00engine: {}\n", "not UTF-8"),
])
@pytest.mark.parametrize("cmd", [
    ["config", "show"],
    ["detect", "-w", "WD"],
    ["check"],
    ["models", "fetch", "--dry-run"],
])
def test_unreadable_config_file_is_a_usage_error(tmp_path, content, says, cmd):
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(content)
    r = _invoke([c.replace("WD", str(tmp_path / "wd")) for c in cmd] + ["-c", str(cfg)])
    _clean_error(r, 2)
    assert says in r.output and "bad.yaml" in r.output


def test_show_refuses_a_negative_count(tmp_path):
    r = _invoke(["show", "-n", "-1", str(tmp_path)])
    _clean_error(r, 2)
    assert "-n" in r.output


@pytest.mark.parametrize("value, meta", [
    ("Apache 2.0", {"license": "apache-2.0"}),
    ("MIT", {"license": "mit"}),
    ("CC-BY-NC-4.0", {"license": "cc-by-nc-4.0"}),
    ("apache-2.0", {"license": "apache-2.0"}),
    ("Proprietary (ACME)", {"license": "other", "license_name": "proprietary-acme"}),
    ("", {}),
    # a lower-case word that is no Hub identifier was kept, and the Hub refused the card
    ("proprietary", {"license": "other", "license_name": "proprietary"}),
    ("custom", {"license": "other", "license_name": "custom"}),
    ("llama-2", {"license": "llama2"}),
    ("gpl-3", {"license": "gpl-3.0"}),
])
def test_dataset_card_license_is_a_hub_identifier(tmp_path, value, meta):
    from guidealign.config import load_config
    from guidealign.hub.card import dataset_card

    cfg = load_config(None, [f"push.license={value}"] if value else [])
    card = dataset_card(repo_id="org/x", stage="respond", rows=3, files=1, cfg=cfg,
                        workdir=tmp_path, data_dir="data")
    front = yaml.safe_load(card.split("---\n")[1])
    assert {k: front[k] for k in ("license", "license_name") if k in front} == meta
    assert front["configs"][0]["data_files"][0]["path"] == "data/*.parquet"


def test_a_push_with_a_bad_repo_id_or_an_unreachable_hub_is_a_one_line_error(tmp_path, monkeypatch):
    import pyarrow as pa

    from guidealign.shards import write_manifest, write_shard

    for i in range(2):
        write_shard(tmp_path / "respond", i, pa.table({"id": [str(i)], "prompt": ["p"], "response": ["r"]}), "f")
    write_manifest(tmp_path / "respond", stage="respond", num_shards=2, fingerprint="f")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the tests set it (conftest)
    r = _invoke(["push", "respond", "bad repo id", "-w", str(tmp_path)])
    _clean_error(r, 1)
    assert "Repo id must use alphanumeric chars" in r.output
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    r = _invoke(["push", "respond", "org/x", "-w", str(tmp_path), "--set", "push.max_retries=0"])
    _clean_error(r, 1)
    assert "endpoint http://127.0.0.1:9" in r.output


def test_a_dataset_and_a_model_pushed_to_one_repo_id_keep_a_report_each(tmp_path):
    from guidealign.config import load_config
    from guidealign.hub.push import PushReport, write_report

    pcfg = load_config(None).push
    paths = {write_report(tmp_path, PushReport(repo_id="org/labrador", repo_type=t), tmp_path, pcfg, "e")
             for t in ("dataset", "model")}
    assert sorted(p.name for p in paths) == ["dataset__org__labrador.json", "model__org__labrador.json"]
    assert all(p.exists() for p in paths)


@pytest.mark.parametrize("model", ["{tmp}/no-such-model", "nobody-here/no-such-model-xyz"])
@pytest.mark.parametrize("cmd", [["detect"], ["run", "--no-check", "--stages", "detect"]])
def test_a_model_neither_local_nor_cached_is_a_one_line_error(tmp_path, monkeypatch, model, cmd):
    """A missing model directory, or a Hub id not in the cache on an offline node (the paper's
    models are Hub ids), printed a 40-120 line traceback instead of one line naming the model."""
    from synthetic import write_prompt_shards

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    wd = tmp_path / "wd"
    write_prompt_shards(wd / "prompts", [{"id": "a", "prompt": "Hello?"}])
    model = model.format(tmp=tmp_path)
    r = _invoke([*cmd, "-w", str(wd), "--no-progress", "--set", f"engine.model={model}"])
    _clean_error(r, 1)
    lines = [ln for ln in r.output.splitlines() if ln.strip() and not ln.startswith("== ")]
    assert lines[0].startswith("Error:") and model in lines[0], r.output  # (run: "== detect" first)
    assert len(lines) <= 2 and sum(ln.startswith("Error:") for ln in lines) == 1
