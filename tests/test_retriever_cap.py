"""retriever.max_prompts_per_guideline: two pairs of one guideline never share a batch, so a
guideline serving many prompts stretched an epoch into batches of one pair (no in-batch
negative, no loss, yet an optimizer step)."""
from __future__ import annotations

import random

import numpy as np

from guidealign.config import load_config
from guidealign.retrieval.train import AUTO_CAP_MIN, capped_pairs, retriever_fingerprint


def _skewed_pairs(prompts: int, guidelines: int, per: int = 7, seed: int = 0):
    """(prompt ids, guideline ids): each prompt has ``per`` guidelines drawn with Zipf-like
    popularity, as generic guidelines merged from many near-duplicates are."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, guidelines + 1)
    w /= w.sum()
    pids, gids = [], []
    for p in range(prompts):
        for g in sorted(set(rng.choice(guidelines, size=per, p=w).tolist())):
            pids.append(f"p{p}")
            gids.append(f"g{g}")
    return pids, gids


def test_the_cap_keeps_at_most_that_many_prompts_per_guideline_whatever_the_order():
    pids, gids = _skewed_pairs(400, 100)
    keep, cap = capped_pairs(pids, gids, 5, 64, seed=0)
    assert cap == 5 and keep == sorted(keep)
    counts = {}
    for i in keep:
        counts[gids[i]] = counts.get(gids[i], 0) + 1
    assert max(counts.values()) == 5
    # a guideline under the cap keeps every pair; the choice does not depend on the order
    under = {g for g in set(gids) if gids.count(g) <= 5}
    assert all(i in set(keep) for i, g in enumerate(gids) if g in under)
    order = list(range(len(pids)))
    random.Random(1).shuffle(order)
    keep2, _ = capped_pairs([pids[i] for i in order], [gids[i] for i in order], 5, 64, seed=0)
    assert sorted((pids[order[i]], gids[order[i]]) for i in keep2) == sorted((pids[i], gids[i]) for i in keep)
    assert capped_pairs(pids, gids, 0, 64, seed=0) == (list(range(len(pids))), 0)
    assert capped_pairs(pids[:50], gids[:50], "auto", 64, seed=0)[1] == AUTO_CAP_MIN  # small sets


def test_auto_cap_turns_an_epoch_of_one_pair_batches_into_real_batches():
    from datasets import Dataset

    from guidealign.retrieval.sampler import no_false_negatives_sampler

    pids, gids = _skewed_pairs(1200, 300)
    sizes = {}
    for cap in (0, "auto"):
        keep, _ = capped_pairs(pids, gids, cap, 64, seed=0)
        a, p = [f"prompt {pids[i]}" for i in keep], [f"guideline {gids[i]}" for i in keep]
        pos = {}
        for x, y in zip(a, p):
            pos.setdefault(x, set()).add(y)
        s = no_false_negatives_sampler(pos)(Dataset.from_dict({"anchor": a, "positive": p}),
                                            batch_size=64, drop_last=False, seed=0)
        sizes[cap] = np.array([len(b) for b in s._pass(0)])
        # the README's figures (`pytest -s tests/test_retriever_cap.py -k one_pair_batches`)
        print(f"cap {cap}: {len(keep) / len(pids):.2f} of the pairs kept, {len(sizes[cap])} batches, "
              f"median {np.median(sizes[cap]):g} pairs, {(sizes[cap] == 1).mean():.2f} of one pair")
    assert np.median(sizes[0]) <= 2 and (sizes[0] == 1).mean() > 0.3  # the problem, measured
    assert np.median(sizes["auto"]) >= 8 and (sizes["auto"] == 1).mean() < 0.05
    assert len(sizes["auto"]) < len(sizes[0]) / 3


def test_no_cap_keeps_the_retriever_fingerprint_of_before_the_key():
    """Runs without the cap (the default) keep their trained retriever: the fingerprint is the
    one computed before the key existed (pinned); a cap is a new model."""
    rc = load_config().retriever
    assert retriever_fingerprint(rc, "v1") == "4c87bec785d47d6d0754"
    assert retriever_fingerprint(load_config(None, ["retriever.max_prompts_per_guideline=auto"]).retriever,
                                 "v1") != "4c87bec785d47d6d0754"


def test_a_capped_pair_s_guideline_is_no_in_batch_negative_of_its_prompt():
    """The cap leaves out pairs of the most popular guidelines; their prompts still have those
    guidelines, so no batch may hold another pair whose positive is one of them (a skewed set:
    64% of the kept pairs had such a false negative when only the kept pairs were counted)."""
    import pyarrow as pa
    from datasets import Dataset

    from guidealign.retrieval.sampler import no_false_negatives_sampler
    from guidealign.retrieval.train import training_pairs

    pids, gids = _skewed_pairs(600, 150)
    train = pa.table({"prompt_id": pids, "prompt": [f"prompt {p}" for p in pids], "guideline_id": gids})
    doc_of = {g: f"guideline text {g}" for g in set(gids)}
    rc = load_config(None, ["retriever.max_prompts_per_guideline=auto", "retriever.batch_size=32"]).retriever
    anchors, positives, positives_of = training_pairs(train, doc_of, rc)
    assert len(anchors) < len(pids)  # the cap left pairs out
    own = {}
    for p, g in zip(pids, gids):
        own.setdefault(f"prompt {p}", set()).add(doc_of[g])
    assert positives_of == own
    ds = Dataset.from_dict({"anchor": anchors, "positive": positives})
    sampler = no_false_negatives_sampler(positives_of)(ds, batch_size=32, drop_last=False, seed=rc.seed)
    false, pairs = 0, 0
    for batch in sampler:
        for i in batch:
            pairs += 1
            false += bool(own[anchors[i]] & {positives[j] for j in batch if j != i})
    assert pairs == len(anchors) and false == 0


def test_a_cap_changes_the_fingerprint_no_cap_keeps_it():
    cfg = load_config(None, [])
    base = retriever_fingerprint(cfg.retriever, "v1")
    assert base == retriever_fingerprint(load_config(None, ["retriever.max_prompts_per_guideline=0"]).retriever, "v1")
    capped = retriever_fingerprint(load_config(None, ["retriever.max_prompts_per_guideline=auto"]).retriever, "v1")
    assert capped != base
