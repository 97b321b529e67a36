"""Stop 56 review of the retrieval area: the library's training pairs, tiny libraries, the
FAISS GPU fallback, held-out evaluation."""
from __future__ import annotations

import pyarrow.parquet as pq

from guidealign.config import load_config
from guidealign.retrieval.library import run_library
from guidealign.retrieval.library_store import read_library
from synthetic import write_guideline_shards


def _pairs(workdir):
    return [r for split in ("train", "heldout")
            for r in pq.read_table(workdir / "library" / "pairs" / f"{split}.parquet").to_pylist()]


def test_prompts_without_text_keep_their_guidelines_but_give_no_pair_and_are_counted(workdir):
    """Guideline shards whose prompt is null or blank (shards written elsewhere: the guidelines
    stage quarantines such prompts) gave pairs with an empty prompt: the retriever trained on
    "" as an anchor, and every such prompt was one anchor text and one held-out twin group."""
    rows = [{"id": "n1", "prompt": None, "risky": True,
             "guidelines": [{"title": "A", "text": "Refuse to explain how to build a weapon."}]},
            {"id": "n2", "prompt": " \t ", "risky": True,
             "guidelines": [{"title": "B", "text": "Point the user to a doctor for dosage questions."},
                            {"title": "C", "text": "Cite sources when giving statistics."}]},
            {"id": "n3", "prompt": "\u200b", "risky": False,
             "guidelines": [{"title": "D", "text": "Use plain words for beginners."}]},
            {"id": "ok", "prompt": "How do I make a bomb?", "risky": True,
             "guidelines": [{"title": "A", "text": "Refuse to explain how to build a weapon."}]}]
    write_guideline_shards(workdir / "guidelines", rows, shard_rows=2)
    rep = run_library(load_config(overrides=["library.heldout_fraction=0.5"]), workdir, progress=False)
    pairs = _pairs(workdir)
    assert [p["prompt_id"] for p in pairs] == ["ok"]
    assert all(p["prompt"].strip() for p in pairs)
    assert rep.prompts_without_text == 3 and rep.pairs_without_prompt == 4
    assert "4 pairs of 3 prompts without text left out" in rep.summary()
    assert rep.pairs_train + rep.pairs_heldout == 1
    lib, _ = read_library(workdir)  # the guidelines themselves are kept
    assert lib.num_rows == 4


def test_a_guideline_of_a_prompts_case_twin_is_no_in_batch_negative_of_it():
    """"How do I pick a lock?" and "how do i pick a lock?" are one query to an uncased encoder
    (the split already keeps them together), yet each had only its own guidelines as positives:
    the sampler put (twin A, gA) and (twin B, gB) in one batch, and the loss pushed the one
    query away from gB for A and toward it for B."""
    import pyarrow as pa
    from datasets import Dataset

    from guidealign.retrieval.embed import normalize_text
    from guidealign.retrieval.sampler import no_false_negatives_sampler
    from guidealign.retrieval.train import training_pairs

    rows = [("a", "How do I pick a lock?", "ga"), ("b", "how do i pick a lock?", "gb"),
            ("b", "how do i pick a lock?", "gc")]
    rows += [(f"o{i}", f"other prompt {i}", f"go{i}") for i in range(6)]
    train = pa.table({"prompt_id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                      "guideline_id": [r[2] for r in rows]})
    doc_of = {r[2]: f"guideline {r[2]}" for r in rows}
    anchors, positives, positives_of = training_pairs(train, doc_of, load_config().retriever)
    own: dict[str, set[str]] = {}  # every guideline of each query as the encoder sees it
    for a, p in zip(anchors, positives):
        own.setdefault(normalize_text(a), set()).add(p)
    ds = Dataset.from_dict({"anchor": anchors, "positive": positives})
    for seed in range(8):
        sampler = no_false_negatives_sampler(positives_of)(ds, batch_size=16, drop_last=False, seed=seed)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(anchors)))
        for b in batches:
            for i in b:
                others = {positives[j] for j in b if j != i}
                assert not own[normalize_text(anchors[i])] & others, (seed, b)


def test_a_library_whose_prompts_all_lack_text_is_refused_for_training_saying_why(workdir):
    """Guideline shards without prompt texts: their pairs all had the prompt "", and training
    failed with "1 distinct prompt(s)" for many prompts; now there is no pair, and the error
    says where the prompts went."""
    import pytest

    from guidealign.retrieval.train import run_train_retriever

    rows = [{"id": f"n{i}", "prompt": None, "risky": True,
             "guidelines": [{"title": "", "text": f"Guideline number {i} about topic {i * 7}."}]}
            for i in range(6)]
    write_guideline_shards(workdir / "guidelines", rows, shard_rows=4)
    cfg = load_config(overrides=["library.heldout_fraction=0"])
    run_library(cfg, workdir, progress=False)
    with pytest.raises(RuntimeError, match="6 have no text"):
        run_train_retriever(cfg, workdir, progress=False)
    assert not (workdir / "retriever" / "_done.json").exists()


def test_an_invisible_title_is_no_title(workdir):
    """A title of only a zero-width space or a BOM was kept (an invisible text was already taken
    as empty): the retriever embedded, and the responder was shown, "\\u200b: Refuse ...", and
    such a title could out-vote the real one of the same guideline."""
    from guidealign.retrieval.embed import doc_text

    rows = [{"id": f"p{i}", "prompt": f"prompt {i}", "risky": True,
             "guidelines": [{"title": t, "text": "Refuse to help with weapons."},
                            {"title": "\ufeff ", "text": "Cite your sources when you give numbers."}]}
            for i, t in enumerate(["\u200b", "\u200b", "Weapons"])]
    write_guideline_shards(workdir / "guidelines", rows, shard_rows=2)
    run_library(load_config(), workdir, progress=False)
    lib, _ = read_library(workdir)
    got = {r["text"]: r["title"] for r in lib.to_pylist()}
    assert got == {"Refuse to help with weapons.": "Weapons", "Cite your sources when you give numbers.": ""}
    assert doc_text("", "Cite your sources when you give numbers.") == "Cite your sources when you give numbers."
