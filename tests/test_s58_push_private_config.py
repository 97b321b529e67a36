"""`push.private: true` set in the config (not --private) asks for a private repo too: an existing
public repo is pushed to as it is, and the user is told, as with --private (it was silent)."""
from __future__ import annotations

from hubserver import HubServer
from test_push import TOKEN, hub_env, make_model, make_run, push_cmd, run


def _warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("warning:")]


def test_private_in_the_config_warns_of_an_existing_public_repo(tmp_path, workdir):
    make_run(workdir, shards=1)
    make_model(workdir, card="# m\n")
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        p = run(push_cmd(workdir, "model", "org/s58-model", "--public"), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert not _warnings(p.stderr)

        p = run(push_cmd(workdir, "model", "org/s58-model", "--set", "push.private=true"), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert hub.state.repos[("model", "org/s58-model")].private is False  # not changed
        warning = _warnings(p.stderr)
        assert len(warning) == 1, p.stderr[-3000:]
        assert "org/s58-model is public, not private as asked" in warning[0] and "push.private" in warning[0]


def test_the_default_config_does_not_warn_of_a_private_repo(tmp_path, workdir):
    """push.private at its default (false: public) asks nothing of an existing private repo."""
    make_run(workdir, shards=1)
    make_model(workdir, card="# m\n")
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        p = run(push_cmd(workdir, "model", "org/s58-private", "--private"), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        p = run(push_cmd(workdir, "model", "org/s58-private"), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert hub.state.repos[("model", "org/s58-private")].private is True
        assert not _warnings(p.stderr), p.stderr[-3000:]
