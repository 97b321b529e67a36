"""Retrieval metrics on held-out prompts: recall@k, MRR and the risk-identification rate.

Each held-out prompt is a query; its relevant guidelines are the library entries its own
guidelines were merged into. A system is anything that scores every library entry for a
batch of queries: a dense encoder (cosine) or BM25.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

_TOKEN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@dataclass
class EvalSet:
    queries: list[str]            # prompt texts
    risky: list[bool]             # the prompt's risky flag (True only when known risky)
    relevant: list[set[int]]      # library row numbers relevant to each query
    doc_ids: list[str]            # library guideline ids, row order
    docs: list[str]               # library texts to embed (title: text)
    safety: np.ndarray            # bool per library row: kind == "safety"
    twins_left_out: int = 0       # held-out prompts left out: a training prompt's twin


def build_eval_set(library, heldout, max_queries: int = 0, train=None) -> EvalSet:
    """``library``: table with guideline_id, title, text, kind; ``heldout``: pairs table;
    ``train``: the training pairs, whose prompts' twins (``split.twin_key``: the same words)
    are left out of the queries."""
    from guidealign.retrieval.embed import doc_text
    from guidealign.retrieval.split import trained_twins

    ids = library.column("guideline_id").to_pylist()
    row_of = {g: i for i, g in enumerate(ids)}
    docs = [doc_text(t, x) for t, x in zip(library.column("title").to_pylist(),
                                           library.column("text").to_pylist())]
    safety = np.array([k == "safety" for k in library.column("kind").to_pylist()], dtype=bool)
    by_prompt: dict[str, list] = {}
    for pid, prompt, risky, gid in zip(*(heldout.column(c).to_pylist()
                                         for c in ("prompt_id", "prompt", "risky", "guideline_id"))):
        q = by_prompt.setdefault(pid, [prompt, risky is True, set()])
        if gid in row_of:
            q[2].add(row_of[gid])
    keys = sorted(k for k, v in by_prompt.items() if v[2])
    twins = 0
    if train is not None and keys:
        twin = trained_twins([by_prompt[k][0] for k in keys], train.column("prompt").to_pylist())
        twins = sum(twin)
        keys = [k for k, t in zip(keys, twin) if not t]
    if max_queries and len(keys) > max_queries:
        keys = keys[:max_queries]  # prompt ids are hashes: a deterministic, unbiased subset
    return EvalSet(queries=[by_prompt[k][0] for k in keys], risky=[by_prompt[k][1] for k in keys],
                   relevant=[by_prompt[k][2] for k in keys], doc_ids=ids, docs=docs, safety=safety,
                   twins_left_out=twins)


ScoreFn = Callable[[list[str]], np.ndarray]  # queries -> (len(queries), n_docs) scores


def dense_scorer(model, docs: list[str], batch_size: int = 128) -> ScoreFn:
    from guidealign.retrieval.embed import encode

    d = encode(model, docs, batch_size=batch_size)

    def score(queries: list[str]) -> np.ndarray:
        return encode(model, queries, batch_size=batch_size) @ d.T
    return score


def bm25_scorer(docs: list[str], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25) -> ScoreFn:
    """Okapi BM25 as rank_bm25's ``BM25Okapi`` scores it (the same idf, with its floor of
    ``epsilon`` x the mean idf for terms in more than half the documents, and each query token
    counted as often as it occurs), as one sparse product per batch of queries: rank_bm25 loops
    in Python over every document for each query token (~0.09 s a query over 33k guidelines,
    minutes of a GPU node's time for the evaluation's 5,000 queries)."""
    from scipy import sparse

    vocab: dict[str, int] = {}
    # an empty guideline is one empty token, as rank_bm25 takes it
    doc_tokens = [tokenize(d) or [""] for d in docs]
    rows, cols, tf = _term_counts(doc_tokens, vocab, grow=True)
    n_docs = len(docs)
    df = np.bincount(cols, minlength=len(vocab)).astype(np.float64)
    idf = np.log(n_docs - df + 0.5) - np.log(df + 0.5)
    if len(idf):
        idf[idf < 0] = epsilon * idf.mean()
    dl = np.asarray([len(t) for t in doc_tokens], dtype=np.float64)
    norm = k1 * (1 - b + b * dl / (dl.sum() / max(n_docs, 1)))
    w = idf[cols] * tf * (k1 + 1) / (tf + norm[rows])
    weights = sparse.csr_matrix((w, (cols, rows)), shape=(len(vocab), n_docs))  # term x document

    def score(queries: list[str]) -> np.ndarray:
        q_rows, q_cols, q_counts = _term_counts([tokenize(q) for q in queries], vocab, grow=False)
        counts = sparse.csr_matrix((q_counts, (q_rows, q_cols)), shape=(len(queries), len(vocab)))
        return np.asarray((counts @ weights).todense(), dtype=np.float64)
    return score


def _term_counts(token_lists: list[list[str]], vocab: dict[str, int], grow: bool):
    """(row, term column, count) of each distinct term of each token list, as arrays; terms
    not in ``vocab`` are added (``grow``) or left out."""
    rows, cols, counts = [], [], []
    for r, toks in enumerate(token_lists):
        for t, n in Counter(toks).items():
            if grow:
                vocab.setdefault(t, len(vocab))
            elif t not in vocab:
                continue
            rows.append(r)
            cols.append(vocab[t])
            counts.append(n)
    return (np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64),
            np.asarray(counts, dtype=np.float64))


def top_rows(row: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best rows of one query's scores, best first; ties by row number (lower
    first), also at the k-th place (``argpartition`` picks tied rows there arbitrarily)."""
    n = row.shape[0]
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k >= n:
        return np.lexsort((np.arange(n), -row))
    kth = np.partition(row, n - k)[n - k]  # the k-th largest score
    above = np.flatnonzero(row > kth)
    t = np.concatenate([above, np.flatnonzero(row == kth)[:k - len(above)]])
    return t[np.lexsort((t, -row[t]))]


def first_relevant_rank(row: np.ndarray, relevant: set[int]) -> int:
    """1-based rank of the best-placed relevant row in the order ``top_rows`` uses (score,
    then row number): a relevant row tied with others ranks after the lower-numbered ones."""
    return 1 + min(int((row > row[r]).sum()) + int((row[:r] == row[r]).sum()) for r in relevant)


def evaluate(es: EvalSet, score: ScoreFn, *, recall_at=(1, 3, 5, 10, 20), risk_top_k: int = 3,
             chunk: int = 512) -> dict:
    """recall@k (share of a query's relevant guidelines in its top k, averaged), MRR (first
    relevant's reciprocal rank over the whole library) and the risk-identification rate
    (share of risky queries with a safety guideline among the top ``risk_top_k``). All three
    rank by score, ties by row number, so a query whose scores all tie (BM25 with no shared
    word) gets no credit it would not get from that order."""
    if not recall_at or min(recall_at) < 1 or risk_top_k < 1:
        raise ValueError("retrieval evaluation: the recall@k cut-offs and risk_top_k must be "
                         f">= 1, not recall_at={list(recall_at)}, risk_top_k={risk_top_k}")
    kmax = max(max(recall_at), risk_top_k)
    hits = {k: 0.0 for k in recall_at}
    rr = 0.0
    risky_n = risky_hit = 0
    n = len(es.queries)
    for s in range(0, n, chunk):
        scores = np.asarray(score(es.queries[s:s + chunk]), dtype=np.float64)
        if np.isnan(scores).any():
            raise ValueError("retrieval evaluation: the scorer returned NaN scores")
        for qi in range(len(scores)):
            row = scores[qi]
            t = top_rows(row, kmax)  # by score, ties by row number
            rel = es.relevant[s + qi]
            for k in recall_at:
                hits[k] += len(rel.intersection(t[:k].tolist())) / len(rel)
            rr += 1.0 / first_relevant_rank(row, rel)  # the same order as the top k
            if es.risky[s + qi]:
                risky_n += 1
                risky_hit += bool(es.safety[t[:risk_top_k]].any())
    out = {f"recall@{k}": round(hits[k] / n, 4) if n else None for k in recall_at}
    out["mrr"] = round(rr / n, 4) if n else None
    out["risk_identification"] = round(risky_hit / risky_n, 4) if risky_n else None
    out["queries"] = n
    out["risky_queries"] = risky_n
    return out


def render_table(results: dict[str, dict], recall_at=(1, 3, 5, 10, 20)) -> str:
    cols = [f"recall@{k}" for k in recall_at] + ["mrr", "risk_identification"]
    heads = [c.replace("recall@", "R@").replace("risk_identification", "risk-id") for c in cols]
    lines = [f"{'system':<12}" + "".join(f"{h:>9}" for h in heads)]
    lines.append("-" * len(lines[0]))
    for name, m in results.items():
        cells = "".join(f"{m[c]:>9.4f}" if isinstance(m.get(c), (int, float)) else f"{'-':>9}"
                        for c in cols)
        lines.append(f"{name:<12}{cells}")
    n = next(iter(results.values()), {})
    lines.append(f"({n.get('queries', 0)} held-out prompts, {n.get('risky_queries', 0)} risky)")
    return "\n".join(lines)
