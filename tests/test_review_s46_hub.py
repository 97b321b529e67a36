"""Review s46 (push, cards, verify): a token in the config is not published in the dataset card;
a run's model pushed by its path must be finished, as `push model` requires; a repo id without a
namespace is pushed under the user create_repo names; an upload the Hub refuses and a push
without a token fail in one line with a hint; --public on an existing private repo is not
ignored silently and the report records the real visibility; `verify --repair` of a marker that
parses but is incomplete removes its shard too, so a second verify passes."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.shards import write_manifest, write_shard
from guidealign.shards.layout import marker_path, quarantine_path, shard_path
from hubserver import HubServer
from test_push import TOKEN, hub_env, make_model, make_run, push_cmd, run, shard_paths

SECRET = "hf_MYSECRETxyz"


def _block(card: str, title: str):
    return yaml.safe_load(card.split(f"### {title}\n\n```yaml\n", 1)[1].split("```", 1)[0])


def _report(workdir: Path, name: str) -> dict:
    return json.loads((workdir / "push" / name).read_text())


# --- 1. secrets in the config stay out of the card ---------------------------------------------

def test_a_token_in_the_config_is_not_published_in_the_card(tmp_path):
    from guidealign.config import load_config
    from guidealign.hub.card import dataset_card, model_card, redact

    cfg = load_config(None, [f"sft.trainer_args={{hub_token: {SECRET}, pad_token: '<pad>', "
                             "max_grad_norm: 1.0, hub: {api_key: k123SECRET, password: pw9SECRET}}"])
    card = dataset_card(repo_id="org/x", stage="respond", rows=1, files=1, cfg=cfg, workdir=tmp_path)
    assert SECRET not in card and "k123SECRET" not in card and "pw9SECRET" not in card
    args = _block(card, "Config")["sft"]["trainer_args"]
    assert args["hub_token"] == args["hub"]["api_key"] == args["hub"]["password"] == "(redacted)"
    # tokenizer and length settings named "token(s)" are no secrets: they stay
    assert args["pad_token"] == "<pad>" and args["max_grad_norm"] == 1.0
    assert _block(card, "Config")["respond"]["sampling"]["max_tokens"] == 512

    # at any depth, in any of a card's fields; a Hub token as a bare value too
    hub_token = "hf_" + "A1b2" * 9
    got = redact({"a": [{"HF_TOKEN": "x", "authToken": "y", "secret_key": "z",
                         "credentials": {"user": "u"}, "eos_token_id": 2, "sort_key": "id"}],
                  "argv": ["--token", hub_token]})
    assert got == {"a": [{"HF_TOKEN": "(redacted)", "authToken": "(redacted)",
                          "secret_key": "(redacted)", "credentials": "(redacted)",
                          "eos_token_id": 2, "sort_key": "id"}],
                   "argv": ["--token", "(redacted)"]}
    mcard = model_card(base_model="org/base", data={}, metrics={}, mode="full", merged=True,
                       hyperparameters={"trainer_args": {"hub_token": SECRET}})
    assert SECRET not in mcard


# --- 2. a run's model pushed by its path must be finished ------------------------------------

def _model(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "tokenizer.json").write_text("{}")  # the weights are gone: SFT was replacing them
    return d


def test_a_run_model_pushed_by_its_path_must_be_finished(tmp_path, workdir):
    from guidealign.hub.targets import PushError, resolve_target

    m = _model(tmp_path / "other-run" / "sft" / "model")  # no sft/_done.json
    for what in (str(m), str(m) + "/"):
        with pytest.raises(PushError, match="not a finished model"):
            resolve_target(workdir, what)
    link = tmp_path / "latest-model"
    link.symlink_to(m, target_is_directory=True)
    with pytest.raises(PushError, match="not a finished model"):
        resolve_target(workdir, str(link))
    # the CLI refuses before it reaches the Hub (offline here)
    r = CliRunner().invoke(cli, ["push", str(m), "org/m", "-w", str(workdir)])
    assert r.exit_code != 0 and "not a finished model" in r.output, r.output

    (m.parent / "_done.json").write_text(json.dumps({"fingerprint": "f"}))
    assert resolve_target(workdir, str(m)) == ("model", m)
    # a model folder outside a run's sft/ has no _done.json to ask for
    mine = _model(tmp_path / "exports" / "my-model")
    assert resolve_target(workdir, str(mine)) == ("model", mine)


# --- 3. a repo id without a namespace --------------------------------------------------------

def test_a_repo_id_without_a_namespace_is_pushed_under_the_user(tmp_path, workdir):
    make_run(workdir, shards=2)
    with HubServer(token=TOKEN) as hub:
        p = run(push_cmd(workdir, "respond", "mydata"), hub_env(hub, tmp_path))
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert list(hub.state.repos) == [("dataset", "tester/mydata")]  # the token's user
        assert set(hub.files("tester/mydata")) == {".gitattributes", "README.md",
                                                   *shard_paths(workdir, 2)}
        assert "# tester/mydata" in hub.content("tester/mydata", "README.md").decode()
        assert "push dataset tester/mydata:" in p.stdout
    rep = _report(workdir, "dataset__tester__mydata.json")
    assert rep["repo_id"] == "tester/mydata" and rep["uploaded"] == 3
    assert not (workdir / "push" / "dataset__mydata.json").exists()


# --- 4. failures in one line, with a hint ----------------------------------------------------

def test_a_refused_upload_fails_in_one_line_with_a_hint(tmp_path, workdir):
    make_run(workdir, shards=2)
    shard = shard_path(workdir / "respond", 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: the marker's sha256 goes up with other bytes
    shard.write_bytes(bytes(data))
    with HubServer(token=TOKEN) as hub:
        p = run(push_cmd(workdir, "respond", "org/x"), hub_env(hub, tmp_path))
        assert p.returncode == 1
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        line = next(ln for ln in p.stderr.splitlines() if ln.startswith("Error: "))
        assert "Error while uploading 'data/" in line and "HTTP 400" in line
        assert f"guidealign verify {workdir}" in line


def test_a_push_without_a_token_says_how_to_set_one(tmp_path, workdir):
    make_run(workdir, shards=1)
    with HubServer(token=TOKEN) as hub:
        p = run(push_cmd(workdir, "respond", "org/y"), hub_env(hub, tmp_path, token=None))
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert "401" in p.stderr and "HF_TOKEN" in p.stderr and "hf auth login" in p.stderr
        assert ("dataset", "org/y") not in hub.state.repos


# --- 5. visibility: asked for, and as it is ---------------------------------------------------

def test_public_on_an_existing_private_repo_warns_and_reports_the_real_visibility(tmp_path, workdir):
    make_run(workdir, shards=1)
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        p = run(push_cmd(workdir, "respond", "org/vis", "--private"), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert "warning" not in p.stderr.lower()
        assert _report(workdir, "dataset__org__vis.json")["private"] is True

        p = run(push_cmd(workdir, "respond", "org/vis", "--public"), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        warning = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]
        assert warning and "org/vis is private" in warning[0], p.stderr[-3000:]
        assert hub.state.repos[("dataset", "org/vis")].private is True  # not changed
        rep = _report(workdir, "dataset__org__vis.json")
        assert rep["private"] is True and rep["requested_private"] is False


# --- 6. verify --repair of a marker that parses but is incomplete ----------------------------

@pytest.mark.parametrize("marker", [b'{"index": 0, "rows": 4}', b'{"index": 0, "ro'],
                         ids=["incomplete", "torn"])
def test_repair_of_an_unreadable_marker_removes_its_shard_and_quarantine(tmp_path, marker):
    w = tmp_path / "run"
    d = w / "respond"
    write_manifest(d, stage="respond", num_shards=2, fingerprint="fp")
    for i in range(2):
        write_shard(d, i, pa.table({"id": [f"{i}-{j}" for j in range(4)]}), "fp",
                    quarantine=pa.table({"id": [f"q{i}"], "reason": ["bad"]}))
    assert quarantine_path(d, 0).exists()
    marker_path(d, 0).write_bytes(marker)

    def verify(*args):
        r = CliRunner().invoke(cli, ["verify", str(w), "--json", *args])
        return r.exit_code, json.loads(r.output)

    code, out = verify("--repair")
    assert code == 1
    bad = [p for p in out["problems"] if p["kind"] == "corrupt"]
    assert [p["path"] for p in bad] == ["respond/shard-00000.done.json"]
    rel = lambda p: p.relative_to(w).as_posix()  # noqa: E731
    assert set(out["removed"]) == {rel(marker_path(d, 0)), rel(shard_path(d, 0)),
                                   rel(quarantine_path(d, 0))}
    assert "marker unreadable or incomplete" in bad[0]["detail"]
    assert "not valid JSON" not in bad[0]["detail"]
    assert not shard_path(d, 0).exists() and not quarantine_path(d, 0).exists()
    assert shard_path(d, 1).exists() and marker_path(d, 1).exists()
    code, out = verify()
    assert code == 0, out["problems"]  # shard 0 is pending: the stage's rerun redoes it
    assert [p["kind"] for p in out["problems"]] == ["pending"]


# --- a card edited on the Hub -----------------------------------------------------------------

def test_a_card_edited_on_the_hub_is_saved_before_a_push_replaces_it(tmp_path, workdir):
    """Every push replaced the card (the data_files must name the new version's folder), so a
    text added on the Hub was lost without a word, also by a push that changed nothing else."""
    import sys

    make_run(workdir, shards=2)
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        assert run(push_cmd(workdir, "respond", "org/c"), env).returncode == 0
        ours = hub.content("org/c", "README.md")
        edited = ours + b"\n## Notes from the maintainers\n\nUse the train split only.\n"
        # the card edited on the Hub, by another process (this one's huggingface_hub is offline)
        (tmp_path / "edited.md").write_bytes(edited)
        upload = ("from huggingface_hub import HfApi; HfApi().upload_file(path_or_fileobj="
                  f"{str(tmp_path / 'edited.md')!r}, path_in_repo='README.md', repo_id='org/c', "
                  "repo_type='dataset')")
        assert run([sys.executable, "-c", upload], env).returncode == 0
        p = run(push_cmd(workdir, "respond", "org/c"), env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "was edited on the Hub since the last push" in p.stderr
        saved = list((workdir / "push").glob("README-respond.on-hub-*.md"))
        assert len(saved) == 1 and saved[0].read_bytes() == edited
        assert hub.content("org/c", "README.md") == ours  # the generated card again
        # pushed again, with the generated card on the Hub: nothing to say, nothing saved
        p = run(push_cmd(workdir, "respond", "org/c"), env)
        assert p.returncode == 0 and "edited on the Hub" not in p.stderr
        assert len(list((workdir / "push").glob("README-respond.on-hub-*.md"))) == 1


def test_a_model_card_edited_on_the_hub_is_kept_until_the_model_changes(tmp_path, workdir):
    """Only dataset pushes looked at the Hub's card: a model card edited on the Hub (usage notes)
    was replaced by every later push of the unchanged model, without a warning or a copy."""
    import sys

    m = make_model(workdir, size=1000, tokenizer=False, card="---\nlibrary_name: transformers\n---\n# Labrador\n")
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        assert run(push_cmd(workdir, "model", "org/lab"), env).returncode == 0
        edited = (m / "README.md").read_bytes() + b"\n## Usage (hand-written)\n"
        (tmp_path / "edited.md").write_bytes(edited)
        upload = ("from huggingface_hub import HfApi; HfApi().upload_file(path_or_fileobj="
                  f"{str(tmp_path / 'edited.md')!r}, path_in_repo='README.md', repo_id='org/lab')")
        assert run([sys.executable, "-c", upload], env).returncode == 0
        for _ in range(2):  # the unchanged model pushed again, twice: the edit stays
            p = run(push_cmd(workdir, "model", "org/lab"), env)
            assert p.returncode == 0, p.stderr[-3000:]
            assert hub.content("org/lab", "README.md", "model") == edited
        # a retrained model's new card replaces it, the edited one saved first
        (m / "README.md").write_text("---\nlibrary_name: transformers\n---\n# Labrador v2\n")
        p = run(push_cmd(workdir, "model", "org/lab"), env)
        assert p.returncode == 0 and "was edited on the Hub since the last push" in p.stderr
        assert hub.content("org/lab", "README.md", "model") == (m / "README.md").read_bytes()
        saved = list((workdir / "push").glob("README-model.on-hub-*.md"))
        assert len(saved) == 1 and saved[0].read_bytes() == edited


def test_a_hub_token_inside_a_longer_value_is_redacted():
    from guidealign.hub.card import redact

    tok = "hf_" + "Z9y8" * 9
    got = redact([f"--hub_token={tok}", f"Bearer {tok}", f"https://u:{tok}@hf.co/x", "hf_short"])
    assert got == ["--hub_token=(redacted)", "Bearer (redacted)", "https://u:(redacted)@hf.co/x", "hf_short"]
