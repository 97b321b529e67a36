"""The retriever training and the index: version ties between the library, the
retriever and the index across ranks, and training sets that cannot teach anything."""
from __future__ import annotations

from pathlib import Path

import pytest

from guidealign.config import load_config
from guidealign.retrieval.index import index_dir, run_index, wait_current_index
from guidealign.retrieval.library import run_library
from guidealign.retrieval.train import retriever_dir, retriever_fingerprint, run_train_retriever
from synthetic import coded_guideline_rows, write_guideline_shards

SETS = ["library.threads=1", "index.threads=1", "index.use_gpu=false", "retriever.threads=1"]


@pytest.fixture(scope="module")
def lib_run(module_tmp) -> Path:
    wd = module_tmp.mktemp("review") / "run"
    write_guideline_shards(wd / "guidelines", coded_guideline_rows(4, 3, seed=2), shard_rows=8)
    run_library(load_config(overrides=SETS), wd, progress=False)
    return wd


def test_non_lead_rank_refuses_an_index_of_another_index_config(lib_run):
    """A rerun with another index config: rank 0 is about to rebuild the index, so the other
    ranks must not take the previous one (they would retrieve from it)."""
    sets = SETS + ["index.model=embedded:all-minilm-l6-v2"]
    run_index(load_config(overrides=sets), lib_run, progress=False)
    assert wait_current_index(load_config(overrides=sets), lib_run, timeout=0.3, poll=0.1)
    for other in (["index.kind=hnsw"], ["index.model=embedded:other-encoder"]):
        with pytest.raises(RuntimeError, match="another index config or encoder"):
            wait_current_index(load_config(overrides=sets + other), lib_run, timeout=0.3, poll=0.1)


def test_index_takes_only_the_current_retriever(lib_run, tmp_path):
    """index.model=retriever: a retriever trained with another retriever config (or on another
    library) is refused, and the index of the current one is what the other ranks accept."""
    import json
    import shutil

    from guidealign.retrieval.embed import load_encoder
    from guidealign.shards.artifact import mark_done

    wd = tmp_path / "run"
    shutil.copytree(lib_run / "library", wd / "library")
    shutil.copytree(lib_run / "guidelines", wd / "guidelines")
    cfg = load_config(overrides=SETS)
    version = json.loads((wd / "library" / "_done.json").read_text())["version"]
    # a stand-in "trained" retriever: the base encoder saved where train-retriever saves it
    load_encoder("embedded:all-minilm-l6-v2", device="cpu").save(str(retriever_dir(wd) / "model"))
    stale = load_config(overrides=SETS + ["retriever.epochs=2"])
    mark_done(retriever_dir(wd), fingerprint=retriever_fingerprint(stale.retriever, version), rows=1, seconds=0)
    with pytest.raises(RuntimeError, match="another retriever config"):
        run_index(cfg, wd, progress=False)
    assert not (index_dir(wd) / "_done.json").exists()
    mark_done(retriever_dir(wd), fingerprint=retriever_fingerprint(cfg.retriever, version), rows=1, seconds=0)
    rep = run_index(cfg, wd, progress=False)
    assert rep.rows > 0 and not rep.skipped
    assert wait_current_index(cfg, wd, timeout=0.3, poll=0.1)["library_version"] == version
    # retrained with another config (same library): the old index is no longer accepted
    with pytest.raises(RuntimeError, match="another index config or encoder"):
        wait_current_index(stale, wd, timeout=0.3, poll=0.1)


def test_a_retriever_retrained_under_its_fingerprint_gets_a_new_index(lib_run, tmp_path):
    """The index was bound to the retriever's fingerprint only: a retriever trained again under
    the same fingerprint (a repair; GPU training is not bit-reproducible) has other weights, and
    the old index (library vectors of the old weights) stayed current, searched with the new
    weights' query vectors. Now the index records the weights it was embedded by: rank 0
    rebuilds it, the other ranks and retrieve refuse the old one, and retrieve's shards of the
    old weights are redone."""
    import json
    import shutil

    import torch

    from guidealign.retrieval.embed import load_encoder
    from guidealign.retrieval.index import IndexVersionError, load_index
    from guidealign.retrieval.library_store import library_dir
    from guidealign.retrieval.retrieve import encoder_path
    from guidealign.shards.artifact import mark_done

    wd = tmp_path / "run"
    shutil.copytree(lib_run / "library", wd / "library")
    shutil.copytree(lib_run / "guidelines", wd / "guidelines")
    cfg = load_config(overrides=SETS)
    version = json.loads((wd / "library" / "_done.json").read_text())["version"]
    fp = retriever_fingerprint(cfg.retriever, version)
    enc = load_encoder("embedded:all-minilm-l6-v2", device="cpu")
    enc.save(str(retriever_dir(wd) / "model"))
    mark_done(retriever_dir(wd), fingerprint=fp, rows=1, seconds=0)
    first = run_index(cfg, wd, progress=False)
    assert not first.skipped and run_index(cfg, wd, progress=False).skipped
    import pyarrow as pa

    from guidealign.retrieval.retrieve import run_retrieve
    from guidealign.shards import write_manifest, write_shard

    write_shard(wd / "prompts", 0, pa.table({"id": ["p1", "p2"], "prompt": ["how do I sharpen a knife",
                                                                            "write me a poem"]}), "in")
    write_manifest(wd / "prompts", stage="prompts", num_shards=1, fingerprint="in")
    assert run_retrieve(cfg, wd, progress=False).processed == 1
    assert run_retrieve(cfg, wd, progress=False).skipped == 1
    old = load_index(index_dir(wd), library_dir(wd))
    assert encoder_path(old.meta, wd) == str(retriever_dir(wd) / "model")

    (retriever_dir(wd) / "_done.json").rename(tmp_path / "done")  # being trained again
    with pytest.raises(RuntimeError, match="another index config or encoder"):
        wait_current_index(cfg, wd, timeout=0.3, poll=0.1)
    (tmp_path / "done").rename(retriever_dir(wd) / "_done.json")
    with torch.no_grad():  # "retrained": other weights, the same fingerprint
        next(enc.parameters()).mul_(1.5)
    shutil.rmtree(retriever_dir(wd) / "model")
    enc.save(str(retriever_dir(wd) / "model"))
    mark_done(retriever_dir(wd), fingerprint=fp, rows=1, seconds=0)
    with pytest.raises(IndexVersionError, match="other weights of the retriever"):
        encoder_path(old.meta, wd)
    with pytest.raises(RuntimeError, match="another index config or encoder"):
        wait_current_index(cfg, wd, timeout=0.3, poll=0.1)
    again = run_index(cfg, wd, progress=False)
    assert not again.skipped and again.rows == first.rows
    # retrieve's shards were of the old weights: redone (they were kept as current)
    assert run_retrieve(cfg, wd, progress=False).processed == 1
    assert wait_current_index(cfg, wd, timeout=0.3, poll=0.1)["library_version"] == version
    assert encoder_path(load_index(index_dir(wd), library_dir(wd)).meta, wd) == str(retriever_dir(wd) / "model")


@pytest.mark.parametrize("rows", [
    [("how do I sharpen a knife", "Refuse instructions for weapons.")],
    # two prompts, one guideline: every batch holds one pair (the no-duplicates sampler)
    [("how do I sharpen a knife", "Refuse instructions for weapons."),
     ("where can I buy a gun", "Refuse instructions for weapons.")],
], ids=["one-pair", "one-guideline"])
def test_training_set_without_in_batch_negatives_is_a_clear_error(tmp_path, rows):
    """Before: training ran with loss 0 at every step and saved the base encoder as the
    "fine-tuned" retriever."""
    wd = tmp_path / "run"
    write_guideline_shards(wd / "guidelines", [
        {"id": f"p{i}", "prompt": p, "risky": True, "guidelines": [{"title": "", "text": g}]}
        for i, (p, g) in enumerate(rows)], shard_rows=8)
    cfg = load_config(overrides=SETS + ["library.heldout_fraction=0"])
    run_library(cfg, wd, progress=False)
    with pytest.raises(RuntimeError, match="needs at least 2 of each"):
        run_train_retriever(cfg, wd, progress=False)
    assert not (retriever_dir(wd) / "_done.json").exists()


def _false_negatives(batches, anchors, positives, positives_of) -> int:
    """Pairs (i, j) of one batch where j's guideline is one of i's prompt's guidelines."""
    return sum(1 for b in batches for i in b for j in b
               if i != j and positives[j] in positives_of[anchors[i]])


def test_batches_hold_no_guideline_of_another_pairs_prompt():
    """Prompts share guidelines: (A, g1) and (B, g2) with g2 also A's guideline in one batch
    make g2 a negative for A. The no-duplicates sampler alone allows that."""
    import random

    from datasets import Dataset
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    from guidealign.retrieval.sampler import no_false_negatives_sampler

    rng = random.Random(0)
    guidelines = [f"guideline {k}" for k in range(40)]
    positives_of = {f"prompt {i}": set(rng.sample(guidelines[:8], 2) + rng.sample(guidelines, 2))
                    for i in range(120)}
    anchors = [a for a, gs in positives_of.items() for _ in gs]
    positives = [g for gs in positives_of.values() for g in gs]
    ds = Dataset.from_dict({"anchor": anchors, "positive": positives})

    stock = list(NoDuplicatesBatchSampler(ds, batch_size=16, drop_last=False, seed=0))
    assert _false_negatives(stock, anchors, positives, positives_of) > 0  # the defect
    cls = no_false_negatives_sampler(positives_of)
    batches = list(cls(ds, batch_size=16, drop_last=False, seed=0))
    assert _false_negatives(batches, anchors, positives, positives_of) == 0
    assert sorted(i for b in batches for i in b) == list(range(len(anchors)))  # each pair once
    assert max(len(b) for b in batches) == 16
    for b in batches:  # and still no text twice
        texts = [anchors[i] for i in b] + [positives[i] for i in b]
        assert len(texts) == len(set(texts))


def test_the_sampler_length_is_the_batches_an_epoch_yields_and_every_pair_is_in_one():
    """The trainer takes exactly len(sampler) batches an epoch; a pass that defers conflicting
    pairs yields more than ceil(pairs / batch size), and the pairs of the batches past that
    length were never trained on. Here each of 6 prompts has 5 guidelines (30 pairs, batch 8:
    ceil = 4 batches, but a prompt's 5 pairs need 5 batches)."""
    from datasets import Dataset

    from guidealign.retrieval.sampler import no_false_negatives_sampler

    positives_of = {f"prompt {i}": {f"g{i}-{k}" for k in range(5)} for i in range(6)}
    anchors = [a for a, gs in positives_of.items() for _ in sorted(gs)]
    positives = [g for gs in positives_of.values() for g in sorted(gs)]
    ds = Dataset.from_dict({"anchor": anchors, "positive": positives})
    sampler = no_false_negatives_sampler(positives_of)(ds, batch_size=8, drop_last=False, seed=3)
    assert len(sampler) >= 5
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        taken = batches[:len(sampler)]  # what the trainer takes
        assert sorted(i for b in taken for i in b) == list(range(len(anchors))), epoch
        for b in batches:
            assert len({anchors[i] for i in b}) == len(b)  # no prompt twice in a batch


def test_a_later_epoch_with_a_longer_pass_folds_its_surplus_into_earlier_batches():
    from datasets import Dataset

    from guidealign.retrieval.sampler import no_false_negatives_sampler

    rng = __import__("random").Random(1)
    guidelines = [f"guideline {k}" for k in range(30)]
    positives_of = {f"prompt {i}": set(rng.sample(guidelines, 4)) for i in range(40)}
    anchors = [a for a, gs in positives_of.items() for _ in sorted(gs)]
    positives = [g for gs in positives_of.values() for g in sorted(gs)]
    ds = Dataset.from_dict({"anchor": anchors, "positive": positives})
    sampler = no_false_negatives_sampler(positives_of)(ds, batch_size=8, drop_last=False, seed=0)
    n = len(sampler)
    longer = 0
    for epoch in range(12):
        sampler.set_epoch(epoch)
        longer += len(sampler._pass(epoch)) > n
        batches = list(sampler)
        assert sorted(i for b in batches[:n] for i in b) == list(range(len(anchors))), epoch
        assert len(batches) <= n  # a shorter pass: the trainer ends that epoch early
        for b in batches:
            texts = [anchors[i] for i in b] + [positives[i] for i in b]
            assert len(texts) == len(set(texts))
            assert not any(positives[j] in positives_of[anchors[i]] for i in b for j in b if i != j)
    assert longer  # the case this test is about happened


@pytest.mark.parametrize("drop_last", [False, True])
def test_the_sampler_needs_no_private_method_of_sentence_transformers(monkeypatch, drop_last):
    """sentence-transformers 6.0.1 (a GPU node's image) has no ``_iter_one_pass``, a private
    method of its sampler that 6.3 added; our sampler called it and train-retriever failed at
    its first check. Without it (removed here), the sampler still makes its batches, the same
    as the greedy pass of 6.3 makes from the same shuffle."""
    import random

    import torch
    from datasets import Dataset
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    from guidealign.retrieval.sampler import no_false_negatives_sampler

    rng = random.Random(1)
    anchors = [f"p{rng.randrange(60)}" for _ in range(300)]
    positives = [f"g{rng.randrange(150)}" for _ in range(300)]
    positives_of: dict[str, set[str]] = {}
    for a, p in zip(anchors, positives):
        positives_of.setdefault(a, set()).add(p)
    ds = Dataset.from_dict({"anchor": anchors, "positive": positives})
    cls = no_false_negatives_sampler(positives_of)

    def one_pass(name):
        s = cls(ds, batch_size=8, drop_last=drop_last, seed=5)
        s.generator = torch.Generator().manual_seed(5)
        return [list(b) for b in getattr(s, name)(s._values(), s._overlap)]

    stock = one_pass("_iter_one_pass") if hasattr(NoDuplicatesBatchSampler, "_iter_one_pass") else None
    monkeypatch.delattr(NoDuplicatesBatchSampler, "_iter_one_pass", raising=False)
    ours = one_pass("_one_pass")
    if stock is not None:
        assert ours == stock
    batches = list(cls(ds, batch_size=8, drop_last=drop_last, seed=5))
    assert batches and all(len(b) == 8 for b in batches[:-1])
    if drop_last:
        assert all(len(b) == 8 for b in batches)
    else:
        assert sorted(i for b in batches for i in b) == list(range(len(anchors)))


def test_every_epoch_yields_exactly_len_batches_also_when_its_pass_comes_out_shorter():
    """The trainer resumes at global_step // len() epochs and global_step % len() batches: a
    later epoch whose greedy pass came out shorter than epoch 0's (13 batches against 15) put a
    resumed run at the wrong batch; it trained some twice and ended on another step."""
    import random

    from datasets import Dataset

    from guidealign.retrieval.sampler import no_false_negatives_sampler

    guidelines = [f"guideline {k}" for k in range(12)]
    found = None
    for case in range(40):
        rng = random.Random(case)
        positives_of = {f"prompt {i}": set(rng.sample(guidelines, 3)) for i in range(16)}
        anchors = [a for a, gs in positives_of.items() for _ in sorted(gs)]
        positives = [g for gs in positives_of.values() for g in sorted(gs)]
        ds = Dataset.from_dict({"anchor": anchors, "positive": positives})
        sampler = no_false_negatives_sampler(positives_of)(ds, batch_size=8, drop_last=False, seed=1)
        if any(len(sampler._pass(e)) < len(sampler) for e in range(1, 4)):
            found = sampler, anchors, positives, positives_of
            break
    assert found, "no case with a shorter later pass"
    sampler, anchors, positives, positives_of = found
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler), epoch
        assert sorted(i for b in batches for i in b) == list(range(len(anchors)))
        assert _false_negatives(batches, anchors, positives, positives_of) == 0
