"""Stop 57 review of `guidealign push`, against the local Hub stand-in (tests/hubserver.py), as
tests/test_push.py."""
from __future__ import annotations

from hubserver import HubServer
from test_push import TOKEN, hub_env, make_model, make_run, push_cmd, run

BOTH = ["--set", "push.repo_id=org/s57-ds", "--set", "push.model_repo_id=org/s57-model"]


def _warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("warning:")]


# --- 1. push without WHAT: the model's repo is checked and reported too ----------------------

def test_private_without_what_warns_of_an_existing_public_model_repo(tmp_path, workdir):
    """`push --private` with no WHAT pushes the dataset, then the model: a model repo that
    already exists as public stays public, and the user is told so (it was silent)."""
    make_run(workdir, shards=1)
    make_model(workdir, card="# m\n")
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        p = run(push_cmd(workdir, "model", "org/s57-model", "--public"), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]

        p = run(push_cmd(workdir, "--private", *BOTH), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert hub.state.repos[("model", "org/s57-model")].private is False  # not changed
        assert hub.state.repos[("dataset", "org/s57-ds")].private is True    # new: as asked
        warning = _warnings(p.stderr)
        assert len(warning) == 1, p.stderr[-3000:]
        assert "org/s57-model is public" in warning[0] and "new repo only" in warning[0]


def test_push_without_what_prints_the_summary_of_each_push(tmp_path, workdir):
    """Both pushes are shown on the console, the model's as well as the dataset's."""
    make_run(workdir, shards=1)
    make_model(workdir, card="# m\n")
    with HubServer(token=TOKEN) as hub:
        p = run(push_cmd(workdir, *BOTH), hub_env(hub, tmp_path))
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("push ")]
        assert [ln.split()[1:3] for ln in lines] == [["dataset", "org/s57-ds:"],
                                                      ["model", "org/s57-model:"]], p.stdout


# --- 2. the trained model named by its path goes to push.model_repo_id -----------------------

def test_the_model_named_by_its_path_goes_to_the_model_repo_id(tmp_path, workdir):
    """`push sft/model` (or its absolute path) without REPO_ID pushes the trained model to
    push.model_repo_id, as `push model` does, not to the dataset's push.repo_id."""
    make_run(workdir, shards=1)
    make_model(workdir, card="# m\n")
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        for what in ("sft/model", str(workdir / "sft" / "model")):
            p = run(push_cmd(workdir, what, *BOTH), env)
            assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert sorted(hub.state.repos) == [("model", "org/s57-model")]


# --- 3. a push that fails after an earlier one finished says what went up --------------------

def test_a_failed_model_push_still_shows_the_dataset_push_that_finished(tmp_path, workdir):
    """Without WHAT the dataset goes up, then the model: when the model's push fails, the
    dataset's summary is printed before the error (it is on the Hub; it was not said)."""
    make_run(workdir, shards=1)
    make_model(workdir, card="# m\n")
    with HubServer(token=TOKEN) as hub:
        hub.fail("POST", r"^/api/models/org/s57-model/preupload/", 403, times=1)
        p = run(push_cmd(workdir, *BOTH), hub_env(hub, tmp_path))
        assert p.returncode == 1, (p.stdout + p.stderr)[-3000:]
        assert "Traceback" not in p.stderr and "403" in p.stderr, p.stderr[-3000:]
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("push ")]
        assert [ln.split()[1:3] for ln in lines] == [["dataset", "org/s57-ds:"]], p.stdout
        assert ("dataset", "org/s57-ds") in hub.state.repos
