"""Stop 56 (lead): `push model` takes push.model_repo_id, and `check` finds push settings that
would fail the push only after every other stage had run."""
from __future__ import annotations

import sys

from guidealign.check_jobs import FAIL, WARN, other_rows
from guidealign.config import load_config
from hubserver import HubServer
from test_push import TOKEN, hub_env, make_model, make_run, push_cmd, run


def test_push_model_without_a_repo_id_goes_to_the_model_repo_id(tmp_path, workdir):
    """With push.repo_id (the dataset's) and push.model_repo_id both set, `push model` made a
    new model repo named like the dataset's and pushed the model there."""
    make_model(workdir, size=1000, tokenizer=False)
    make_run(workdir, shards=1)
    with HubServer(token=TOKEN) as hub:
        p = run(push_cmd(workdir, "model", "--set", "push.repo_id=org/aligned-data",
                         "--set", "push.model_repo_id=org/labrador"), hub_env(hub, tmp_path))
        assert p.returncode == 0, p.stderr[-3000:]
        assert "model.safetensors" in hub.files("org/labrador", "model")
        assert ("model", "org/aligned-data") not in hub.state.repos


def _push_rows(overrides, stages, monkeypatch, offline=False):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    rows = other_rows(load_config(None, overrides), stages)
    return [r for r in rows if r.check == "push"]


def test_check_fails_a_push_repo_id_the_hub_would_refuse(monkeypatch):
    (row,) = _push_rows(["push.repo_id=org/x", "push.model_repo_id=org/a b"], None, monkeypatch)
    assert row.status == FAIL and "push.model_repo_id 'org/a b' is not a Hub repo id" in row.detail
    assert _push_rows(["push.repo_id=org/x", "push.model_repo_id=org/y"], None, monkeypatch) == []


def test_an_offline_hub_fails_a_run_that_pushes_and_warns_a_check_alone(monkeypatch):
    over = ["push.repo_id=org/x"]
    (run_row,) = _push_rows(over, ["respond", "push"], monkeypatch, offline=True)
    assert run_row.status == FAIL and "HF_HUB_OFFLINE" in run_row.detail
    (check_row,) = _push_rows(over, None, monkeypatch, offline=True)
    assert check_row.status == WARN
    assert _push_rows(over, ["respond"], monkeypatch, offline=True) == []  # push not run
