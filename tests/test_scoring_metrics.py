"""Retrieval metrics and verdict scores on made-up scores: no engine, no training.

recall@k, MRR and the risk-identification rate must all rank the library in one order
(score, ties by row number): BM25 gives many tied scores (0 for every guideline that shares
no word with the prompt), and a metric that breaks ties its own way reports a figure that
the ranking the others use does not give.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from guidealign.retrieval.evaluate import EvalSet, bm25_scorer, evaluate


def _one_query(scores: np.ndarray, relevant: set[int], safety=None, risky=True) -> EvalSet:
    n = scores.shape[-1]
    return EvalSet(queries=["q"], risky=[risky], relevant=[relevant],
                   doc_ids=[str(i) for i in range(n)], docs=[""] * n,
                   safety=np.zeros(n, bool) if safety is None else safety)


def _reference(row: np.ndarray, relevant: set[int], safety: np.ndarray, ks, risk_k):
    """The metrics from a full sort by (score desc, row asc)."""
    order = np.lexsort((np.arange(len(row)), -row)).tolist()
    rank = {r: order.index(r) + 1 for r in relevant}
    out = {f"recall@{k}": sum(rank[r] <= k for r in relevant) / len(relevant) for k in ks}
    out["mrr"] = 1.0 / min(rank.values())
    out["risk_identification"] = float(safety[order[:risk_k]].any())
    return out


def test_all_tied_scores_give_no_first_place_in_mrr():
    # before: MRR 1.0 (ties counted in the relevant row's favour) while recall@3 was 0
    es = _one_query(np.zeros(10), {5}, risky=False)
    m = evaluate(es, lambda qs: np.zeros((len(qs), 10)), recall_at=(1, 3))
    assert m["recall@1"] == 0.0 and m["recall@3"] == 0.0
    assert m["mrr"] == pytest.approx(1 / 6, abs=1e-4)  # 6th by row number among the tied rows


def test_bm25_query_sharing_no_word_is_not_ranked_first():
    docs = ["Refuse to help with weapons.", "Be kind about grief.",
            "Cite sources for medical claims.", "Do not share private data.",
            "Explain code step by step."]
    es = EvalSet(queries=["zzz qqq"], risky=[False], relevant=[{4}], doc_ids=list("abcde"),
                 docs=docs, safety=np.zeros(5, bool))
    m = evaluate(es, bm25_scorer(docs), recall_at=(1, 3))
    assert m["recall@3"] == 0.0
    assert m["mrr"] == pytest.approx(1 / 5, abs=1e-4)  # before: 1.0


def test_bm25_scores_are_rank_bm25s_okapi_scores():
    """The sparse BM25 replaced rank_bm25's per-document Python loop (~0.09 s a query over 33k
    guidelines): the same scores, negative-idf floor, repeated and unknown query words, empty
    guidelines and queries included."""
    import random

    rank_bm25 = pytest.importorskip("rank_bm25")
    from guidealign.retrieval.evaluate import tokenize

    rng = random.Random(0)
    words = [f"w{i}" for i in range(200)] + ["the", "a", "of"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 20))) for _ in range(400)]
    docs += ["", "the the the of", "THE a, a."]
    queries = [" ".join(rng.choice(words + ["unseen"]) for _ in range(rng.randint(0, 10))) for _ in range(80)]
    queries += ["", "the the a", "unseen"]
    ref = rank_bm25.BM25Okapi([tokenize(d) or [""] for d in docs])
    want = np.stack([ref.get_scores(tokenize(q)) for q in queries])
    got = bm25_scorer(docs)(queries)
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ties_at_the_kth_place_are_broken_by_row_number():
    # scores 0/1/2 over 2552 rows: argpartition picked arbitrary tied rows for the k-th place
    s = np.random.default_rng(0).integers(0, 3, size=2552).astype(float)
    k = 16
    order = np.lexsort((np.arange(len(s)), -s))
    rel = int(order[k - 1])  # k-th in (score, row number) order
    safety = np.zeros(len(s), bool)
    safety[rel] = True
    m = evaluate(_one_query(s, {rel}, safety), lambda qs: s[None, :], recall_at=(k,), risk_top_k=k)
    assert m[f"recall@{k}"] == 1.0
    assert m["mrr"] == pytest.approx(1 / k, abs=1e-4)
    assert m["risk_identification"] == 1.0


def test_metrics_match_a_full_sort_on_tie_heavy_rankings():
    rng = np.random.default_rng(1)
    ks, risk_k = (1, 3, 5, 20), 3
    for _ in range(60):
        n = int(rng.integers(2, 1500))
        row = rng.integers(0, 4, size=n).astype(float)
        relevant = set(rng.choice(n, size=int(rng.integers(1, min(n, 4) + 1)), replace=False).tolist())
        safety = rng.random(n) < 0.05
        m = evaluate(_one_query(row, relevant, safety), lambda qs: row[None, :],
                     recall_at=ks, risk_top_k=risk_k)
        ref = _reference(row, relevant, safety, ks, risk_k)
        for key, want in ref.items():
            assert m[key] == pytest.approx(round(want, 4)), (n, key)


def test_top_rows_and_first_relevant_rank():
    from guidealign.retrieval.evaluate import first_relevant_rank, top_rows

    row = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert top_rows(row, 2).tolist() == [1, 2]
    assert top_rows(row, 4).tolist() == [1, 2, 4, 3]
    assert top_rows(row, 9).tolist() == [1, 2, 4, 3, 0]  # k past the library: all of it
    assert first_relevant_rank(row, {4}) == 3 and first_relevant_rank(row, {0, 3}) == 4
    assert first_relevant_rank(row, {1, 2}) == 1


def test_k_larger_than_the_library_and_several_relevant():
    row = np.array([0.9, 0.1, 0.5])
    es = _one_query(row, {1, 2})
    m = evaluate(es, lambda qs: row[None, :], recall_at=(1, 2, 50), risk_top_k=1)
    assert (m["recall@1"], m["recall@2"], m["recall@50"]) == (0.0, 0.5, 1.0)
    assert m["mrr"] == 0.5


def test_nan_scores_and_bad_cutoffs_are_refused():
    es = _one_query(np.zeros(3), {0})
    with pytest.raises(ValueError, match="NaN"):
        evaluate(es, lambda qs: np.array([[0.1, math.nan, 0.2]]), recall_at=(1,))
    with pytest.raises(ValueError, match="recall_at"):
        evaluate(es, lambda qs: np.zeros((1, 3)), recall_at=(0, 1))
    with pytest.raises(ValueError, match="risk_top_k"):
        evaluate(es, lambda qs: np.zeros((1, 3)), recall_at=(1,), risk_top_k=0)


# --- score-mode threshold calibration (bench/detect_modes.py) ---------------------------------

def _detect_modes():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "detect_modes.py"
    spec = importlib.util.spec_from_file_location("bench_detect_modes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_calibrate_breaks_exact_ties_by_distance_to_half():
    dm = _detect_modes()
    # 30 per class: recall - FPR is 1/30 both at 0.9 (1/30 - 0) and at 0.5 (4/30 - 3/30), but
    # 1/30 - 0 > 4/30 - 3/30 in floats; before: 0.9
    risky = [0.9] * 1 + [0.5] * 3 + [0.05] * 26
    benign = [0.5] * 3 + [0.05] * 27
    assert dm.calibrate(risky, benign) == 0.5


def test_calibrated_threshold_gives_the_rates_it_was_chosen_for():
    dm = _detect_modes()
    rng = np.random.default_rng(2)
    for _ in range(30):
        risky = np.round(rng.random(int(rng.integers(1, 40))), 2).tolist()   # many ties
        benign = np.round(rng.random(int(rng.integers(1, 40))) * 0.8, 2).tolist()
        t = dm.calibrate(risky, benign)
        youden = lambda th: (sum(s >= th for s in risky) / len(risky)
                             - sum(s >= th for s in benign) / len(benign))
        best = max(youden(c) for c in set(risky) | set(benign) | {0.5})
        assert youden(t) == pytest.approx(best)
        pred = [s >= t for s in risky], [s >= t for s in benign]
        r = dm.rates(*pred)
        assert r["recall"] - r["fpr"] == pytest.approx(best)
        rec, fpr = dm.recall_at_fpr(risky, benign, r["fpr"])
        assert fpr <= r["fpr"] + 1e-12 and rec >= r["recall"]
