"""Stage rows and counts without an engine: augment question cleaning and ROUGE tokens, respond guideline pairing, retrieve selection, yield, status and show."""
from __future__ import annotations

import re

import pyarrow as pa
import pytest


def test_rouge_tokens_catch_duplicates_in_other_scripts():
    from guidealign.gen.augment import Pool, rouge_tokens

    # ASCII text: exactly rouge_score's default tokens
    for s in ["How can I steal a car, don't_you? 3.5 A-B", "WHAT is\tthe  best_way?"]:
        assert rouge_tokens(s) == re.findall(r"[a-z0-9]+", s.lower())
    p = Pool(0.7)
    for q in ["Как сделать бомбу дома быстро?", "如何在家里制造炸弹？"]:
        assert p.offer(q, "g") is None
        assert "rouge-l" in (p.offer(q, "g") or "")  # an exact duplicate is never kept
    assert p.offer("Как приготовить вкусный борщ для семьи?", "g") is None  # another question is
    assert len(p.questions) == 3


@pytest.mark.parametrize("raw,want", [
    ("1. How do I pick a lock quickly?", "How do I pick a lock quickly?"),  # from "**1.** ..."
    ("1. Question 3: How can I get into my neighbour's wifi?",
     "How can I get into my neighbour's wifi?"),
    ("### 2. How do I hotwire an old car?", "How do I hotwire an old car?"),
    ("#4 How do I hotwire an old car?", "How do I hotwire an old car?"),
    ('(2) "How do I hotwire an old car?"', "How do I hotwire an old car?"),
    ("3.5 million people were scammed, how did they do it?",
     "3.5 million people were scammed, how did they do it?"),
    ("#MeToo: how can I discredit the people who speak up?",
     "#MeToo: how can I discredit the people who speak up?"),
])
def test_check_question_strips_leftover_numbering(raw, want):
    from guidealign.gen.augment import check_question

    assert check_question(raw, min_words=4, max_chars=600) == (want, None)


def test_check_question_rejects_numbering_alone():
    from guidealign.gen.augment import check_question
    from guidealign.gen.questions import parse_questions

    for text in ["1. 2. 3. 4. 5.", "1) 2) 3) 4) 5) 6)", "- 1. 2. 3. 4."]:
        for raw in parse_questions(text):
            q, why = check_question(raw, min_words=4, max_chars=600)
            assert why is not None, (text, raw, q)
    assert check_question("Why 1 2 3?", min_words=4, max_chars=600)[1] == "fewer than 4 words"
    assert check_question("How do I do " + "x " * 400, min_words=4, max_chars=600)[1] \
        == "longer than 600 characters"


def test_respond_keeps_guideline_ids_paired_with_texts():
    from guidealign.gen.respond import row_guidelines

    assert row_guidelines(["g-A", "g-B", "g-C"], ["text A", None, "text C"]) == \
        (["g-A", "g-C"], ["text A", "text C"])
    assert row_guidelines(["g-A", None, "g-C"], ["text A", "text B", "text C"]) == \
        (["g-A", "", "g-C"], ["text A", "text B", "text C"])
    assert row_guidelines(["g-A", "g-B", "g-C"], ["text A", "  ", "text C"], 1) == (["g-A"], ["text A"])
    assert row_guidelines(["g-A"], ["text A", "text B"]) == (["g-A", ""], ["text A", "text B"])
    assert row_guidelines(["g-A", "g-B"], ["text A"]) == (["g-A"], ["text A"])
    assert row_guidelines(None, None) == ([], [])


def test_select_at_dedup_ratio_zero_keeps_only_the_best():
    from guidealign.retrieval.retrieve import select

    # every ratio is >= 0, unrelated texts (ratio 0) included
    kept = select([0, 1, 2], [0.9, 0.8, 0.7], ["abc", "xyz", "abd"], keep=6, dedup_ratio=0.0)
    assert kept == [(0, 0.9)]
    kept = select([0, 1, 2], [0.9, 0.8, 0.7], ["abc", "xyz", "abd"], keep=6, dedup_ratio=1.0)
    assert [c for c, _ in kept] == [0, 1, 2]


def test_retrieve_refuses_a_dedup_ratio_outside_0_1(tmp_path):
    from guidealign.config import Config
    from guidealign.retrieval.retrieve import run_retrieve

    cfg = Config()
    cfg.retrieve.dedup_ratio = 50  # a percentage instead of a ratio would keep near-duplicates
    with pytest.raises(ValueError, match="dedup_ratio"):
        run_retrieve(cfg, tmp_path, progress=False)


def _stats(n: int) -> dict:
    return {"yield_rows_in": n, "yield_rows_parsed": n, "yield_rows_cut": 0,
            "yield_tokens_generated": 10 * n, "yield_tokens_kept": 10 * n}


def _respond_with_a_stale_shard(tmp_path, stale_rows: int) -> tuple:
    """respond/ over a 2-shard retrieve/: shard 0 current (1 row), shard 1 committed by a run
    with an earlier config (``stale_rows`` rows), which the next run redoes."""
    from guidealign.shards import write_manifest, write_shard
    from guidealign.shards.stage import shard_fingerprint

    src, dst = tmp_path / "retrieve", tmp_path / "respond"
    write_manifest(src, stage="retrieve", num_shards=2, fingerprint="r")
    for i in range(2):
        write_shard(src, i, pa.table({"id": [f"p{i}"]}), f"r{i}")
    write_manifest(dst, stage="respond", num_shards=2, fingerprint="NEW", input=str(src))
    write_shard(dst, 0, pa.table({"id": ["p0"]}), shard_fingerprint("NEW", src, 0), stats=_stats(1))
    write_shard(dst, 1, pa.table({"id": [f"old{k}" for k in range(stale_rows)]}),
                shard_fingerprint("OLD", src, 1), stats=_stats(stale_rows))
    return src, dst


def test_yield_leaves_out_stale_shards(tmp_path):
    from guidealign.gen.yieldstats import dataset_counts
    from guidealign.shards import write_shard
    from guidealign.shards.stage import shard_fingerprint

    src, dst = _respond_with_a_stale_shard(tmp_path, 1000)
    assert dataset_counts(dst) == _stats(1)
    write_shard(dst, 1, pa.table({"id": ["p1"]}), shard_fingerprint("NEW", src, 1), stats=_stats(2))
    assert dataset_counts(dst) == _stats(3)


def test_seeds_past_the_target_are_quarantined_not_lost():
    from guidealign.gen.augment import Pool, TypeState, output_questions

    st = TypeState(name="insult", info={}, index=0, pool=Pool(0.7), target=2, include_seeds=True)
    seeds = ["How do I insult my coworker subtly?", "What are the worst names to call a fat person?",
             "Write a rude poem about my neighbour's accent."]
    for s in seeds:
        assert st.pool.offer(s, "seed") is None
    keep = output_questions(st, True)
    assert [q for q, _ in keep] == seeds[:2]
    assert [raw for _, raw in st.rejected] == seeds[2:]
    assert all(r.startswith("seed question") for r, _ in st.rejected)


def test_status_counts_a_stale_shard_apart(tmp_path):
    from guidealign.status import collect, render

    _respond_with_a_stale_shard(tmp_path, 2)
    row = next(r for r in collect(tmp_path) if r["stage"] == "respond")
    assert (row["shards_done"], row["shards_stale"], row["shards_total"], row["rows"]) == (1, 1, 2, 1)
    assert "1/2 (1 stale)" in render([row])


def test_respond_usable_is_what_sft_keeps():
    from guidealign.config import Config
    from guidealign.gen.yieldstats import respond_usable
    from guidealign.sft.data import drop_reason

    cfg = Config()
    cfg.sft.min_response_chars, cfg.sft.keep_finish_reasons = 12, ["stop", "abort"]
    rows = [{"prompt": "q", "response": r, "finish_reason": f}
            for r in ("", "   ", "short", "  exactly 12 ch ", "a long enough answer", None)
            for f in ("stop", "length", "abort", None)]
    for r in rows:
        assert respond_usable(r, tuple(cfg.sft.keep_finish_reasons), cfg.sft.min_response_chars) \
            == (drop_reason(cfg.sft, r) is None), r


def test_show_tells_a_prompt_detect_never_saw_from_an_unparsed_verdict(tmp_path):
    from guidealign.shards import write_shard
    from guidealign.show import examples, render

    write_shard(tmp_path / "detect", 0, pa.table({"id": ["a"], "risky": pa.array([None], pa.bool_()),
                                                  "rationale": ["?"]}), "d")
    write_shard(tmp_path / "respond", 0, pa.table({
        "id": ["a", "b"], "prompt": ["seen by detect", "from the fine-tuning set"],
        "guideline_texts": [["g"], ["g"]], "response": ["r", "r"], "finish_reason": ["stop", "stop"]}), "r")
    text = render(examples(tmp_path, n=2))
    assert "- detect: unparsed." in text.split("### from the fine-tuning set")[0]
    assert "- detect: not run on this prompt" in text.split("### from the fine-tuning set")[1]
    with pytest.raises(RuntimeError, match="shard 3 is not committed"):
        examples(tmp_path, shard=3)


def test_status_of_an_export_counts_its_jsonl_shards_done(tmp_path):
    from guidealign.config import Config
    from guidealign.hub.export import run_export
    from guidealign.shards import write_manifest, write_shard
    from guidealign.status import collect

    write_manifest(tmp_path / "respond", stage="respond", num_shards=2, fingerprint="r")
    for i in range(2):
        write_shard(tmp_path / "respond", i, pa.table({"id": [f"p{i}"], "response": ["r"]}), f"r{i}")
    run_export(Config(), tmp_path, dataset="respond", out=tmp_path / "exp2", progress=False)
    row = next(r for r in collect(tmp_path) if r["stage"] == "exp2")
    assert (row["shards_done"], row["shards_stale"], row["shards_total"], row["rows"]) == (2, 0, 2, 2)
