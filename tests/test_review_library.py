"""Review of the library stage (explode, de-duplication, canonical guidelines, pairs) and the
FAISS index: defects found in review, each with the test that shows it."""
from __future__ import annotations

import random

import pyarrow.parquet as pq

from guidealign.config import load_config
from guidealign.retrieval.embed import normalize_text
from guidealign.retrieval.library import run_library
from guidealign.retrieval.library_store import read_library
from synthetic import base_guideline, near_duplicate, write_guideline_shards

SETS = ["library.threads=1", "library.use_gpu=false"]


def _near_duplicate_rows(n_base: int = 300, seed: int = 1) -> list[dict]:
    """One prompt per guideline text: ``n_base`` distinct guidelines and up to three rewrites
    of each (about 750 unique texts), so a cluster joins several prompts."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n_base):
        _, text = base_guideline(rng, 1)
        texts.append(text)
        texts.extend(near_duplicate(text, rng, edits=rng.randint(1, 4)) for _ in range(rng.randint(0, 3)))
    return [{"id": f"p{i:04d}", "prompt": f"prompt {i}", "risky": i % 3 == 0,
             "guidelines": [{"title": "", "text": t}]} for i, t in enumerate(texts)]


def _library_of(wd, rows, sets):
    write_guideline_shards(wd / "guidelines", rows, shard_rows=64)
    run_library(load_config(overrides=SETS + sets), wd, progress=False)
    lib, version = read_library(wd)
    pairs = {s: pq.read_table(wd / "library" / "pairs" / f"{s}.parquet") for s in ("train", "heldout")}
    return lib, version, pairs


def test_approximate_dedup_does_not_depend_on_the_order_guidelines_are_read_in(tmp_path):
    """Above exact_search_max unique guidelines the candidate search is IVF, whose k-means and
    training sample follow the row order: the same guidelines read in another order (other
    shards, another ingest order) must still give the same library and the same pairs."""
    rows = _near_duplicate_rows()
    assert len({normalize_text(r["guidelines"][0]["text"]) for r in rows}) > 500
    sets = ["library.exact_search_max=100"]  # IVF candidate search
    built = []
    for seed in range(3):
        order = rows[:]
        random.Random(seed).shuffle(order)
        built.append(_library_of(tmp_path / f"w{seed}", order, sets))
    lib0, version0, pairs0 = built[0]
    assert lib0.num_rows < len(rows)  # near duplicates were merged
    for lib, version, pairs in built[1:]:
        assert lib.num_rows == lib0.num_rows, "another read order merged other guidelines"
        assert lib.equals(lib0), "another read order gave another library"
        assert version == version0
        for s in pairs:
            assert pairs[s].equals(pairs0[s]), f"another read order gave other {s} pairs"


def test_library_version_changes_when_its_training_pairs_change(tmp_path):
    """The retriever (retriever_fingerprint) and the index follow the library's version: a
    library rebuilt with another held-out split holds other training pairs, so its version
    must change, or train-retriever keeps the model trained on the old split (and evaluates
    it on held-out prompts it was trained on)."""
    from guidealign.retrieval.train import retriever_fingerprint

    rows = _near_duplicate_rows(60)
    wd = tmp_path / "run"
    _, v1, p1 = _library_of(wd, rows, ["library.heldout_fraction=0.1"])
    _, v2, p2 = _library_of(wd, rows, ["library.heldout_fraction=0.5"])
    assert not p1["train"].equals(p2["train"])  # other training pairs
    rc = load_config().retriever
    assert retriever_fingerprint(rc, v1) != retriever_fingerprint(rc, v2), \
        "the retriever trained on the old split is taken as current"
    # the same pairs again: the same version
    _, v3, _ = _library_of(tmp_path / "again", rows, ["library.heldout_fraction=0.5"])
    assert v3 == v2


def test_candidates_exactly_at_min_cosine_are_kept():
    """"yes." and "yes!" share one of their two trigrams: cosine exactly 0.5 (0.49999997 in
    float32) and fuzz.ratio exactly 75, so with min_cosine 0.5 and threshold 0.75 (both
    inclusive) they are one guideline; float32 rounding dropped the candidate pair."""
    from rapidfuzz import fuzz

    from guidealign.retrieval.dedup import cluster
    from guidealign.retrieval.embed import ngram_vectors

    keys = ["yes.", "yes!", "abcd", "abce", "be polite."]
    vecs = ngram_vectors(keys)
    assert abs(float(vecs[0] @ vecs[1]) - 0.5) < 1e-6 and fuzz.ratio(keys[0], keys[1]) == 75
    labels, stats = cluster(keys, vecs, threshold=0.75, k=4, min_cosine=0.5, use_gpu=False)
    assert labels.tolist() == [0, 0, 2, 2, 4], f"pairs at exactly min_cosine dropped: {labels.tolist()}"


def test_approximate_candidate_search_on_a_small_library_does_not_ask_for_more_lists_than_points():
    """With library.exact_search_max below the library's size (0: "always approximate"), up to 16
    guidelines asked FAISS for 4*sqrt(n) >= n inverted lists: k-means refused ("Number of training
    points (12) should be at least as large as number of clusters (13)")."""
    from guidealign.retrieval.dedup import cluster
    from guidealign.retrieval.embed import ngram_vectors

    keys = ["Never reveal a private person's home address.", "Decline to give weapon assembly steps.",
            "Suggest seeing a doctor for dosage questions.", "Cite sources for market figures.",
            "Keep examples suitable for children.", "Stay neutral about candidates in elections.",
            "Do not write code that breaks into accounts.", "Point to crisis hotlines when someone is at risk.",
            "Explain drug laws without sourcing tips.", "Warn that gambling systems do not beat the odds.",
            "Summarize instead of reproducing lyrics.", "Refuse to praise violent movements.",
            "Decline to give weapon assembly steps!"]
    labels, _ = cluster(keys, ngram_vectors(keys), threshold=0.75, k=10, min_cosine=0.5, exact_max=0,
                        use_gpu=False)
    assert labels[-1] == labels[1] and len(set(labels.tolist())) == 12


def test_the_library_version_follows_its_rows_not_how_they_are_cut_into_files(tmp_path):
    """The version (what the retriever and the index are tied to) hashed the shard files'
    bytes: library.shard_rows alone gave a new version, so the retriever was trained again,
    the library embedded again and every retrieve (and, with a retrained GPU model, respond)
    shard redone for the same rows."""
    rows = _near_duplicate_rows(60)
    lib1, v1, _ = _library_of(tmp_path / "a", rows, [])
    lib2, v2, _ = _library_of(tmp_path / "b", rows, ["library.shard_rows=7"])
    assert lib1.equals(lib2) and len(list((tmp_path / "b" / "library").glob("shard-*.parquet"))) > 1
    assert v1 == v2
