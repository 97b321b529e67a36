"""Near-duplicate merging: FAISS nearest neighbours as candidates, rapidfuzz to confirm,
connected components (scipy) to build clusters.

Comparing every pair is quadratic; instead each (already exactly de-duplicated) guideline
asks a FAISS index for its ``k`` nearest neighbours, candidates below a loose cosine floor
are dropped, the rest are confirmed with ``fuzz.ratio >= threshold``, and the clusters are
the connected components of the graph of confirmed pairs (what a union-find over the pairs
gives). Above ``exact_search_max`` vectors the search is IVF (approximate). Several candidate
spaces (the library's model candidates come with n-gram ones) give the union of their pairs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Cluster labels of 0..n-1 joined by the edges ``pairs`` (shape (m, 2)): each element's
    label is the smallest index in its connected component (so a label is itself a member,
    and labels do not depend on the order of the pairs)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.empty(0, dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    _, first = np.unique(comp, return_index=True)  # per component, its first (smallest) member
    return first[comp].astype(np.int64)


@dataclass
class DedupStats:
    items: int = 0
    candidate_pairs: int = 0
    confirmed_pairs: int = 0
    merges: int = 0
    clusters: int = 0
    search: str = "flat"
    seconds: dict = field(default_factory=dict)


def build_search_index(vecs: np.ndarray, *, exact_max: int, nprobe: int, seed: int = 1234):
    import faiss

    n, d = vecs.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
        index.add(vecs)
        return index, "flat"
    nlist = min(max(1, int(4 * math.sqrt(n))), max(1, n // 39))  # FAISS wants ~39 points a list
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = vecs[np.sort(rng.choice(n, size=min(n, nlist * 40), replace=False))]
    index.cp.seed = seed
    index.train(sample)
    index.add(vecs)
    index.nprobe = nprobe
    return index, f"ivf{nlist},nprobe{nprobe}"


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-D array by a sort: numpy 2.3's ``np.unique`` of 9.3M mostly distinct
    int64 took 9.7 CPU-s here, ``np.sort`` 0.2."""
    y = np.sort(x)
    return y[np.concatenate(([True], y[1:] != y[:-1]))] if len(y) else y


def candidate_pairs(vecs: np.ndarray, *, k: int, min_cosine: float, exact_max: int = 50_000,
                    nprobe: int = 8, chunk: int = 65_536, use_gpu: bool | str = "auto") -> tuple[np.ndarray, str]:
    """Unique (i, j), i < j, pairs among each row's ``k`` nearest neighbours with cosine >= min_cosine."""
    n = len(vecs)
    if n < 2 or k < 1:
        return np.empty((0, 2), dtype=np.int64), "none"
    index, kind = build_search_index(vecs, exact_max=exact_max, nprobe=nprobe)
    kk = min(k + 1, n)
    if use_gpu:
        from guidealign.retrieval.faiss_gpu import num_gpus, to_gpus

        gpu_index = to_gpus(index, "flat", use_gpu, k=kk)  # the CPU index when the GPU probe failed
        if gpu_index is not index:
            index, kind = gpu_index, f"{kind},gpu{num_gpus(use_gpu)}"
    parts = []
    for s in range(0, n, chunk):
        sims, nbrs = index.search(vecs[s:s + chunk], kk)
        rows = np.repeat(np.arange(s, s + len(nbrs), dtype=np.int64), kk).reshape(len(nbrs), kk)
        # a tiny tolerance: the search computes float32 cosines, and min_cosine is inclusive
        # ("yes." vs "yes!": one trigram of two shared, cosine 0.5 computed as 0.49999997)
        keep = (nbrs >= 0) & (nbrs != rows) & (sims >= min_cosine - 1e-5)
        a, b = rows[keep], nbrs[keep].astype(np.int64)
        # each pair (i < j) as one int64, i * n + j (n < 2**31): half the memory of two columns
        parts.append(np.minimum(a, b) * n + np.maximum(a, b))
    code = sorted_unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
    return np.stack([code // n, code % n], axis=1), kind


def confirm_pairs(texts: list[str], pairs: np.ndarray, threshold: float, chunk: int = 500_000) -> np.ndarray:
    """The pairs whose rapidfuzz ``fuzz.ratio`` is >= ``threshold`` (0..1)."""
    from rapidfuzz import fuzz, process

    if not len(pairs):
        return pairs
    keep = np.zeros(len(pairs), dtype=bool)
    cutoff = threshold * 100.0
    for s in range(0, len(pairs), chunk):
        p = pairs[s:s + chunk]
        a = [texts[i] for i in p[:, 0]]
        b = [texts[j] for j in p[:, 1]]
        scores = process.cpdist(a, b, scorer=fuzz.ratio, workers=-1, dtype=np.float32)
        # a tiny tolerance: cpdist returns float32, the paper's threshold is inclusive
        keep[s:s + len(p)] = scores >= cutoff - 1e-4
    return pairs[keep]


def exhaustive_pairs(texts: list[str], threshold: float, block: int = 2000) -> np.ndarray:
    """Every pair (i < j) whose ``fuzz.ratio`` is >= ``threshold``, by comparing all pairs
    (quadratic: the reference that the candidate search is measured against, in
    ``bench/retrieval.py --only merge`` and the tests; 10,000 texts take ~20 s on 2 cores)."""
    from rapidfuzz import fuzz, process

    cut = threshold * 100.0 - 1e-4  # as confirm_pairs: float32 scores, an inclusive threshold
    parts = [np.empty((0, 2), dtype=np.int64)]
    for s in range(0, len(texts), block):
        m = process.cdist(texts[s:s + block], texts, scorer=fuzz.ratio, workers=-1,
                          dtype=np.float32, score_cutoff=cut)
        i, j = np.nonzero(m >= cut)
        i = i + s
        parts.append(np.stack([i[i < j], j[i < j]], axis=1).astype(np.int64))
    return np.concatenate(parts)


def short_pairs(texts: list[str], vecs: np.ndarray, threshold: float) -> np.ndarray:
    """Candidate pairs the vectors cannot give: a text with an all-zero vector (too short for
    one n-gram, e.g. "No") against every text short enough for ``fuzz.ratio`` to reach
    ``threshold`` with it (ratio = 2 * matches / total length, so at most len * (2 / t - 1))."""
    zero = np.flatnonzero(~vecs.any(axis=1)) if len(vecs) else np.empty(0, dtype=np.int64)
    if not zero.size or threshold <= 0:
        return np.empty((0, 2), dtype=np.int64)
    lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    near = np.flatnonzero(lens <= int(lens[zero].max() * (2.0 / threshold - 1.0)))
    i, j = np.repeat(zero, near.size), np.tile(near, zero.size)
    keep = i != j
    pairs = np.stack([np.minimum(i, j)[keep], np.maximum(i, j)[keep]], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def cluster(texts: list[str], vecs, *, threshold: float, k: int, min_cosine: float,
            exact_max: int = 50_000, nprobe: int = 8, use_gpu: bool | str = "auto") -> tuple[np.ndarray, DedupStats]:
    """Cluster labels for near-duplicate ``texts`` with vectors ``vecs``: per text, the smallest
    index of its cluster (see :func:`components`).

    ``vecs``: one array, or several candidate spaces (an iterable of arrays, one row per text,
    each searched in turn and then let go): the candidates are the union of theirs."""
    import time

    stats = DedupStats(items=len(texts))
    t0 = time.perf_counter()
    parts, kinds = [np.empty((0, 2), dtype=np.int64)], []
    for v in ([vecs] if isinstance(vecs, np.ndarray) else vecs):
        p, kind = candidate_pairs(v, k=k, min_cosine=min_cosine, exact_max=exact_max,
                                  nprobe=nprobe, use_gpu=use_gpu)
        parts += [p.reshape(-1, 2), short_pairs(texts, v, threshold)]
        kinds.append(kind)
        del v
    stats.search = "+".join(kinds) or "none"
    pairs = np.concatenate(parts).astype(np.int64)
    if len(kinds) > 1 and len(pairs):  # a pair found in two spaces is confirmed once
        n = max(len(texts), 1)
        code = sorted_unique(pairs[:, 0] * n + pairs[:, 1])
        pairs = np.stack([code // n, code % n], axis=1)
    stats.candidate_pairs = len(pairs)
    t1 = time.perf_counter()
    ok = confirm_pairs(texts, pairs, threshold)
    stats.confirmed_pairs = len(ok)
    t2 = time.perf_counter()
    labels = components(len(texts), ok)
    stats.clusters = int(np.count_nonzero(labels == np.arange(len(texts))))  # one root per cluster
    stats.merges = len(texts) - stats.clusters
    stats.seconds = {"search": round(t1 - t0, 3), "confirm": round(t2 - t1, 3),
                     "components": round(time.perf_counter() - t2, 3)}
    return labels, stats
