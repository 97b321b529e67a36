"""The vectors the library's near-duplicate candidate search looks in (hashed character
n-grams, or sentence embeddings with the n-grams as well), for :func:`retrieval.dedup.cluster`."""
from __future__ import annotations

import time

import numpy as np

from guidealign.core.threads import set_threads


def library_vectors(keys: list[str], lc, space: str | None = None) -> np.ndarray:
    """The candidate-search vectors of ``keys`` in ``space`` ("ngram": hashed n-grams, "model":
    sentence embeddings; default ``lc.candidates``)."""
    from guidealign.retrieval.embed import encode, fold_marks, load_encoder, ngram_vectors

    space = space or lc.candidates
    if space == "ngram":  # accents folded: see fold_marks
        # beside model candidates at the default dimension: ngram_dim is for candidates=ngram
        # (a model library's fingerprint does not count it)
        dim = lc.ngram_dim if lc.candidates == "ngram" else type(lc)().ngram_dim
        return ngram_vectors([fold_marks(k) for k in keys], dim=dim)
    if space == "model":
        from guidealign.retrieval.faiss_gpu import num_gpus

        # FAISS's GPU probe (a child process, once per process; the clustering's FAISS asks
        # later) before the encoder takes a GPU here: on EXCLUSIVE_PROCESS GPUs it would find
        # them all taken after
        num_gpus(lc.use_gpu)
        set_threads(lc.threads)
        model = load_encoder(lc.embed_model)
        return encode(model, keys, batch_size=lc.batch_size)
    raise ValueError(f"library.candidates must be 'ngram' or 'model', not {space!r}")


def candidate_spaces(lc) -> tuple[str, ...]:
    """The spaces searched for near-duplicate candidates. With model candidates the n-grams too:
    the merge test, fuzz.ratio, is character-level, and the embedding puts text with typos in
    every word (ratio 0.90) at cosine 0.18 to its original, below min_cosine, so model
    neighbours alone kept such pairs apart. The n-gram search costs little beside the
    embedding (3,000 guidelines on 2 CPU cores: 0.3 s more search, 60 s or more of embedding)."""
    if lc.candidates not in ("ngram", "model"):
        raise ValueError(f"library.candidates must be 'ngram' or 'model', not {lc.candidates!r}")
    return ("model", "ngram") if lc.candidates == "model" else ("ngram",)


def candidate_vectors(keys: list[str], lc, secs: dict | None = None):
    """The vectors of ``keys`` in each of ``candidate_spaces(lc)`` in turn, for ``dedup.cluster``
    (only one space held at a time); the time spent making them is added to ``secs["vectors"]``."""
    for space in candidate_spaces(lc):
        t0 = time.perf_counter()
        vecs = library_vectors(keys, lc, space)
        if secs is not None:
            secs["vectors"] = secs.get("vectors", 0.0) + time.perf_counter() - t0
        yield vecs
        del vecs
