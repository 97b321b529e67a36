"""Stop 57 review of train-retriever's non-lead ranks: they took any finished retriever, even
one trained on an older library or with other training settings, and reported it as up to date
while rank 0 was still retraining. Rank 0's output is stood in for by a ``_done.json`` written
by hand (no model is trained here)."""
from __future__ import annotations

import pytest

from guidealign.config import load_config
from guidealign.retrieval.library import run_library
from guidealign.retrieval.library_store import library_version, library_dir
from guidealign.retrieval.train import (eval_fingerprint, retriever_dir, retriever_fingerprint,
                                        run_train_retriever)
from guidealign.shards.artifact import NotReady, mark_done
from synthetic import write_guideline_shards

FAST = ["executor.wait_timeout_s=0.3", "library.threads=1", "library.use_gpu=false"]
ROWS = [{"id": f"p{i}", "prompt": f"prompt {i}", "risky": True,
         "guidelines": [{"title": "", "text": f"Guideline {i} {w}."} for w in ("one", "two")]}
        for i in range(4)]


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    """The rank's wait polls every 10 ms, not 5 s: a refusal ends at wait_timeout_s (0.3 s)."""
    import functools

    import guidealign.retrieval.library_store as library_store
    from guidealign.shards.artifact import wait_done

    monkeypatch.setattr(library_store, "wait_done", functools.partial(wait_done, poll=0.01))


def _finished(workdir, cfg, version: str) -> None:
    """A retriever as rank 0 leaves it when it trained with ``cfg`` on library ``version``."""
    d = retriever_dir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    mark_done(d, fingerprint=retriever_fingerprint(cfg.retriever, version), rows=1, seconds=0.0,
              library_version=version, eval_fingerprint=eval_fingerprint(cfg.retriever))


def _rank1(cfg, workdir):
    return run_train_retriever(cfg, workdir, rank=1, world_size=2, progress=False)


def test_a_non_lead_rank_takes_only_the_retriever_of_this_runs_library_and_training_config(workdir):
    cfg = load_config(overrides=FAST)
    write_guideline_shards(workdir / "guidelines", ROWS, shard_rows=16)
    run_library(cfg, workdir, progress=False)
    version = library_version(library_dir(workdir))

    _finished(workdir, cfg, version)  # rank 0's retriever of this run: taken
    assert _rank1(cfg, workdir).skipped

    # another training setting (a rerun after a config change): rank 0 is retraining
    other = load_config(overrides=FAST + ["retriever.learning_rate=1e-4"])
    with pytest.raises(NotReady, match="another retriever config"):
        _rank1(other, workdir)

    # an older library (a rerun after more guidelines arrived, the library rebuilt since)
    _finished(workdir, cfg, "an-older-library-version")
    with pytest.raises(NotReady, match="another library"):
        _rank1(cfg, workdir)


def test_a_non_lead_rank_refuses_a_retriever_of_a_library_built_from_other_guidelines(workdir):
    """More guidelines arrived but the library is the previous run's: the retriever trained on
    it is no retriever of this run's guidelines (rank 0 stops: run the library stage first)."""
    cfg = load_config(overrides=FAST)
    write_guideline_shards(workdir / "guidelines", ROWS, shard_rows=16)
    run_library(cfg, workdir, progress=False)
    _finished(workdir, cfg, library_version(library_dir(workdir)))
    assert _rank1(cfg, workdir).skipped
    more = ROWS + [{"id": "p9", "prompt": "more", "risky": False,
                    "guidelines": [{"title": "", "text": "New."}]}]
    write_guideline_shards(workdir / "guidelines", more, shard_rows=16)
    with pytest.raises(NotReady, match="other guidelines"):
        _rank1(cfg, workdir)
    other_lib = load_config(overrides=FAST + ["library.fuzzy_threshold=0.9"])
    write_guideline_shards(workdir / "guidelines", ROWS, shard_rows=16)
    assert _rank1(cfg, workdir).skipped
    with pytest.raises(NotReady, match="another library config"):
        _rank1(other_lib, workdir)


def test_a_non_lead_rank_waits_while_rank_0_re_evaluates_with_new_evaluation_settings(workdir):
    """Rank 0 re-evaluates (not retrains) when an evaluation setting changed: until it has, the
    stage's metrics are the old settings' and the other ranks do not report it up to date."""
    cfg = load_config(overrides=FAST)
    write_guideline_shards(workdir / "guidelines", ROWS, shard_rows=16)
    run_library(cfg, workdir, progress=False)
    _finished(workdir, cfg, library_version(library_dir(workdir)))
    other = load_config(overrides=FAST + ["retriever.max_eval_queries=7"])
    with pytest.raises(NotReady, match="other evaluation settings"):
        _rank1(other, workdir)
    _finished(workdir, other, library_version(library_dir(workdir)))
    assert _rank1(other, workdir).skipped
