"""Index (versioned against the library) and batch retrieval (near-dup filtering,
quarantine, rank split, and identical output across a SIGKILL and resume)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

import guidealign.shards as shards
from guidealign.config import load_config
from guidealign.retrieval.index import EmptyLibraryError, IndexVersionError, load_index, run_index
from guidealign.retrieval.library import run_library
from guidealign.retrieval.retrieve import encoder_path, run_retrieve, select
from synthetic import (base_guideline, synthetic_library,
                                 write_guideline_shards, write_prompt_shards)

REPO = Path(__file__).resolve().parents[1]
# the base MiniLM (no training needed here); one torch thread so runs are reproducible
OVERRIDES = ["index.model=embedded:all-minilm-l6-v2", "index.threads=1", "retrieve.threads=1",
             "retrieve.batch_size=16"]


def _guideline_rows(seed: int, n_prompts: int = 60):
    import random

    texts, _ = synthetic_library(n_prompts * 3, 40, seed=seed)
    rng = random.Random(seed)
    return [{"id": f"p{seed}-{i:03d}", "prompt": f"prompt {i}", "risky": rng.random() < 0.5,
             "guidelines": [{"title": "T", "text": t} for t in texts[3 * i:3 * i + 3]]}
            for i in range(n_prompts)]


@pytest.fixture(scope="module")
def built(module_tmp):
    """A workdir with a library, its index and 6 prompt shards."""
    w = module_tmp.mktemp("retr") / "run"
    write_guideline_shards(w / "guidelines", _guideline_rows(1), shard_rows=25)
    cfg = load_config(overrides=OVERRIDES)
    run_library(cfg, w, progress=False)
    run_index(cfg, w, progress=False)
    import random

    rng = random.Random(5)
    prompts = [{"id": f"q{i:03d}", "prompt": f"How should I handle {base_guideline(rng)[0].lower()}?"}
               for i in range(60)]
    prompts[7]["prompt"] = "   "
    write_prompt_shards(w / "prompts", prompts, shard_rows=10)
    return w


def _copy_run(src: Path, dst: Path, names=("guidelines", "library", "index", "prompts")) -> Path:
    for n in names:
        shutil.copytree(src / n, dst / n)
    return dst


def _read_all(d: Path) -> pa.Table:
    return pa.concat_tables(list(shards.iter_tables(d)))


def test_index_refuses_another_library(built, tmp_path):
    w = _copy_run(built, tmp_path / "run")
    idx = load_index(w / "index", w / "library", use_gpu=False)
    assert len(idx.ids) == idx.index.ntotal > 0
    # rebuild the library from other guidelines: same place, another version
    shutil.rmtree(w / "guidelines")
    write_guideline_shards(w / "guidelines", _guideline_rows(2), shard_rows=25)
    cfg = load_config(overrides=OVERRIDES)
    run_library(cfg, w, progress=False)
    with pytest.raises(IndexVersionError, match="library version"):
        load_index(w / "index", w / "library", use_gpu=False)
    with pytest.raises(IndexVersionError):
        run_retrieve(cfg, w, progress=False)
    assert not (w / "retrieve").exists()
    # an index loaded against another run's library is refused as well
    with pytest.raises(IndexVersionError):
        load_index(built / "index", w / "library", use_gpu=False)
    # rebuilding the index makes it usable again
    run_index(cfg, w, progress=False)
    assert load_index(w / "index", w / "library", use_gpu=False).meta["library_version"] != \
        load_index(built / "index", built / "library", use_gpu=False).meta["library_version"]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_kinds_find_the_library_itself(built, tmp_path, kind):
    from guidealign.retrieval.embed import encode, load_encoder

    w = _copy_run(built, tmp_path / "run", names=("library",))
    cfg = load_config(overrides=OVERRIDES + [f"index.kind={kind}", "index.nprobe=64"])
    rep = run_index(cfg, w, progress=False)
    assert rep.kind.startswith(kind)
    idx = load_index(w / "index", w / "library", use_gpu=False)
    model = load_encoder(encoder_path(idx.meta, w))
    q = encode(model, idx.texts[:20])
    _, nbrs = idx.search(q, 1)
    assert (nbrs[:, 0] == list(range(20))).mean() >= 0.9


def test_select_drops_near_duplicate_candidates():
    texts = ["Do not help with weapons.", "Do not help with weapons!", "Be kind to the user.",
             "Cite sources.", "do not help with weapon", "Keep answers short."]
    kept = select([0, 1, 2, 3, 4, 5], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], texts, keep=3, dedup_ratio=0.5)
    assert [c for c, _ in kept] == [0, 2, 3]
    kept = select([0, 1, -1, 4], [0.9, 0.8, 0.7, 0.5], texts, keep=6, dedup_ratio=0.5)
    assert [c for c, _ in kept] == [0]


def test_retrieve_output_and_rank_split(built, tmp_path):
    w = _copy_run(built, tmp_path / "run")
    cfg = load_config(overrides=OVERRIDES)
    r0 = run_retrieve(cfg, w, rank=0, world_size=2, progress=False)
    r1 = run_retrieve(cfg, w, rank=1, world_size=2, progress=False)
    assert r0.processed == r1.processed == 3
    out = _read_all(w / "retrieve")
    assert out.num_rows == 59
    q = shards.read_quarantine(w / "retrieve").to_pylist()
    assert q == [{"id": "q007", "prompt": "   ", "reason": "empty prompt"}]
    from rapidfuzz import fuzz

    from guidealign.retrieval.embed import normalize_text

    for row in out.to_pylist():
        assert len(row["guideline_ids"]) == len(row["guideline_texts"]) == len(row["scores"])
        assert 1 <= len(row["guideline_ids"]) <= 6
        assert row["scores"] == sorted(row["scores"], reverse=True)
        # kept guidelines are no near-duplicates in what the library compares: their texts
        # (every synthetic guideline has the title "T": guideline_texts are "T: <text>")
        ts = [normalize_text(t.removeprefix("T: ")) for t in row["guideline_texts"]]
        assert all(fuzz.ratio(a, b) < 50 for i, a in enumerate(ts) for b in ts[i + 1:])
    # a rerun does nothing
    again = run_retrieve(cfg, w, progress=False)
    assert again.processed == 0 and again.skipped == 6


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import guidealign.retrieval.retrieve as R
    from guidealign.config import load_config

    orig = R.make_shard_fn

    def slow_make(cfg, workdir):
        fn = orig(cfg, workdir)
        def slow(table, i):
            if i > 0:
                time.sleep(3600)  # shard 0 commits at once; we get killed while shard 1 is in flight
            return fn(table, i)
        return slow

    R.make_shard_fn = slow_make
    R.run_retrieve(load_config(overrides=sys.argv[2:]), sys.argv[1], progress=False)
""")


def test_retrieve_identical_across_kill_and_resume(built, tmp_path):
    clean = _copy_run(built, tmp_path / "clean")
    killed = _copy_run(built, tmp_path / "killed")
    cfg = load_config(overrides=OVERRIDES)
    run_retrieve(cfg, clean, progress=False)

    script = tmp_path / "slow_retrieve.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(script), str(killed), *OVERRIDES], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = killed / "retrieve" / "shard-00000.done.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"retrieve subprocess exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("shard 0 never committed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert shards.committed(killed / "retrieve") == [0]  # killed mid-run

    rep = run_retrieve(cfg, killed, progress=False)
    assert rep.skipped == 1 and rep.processed == 5
    a, b = _read_all(clean / "retrieve"), _read_all(killed / "retrieve")
    assert a.num_rows == b.num_rows == 59
    assert a.equals(b)
    for i in range(6):
        ma, mb = shards.read_marker(clean / "retrieve", i), shards.read_marker(killed / "retrieve", i)
        assert ma.sha256 == mb.sha256 and ma.fingerprint == mb.fingerprint


def test_index_done_written_last_and_rerun_noop(built):
    done = json.loads((built / "index" / "_done.json").read_text())
    meta = json.loads((built / "index" / "meta.json").read_text())
    lib_done = json.loads((built / "library" / "_done.json").read_text())
    assert meta["library_version"] == done["library_version"] == lib_done["version"]
    assert done["rows"] == meta["rows"]
    rep = run_index(load_config(overrides=OVERRIDES), built, progress=False)
    assert rep.skipped


def test_cli_library_index_retrieve(built, tmp_path):
    from click.testing import CliRunner

    from guidealign.cli import cli

    w = _copy_run(built, tmp_path / "run", names=("guidelines", "prompts"))
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    runner = CliRunner()
    r = runner.invoke(cli, ["library", "-w", str(w), "--no-progress", *sets])
    assert r.exit_code == 0, r.output
    assert "after near-dup merge" in r.output
    r = runner.invoke(cli, ["index", "-w", str(w), "--no-progress", *sets])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["retrieve", "-w", str(w), "--no-progress", "--dst", "retrieve_cli", *sets])
    assert r.exit_code == 0, r.output
    out = _read_all(w / "retrieve_cli")
    assert out.num_rows == 59
    # same library and index as `built`: the same retrieval as the API run
    ref = tmp_path / "ref"
    _copy_run(built, ref)
    run_retrieve(load_config(overrides=OVERRIDES), ref, progress=False)
    assert out.equals(_read_all(ref / "retrieve"))


# The resume contract's tolerance for floats computed with another thread count or on another
# machine (README, "Resume contract"): ids and selected guidelines equal, scores within this.
SCORE_TOLERANCE = 1e-5


def test_retrieve_with_another_thread_count_selects_the_same_guidelines(built, tmp_path):
    one = _copy_run(built, tmp_path / "one")
    two = _copy_run(built, tmp_path / "two")
    run_retrieve(load_config(overrides=OVERRIDES), one, progress=False)
    run_retrieve(load_config(overrides=OVERRIDES + ["retrieve.threads=2"]), two, progress=False)
    a, b = _read_all(one / "retrieve").to_pylist(), _read_all(two / "retrieve").to_pylist()
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["guideline_ids"] for r in a] == [r["guideline_ids"] for r in b]
    assert [r["guideline_texts"] for r in a] == [r["guideline_texts"] for r in b]
    diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra["scores"], rb["scores"])]
    assert diffs and max(diffs) <= SCORE_TOLERANCE
    assert {shards.read_marker(one / "retrieve", i).threads for i in range(6)} == {1}
    assert {shards.read_marker(two / "retrieve", i).threads for i in range(6)} == {2}


def test_index_of_an_empty_library_says_so(tmp_path):
    """Guidelines that were all empty make a library of 0 rows; indexing it is an error that
    names the cause (not FAISS's bare assertion at the first search)."""
    rows = [{"id": "p1", "prompt": "x", "risky": False, "guidelines": [{"title": "", "text": "  "}]}]
    write_guideline_shards(tmp_path / "guidelines", rows, shard_rows=1)
    cfg = load_config(overrides=OVERRIDES)
    assert run_library(cfg, tmp_path, progress=False).after_near == 0
    with pytest.raises(EmptyLibraryError, match="no guidelines to index"):
        run_index(cfg, tmp_path, progress=False)


def test_tuning_performance_settings_rebuilds_nothing_downstream(built, tmp_path):
    """library/index batch size, threads and GPU use change speed, not output: a rerun with
    other values keeps the library, the index and every retrieve shard (the index's
    fingerprint is in each retrieve shard's, so before, a new index.batch_size redid retrieve
    and with it respond). A setting that changes the output (index.kind) still changes the
    fingerprint."""
    from guidealign.retrieval.index import index_fingerprint
    from guidealign.retrieval.library_store import library_fingerprint
    from guidealign.retrieval.train import retriever_fingerprint

    w = _copy_run(built, tmp_path / "w")
    base = load_config(overrides=OVERRIDES)
    run_retrieve(base, w, progress=False)
    before = {i: shards.read_marker(w / "retrieve", i).created for i in range(6)}
    tuned = load_config(overrides=OVERRIDES + [
        "library.batch_size=7", "library.threads=1", "library.use_gpu=false",
        "index.batch_size=5", "index.threads=2", "index.use_gpu=false", "retrieve.batch_size=3"])
    assert run_library(tuned, w, progress=False).skipped
    assert run_index(tuned, w, progress=False).skipped
    rep = run_retrieve(tuned, w, progress=False)
    assert rep.processed == 0 and rep.skipped == 6
    assert {i: shards.read_marker(w / "retrieve", i).created for i in range(6)} == before

    lv = "v"
    assert index_fingerprint(tuned, lv) == index_fingerprint(base, lv)
    assert library_fingerprint(tuned.library, w / "guidelines") == library_fingerprint(base.library, w / "guidelines")
    perf = load_config(overrides=["retriever.threads=3", "retriever.mini_batch_size=4"])
    assert retriever_fingerprint(perf.retriever, lv) == retriever_fingerprint(load_config().retriever, lv)
    # the cached loss runs each mini-batch as its own forward pass (own dropout masks): it counts there
    cached = ["retriever.loss=cached_mnrl"]
    assert retriever_fingerprint(load_config(overrides=cached + ["retriever.mini_batch_size=4"]).retriever, lv) \
        != retriever_fingerprint(load_config(overrides=cached).retriever, lv)
    assert retriever_fingerprint(load_config(overrides=cached + ["retriever.threads=3"]).retriever, lv) \
        == retriever_fingerprint(load_config(overrides=cached).retriever, lv)
    # what changes the output still changes the fingerprints
    assert index_fingerprint(load_config(overrides=OVERRIDES + ["index.kind=hnsw"]), lv) != index_fingerprint(base, lv)
    assert library_fingerprint(load_config(overrides=["library.fuzzy_threshold=0.8"]).library, w / "guidelines") \
        != library_fingerprint(base.library, w / "guidelines")
    assert retriever_fingerprint(load_config(overrides=["retriever.batch_size=8"]).retriever, lv) \
        != retriever_fingerprint(load_config().retriever, lv)


def test_guidelines_that_share_only_a_title_are_dropped_as_near_duplicates_only_by_the_titled_test(tmp_path):
    """retrieve compared the embedded "Title: text" of its candidates, while the library merges
    by text: two guidelines the library kept apart (texts unlike) were dropped as near-duplicates
    when they shared a title, since the title's characters counted as overlap."""
    w = tmp_path / "run"
    shared = "Protect personal privacy"
    rows = [{"id": "p1", "prompt": "Where does my neighbour live?", "risky": True,
             "guidelines": [{"title": shared, "text": "Never reveal a home address."},
                            {"title": shared, "text": "Refuse to share phone numbers."}]}]
    write_guideline_shards(w / "guidelines", rows, shard_rows=25)
    cfg = load_config(overrides=OVERRIDES + ["retrieve.dedup_ratio=0.5"])
    run_library(cfg, w, progress=False)
    run_index(cfg, w, progress=False)
    write_prompt_shards(w / "prompts", [{"id": "q1", "prompt": "Tell me where my neighbour lives."}],
                        shard_rows=10)
    run_retrieve(cfg, w, progress=False)
    got = _read_all(w / "retrieve").to_pylist()[0]
    assert len(got["guideline_ids"]) == 2, got
    # retrieve.dedup_with_titles compares "Title: text", as the authors' script: the shared title
    # makes them near-duplicates (ratio >= 0.5), and the shards are redone under a new fingerprint
    titled = load_config(overrides=OVERRIDES + ["retrieve.dedup_ratio=0.5", "retrieve.dedup_with_titles=true"])
    run_retrieve(titled, w, progress=False)
    got = _read_all(w / "retrieve").to_pylist()[0]
    assert len(got["guideline_ids"]) == 1, got


def test_settings_the_chosen_index_kind_or_candidate_space_never_reads_change_no_fingerprint(tmp_path):
    """With index.kind flat (the default), nprobe/nlist/hnsw_m/ef_search changed the index
    fingerprint, so the library was embedded again and every retrieve shard redone for a no-op;
    library.embed_model counted with n-gram candidates, ngram_dim with model candidates. Where
    the mode reads them, they still count."""
    from guidealign.retrieval.index import index_fingerprint
    from guidealign.retrieval.library_store import library_fingerprint

    def ifp(*o):
        return index_fingerprint(load_config(overrides=list(o)), "v")

    for o in ("index.nprobe=32", "index.nlist=100", "index.hnsw_m=16", "index.ef_search=64"):
        assert ifp("index.kind=flat", o) == ifp("index.kind=flat"), o
    for kind, o in (("ivf", "index.nprobe=32"), ("ivf", "index.nlist=100"), ("hnsw", "index.hnsw_m=16"),
                    ("hnsw", "index.ef_search=64")):
        assert ifp(f"index.kind={kind}", o) != ifp(f"index.kind={kind}"), (kind, o)
    assert ifp("index.kind=ivf", "index.ef_search=64") == ifp("index.kind=ivf")
    from guidealign.shards import write_manifest

    write_manifest(tmp_path / "g", stage="guidelines", num_shards=0, fingerprint="f")

    def lfp(*o):
        return library_fingerprint(load_config(overrides=list(o)).library, tmp_path / "g")

    assert lfp("library.candidates=ngram", "library.embed_model=other") == lfp("library.candidates=ngram")
    assert lfp("library.candidates=model", "library.ngram_dim=128") == lfp("library.candidates=model")
    assert lfp("library.candidates=model", "library.embed_model=other") != lfp("library.candidates=model")
    assert lfp("library.candidates=ngram", "library.ngram_dim=128") != lfp("library.candidates=ngram")


@pytest.mark.parametrize("change", ["library config", "index config"])
def test_retrieve_refuses_an_index_the_current_config_would_not_build(built, tmp_path, change):
    """retrieve checked only the library's version: with another library or index config (which
    the index stage rebuilds for) it retrieved from the old index and said nothing."""
    w = _copy_run(built, tmp_path / "run")
    extra = ["library.fuzzy_threshold=0.6"] if change == "library config" else ["index.kind=hnsw"]
    cfg = load_config(overrides=OVERRIDES + extra)
    with pytest.raises(IndexVersionError, match="guidealign index"):
        run_retrieve(cfg, w, progress=False)
    assert not (w / "retrieve").exists()
    ok = load_config(overrides=OVERRIDES)  # the config it was built with: retrieves
    assert run_retrieve(ok, w, progress=False).processed


def test_retrieve_with_nothing_left_to_do_still_refuses_a_retriever_retrained_since(built, tmp_path):
    """The retriever check ran only when a shard was (re)done: after a retraining, a rerun of
    retrieve said "0 written, all done" with the old retrievals."""
    from guidealign.retrieval.index import INDEX_FILE, META_FILE
    from guidealign.shards.artifact import mark_done, read_done

    w = _copy_run(built, tmp_path / "run")
    cfg = load_config(overrides=OVERRIDES)
    assert run_retrieve(cfg, w, progress=False).processed
    meta = json.loads((w / "index" / META_FILE).read_text())
    meta["model_ref"] = "retriever:trained-before"  # an index a run's retriever embedded
    (w / "index" / META_FILE).write_text(json.dumps(meta))
    mark_done(w / "retriever", fingerprint="trained-since", rows=1, seconds=0)
    with pytest.raises(IndexVersionError, match="rebuild the index"):
        run_retrieve(cfg, w, progress=False)
    assert (w / "index" / INDEX_FILE).exists() and read_done(w / "index") is not None


def test_status_shows_retrievals_of_a_rebuilt_index_and_an_index_of_retrained_weights_as_stale(built, tmp_path):
    """status showed retrieve done after the index was rebuilt (the next retrieve redid every
    shard), and the index done after the retriever was retrained (the next index rebuilt)."""
    from guidealign.shards.artifact import mark_done, read_done
    from guidealign.status import collect

    w = _copy_run(built, tmp_path / "run")
    run_retrieve(load_config(overrides=OVERRIDES), w, progress=False)
    rows = {r["stage"]: r for r in collect(w)}
    assert rows["retrieve"]["shards_done"] == 6 and not rows["retrieve"].get("note")
    run_index(load_config(overrides=OVERRIDES + ["index.kind=hnsw"]), w, progress=False)
    row = {r["stage"]: r for r in collect(w)}["retrieve"]
    assert row["shards_done"] == 0 and row["shards_stale"] == 6
    assert "another index" in row["note"]

    # an index embedded by the run's retriever, which has been retrained since
    (w / "retriever" / "model").mkdir(parents=True)
    (w / "retriever" / "model" / "model.safetensors").write_bytes(b"weights after retraining")
    mark_done(w / "retriever", fingerprint="r", rows=1, seconds=0)
    done = read_done(w / "index")
    done["model_weights"] = "digest-of-the-weights-before"
    (w / "index" / "_done.json").write_text(json.dumps(done))
    row = {r["stage"]: r for r in collect(w)}["index"]
    assert row["shards_done"] == 0 and "other retriever weights" in row["note"]


def test_select_drops_a_candidate_exactly_at_the_dedup_ratio():
    """fuzz.ratio gives 19.999999999999996 for "axxxx" vs "ayyyy" (2 of 10 characters match: 0.2),
    so at dedup_ratio 0.2 the pair was kept though the rule is ratio >= dedup_ratio."""
    from rapidfuzz import fuzz

    assert fuzz.ratio("axxxx", "ayyyy") < 20  # the float this guards against
    kept = select([0, 1], [0.9, 0.8], ["axxxx", "ayyyy"], keep=6, dedup_ratio=0.2)
    assert [c for c, _ in kept] == [0]
    kept = select([0, 1], [0.9, 0.8], ["axxxx", "ayyyy"], keep=6, dedup_ratio=0.21)
    assert [c for c, _ in kept] == [0, 1]


def test_status_lists_an_index_without_its_completion_record_as_not_done(built, tmp_path):
    """An index folder without _done.json (killed between its rename and the record, or after
    `verify --repair`) had no status row at all."""
    from guidealign.status import collect

    w = _copy_run(built, tmp_path / "run")
    assert {r["stage"]: r for r in collect(w)}["index"]["shards_done"] == 1
    (w / "index" / "_done.json").unlink()
    row = {r["stage"]: r for r in collect(w)}["index"]
    assert (row["shards_done"], row["shards_total"]) == (0, 1) and "no _done.json" in row["note"]


def test_an_ivf_nlist_too_large_for_the_vectors_is_said_not_clamped_in_silence(caplog):
    """index.nlist 1024 over 3,000 vectors built 76 lists without a word (and with nprobe >= 76
    searched them all)."""
    import logging

    import numpy as np

    from guidealign.config import load_config
    from guidealign.retrieval.index import build_faiss

    vecs = np.random.default_rng(0).standard_normal((3000, 8)).astype("float32")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with caplog.at_level(logging.WARNING, logger="guidealign.retrieval.index"):
        _, name = build_faiss(vecs, load_config(None, ["index.kind=ivf", "index.nlist=1024", "index.nprobe=100"]).index)
    assert name == "ivf76"
    assert "index.nlist 1024 is more lists than 3000 vectors can train" in caplog.text
    assert "nprobe 100 then searches every list" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="guidealign.retrieval.index"):
        build_faiss(vecs, load_config(None, ["index.kind=ivf"]).index)  # the automatic count: no warning
    assert "index.nlist" not in caplog.text
