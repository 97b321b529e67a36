"""One rule for a config model reference: a local path or a Hugging Face Hub id
(guidealign.core.models.model_ref), used alike by resolve/model_kind/`models fetch`, by
`guidealign check` (check_models.locate) and by the model card's ``base_model``."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working directory holding ``models/x`` and a local ``owner/local`` directory, and a
    HOME holding ``m``; the Hub offline and its cache empty."""
    import huggingface_hub.constants as hfc

    from guidealign.core.models import home

    monkeypatch.setenv("GUIDEALIGN_HOME", str(home()))  # the embedded models stay where they are
    (tmp_path / "work" / "models" / "x").mkdir(parents=True)
    (tmp_path / "work" / "owner" / "local").mkdir(parents=True)
    (tmp_path / "home" / "m").mkdir(parents=True)
    (tmp_path / "hub").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


# --- the rule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, want", [
    ("models/x", "models/x"),            # exists, relative
    ("owner/local", "owner/local"),      # exists, although it reads like a Hub id
    ("./x", "x"),                        # missing, but a path by its start
    ("../y", "../y"),
    ("~/x", "HOME/x"),                   # missing, "~" expanded
    ("~/m", "HOME/m"),                   # exists
    ("/abs/no-such-dir", "/abs/no-such-dir"),
])
def test_paths(place, name, want):
    from guidealign.core.models import is_hub_id, model_ref

    kind, ref = model_ref(name)
    assert kind == "path" and ref == Path(want.replace("HOME", str(place / "home")))
    assert not is_hub_id(name)


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased", "owner/name", "owner/name.v1",
                                  "lmsys/vicuna-13b-v1.5", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "models/not-here", "x" * 96])
def test_hub_ids(place, name):
    from guidealign.core.models import is_hub_id, model_ref

    assert model_ref(name) == ("hub", name)
    assert is_hub_id(name)


@pytest.mark.parametrize("name", ["a//b", "owner/na me", "a--b", "org/a--b", "a..b", "owner/name.",
                                  "-owner/name", ".hidden/x", "a/b/c", "owner/name@main",
                                  "owner/name.git", "café", "x" * 97, ""])
def test_neither_path_nor_hub_id_is_an_error(place, name):
    from guidealign.core.models import is_hub_id, model_ref

    with pytest.raises(ValueError, match="neither a local path .* nor a Hugging Face Hub id"):
        model_ref(name)
    assert not is_hub_id(name)


# --- core.models: resolve, model_kind, models fetch --------------------------------------------

def test_resolve_and_model_kind_follow_the_rule(place):
    from guidealign.core.models import model_kind, resolve

    assert resolve("gpt2") == "gpt2" and model_kind("gpt2") == "hub"
    assert model_kind("owner/local") == "local" and resolve("owner/local") == "owner/local"
    with pytest.raises(FileNotFoundError, match="no such local model directory"):
        resolve("./x")
    # a malformed name used to reach the loaders, which failed with a Hub error much later
    with pytest.raises(ValueError, match="'owner/na me' is neither a local path"):
        resolve("owner/na me")
    with pytest.raises(ValueError, match="neither a local path"):
        model_kind("a//b")


def test_models_fetch_names_a_malformed_model(place):
    from guidealign.config import load_config
    from guidealign.core.models import FetchError, fetch_models

    cfg = load_config(None, ["sft.base_model=owner/na me"])
    with pytest.raises(FetchError, match=r"sft.base_model=owner/na me \(model 'owner/na me' is "
                                         "neither a local path"):
        fetch_models(cfg, echo=lambda *_: None)


# --- guidealign check --------------------------------------------------------------------------

def _row(out: str, item: str) -> list[str]:
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line)]
        if len(cells) > 4 and cells[2].startswith(item):
            return cells[2:5]
    raise AssertionError(f"no row {item!r} in\n{out}")


def _check(*sets: str) -> tuple[int, str]:
    from guidealign.cli import cli

    args = ["check"] + [a for s in sets for a in ("--set", s)]
    r = CliRunner().invoke(cli, args, env={"COLUMNS": "200"}, catch_exceptions=False)
    return r.exit_code, r.output


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased"])
def test_check_takes_an_ownerless_hub_id_for_one_offline(place, name):
    """`guidealign check` called "gpt2" a FAIL: "no such local path, and not a Hub id (org/name)"."""
    code, out = _check(f"retriever.base_model={name}")
    assert _row(out, f"retriever base: {name}") == [
        f"retriever base: {name}", "WARN", "not in local cache; would download (offline: size unknown)"]
    assert code == 0, out


def test_check_finds_an_ownerless_hub_id_in_the_cache(place):
    d = place / "hub" / "models--gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(commit)
    from guidealign.check_models import locate

    info = locate("gpt2")
    assert (info.where, info.path, info.max_positions) == ("hub cache", str(snap), 1024), info.notes
    code, out = _check("retriever.base_model=gpt2")
    assert _row(out, "retriever base: gpt2")[1] == "OK" and code == 0, out


@pytest.mark.parametrize("name", ["owner/na me", "org/a--b", "-owner/name"])
def test_check_fails_a_malformed_name_instead_of_planning_its_download(place, name):
    """These passed `check` as "would download", and failed in the job."""
    from guidealign.check_models import locate

    info = locate(name)
    assert info.where == "missing" and "neither a local path" in info.notes[0]
    code, out = _check(f"retriever.base_model={name}")
    assert _row(out, "retriever base")[1] == "FAIL" and code == 1, out


def test_check_names_a_missing_local_path(place):
    from guidealign.check_models import locate

    info = locate("./no-such-model")
    assert (info.where, info.notes) == ("missing", ["no such local path (no-such-model)"])
    assert locate("owner/local").where == "local"


# --- the model card ----------------------------------------------------------------------------

@pytest.mark.parametrize("base, want", [
    ("gpt2", "gpt2"),                        # was dropped: not "org/name"
    ("bert-base-uncased", "bert-base-uncased"),
    ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-hf"),
    ("org/a--b", None),                      # was written, and the Hub refuses such a card
    ("org/name.", None),
    ("owner/local", None),                   # a local directory here
    ("~/m", None),
])
def test_model_card_base_model(place, base, want):
    from guidealign.hub.card import model_card

    card = model_card(base_model=base, data={}, hyperparameters={}, metrics={}, mode="lora",
                      merged=False)
    assert yaml.safe_load(card.split("---\n")[1]).get("base_model") == want
    from guidealign.hub.card import redact

    assert f"`{redact(base)}`" in card  # a local path by its base name only
