"""`push.private: true` set in the config (not --private) asks for a private repo too: an existing
public repo is pushed to as it is, and the user is told, as with --private (it was silent)."""
from __future__ import annotations

from hubserver import HubServer
from test_push import TOKEN, hub_env, make_model, make_run, push_cmd, run


def _push_model(workdir, env, repo: str, *args) -> list[str]:
    """Push the trained model to ``repo``; its warnings (stderr lines starting "warning:")."""
    p = run(push_cmd(workdir, "model", repo, *args), env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]


def test_private_in_the_config_warns_of_an_existing_public_repo(tmp_path, workdir):
    make_run(workdir, shards=1)
    make_model(workdir, card="# m\n")
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        assert not _push_model(workdir, env, "org/s58-model", "--public")
        warning = _push_model(workdir, env, "org/s58-model", "--set", "push.private=true")
        assert hub.state.repos[("model", "org/s58-model")].private is False  # not changed
        assert len(warning) == 1
        assert "org/s58-model is public, not private as asked" in warning[0] and "push.private" in warning[0]


def test_the_default_config_does_not_warn_of_a_private_repo(tmp_path, workdir):
    """push.private at its default (false: public) asks nothing of an existing private repo."""
    make_run(workdir, shards=1)
    make_model(workdir, card="# m\n")
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        _push_model(workdir, env, "org/s58-private", "--private")
        assert not _push_model(workdir, env, "org/s58-private")
        assert hub.state.repos[("model", "org/s58-private")].private is True
