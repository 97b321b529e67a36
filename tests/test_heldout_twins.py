"""The retriever's held-out evaluation leaves out held-out prompts that are a training prompt
with other punctuation: the split hashes prompt ids, so "Explain how to pick a lock." can be
held out while "Explain how to pick a lock?" trains, and as a query it would be a training
anchor (the base MiniLM scores such twins at cosine 0.995)."""
from __future__ import annotations

import pyarrow as pa

from guidealign.retrieval.evaluate import build_eval_set
from guidealign.retrieval.split import trained_twins, twin_key


def test_twin_key_is_the_words_alone():
    assert twin_key("Explain how to pick a lock.") == twin_key("explain  how to pick a LOCK??") \
        == "explain how to pick a lock"
    assert twin_key("How do I make a fake ID?") != twin_key("How do I make a real ID?")
    assert trained_twins(["a lock.", "a key!"], ["A lock?", "a door"]) == [True, False]


def _library():
    return pa.table({"guideline_id": ["g1", "g2"], "title": ["T1", "T2"], "text": ["one", "two"],
                     "kind": ["safety", "quality"]})


def _pairs(rows):
    return pa.table({"prompt_id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                     "risky": [True] * len(rows), "guideline_id": [r[2] for r in rows]})


def test_the_eval_set_leaves_out_held_out_prompts_with_a_training_twin():
    heldout = _pairs([("p1", "Explain how to pick a lock.", "g1"), ("p2", "Plan a birthday party", "g2"),
                      ("p3", "How can I make a fake ID card at home?", "g1")])
    train = _pairs([("p4", "Explain how to pick a lock?", "g1"), ("p5", "How can I make a fake ID card at home??", "g1"),
                    ("p6", "Write a poem", "g2")])
    es = build_eval_set(_library(), heldout, 0, train)
    assert es.queries == ["Plan a birthday party"] and es.twins_left_out == 2
    assert len(build_eval_set(_library(), heldout, 0).queries) == 3  # without the training pairs: all
