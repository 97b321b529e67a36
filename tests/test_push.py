"""`guidealign push` against a local stand-in of the Hub (tests/hubserver.py, loopback only):
the round trip through datasets.load_dataset, rate-limit retries (of a commit, by push; of a
transient 502 on the preupload call and an LFS upload, by huggingface_hub's own http_backoff), the
token never printed, a model push, and a push killed, or failed, before its last commit that
resumes without re-uploading what reached the Hub. A dataset's shards go to
data/<version>/ (tests/test_push_atomic.py: the commits and what readers see meanwhile)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guidealign.gen.respond import RESPOND_SCHEMA
from hubserver import HubServer
from guidealign.shards import read_marker, read_table, write_json_atomic, write_manifest, write_shard
from guidealign.shards.layout import shard_path

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_TESTsecretTOKEN0123456789"


def version_of(workdir: Path, stage: str = "respond") -> str:
    """The version folder a push of the local stage writes its shards to: the first 12 hex
    digits of the sha256 over the shards' sorted (file name, sha256) pairs."""
    import hashlib

    from guidealign.shards import read_manifest

    d = workdir / stage
    pairs = sorted([shard_path(d, i).name, read_marker(d, i).sha256]
                   for i in range(int(read_manifest(d)["num_shards"])))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:12]


def shard_paths(workdir: Path, shards: int, stage: str = "respond") -> list[str]:
    """The paths on the Hub of the local stage's shards."""
    v = version_of(workdir, stage)
    return [f"data/{v}/shard-{i:05d}.parquet" for i in range(shards)]


def make_rows(shard: int, n: int) -> list[dict]:
    return [dict(id=f"s{shard}-{i}", prompt=f"prompt {shard}/{i} " + "x" * (i * 37 % 200),
                 guideline_ids=[f"g{i}"], guideline_texts=[f"guideline {i}"],
                 response=f"response {shard}/{i}", finish_reason="stop", model="m",
                 prompt_tokens=i, output_tokens=i + 1, note="")
            for i in range(n)]


def make_model(workdir: Path, *, size: int = 2000, tokenizer: bool = True, card: str | None = None,
               done: bool = True) -> Path:
    """An SFT model under WORKDIR/sft/model (``size`` random weight bytes, a tokenizer file, a
    card), finished (sft/_done.json) unless ``done`` is False."""
    m = workdir / "sft" / "model"
    m.mkdir(parents=True)
    (m / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (m / "model.safetensors").write_bytes(os.urandom(size))
    if tokenizer:
        (m / "tokenizer.json").write_text("{}")
    if card is not None:
        (m / "README.md").write_text(card)
    if done:
        (workdir / "sft" / "_done.json").write_text(json.dumps({"fingerprint": "f"}))
    return m


def make_run(workdir: Path, shards: int, rows: int = 5) -> list[dict]:
    d = workdir / "respond"
    write_manifest(d, stage="respond", num_shards=shards, fingerprint="fp", model="org/responder-that-ran")
    out = []
    for s in range(shards):
        r = make_rows(s, rows)
        write_shard(d, s, pa.Table.from_pylist(r, schema=RESPOND_SCHEMA), "fp")
        out += r
    lib = workdir / "library"
    write_manifest(lib, stage="library", num_shards=1, fingerprint="lfp")
    write_shard(lib, 0, pa.table({"guideline_id": ["a", "b", "c"]}), "lfp")
    write_json_atomic(workdir / "retriever" / "_done.json",
                      {"fingerprint": "r", "rows": 10, "seconds": 1.0,
                       "metrics": {"recall@6": 0.8125, "mrr": 0.5}})
    return out


def hub_env(hub: HubServer, tmp: Path, token: str | None = TOKEN) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp / "hf-home"),
               HF_DATASETS_CACHE=str(tmp / "ds-cache"), HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if token:
        env["HF_TOKEN"] = token
    return env


def push_cmd(workdir, *args) -> list[str]:
    return [sys.executable, "-m", "guidealign", "-vv", "push", *args, "-w", str(workdir),
            "--set", "push.backoff_s=0.05", "--no-progress"]


def run(cmd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


LOAD = """
import json, sys
from datasets import load_dataset
ds = load_dataset(sys.argv[1], split="train")
print("ROWS " + json.dumps(ds.to_list()))
"""


def test_push_round_trip_with_rate_limits(tmp_path, workdir):
    rows = make_run(workdir, shards=2)
    with HubServer(token=TOKEN) as hub:
        hub.fail("POST", r"/commit/", 429, times=2, Retry_After="0")
        hub.fail("POST", r"/api/repos/create", 503, times=1)
        env = hub_env(hub, tmp_path)
        p = run(push_cmd(workdir, "respond", "org/aligned", "--private",
                         "--set", "push.files_per_commit=2"), env)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-4000:]
        assert TOKEN not in out  # never printed, even at -vv
        assert "retry" in out and "429" in out
        assert TOKEN in hub.state.seen_tokens  # ... but sent to the Hub
        # two 429s, then the shards' commit (2 files), then the card's
        assert len(hub.requests("POST", r"/commit/")) == 2 + 2
        assert len(hub.commits("org/aligned")) == 1 + 2  # the repo's initial commit, then 2
        # a retried commit does not upload its LFS objects again
        assert len(hub.state.lfs_uploads) == 2
        files = hub.files("org/aligned")
        paths = shard_paths(workdir, 2)
        v = version_of(workdir)
        assert len(v) == 12 and paths[0] == f"data/{v}/shard-00000.parquet"
        assert set(files) == {".gitattributes", "README.md", *paths}
        for i in range(2):  # pushed as they are: byte-identical, stored as LFS
            local = shard_path(workdir / "respond", i)
            assert hub.content("org/aligned", paths[i]) == local.read_bytes()
            assert files[paths[i]].sha256 == read_marker(workdir / "respond", i).sha256
        card = hub.content("org/aligned", "README.md").decode()
        assert f"path: data/{v}/*.parquet" in card and "library_size: 3" in card
        assert "recall@6: 0.8125" in card and "prompt_version" in card
        assert "responder: org/responder-that-ran" in card  # the model the run recorded
        assert "detect.yaml" in card  # hashes of the generation prompts
        assert "rows: 10" in card and "generator: embedded:smollm2-135m-instruct" in card
        assert hub.state.repos[("dataset", "org/aligned")].private is True
        report = json.loads((workdir / "push" / "dataset__org__aligned.json").read_text())
        assert report["uploaded"] == 3 and report["retries"] >= 3 and TOKEN not in json.dumps(report)
        assert report["commits"] == 2 and report["commit"] == hub.commits("org/aligned")[-1][0]

        # Private: no token, no data.
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{hub.endpoint}/api/datasets/org/aligned")
        assert e.value.code == 401

        # The round trip: datasets.load_dataset reads back exactly the rows written.
        p = run([sys.executable, "-c", LOAD, "org/aligned"], env)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("ROWS ")]
        assert p.returncode == 0 and lines, (p.stdout + p.stderr)[-4000:]
        got = sorted(json.loads(lines[-1][5:]), key=lambda r: r["id"])
        assert got == sorted(rows, key=lambda r: r["id"])

        # Pushing again changes nothing and uploads nothing.
        n_puts = len(hub.state.lfs_uploads)
        n_commits = len(hub.state.repos[("dataset", "org/aligned")].commits)
        n_posts = len(hub.requests("POST", r"/commit/"))
        p = run(push_cmd(workdir, "respond", "org/aligned", "--set", "push.files_per_commit=2"), env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert len(hub.state.lfs_uploads) == n_puts
        # nothing changed locally, so nothing is committed (the card is rebuilt identically)
        assert len(hub.state.repos[("dataset", "org/aligned")].commits) == n_commits
        assert len(hub.requests("POST", r"/commit/")) == n_posts  # not even tried
        assert "0 file(s) pushed in 0 commit(s), 3 already on the Hub" in p.stdout
        report = json.loads((workdir / "push" / "dataset__org__aligned.json").read_text())
        assert report["already_there"] == 3 and report["uploaded"] == 0


def test_transient_errors_are_retried_by_huggingface_hub(tmp_path, workdir):
    make_run(workdir, shards=2)
    with HubServer(token=TOKEN) as hub:
        # Requests huggingface_hub itself retries (http_backoff): the preupload call, an upload.
        hub.fail("POST", r"/preupload/", 502, times=1)
        hub.fail("PUT", r"/_lfs/", 502, times=1)
        p = run(push_cmd(workdir, "respond", "org/flaky"), hub_env(hub, tmp_path))
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert [s for _, _, s in hub.requests("POST", r"/preupload/")][:2] == [502, 200]
        puts = [s for _, _, s in hub.requests("PUT", r"/_lfs/")]
        assert sorted(puts) == [200, 200, 502]  # two shards, one of them sent twice
        report = json.loads((workdir / "push" / "dataset__org__flaky.json").read_text())
        assert report["retries"] == 0  # no step of ours had to be run again
        assert report["uploaded"] == 3 and report["commits"] == 2  # the shards', the card's
        assert len(hub.commits("org/flaky")) == 1 + 2
        for i, path in enumerate(shard_paths(workdir, 2)):
            assert hub.content("org/flaky", path) == shard_path(workdir / "respond", i).read_bytes()
        assert f"path: data/{version_of(workdir)}/*.parquet" in \
            hub.content("org/flaky", "README.md").decode()


def test_push_needs_a_token_and_a_complete_stage(tmp_path, workdir):
    make_run(workdir, shards=2)
    with HubServer(token=TOKEN) as hub:
        p = run(push_cmd(workdir, "respond", "org/x"), hub_env(hub, tmp_path, token=None))
        assert p.returncode != 0 and ("401" in p.stderr or "credentials" in p.stderr.lower())
        (workdir / "respond" / "shard-00001.done.json").unlink()
        p = run(push_cmd(workdir, "respond", "org/x"), hub_env(hub, tmp_path))
        assert p.returncode != 0 and "incomplete" in p.stderr
        assert ("dataset", "org/x") not in hub.state.repos


def test_push_of_a_smaller_stage_deletes_the_stale_shards(tmp_path, workdir):
    """A stage pushed with 3 shards, rebuilt with 2 and pushed again: the first version's
    folder (its 3 shards) is deleted from the Hub, so the repo holds exactly the stage's rows."""
    import shutil

    make_run(workdir, shards=3)
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        assert run(push_cmd(workdir, "respond", "org/s"), env).returncode == 0
        old = shard_paths(workdir, 3)
        shutil.rmtree(workdir / "respond")
        make_run(workdir, shards=2)
        p = run(push_cmd(workdir, "respond", "org/s"), env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "3 stale file(s) deleted" in p.stdout + p.stderr
        assert sorted(f for f in hub.files("org/s") if f.startswith("data/")) == shard_paths(workdir, 2)
        report = json.loads((workdir / "push" / "dataset__org__s.json").read_text())
        assert report["deleted_paths"] == old
        n = len(hub.commits("org/s"))
        assert run(push_cmd(workdir, "respond", "org/s"), env).returncode == 0
        assert len(hub.commits("org/s")) == n  # nothing new, nothing stale: no commit


def test_a_shard_of_no_rows_is_left_out_and_a_stage_of_no_rows_is_refused(tmp_path, workdir):
    """A 0-row shard (a block whose every row went to quarantine) made the pushed repo fail in
    load_dataset ("BatchSize must be greater than 0"); a stage of no rows was pushed as an
    empty version whose last commit deleted the Hub's data."""
    import shutil

    make_run(workdir, shards=2, rows=3)
    empty = pa.Table.from_pylist([], schema=RESPOND_SCHEMA)
    write_shard(workdir / "respond", 0, empty, "fp")
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        p = run(push_cmd(workdir, "respond", "org/e"), env)
        assert p.returncode == 0, p.stderr[-3000:]
        data = sorted(f for f in hub.files("org/e") if f.startswith("data/"))
        assert [f.rsplit("/", 1)[1] for f in data] == ["shard-00001.parquet"]
        p = run([sys.executable, "-c", LOAD, "org/e"], env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert [r["id"] for r in json.loads(p.stdout.split("ROWS ", 1)[1])] == ["s1-0", "s1-1", "s1-2"]
        shutil.rmtree(workdir / "respond")
        write_manifest(workdir / "respond", stage="respond", num_shards=1, fingerprint="fp")
        write_shard(workdir / "respond", 0, empty, "fp")
        p = run(push_cmd(workdir, "respond", "org/e"), env)
        assert p.returncode != 0 and "holds no rows" in p.stdout + p.stderr
        assert sorted(f for f in hub.files("org/e") if f.startswith("data/")) == data  # kept


def test_push_refuses_shards_committed_under_another_config(tmp_path, workdir):
    """Every shard has a marker, but one was committed with another fingerprint (a config
    changed and only some ranks reran): the stage is not finished, and nothing is pushed."""
    from guidealign.shards import map_shards

    src = workdir / "retrieve"
    for i in range(2):
        write_shard(src, i, pa.Table.from_pylist(make_rows(i, 5), schema=RESPOND_SCHEMA), "in")
    write_manifest(src, stage="retrieve", num_shards=2, fingerprint="in")
    map_shards("respond", src, workdir / "respond", "config-a", fn=lambda t, i: t, progress=False)
    map_shards("respond", src, workdir / "respond", "config-b", fn=lambda t, i: t, progress=False,
               rank=0, world_size=2, assign="static")  # shard 1 still has config-a's
    with HubServer(token=TOKEN) as hub:
        p = run(push_cmd(workdir, "respond", "org/x"), hub_env(hub, tmp_path))
        assert p.returncode != 0 and "another config" in p.stderr
        assert ("dataset", "org/x") not in hub.state.repos


def test_push_model_public(tmp_path, workdir):
    m = make_model(workdir, size=300_000, card="---\nlibrary_name: transformers\n---\n# Labrador\n", done=False)
    with HubServer(token=TOKEN) as hub:
        # without sft/_done.json (SFT stopped while it replaced the model): not pushed
        p = run(push_cmd(workdir, "model", "org/labrador", "--public"), hub_env(hub, tmp_path))
        assert p.returncode != 0 and "not a finished model" in p.stderr, p.stderr[-3000:]
        assert ("model", "org/labrador") not in hub.state.repos
        (workdir / "sft" / "_done.json").write_text(json.dumps({"fingerprint": "f"}))
        p = run(push_cmd(workdir, "model", "org/labrador", "--public"), hub_env(hub, tmp_path))
        assert p.returncode == 0, p.stderr[-3000:]
        repo = hub.state.repos[("model", "org/labrador")]
        assert repo.private is False
        files = hub.files("org/labrador", "model")
        assert files["model.safetensors"].sha256 is not None  # LFS
        assert hub.content("org/labrador", "model.safetensors", "model") == \
            (m / "model.safetensors").read_bytes()
        assert hub.content("org/labrador", "README.md", "model").startswith(b"---\nlibrary_name")
        # Anyone may read a public repo.
        with urllib.request.urlopen(f"{hub.endpoint}/org/labrador/resolve/main/config.json") as r:
            assert json.loads(r.read()) == {"model_type": "llama"}

        # The pipeline's call (run_push(cfg, workdir)): push.what to push.repo_id, then the model
        # to push.model_repo_id (already there: nothing uploaded again).
        make_run(workdir, shards=1)
        n_puts = len(hub.state.lfs_uploads)
        script = ("import sys; from guidealign.config import load_config; "
                  "from guidealign.hub.push import run_push; "
                  "cfg = load_config(None, ['push.repo_id=org/run-ds', 'push.model_repo_id=org/labrador']); "
                  "print('REPORT', run_push(cfg, sys.argv[1]).summary())")
        p = run([sys.executable, "-c", script, str(workdir)], hub_env(hub, tmp_path))
        assert p.returncode == 0, p.stderr[-3000:]
        assert "REPORT push dataset org/run-ds: 2 file(s) pushed" in p.stdout
        assert set(hub.files("org/run-ds")) == {".gitattributes", "README.md", *shard_paths(workdir, 1)}
        assert hub.state.repos[("dataset", "org/run-ds")].private is True  # push.private default
        assert len(hub.state.lfs_uploads) == n_puts + 1  # the shard only; the model was there


def test_push_model_repo_id_alone_pushes_the_model_alone(tmp_path, workdir):
    """`run` with push.model_repo_id and no push.repo_id skipped push without a word."""
    m = make_model(workdir, size=1000, tokenizer=False)
    make_run(workdir, shards=1)
    script = ("import sys; from guidealign.config import load_config; "
              "from guidealign.hub.push import run_push; "
              "cfg = load_config(None, ['push.model_repo_id=org/labrador-only']); "
              "print('REPORT', run_push(cfg, sys.argv[1]).summary())")
    with HubServer(token=TOKEN) as hub:
        p = run([sys.executable, "-c", script, str(workdir)], hub_env(hub, tmp_path))
        assert p.returncode == 0, p.stderr[-3000:]
        assert "REPORT push model org/labrador-only" in p.stdout, p.stdout
        assert "model.safetensors" in hub.files("org/labrador-only", "model")
        assert not [r for r in hub.state.repos if r[0] == "dataset"]  # no dataset pushed


def test_interrupted_push_resumes_without_reuploading(tmp_path, workdir):
    make_run(workdir, shards=5, rows=40)
    shas = {read_marker(workdir / "respond", i).sha256 for i in range(5)}
    assert len(shas) == 5
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        # Commits of 2 shards each; the 4th LFS upload (a file of the 2nd commit) never
        # finishes.
        hub.state.hang_after = 3
        proc = subprocess.Popen(push_cmd(workdir, "respond", "org/big", "--set",
                                         "push.files_per_commit=2"),
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240  # a guard against a hung test, not a speed check
            while not (hub.state.hanging and len(hub.state.lfs_uploads) == 3):
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "the push never reached the hanging upload"
                time.sleep(0.05)
        finally:
            proc.kill()  # the interruption: no chance to clean up
            proc.wait()
        hub.state.hang_after = None
        hub.state.release.set()
        first = list(hub.state.lfs_uploads)
        files = hub.files("org/big")
        committed = {p for p, e in files.items() if e.sha256}
        # Three objects were uploaded before the kill, the first two committed (the first
        # commit), under their version's folder; the card comes last, so no card yet.
        assert len(first) == 3
        assert committed == set(shard_paths(workdir, 2)) and "README.md" not in files

        p = run(push_cmd(workdir, "respond", "org/big", "--set", "push.files_per_commit=2"), env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        second = hub.state.lfs_uploads[len(first):]
        assert not set(second) & set(first)  # nothing finished before is uploaded again
        assert set(first) | set(second) == shas
        assert len(second) == 2
        files = hub.files("org/big")
        assert {e.sha256 for e in files.values() if e.sha256} == shas
        for i, path in enumerate(shard_paths(workdir, 5)):
            assert hub.content("org/big", path) == shard_path(workdir / "respond", i).read_bytes()
        report = json.loads((workdir / "push" / "dataset__org__big.json").read_text())
        # the first commit's 2 shards were there; 3 shards + the card in 2 + 1 commits
        assert report["already_there"] == 2 and report["uploaded"] == 4 and report["commits"] == 3
        # And the data are whole.
        t = pa.concat_tables(pq.read_table(shard_path(workdir / "respond", i)) for i in range(5))
        assert t.num_rows == 200


def test_failed_push_resumes_without_reuploading(tmp_path, workdir):
    make_run(workdir, shards=4, rows=20)
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        # Every commit fails, also when retried: the first (2 shards) stops the push.
        hub.fail("POST", r"/commit/", 500, times=100)
        cmd = push_cmd(workdir, "respond", "org/cut", "--set", "push.files_per_commit=2",
                       "--set", "push.max_retries=1")
        p = run(cmd, env)
        assert p.returncode != 0
        assert "retry 1/1" in p.stdout + p.stderr
        commits = hub.commits("org/cut")
        assert len(commits) == 1 and set(commits[-1][2]) == {".gitattributes"}
        # The first commit's objects reached the Hub once, though the commit was tried twice.
        first = list(hub.state.lfs_uploads)
        assert len(first) == 2 and len(set(first)) == 2

        hub.state.faults.clear()
        p = run(cmd, env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        uploads = hub.state.lfs_uploads
        assert uploads[:2] == first and len(uploads) == len(set(uploads)) == 4  # none again
        report = json.loads((workdir / "push" / "dataset__org__cut.json").read_text())
        assert report["already_there"] == 0 and report["uploaded"] == 5 and report["commits"] == 3
        assert report["uploaded_paths"] == shard_paths(workdir, 4) + ["README.md"]
        for i, path in enumerate(shard_paths(workdir, 4)):
            assert hub.content("org/cut", path) == shard_path(workdir / "respond", i).read_bytes()
        assert "README.md" in hub.files("org/cut")


def test_push_cli_errors(workdir):
    from click.testing import CliRunner

    from guidealign.cli import cli

    make_run(workdir, shards=1)
    r = CliRunner().invoke(cli, ["push", "respond", "-w", str(workdir)])
    assert r.exit_code != 0 and "no repo id" in r.output
    r = CliRunner().invoke(cli, ["push", "nothing", "org/x", "-w", str(workdir)])
    assert r.exit_code != 0 and "neither a stage" in r.output
    r = CliRunner().invoke(cli, ["push", "model", "org/x", "-w", str(workdir)])
    assert r.exit_code != 0 and "guidealign sft" in r.output
    r = CliRunner().invoke(cli, ["push", "respond", "org/x", "-w", str(workdir), "--rank", "1",
                                 "--world-size", "2"])
    assert r.exit_code == 0 and "rank 1 has nothing to do" in r.output

    from guidealign.config import load_config
    from guidealign.hub.push import run_push

    cfg = load_config(None, ["push.repo_id=org/x"])
    assert run_push(cfg, workdir, rank=1, world_size=2) is None  # rank 0 pushes, the others not
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # the tests' own setting (conftest)
        r = CliRunner().invoke(cli, ["push", "respond", "org/x", "-w", str(workdir)])
        assert r.exit_code != 0 and "HF_HUB_OFFLINE" in r.output


def test_rank_0_pushes_a_stage_only_once_the_other_ranks_committed_their_shards(tmp_path, workdir):
    """Rank 0 reached push while rank 1 was still writing its respond shard: the push failed
    ("not committed") and the run with it. Now it waits for the whole stage, as SFT does."""
    make_run(workdir, shards=2)
    shard1 = read_table(workdir / "respond", 1)
    (workdir / "respond" / "shard-00001.done.json").unlink()  # rank 1 not done yet
    script = textwrap.dedent("""
        import sys, threading, time
        import pyarrow as pa
        from pathlib import Path
        from guidealign.config import load_config
        from guidealign.hub.push import run_push
        from guidealign.shards import write_shard
        w = Path(sys.argv[1])
        table = pa.ipc.open_file(sys.argv[2]).read_all()
        def rank_1():
            time.sleep(1.0)
            write_shard(w / "respond", 1, table, "fp")
            print("RANK1 committed", flush=True)
        threading.Thread(target=rank_1).start()
        cfg = load_config(None, ["push.repo_id=org/ranks"])
        print("REPORT", run_push(cfg, w, rank=0, world_size=2).summary(), flush=True)
    """)
    arrow = tmp_path / "shard1.arrow"
    with pa.ipc.new_file(arrow, shard1.schema) as f:
        f.write_table(shard1)
    with HubServer(token=TOKEN) as hub:
        p = run([sys.executable, "-c", script, str(workdir), str(arrow)], hub_env(hub, tmp_path))
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.index("RANK1 committed") < p.stdout.index("REPORT")
        assert "REPORT push dataset org/ranks: 3 file(s) pushed" in p.stdout  # 2 shards, the card
        assert set(hub.files("org/ranks")) == {".gitattributes", "README.md", *shard_paths(workdir, 2)}
