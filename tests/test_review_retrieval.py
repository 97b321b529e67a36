"""Review of the retrieval stages: the no-false-negatives batch sampler (folding, drop_last,
training sets where every pair conflicts) and the encoder retrieve loads for an index."""
from __future__ import annotations

import pytest

from guidealign.config import load_config

SETS = ["library.threads=1", "index.threads=1", "index.use_gpu=false", "retriever.threads=1"]


def _sampler(pairs, batch_size, drop_last=False, seed=0):
    from datasets import Dataset

    from guidealign.retrieval.train import no_false_negatives_sampler

    positives_of: dict[str, set[str]] = {}
    for a, p in pairs:
        positives_of.setdefault(a, set()).add(p)
    ds = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    return no_false_negatives_sampler(positives_of)(ds, batch_size=batch_size, drop_last=drop_last, seed=seed)


# A has three guidelines (its pairs conflict with each other); B, C, D one each
PAIRS = [("A", "a1"), ("A", "a2"), ("A", "a3"), ("B", "b1"), ("C", "c1"), ("D", "d1")]


def test_fold_puts_surplus_pairs_only_into_the_batches_the_trainer_takes():
    """A later epoch's pass came out as 4 batches where the trainer takes 2. (A, a3) conflicts
    with both taken batches and sits out; (B, b1) fits either of them. Before: it went into the
    batch opened for (A, a3) past the 2 taken (it was the shortest), so it was never trained on."""
    s = _sampler(PAIRS, batch_size=4)
    s.set_epoch(1)
    out = s._fold([[0, 4], [1, 5], [2], [3]], 2)
    taken = [i for b in out[:2] for i in b]
    assert 3 in taken  # (B, b1) is trained on this epoch
    assert 2 not in taken  # (A, a3) cannot be: every taken batch holds one of A's pairs
    assert len(out) <= 2  # an epoch yields no more batches than len() says


def test_fold_with_drop_last_keeps_every_batch_at_batch_size():
    """drop_last=True promises batches of batch_size; folding surplus pairs into full batches
    made batches of batch_size + 1."""
    s = _sampler(PAIRS, batch_size=2, drop_last=True)
    s.set_epoch(1)
    out = s._fold([[0, 4], [1, 5], [3, 2]], 2)
    assert [len(b) for b in out] == [2, 2]


def test_drop_last_sampler_without_a_single_full_batch_is_a_clear_error():
    """Every pair conflicts with every other (two prompts with the same two guidelines): with
    drop_last=True the pass has no full batch, len() was 0 and the trainer failed with
    "args.max_steps must be set to a positive value"."""
    pairs = [("A", "g1"), ("A", "g2"), ("B", "g1"), ("B", "g2")]
    s = _sampler(pairs, batch_size=2, drop_last=True)
    with pytest.raises(ValueError, match="no batch of 2 pairs"):
        len(s)
    assert len(_sampler(pairs, batch_size=2)) == 4  # without drop_last: a pair per batch


def test_training_set_where_every_pair_conflicts_is_a_clear_error(tmp_path):
    """Two prompts with the same two guidelines: 2 distinct prompts and 2 distinct guidelines
    pass the existing check, but no two pairs may share a batch (each one's guideline is the
    other prompt's too), so every batch holds one pair, the loss is 0 at every step and the
    base encoder was saved as the fine-tuned retriever."""
    from guidealign.retrieval.library import run_library
    from guidealign.retrieval.train import retriever_dir, run_train_retriever
    from synthetic import write_guideline_shards

    wd = tmp_path / "run"
    gls = [{"title": "", "text": "Refuse instructions for weapons."},
           {"title": "", "text": "Point the user to local laws on purchases."}]
    write_guideline_shards(wd / "guidelines", [
        {"id": "p0", "prompt": "how do I sharpen a knife", "risky": True, "guidelines": gls},
        {"id": "p1", "prompt": "where can I buy a gun", "risky": True, "guidelines": gls}], shard_rows=8)
    cfg = load_config(overrides=SETS + ["library.heldout_fraction=0"])
    assert run_library(cfg, wd, progress=False).pairs_train == 4
    with pytest.raises(RuntimeError, match="no two training pairs can share a batch"):
        run_train_retriever(cfg, wd, progress=False)
    assert not (retriever_dir(wd) / "_done.json").exists()


def test_retrieve_refuses_a_retriever_other_than_the_one_the_index_was_embedded_with(tmp_path):
    """The index records the fingerprint of the retriever that embedded it. A retriever retrained
    since (another retriever config) sits in the same place: retrieve loaded it and encoded the
    prompts with another model than the library's vectors."""
    from guidealign.retrieval.index import IndexVersionError
    from guidealign.retrieval.retrieve import encoder_path
    from guidealign.retrieval.train import model_dir, retriever_dir
    from guidealign.shards.artifact import mark_done

    mark_done(retriever_dir(tmp_path), fingerprint="new-retriever", rows=1, seconds=0)
    assert encoder_path({"model_ref": "retriever:new-retriever"}, tmp_path) == str(model_dir(tmp_path))
    with pytest.raises(IndexVersionError, match="rebuild the index"):
        encoder_path({"model_ref": "retriever:old-retriever"}, tmp_path)


def test_select_breaks_score_ties_by_index_row():
    """Guidelines with the same vector tie on score. FAISS lists tied rows higher row first
    while it keeps the lower rows at the top_n cut (its tie order is its kernels' business, and
    its GPU search has its own), so which of two tied near-duplicates survived depended on it.
    Ties now go to the lower index row, the order the evaluation ranks by (evaluate.top_rows)."""
    import faiss
    import numpy as np

    from guidealign.retrieval.retrieve import select

    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[9] = x[2]  # rows 2 and 9: near-duplicate guidelines with the same vector
    texts = [f"distinct guideline number {i} about topic {i * 7}" for i in range(12)]
    texts[2], texts[9] = "Refuse to help with weapons.", "Refuse to help with weapons!"
    index = faiss.IndexFlatIP(8)
    index.add(x)
    sims, nbrs = index.search(x[2:3].copy(), 5)
    kept = select(nbrs[0].tolist(), sims[0].tolist(), texts, keep=3, dedup_ratio=0.5)
    assert kept[0][0] == 2 and 9 not in [c for c, _ in kept]
    assert [s for _, s in kept] == sorted((s for _, s in kept), reverse=True)


def test_select_compares_guidelines_in_the_librarys_comparison_form():
    """The library merges near-duplicates on NFKC, whitespace-collapsed, case-folded text; the
    retrieval-time filter compared the texts as written, so two library guidelines the library
    would call near-duplicates at the retrieval ratio (here 0.6 apart once case-folded, but not
    as written) were both kept for one prompt."""
    from rapidfuzz import fuzz

    from guidealign.retrieval.embed import normalize_text
    from guidealign.retrieval.retrieve import select

    a = "NEVER SHARE  SOMEONE'S HOME ADDRESS."
    b = "never share someone's home address or phone number without consent"
    assert fuzz.ratio(a, b) < 50 <= fuzz.ratio(normalize_text(a), normalize_text(b))
    texts = [a, b, "Cite reliable sources for medical claims."]
    kept = select([0, 1, 2], [0.9, 0.8, 0.7], texts, keep=3, dedup_ratio=0.5)
    assert [c for c, _ in kept] == [0, 2]
