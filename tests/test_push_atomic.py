"""`guidealign push` is atomic: its LFS objects go up in batches (resumable), then ONE commit adds
every changed file and the card and deletes the stale shards, so the Hub revision holds one
push's data and card, never a mix of two (tests/hubserver.py, loopback only)."""
from __future__ import annotations

import json
import shutil
import sys

from hubserver import HubServer
from guidealign.shards import read_marker
from guidealign.shards.layout import shard_path
from test_push import TOKEN, hub_env, make_run, push_cmd, run

REPO_ID = "org/atomic"


def snapshot(hub: HubServer) -> dict:
    """The repo's head: path -> git oid."""
    return {p: e.oid for p, e in hub.files(REPO_ID).items()}


def holds_stage(hub: HubServer, workdir, shards: int) -> bool:
    """Whether the Hub holds exactly the local stage: its shards (no other data/ file) and the
    card its last push wrote."""
    data = sorted(p for p in hub.files(REPO_ID) if p.startswith("data/"))
    if data != [f"data/shard-{i:05d}.parquet" for i in range(shards)]:
        return False
    card = (workdir / "push" / "README-respond.md").read_bytes()
    return hub.content(REPO_ID, "README.md") == card and all(
        hub.content(REPO_ID, f"data/shard-{i:05d}.parquet") == shard_path(workdir / "respond", i).read_bytes()
        for i in range(shards))


def report(workdir) -> dict:
    return json.loads((workdir / "push" / f"{REPO_ID.replace('/', '__')}.json").read_text())


def push_a_then_build_b(hub, workdir, env) -> dict:
    """Version A (4 shards, 20 rows) pushed; the stage rebuilt as version B (3 shards of other
    rows, 21). Returns A's snapshot."""
    make_run(workdir, shards=4, rows=5)
    p = run(push_cmd(workdir, "respond", REPO_ID), env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert holds_stage(hub, workdir, 4) and "rows: 20" in hub.content(REPO_ID, "README.md").decode()
    shutil.rmtree(workdir / "respond")
    make_run(workdir, shards=3, rows=7)
    return snapshot(hub)


def test_a_push_failing_at_its_commit_leaves_the_previous_version_and_resumes(tmp_path, workdir):
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        a = push_a_then_build_b(hub, workdir, env)
        n_commits = len(hub.commits(REPO_ID))
        b_objects = {read_marker(workdir / "respond", i).sha256 for i in range(3)}
        cmd = push_cmd(workdir, "respond", REPO_ID, "--set", "push.files_per_commit=2",
                       "--set", "push.max_retries=0")

        hub.fail("POST", r"/commit/", 500, times=100)  # every commit fails
        n_uploads = len(hub.state.lfs_uploads)
        p = run(cmd, env)
        assert p.returncode != 0
        assert snapshot(hub) == a  # exactly version A: its 4 shards and its card
        assert "rows: 20" in hub.content(REPO_ID, "README.md").decode()
        assert len(hub.commits(REPO_ID)) == n_commits
        # every B object went up (in batches of 2) before the one commit was tried
        uploaded = hub.state.lfs_uploads[n_uploads:]
        assert sorted(uploaded) == sorted(b_objects)

        hub.state.faults.clear()
        p = run(cmd, env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert holds_stage(hub, workdir, 3)  # exactly B: shard 3 is gone, the card is B's
        assert "rows: 21" in hub.content(REPO_ID, "README.md").decode()
        assert len(hub.state.lfs_uploads) == n_uploads + 3  # nothing uploaded again
        assert len(hub.commits(REPO_ID)) == n_commits + 1
        rep = report(workdir)
        assert rep["commits"] == 1 and rep["commit"] == hub.commits(REPO_ID)[-1][0]
        assert rep["uploaded"] == 4 and rep["deleted_paths"] == ["data/shard-00003.parquet"]


def test_a_push_cut_between_commits_never_leaves_a_mix(tmp_path, workdir):
    """The reviewer's scenario: HTTP 500 on every commit after the first, no retries."""
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        a = push_a_then_build_b(hub, workdir, env)
        hub.fail("POST", r"/commit/", 500, times=100, after=1)
        p = run(push_cmd(workdir, "respond", REPO_ID, "--set", "push.files_per_commit=2",
                         "--set", "push.max_retries=0"), env)
        # every data/ file and the card from one version: A untouched, or B whole
        assert snapshot(hub) == a or holds_stage(hub, workdir, 3), sorted(hub.files(REPO_ID))
        assert p.returncode == 0 and holds_stage(hub, workdir, 3)  # one commit: the first


def test_a_push_with_nothing_new_makes_no_commit_and_reports_the_head(tmp_path, workdir):
    make_run(workdir, shards=2)
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        assert run(push_cmd(workdir, "respond", REPO_ID), env).returncode == 0
        head = hub.commits(REPO_ID)[-1][0]
        n_posts = len(hub.requests("POST", r"/commit/"))
        p = run(push_cmd(workdir, "respond", REPO_ID), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert hub.commits(REPO_ID)[-1][0] == head
        assert len(hub.requests("POST", r"/commit/")) == n_posts
        rep = report(workdir)
        assert rep["commits"] == 0 and rep["uploaded"] == 0 and rep["already_there"] == 3
        assert rep["commit"] == head


LOST_ANSWER = """
import sys
from huggingface_hub import HfApi
from huggingface_hub.utils import _http
from guidealign.config import load_config
from guidealign.hub.push import run_push

lost = []
create_commit = HfApi.create_commit

def commit_whose_answer_is_lost(self, *args, **kwargs):
    info = create_commit(self, *args, **kwargs)  # the commit lands on the Hub ...
    if not lost:
        lost.append(info)
        raise _http._DEFAULT_RETRY_ON_EXCEPTIONS[0]("answer lost")  # ... its answer does not
    return info

HfApi.create_commit = commit_whose_answer_is_lost
cfg = load_config(None, ["push.repo_id=" + sys.argv[2], "push.what=respond",
                         "push.files_per_commit=2", "push.backoff_s=0.05"])
print("REPORT", run_push(cfg, sys.argv[1], progress=False).summary())
"""


def test_a_commit_whose_answer_was_lost_is_counted_once(tmp_path, workdir):
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        push_a_then_build_b(hub, workdir, env)
        n_commits = len(hub.commits(REPO_ID))
        p = run([sys.executable, "-c", LOST_ANSWER, str(workdir), REPO_ID], env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert holds_stage(hub, workdir, 3)
        rep = report(workdir)
        assert rep["retries"] == 1
        assert rep["commits"] == len(hub.commits(REPO_ID)) - n_commits == 1
        assert rep["commit"] == hub.commits(REPO_ID)[-1][0]
        assert rep["deleted_paths"] == ["data/shard-00003.parquet"] and rep["uploaded"] == 4
