"""Stop 57 review of the guideline library and retrieval: model candidates that miss
character-level near-duplicates, ..."""
from __future__ import annotations

from rapidfuzz import fuzz

from guidealign.config import load_config
from guidealign.retrieval.embed import normalize_text
from guidealign.retrieval.library import run_library
from guidealign.retrieval.library_store import read_library
from synthetic import write_guideline_shards

# near-duplicates by fuzz.ratio (typos in every word) whose sentence embeddings are far apart
TYPOS = [("Do not provide instructions for making weapons or explosives.",
          "Do nto provdie instrutcions for makign weapnos or explsoives."),
         ("Be kind.", "Be kin.")]


def test_model_candidates_still_merge_guidelines_that_are_near_duplicates_by_ratio(workdir):
    """With library.candidates=model the only candidates were the embedding's neighbours: a
    guideline with typos in every word (fuzz.ratio 90) sits at cosine 0.18 to its original in
    MiniLM's space, below min_cosine, so the library kept both though the paper merges them."""
    for a, b in TYPOS:  # the data means what it says
        assert fuzz.ratio(normalize_text(a), normalize_text(b)) >= 75
    rows = [{"id": f"p{i}", "prompt": f"prompt {i}", "risky": True,
             "guidelines": [{"title": "", "text": t} for t in pair]}
            for i, pair in enumerate(TYPOS)]
    write_guideline_shards(workdir / "guidelines", rows, shard_rows=16)
    for candidates in ("ngram", "model"):
        cfg = load_config(overrides=[f"library.candidates={candidates}", "library.threads=1",
                                     "library.use_gpu=false"])
        rep = run_library(cfg, workdir, progress=False)
        assert rep.after_exact == 4
        assert rep.after_near == 2, candidates
        lib, _ = read_library(workdir)
        assert lib.num_rows == 2


def test_cluster_merges_the_pairs_of_every_candidate_space_and_confirms_each_pair_once():
    """Several candidate spaces: a pair that only the second finds still merges, and a pair
    that both find is one candidate (confirmed once)."""
    import numpy as np

    from guidealign.retrieval.dedup import cluster

    texts = [normalize_text(t) for pair in TYPOS[:1] for t in pair] + ["cite sources for statistics."]
    far = np.eye(3, dtype=np.float32)              # finds nothing (every cosine 0)
    near = np.array([[1, 0], [1, 0], [0, 1]], np.float32)  # finds the typo pair
    labels, stats = cluster(texts, [far, near, near], threshold=0.75, k=2, min_cosine=0.4, use_gpu=False)
    assert labels.tolist() == [0, 0, 2]
    assert stats.candidate_pairs == 1 and stats.confirmed_pairs == 1
    assert stats.search == "flat+flat+flat"


def test_a_non_lead_rank_waits_for_the_library_of_this_runs_guidelines_and_config(workdir):
    """Rank 0 builds the library; the other ranks returned as soon as any library was complete,
    so in a rerun with another library config (or more guidelines) they reported "up to date"
    while rank 0 was about to rebuild it. They take only the current one, as index's do."""
    import pytest

    from guidealign.shards.artifact import NotReady

    rows = [{"id": f"p{i}", "prompt": f"prompt {i}", "risky": True,
             "guidelines": [{"title": "", "text": t} for t in pair]} for i, pair in enumerate(TYPOS)]
    write_guideline_shards(workdir / "guidelines", rows, shard_rows=16)
    fast = ["executor.wait_timeout_s=0.3"]
    run_library(load_config(overrides=fast), workdir, progress=False)
    assert run_library(load_config(overrides=fast), workdir, rank=1, world_size=2, progress=False).skipped
    other = load_config(overrides=fast + ["library.fuzzy_threshold=0.9"])
    with pytest.raises(NotReady, match="another library config"):
        run_library(other, workdir, rank=1, world_size=2, progress=False)
    write_guideline_shards(workdir / "guidelines", rows + [{"id": "p9", "prompt": "more", "risky": False,
                                                            "guidelines": [{"title": "", "text": "New."}]}])
    with pytest.raises(NotReady, match="other guidelines"):
        run_library(load_config(overrides=fast), workdir, rank=1, world_size=2, progress=False)
