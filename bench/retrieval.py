"""Benchmarks of the retrieval package. Prints each figure; sizes are options.

1. dedup:  the library stage (explode, exact dedup, near-dup merge, pairs) over N synthetic
           guidelines with realistic near-duplicates (default 1,000,000 around 33,000 distinct
           ones, as in the paper's 767k -> 33k). Run in a child process: its time and peak RSS.
2. embed:  embedding throughput of our path (prompt shards -> arrow -> retrieval.embed.encode)
           vs a raw SentenceTransformer.encode on the same texts; the ratio (goal >= 0.9).
3. search: FAISS search QPS over a library of L random unit vectors (default 50,000, dim 384)
           for Q query vectors (default 1,000,000), top 20; flat, and optionally ivf/hnsw.
4. merge:  the library's near-duplicate merge (candidate search + fuzz.ratio + components, the
           config's `library` settings) against exhaustive comparison of every pair with
           fuzz.ratio, on M distinct rewrites (default 10,000) of M/25 guideline sentences
           (the paper's 767k -> 33k is ~23 a group), with word-level edits and with typos
           spread over every word: library size ours / exhaustive (1.0: every merge found;
           the search can only miss merges, never add one), and the time of each.
5. bm25:   the retriever evaluation's BM25 baseline (one sparse product per batch of queries)
           against rank_bm25's BM25Okapi (a Python loop over every document for each query
           token) on Q queries (default 500) over a library of L synthetic guidelines (default
           33,000, the paper's size): queries/s of each, the ratio, and the largest difference
           of their scores.

    .venv/bin/python bench/retrieval.py                       # everything, default sizes
    .venv/bin/python bench/retrieval.py --only dedup --guidelines 200000
    .venv/bin/python bench/retrieval.py --only search --queries 100000 --kinds flat,hnsw
    .venv/bin/python bench/retrieval.py --only merge --merge-texts 5000 --set library.neighbors=10
    .venv/bin/python bench/retrieval.py --only bm25 --bm25-queries 200
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tests/synthetic.py: the synthetic library


def _dedup_child(workdir: str, threshold: float, overrides: list[str]) -> None:
    """Runs in a child process so that its peak RSS is the library stage's alone."""
    from guidealign.config import load_config
    from guidealign.retrieval.library import run_library

    cfg = load_config(overrides=[f"library.fuzzy_threshold={threshold}", *overrides])
    t0 = time.perf_counter()
    rep = run_library(cfg, workdir, progress=False)
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"seconds": dt, "peak_rss_mib": rss, "report": rep.__dict__}))


def bench_dedup(n: int, n_base: int, per_prompt: int, threshold: float, overrides=()) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from guidealign.retrieval.embed import normalize_text
    from synthetic import synthetic_library, write_guideline_shards

    t0 = time.perf_counter()
    texts, origin = synthetic_library(n, n_base, seed=0)
    rows = [{"id": f"p{i:08d}", "prompt": f"prompt {i}", "risky": i % 2 == 0,
             "guidelines": [{"title": "", "text": t} for t in texts[s:s + per_prompt]]}
            for i, s in enumerate(range(0, n, per_prompt))]
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as d:
        write_guideline_shards(Path(d) / "guidelines", rows, shard_rows=20_000)
        del rows
        gen_s = time.perf_counter() - t0
        sets = [a for o in overrides for a in ("--set", o)]
        out = subprocess.run([sys.executable, __file__, "--dedup-child", d, "--threshold", str(threshold),
                              *sets],
                             capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        res = json.loads(out.stdout.strip().splitlines()[-1])
        # purity against the planted truth: does a cluster ever mix two distinct guidelines,
        # and is a guideline's family ever split over clusters?
        origin_of = {}
        for t, o in zip(texts, origin):
            origin_of.setdefault(normalize_text(t), o)
        import pyarrow as pa
        import guidealign.shards as shards

        lib = pa.concat_tables(list(shards.iter_tables(Path(d) / "library", ["text", "members"])))
        canon_origin = np.array([origin_of[normalize_text(t)] for t in lib.column("text").to_pylist()])
        split = len(canon_origin) - len(np.unique(canon_origin))
        held = pq.read_metadata(Path(d) / "library" / "pairs" / "heldout.parquet").num_rows
    rep = res["report"]
    print(f"[dedup] {n:,} guidelines ({n_base:,} distinct + rewrites/repeats; {per_prompt} per prompt):")
    print(f"  sizes: exploded {rep['exploded']:,} -> exact {rep['after_exact']:,} -> "
          f"near {rep['after_near']:,} (planted distinct: {n_base:,}; families split over >1 "
          f"cluster: {split:,}); {rep['candidate_pairs']:,} candidate pairs, "
          f"{rep['confirmed_pairs']:,} confirmed; search {rep['search']}; held-out pairs {held:,}")
    print(f"  time: {res['seconds']:.1f} s  (steps: {rep['seconds']})")
    print(f"  peak RSS: {res['peak_rss_mib']:.0f} MiB   (data generation, not timed: {gen_s:.0f} s)")
    return {"n": n, "seconds": res["seconds"], "peak_rss_mib": res["peak_rss_mib"],
            "after_exact": rep["after_exact"], "after_near": rep["after_near"], "split_families": split}


def bench_merge(n: int, kinds: list[str], threshold: float, overrides=()) -> dict:
    import numpy as np

    from guidealign.config import load_config
    from guidealign.retrieval.dedup import cluster, components, exhaustive_pairs
    from guidealign.retrieval.library_candidates import candidate_vectors
    from synthetic import rewrite_families

    lc = load_config(overrides=[f"library.fuzzy_threshold={threshold}", *overrides]).library
    out = {"n": n, "neighbors": lc.neighbors, "min_cosine": lc.min_cosine,
           "candidates": lc.candidates}
    print(f"[merge] {n:,} distinct texts around {max(1, n // 25):,} sentences; library.candidates="
          f"{lc.candidates}, neighbors={lc.neighbors}, min_cosine={lc.min_cosine}, threshold={threshold}")
    for kind in kinds:
        texts = rewrite_families(n, max(1, n // 25), seed=0, kind=kind)
        t0 = time.perf_counter()
        # every space the library searches (with model candidates, the n-grams too)
        vecs = candidate_vectors(texts, lc)
        labels, st = cluster(texts, vecs, threshold=threshold, k=lc.neighbors, min_cosine=lc.min_cosine,
                             exact_max=lc.exact_search_max, nprobe=lc.nprobe, use_gpu=lc.use_gpu)
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ex = exhaustive_pairs(texts, threshold)
        ex_labels, ex_pairs = components(n, ex), len(ex)
        ex_s = time.perf_counter() - t0
        ours = int(np.count_nonzero(labels == np.arange(n)))
        exact = int(np.count_nonzero(ex_labels == np.arange(n)))
        # ours can only split an exhaustive cluster: each of its merges is a confirmed pair
        mixed = len({(a, b) for a, b in zip(labels.tolist(), ex_labels.tolist())}) - ours
        r = {"library_ours": ours, "library_exhaustive": exact, "size_ratio": ours / exact,
             "merges_found": (n - ours) / max(1, n - exact), "pairs_confirmed": st.confirmed_pairs,
             "pairs_exhaustive": ex_pairs, "seconds_ours": ours_s, "seconds_exhaustive": ex_s,
             "clusters_mixed": mixed}
        out[kind] = r
        print(f"  {kind}: library {ours:,} vs exhaustive {exact:,} (ours / exhaustive "
              f"{r['size_ratio']:.3f}; merges found {r['merges_found']:.2%}); pairs confirmed "
              f"{st.confirmed_pairs:,} of {ex_pairs:,}; {ours_s:.1f} s vs {ex_s:.1f} s exhaustive"
              + (f"; {mixed} clusters mix two exhaustive ones (a bug)" if mixed else ""))
    return out


def bench_embed(n: int, batch_size: int, repeats: int) -> dict:
    import guidealign.shards as shards
    from guidealign.retrieval.embed import encode, load_encoder
    from synthetic import synthetic_library, write_prompt_shards

    texts, _ = synthetic_library(n, max(1, n // 3), seed=1)
    model = load_encoder("embedded:all-minilm-l6-v2", device="cpu")
    model.encode(texts[:64], batch_size=batch_size)  # warm-up
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as d:
        write_prompt_shards(Path(d) / "prompts", [{"id": str(i), "prompt": t} for i, t in enumerate(texts)],
                            shard_rows=max(1, n // 4))

        def ours():
            for table in shards.iter_tables(Path(d) / "prompts", ["prompt"]):
                encode(model, table.column("prompt").to_pylist(), batch_size=batch_size)

        def raw():
            model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                         convert_to_numpy=True, show_progress_bar=False)

        best = {"raw": float("inf"), "ours": float("inf")}
        for _ in range(repeats):  # interleaved, best of each: the machine is shared
            for name, fn in (("raw", raw), ("ours", ours)):
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    raw_tps, ours_tps = n / best["raw"], n / best["ours"]
    ratio = ours_tps / raw_tps
    print(f"[embed] {n:,} texts, batch {batch_size}, best of {repeats}: raw encode {raw_tps:,.0f} texts/s, "
          f"ours {ours_tps:,.0f} texts/s, ratio {ratio:.3f} (goal >= 0.9)")
    return {"n": n, "raw_tps": raw_tps, "ours_tps": ours_tps, "ratio": ratio}


def bench_bm25(n_lib: int, n_q: int) -> dict:
    import numpy as np
    from rank_bm25 import BM25Okapi

    from guidealign.retrieval.evaluate import bm25_scorer, tokenize
    from synthetic import synthetic_library

    docs, _ = synthetic_library(n_lib, max(1, n_lib // 3), seed=2)
    queries, _ = synthetic_library(n_q, max(1, n_q // 2), seed=3)
    t0 = time.perf_counter()
    ours = bm25_scorer(docs)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = np.concatenate([ours(queries[i:i + 256]) for i in range(0, n_q, 256)])
    ours_s = time.perf_counter() - t0
    ref = BM25Okapi([tokenize(d) or [""] for d in docs])
    t0 = time.perf_counter()
    want = np.stack([ref.get_scores(tokenize(q)) for q in queries])
    ref_s = time.perf_counter() - t0
    diff = float(np.abs(got - want).max())
    r = {"library": n_lib, "queries": n_q, "ours_qps": n_q / ours_s, "rank_bm25_qps": n_q / ref_s,
         "ratio": ref_s / ours_s, "build_s": built, "max_abs_diff": diff}
    print(f"[bm25] {n_q:,} queries over {n_lib:,} guidelines: ours {r['ours_qps']:,.0f} queries/s "
          f"(built in {built:.2f} s), rank_bm25 {r['rank_bm25_qps']:,.1f} queries/s: {r['ratio']:.0f}x; "
          f"largest score difference {diff:.1e}")
    return r


def bench_search(n_lib: int, n_q: int, dim: int, k: int, kinds: list[str]) -> dict:
    import numpy as np

    from guidealign.config.retrieval import IndexConfig
    from guidealign.retrieval.faiss_gpu import num_gpus, to_gpus
    from guidealign.retrieval.index import build_faiss

    rng = np.random.default_rng(0)
    lib = rng.standard_normal((n_lib, dim), dtype=np.float32)
    lib /= np.linalg.norm(lib, axis=1, keepdims=True)
    out = {}
    for kind in kinds:
        ic = IndexConfig(kind=kind)
        t0 = time.perf_counter()
        index, name = build_faiss(lib, ic)
        index = to_gpus(index, kind)  # sharded over all GPUs when there are any
        name += f" on {num_gpus()} GPU(s)" if num_gpus() and kind != "hnsw" else " on CPU"
        build_s = time.perf_counter() - t0
        done, t_search = 0, 0.0
        chunk = 50_000
        while done < n_q:
            m = min(chunk, n_q - done)
            q = rng.standard_normal((m, dim), dtype=np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            t0 = time.perf_counter()
            index.search(q, k)
            t_search += time.perf_counter() - t0
            done += m
        qps = n_q / t_search
        print(f"[search] {name}: library {n_lib:,} x {dim}, {n_q:,} queries, top {k}: {qps:,.0f} QPS "
              f"({t_search:.1f} s search, {build_s:.1f} s build); 1M queries would take {1e6 / qps:.0f} s")
        out[kind] = {"qps": qps, "build_s": build_s, "queries": n_q}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["dedup", "embed", "search", "merge", "bm25"], action="append")
    ap.add_argument("--guidelines", type=int, default=1_000_000, help="dedup: guidelines in all")
    ap.add_argument("--distinct", type=int, default=0, help="dedup: distinct ones (0: 3.3%% of them)")
    ap.add_argument("--per-prompt", type=int, default=5, help="dedup: guidelines per prompt")
    ap.add_argument("--threshold", type=float, default=0.75)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dedup: config override for the library stage, e.g. library.ngram_dim=128")
    ap.add_argument("--embed-texts", type=int, default=2000)
    ap.add_argument("--embed-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--library", type=int, default=50_000, help="search: library vectors")
    ap.add_argument("--queries", type=int, default=1_000_000, help="search: query vectors")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--kinds", default="flat", help="search: comma-separated index kinds")
    ap.add_argument("--merge-texts", type=int, default=10_000,
                    help="merge: distinct texts (exhaustive comparison is quadratic: 10,000 ~ 20 s here)")
    ap.add_argument("--merge-kinds", default="words,typos", help="merge: edit kinds (words, typos)")
    ap.add_argument("--bm25-library", type=int, default=33_000, help="bm25: library guidelines")
    ap.add_argument("--bm25-queries", type=int, default=500, help="bm25: queries")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--dedup-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.dedup_child:
        _dedup_child(a.dedup_child, a.threshold, a.overrides)
        return
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    parts = a.only or ["dedup", "embed", "search", "merge", "bm25"]
    res = {}
    if "dedup" in parts:
        res["dedup"] = bench_dedup(a.guidelines, a.distinct or max(1, round(a.guidelines * 0.033)),
                                   a.per_prompt, a.threshold, a.overrides)
    if "embed" in parts:
        res["embed"] = bench_embed(a.embed_texts, a.embed_batch, a.repeats)
    if "search" in parts:
        res["search"] = bench_search(a.library, a.queries, a.dim, 20, a.kinds.split(","))
    if "merge" in parts:
        res["merge"] = bench_merge(a.merge_texts, a.merge_kinds.split(","), a.threshold, a.overrides)
    if "bm25" in parts:
        res["bm25"] = bench_bm25(a.bm25_library, a.bm25_queries)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
