"""`guidealign push` of a dataset is atomic for readers with commits of bounded size: the shards go
to a folder of their own version (data/<version>/) in commits of at most push.files_per_commit
files, then ONE small commit writes the card, whose data_files switch to that folder, and
deletes the other versions' files. Whenever a push stops, the card names a folder that holds
one version's shards, all of them, so `datasets.load_dataset` reads one push's rows, never a mix
of two (tests/hubserver.py, loopback only)."""
from __future__ import annotations

import fnmatch
import json
import math
import shutil
import sys

import yaml

from hubserver import HubServer
from guidealign.shards import read_marker
from guidealign.shards.layout import shard_path
from test_push import LOAD, TOKEN, hub_env, make_run, push_cmd, run, shard_paths

REPO_ID = "org/atomic"


def snapshot(hub: HubServer) -> dict:
    """The repo's head: path -> git oid."""
    return {p: e.oid for p, e in hub.files(REPO_ID).items()}


def visible(hub: HubServer) -> dict:
    """What load_dataset reads: the files the card's data_files glob names -> sha256."""
    meta = yaml.safe_load(hub.content(REPO_ID, "README.md").decode().split("---\n")[1])
    glob = meta["configs"][0]["data_files"][0]["path"]
    return {p: e.sha256 for p, e in hub.files(REPO_ID).items()
            if p.count("/") == glob.count("/") and fnmatch.fnmatchcase(p, glob)}


def local_shards(workdir, shards: int) -> list:
    """(file name, sha256) of the local stage's shards."""
    return [(shard_path(workdir / "respond", i).name, read_marker(workdir / "respond", i).sha256)
            for i in range(shards)]


def holds_stage(hub: HubServer, workdir, shards: int) -> bool:
    """Whether the Hub holds exactly the local stage, whatever the layout: the card its last
    push wrote, whose data_files name the stage's shards, byte for byte, and no other file
    under data/."""
    seen = visible(hub)
    data = {p for p in hub.files(REPO_ID) if p.startswith("data/")}
    if set(seen) != data or sorted((p.rsplit("/", 1)[-1], sha) for p, sha in seen.items()) != \
            local_shards(workdir, shards):
        return False
    card = (workdir / "push" / "README-respond.md").read_bytes()
    return hub.content(REPO_ID, "README.md") == card and all(
        hub.content(REPO_ID, p) == shard_path(workdir / "respond", int(p[-13:-8])).read_bytes()
        for p in seen)


def loaded_rows(env) -> list:
    p = run([sys.executable, "-c", LOAD, REPO_ID], env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("ROWS ")]
    assert p.returncode == 0 and lines, (p.stdout + p.stderr)[-4000:]
    return sorted(json.loads(lines[-1][5:]), key=lambda r: r["id"])


def report(workdir) -> dict:
    return json.loads((workdir / "push" / f"dataset__{REPO_ID.replace('/', '__')}.json").read_text())


def added(before: dict, after: dict) -> list:
    """Paths a commit added or changed (``before``/``after``: a commit's files)."""
    return sorted(p for p, e in after.items() if p not in before or before[p].oid != e.oid)


def push_a_then_build_b(hub, workdir, env) -> tuple[dict, dict, list]:
    """Version A (4 shards, 20 rows) pushed; the stage rebuilt as version B (3 shards of 7
    rows: 21, other shards). Returns A's snapshot, what readers see of A, and A's rows."""
    rows_a = make_run(workdir, shards=4, rows=5)
    p = run(push_cmd(workdir, "respond", REPO_ID), env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert holds_stage(hub, workdir, 4) and "rows: 20" in hub.content(REPO_ID, "README.md").decode()
    seen_a = visible(hub)
    shutil.rmtree(workdir / "respond")
    make_run(workdir, shards=3, rows=7)
    return snapshot(hub), seen_a, sorted(rows_a, key=lambda r: r["id"])


def test_commits_hold_at_most_files_per_commit_files_and_the_card_comes_last(tmp_path, workdir):
    """(a) 5 shards with push.files_per_commit=2: ceil(5/2) = 3 shard commits of at most 2
    files, then 1 commit with the card; a second version's last commit is the card and the
    first version's folder deleted (a folder delete)."""
    make_run(workdir, shards=5, rows=3)
    k = 2
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        p = run(push_cmd(workdir, "respond", REPO_ID, "--set", f"push.files_per_commit={k}"), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        commits = hub.commits(REPO_ID)
        assert len(commits) == 1 + math.ceil(5 / k) + 1  # the repo's initial commit first
        changes = [added(a[2], b[2]) for a, b in zip(commits, commits[1:])]
        for ch in changes[:-1]:
            assert 0 < len(ch) <= k and "README.md" not in ch, ch
        assert sorted(sum(changes[:-1], [])) == shard_paths(workdir, 5)
        assert changes[-1] == ["README.md"]
        assert holds_stage(hub, workdir, 5)
        rep = report(workdir)
        assert rep["commits"] == 4 and rep["uploaded"] == 6 and rep["deleted_paths"] == []

        old = shard_paths(workdir, 5)
        shutil.rmtree(workdir / "respond")
        make_run(workdir, shards=5, rows=4)  # version B: 5 other shards
        n = len(hub.commits(REPO_ID))
        p = run(push_cmd(workdir, "respond", REPO_ID, "--set", f"push.files_per_commit={k}"), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        commits = hub.commits(REPO_ID)[n - 1:]
        assert len(commits) == 1 + 3 + 1
        changes = [added(a[2], b[2]) for a, b in zip(commits, commits[1:])]
        assert all(0 < len(ch) <= k for ch in changes[:-1])
        last_before, last = commits[-2][2], commits[-1][2]
        assert changes[-1] == ["README.md"]
        assert sorted(set(last_before) - set(last)) == old  # the old folder went in that commit
        assert holds_stage(hub, workdir, 5)
        rep = report(workdir)
        assert rep["commits"] == 4 and rep["deleted_paths"] == old


def test_a_push_failing_at_its_commits_leaves_the_previous_version_and_resumes(tmp_path, workdir):
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        a, seen_a, _ = push_a_then_build_b(hub, workdir, env)
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
        # the first commit's objects (2 of B's 3) went up before it was tried
        uploaded = hub.state.lfs_uploads[n_uploads:]
        assert len(uploaded) == 2 and set(uploaded) < b_objects

        hub.state.faults.clear()
        p = run(cmd, env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert holds_stage(hub, workdir, 3)  # exactly B: A's folder is gone, the card is B's
        assert "rows: 21" in hub.content(REPO_ID, "README.md").decode()
        assert sorted(hub.state.lfs_uploads[n_uploads:]) == sorted(b_objects)  # none again
        assert len(hub.commits(REPO_ID)) == n_commits + 3  # 2 shard commits + the card's
        rep = report(workdir)
        assert rep["commits"] == 3 and rep["commit"] == hub.commits(REPO_ID)[-1][0]
        assert rep["uploaded"] == 4 and rep["deleted_paths"] == sorted(seen_a)


def test_a_push_cut_between_its_commits_leaves_readers_the_previous_version(tmp_path, workdir):
    """(b) HTTP 500 on every commit after the first, no retries: B's first shard commit has
    landed, its card has not. load_dataset reads A, all of it and nothing of B; the rerun sends
    only what is missing and ends with exactly B, A's folder gone."""
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        a, seen_a, rows_a = push_a_then_build_b(hub, workdir, env)
        n_commits, n_uploads = len(hub.commits(REPO_ID)), len(hub.state.lfs_uploads)
        cmd = push_cmd(workdir, "respond", REPO_ID, "--set", "push.files_per_commit=2",
                       "--set", "push.max_retries=0")
        hub.fail("POST", r"/commit/", 500, times=100, after=1)
        p = run(cmd, env)
        # readers still see A whole: its card, and every shard of it where the card says
        assert visible(hub) == seen_a
        assert loaded_rows(env) == rows_a
        # B's first shard commit landed, in a folder of its own; the second failed
        paths_b = shard_paths(workdir, 3)
        folder_a = {p.rsplit("/", 1)[0] for p in seen_a}
        assert len(folder_a) == 1 and folder_a != {p.rsplit("/", 1)[0] for p in paths_b}
        assert p.returncode != 0
        assert len(hub.commits(REPO_ID)) == n_commits + 1
        assert {p: e for p, e in snapshot(hub).items() if p not in paths_b} == a
        assert set(paths_b[:2]) <= set(hub.files(REPO_ID))

        hub.state.faults.clear()
        uploads_before = list(hub.state.lfs_uploads)
        p = run(cmd, env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        rep = report(workdir)
        # only the missing shard and the card; no object sent twice
        assert rep["uploaded_paths"] == [paths_b[2], "README.md"] and rep["already_there"] == 2
        assert hub.state.lfs_uploads == uploads_before
        assert len(hub.state.lfs_uploads) == n_uploads + 3
        assert rep["commits"] == 2 and rep["deleted_paths"] == sorted(seen_a)
        assert holds_stage(hub, workdir, 3)
        assert sorted(visible(hub)) == paths_b
        rows_b = loaded_rows(env)
        assert len(rows_b) == 21 and {r["id"] for r in rows_b} != {r["id"] for r in rows_a}
        assert not any(p.startswith(f"{next(iter(folder_a))}/") for p in hub.files(REPO_ID))


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
        assert rep["commit"] == head and rep["retries"] == 0

        # (c) the head lookup, sent once by huggingface_hub, is retried after a transient error
        hub.fail("GET", rf"^/api/datasets/{REPO_ID}/revision/main", 503, times=1)
        p = run(push_cmd(workdir, "respond", REPO_ID), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert "head lookup" in p.stdout + p.stderr
        assert [s for _, _, s in hub.requests("GET", rf"^/api/datasets/{REPO_ID}/revision/main")][-2:] == [503, 200]
        rep = report(workdir)
        assert rep["commit"] == head and rep["retries"] == 1 and rep["commits"] == 0


def test_a_push_over_the_flat_layout_of_older_pushes_replaces_it(tmp_path, workdir):
    """Pushes before versioned folders wrote data/shard-NNNNN.parquet and a card naming
    data/*.parquet: the first versioned push deletes those files in its card's commit."""
    make_run(workdir, shards=2)
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        script = (
            "import sys; from huggingface_hub import HfApi, CommitOperationAdd as A\n"
            "api = HfApi(); api.create_repo(sys.argv[1], repo_type='dataset')\n"
            "ops = [A(f'data/shard-{i:05d}.parquet', sys.argv[2 + i]) for i in range(2)]\n"
            "ops.append(A('README.md', b'---\\nconfigs:\\n- config_name: default\\n  data_files:\\n"
            "  - split: train\\n    path: data/*.parquet\\n---\\n'))\n"
            "ops.append(A('notes.txt', b'a file of the user'))\n"
            "api.create_commit(sys.argv[1], operations=ops, commit_message='old', repo_type='dataset')\n")
        p = run([sys.executable, "-c", script, REPO_ID,
                 *[str(shard_path(workdir / "respond", i)) for i in range(2)]], env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        p = run(push_cmd(workdir, "respond", REPO_ID), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert holds_stage(hub, workdir, 2) and "notes.txt" in hub.files(REPO_ID)
        rep = report(workdir)
        assert rep["deleted_paths"] == ["data/shard-00000.parquet", "data/shard-00001.parquet"]
        assert rep["commits"] == 2


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
    if len(lost) < int(sys.argv[3]):
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
        _, seen_a, _ = push_a_then_build_b(hub, workdir, env)
        n_commits = len(hub.commits(REPO_ID))
        # every commit's answer lost once: 2 shard commits and the card's
        p = run([sys.executable, "-c", LOST_ANSWER, str(workdir), REPO_ID, "3"], env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert holds_stage(hub, workdir, 3)
        rep = report(workdir)
        assert rep["retries"] == 3  # each commit once
        assert rep["commits"] == len(hub.commits(REPO_ID)) - n_commits == 3
        assert rep["commit"] == hub.commits(REPO_ID)[-1][0]
        assert rep["deleted_paths"] == sorted(seen_a) and rep["uploaded"] == 4


UPLOADS_COUNTED = """
import collections, json, sys
import huggingface_hub._commit_api as commit_api
from guidealign.config import load_config
from guidealign.hub.push import run_push

seen = collections.Counter()
upload_files = commit_api._upload_files

def counting(*, additions, **kwargs):
    seen.update(op.path_in_repo for op in additions)
    return upload_files(additions=additions, **kwargs)

commit_api._upload_files = counting
cfg = load_config(None, ["push.repo_id=" + sys.argv[2], "push.what=respond",
                         "push.files_per_commit=2", "push.backoff_s=0.05"])
run_push(cfg, sys.argv[1], progress=False)
print("SEEN " + json.dumps(seen))
"""


def test_each_changed_file_is_prepared_for_upload_once(tmp_path, workdir):
    """The operations the upload prepared are the ones committed: create_commit does not hand
    a file to huggingface_hub's uploader (with Xet: read and chunked) a second time, also when
    a commit is retried."""
    make_run(workdir, shards=3)
    with HubServer(token=TOKEN) as hub:
        hub.fail("POST", r"/commit/", 503, times=1)
        p = run([sys.executable, "-c", UPLOADS_COUNTED, str(workdir), REPO_ID], hub_env(hub, tmp_path))
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        seen = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("SEEN ")][-1][5:])
        assert seen == {path: 1 for path in shard_paths(workdir, 3)}
        assert holds_stage(hub, workdir, 3)


def test_a_folder_the_commit_adds_files_to_is_not_deleted_whole(tmp_path):
    """The last commit's deletes counted only the files already on the Hub: a model subfolder
    holding only an older model's files became one folder delete in the commit that adds the new
    model's files there (the delete would remove them)."""
    from types import SimpleNamespace

    from guidealign.hub.push import StaleFiles, owned_by_push
    from guidealign.hub.targets import LocalFile

    f = tmp_path / "new.safetensors"
    f.write_bytes(b"x")
    files = [LocalFile("sub/new.safetensors", f, 1), LocalFile("README.md", f, 1)]
    api = SimpleNamespace(list_repo_files=lambda *a, **k: ["sub/old.safetensors", "README.md"])
    ops = StaleFiles(api, files, owned_by_push("model", "", files), repo_id="o/m", repo_type="model",
                     revision="main")()
    assert [(op.path_in_repo, op.is_folder) for op in ops] == [("sub/old.safetensors", False)]
