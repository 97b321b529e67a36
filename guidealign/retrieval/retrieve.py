"""``guidealign retrieve``: prompt shards -> the guidelines retrieved for each prompt.

Per input shard (via :func:`shards.map_shards`, so it is resumable and split by rank):
embed the prompts in batches with the index's encoder, search the top ``top_n``, walk
the candidates best first and drop any whose ``fuzz.ratio`` to one already kept is
``dedup_ratio`` or more (in the library's comparison form), keep ``keep``. Null or empty prompts go to the quarantine table.

Output columns: id, prompt, guideline_ids, guideline_texts, scores (cosine, best first).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from guidealign.core.threads import set_threads
from guidealign.config import prompt_set, wait_timeout
from guidealign.shards.artifact import NotReady, wait_done
from guidealign.shards import StageReport, fingerprint, map_shards

log = logging.getLogger(__name__)

RETRIEVE_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()),
    ("guideline_ids", pa.list_(pa.string())), ("guideline_texts", pa.list_(pa.string())),
    ("scores", pa.list_(pa.float32())),
])
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("reason", pa.string())])

# The retrieve keys that decide which guidelines a prompt gets (the others, batch_size and
# threads, change no result): recorded in the manifest as ``retrieve_settings``, so that eval
# retrieves for its benchmark as the run retrieved for the responses it was tuned on.
RESULT_SETTINGS = ("top_n", "keep", "dedup_ratio", "dedup_with_titles")


def select(cand: list[int], scores: list[float], texts: list[str], *, keep: int,
           dedup_ratio: float) -> list[tuple[int, float]]:
    """Walk candidates best first; skip one whose ratio to a kept one is >= dedup_ratio.

    ``texts``: what the library compared for each row when it merged its near-duplicates (its
    text, else its title; ``LoadedIndex.keys``), or with ``retrieve.dedup_with_titles`` the
    embedded "Title: text" (``LoadedIndex.texts``, as the authors' script compares), each in the
    library's comparison form (``embed.normalize_text``: NFKC, whitespace collapsed,
    case-folded): "AVOID harm." and "avoid harm" are one guideline to both, and, by the
    library's text, two guidelines that share only a title are two.

    Best first by score, ties by index row (lower first, as the evaluation ranks): FAISS lists
    tied rows in an order of its own (its CPU search: higher row first, while it keeps the lower
    rows at the top_n cut), so of two tied near-duplicates the survivor would depend on it."""
    from rapidfuzz import fuzz

    from guidealign.retrieval.embed import normalize_text

    # a tiny tolerance, as the library's (dedup.confirm_pairs): ratio >= dedup_ratio is inclusive,
    # and fuzz.ratio's float says 19.999999999999996 for a ratio of exactly 0.2
    cutoff = max(dedup_ratio * 100.0 - 1e-4, 0.0)
    kept: list[tuple[int, float]] = []
    kept_forms: list[str] = []
    for c, s in sorted(zip(cand, scores), key=lambda cs: (-cs[1], cs[0])):
        if c < 0:
            continue
        t = normalize_text(texts[c] or "")
        # fuzz.ratio returns 0.0 below the cutoff; compare, so a ratio of 0 counts at dedup_ratio 0
        if any(fuzz.ratio(t, k, score_cutoff=cutoff) >= cutoff for k in kept_forms):
            continue
        kept.append((c, s))
        kept_forms.append(t)
        if len(kept) >= keep:
            break
    return kept


def encoder_path(meta: dict, workdir: Path) -> str:
    """Where the index's encoder is now: the run's own retriever is found under this workdir
    (the index records its fingerprint, not the path it had, so a moved run still works).
    That retriever must be the one that embedded the index: one retrained since (another
    retriever config) sits in the same place, and its query vectors would be searched against
    the old one's library vectors."""
    ref = meta["model_ref"]
    if ref.startswith("retriever:"):
        from guidealign.retrieval.index import IndexVersionError
        from guidealign.retrieval.train import model_dir, retriever_dir
        from guidealign.shards.artifact import read_done

        want = ref.split(":", 1)[1]
        done = read_done(retriever_dir(workdir))
        have = done.get("fingerprint") if done else None
        if have != want:
            raise IndexVersionError(
                f"the index was embedded by the retriever {want}, but {retriever_dir(workdir)} holds "
                f"{'the retriever ' + str(have) if have else 'no complete retriever'}: rebuild the index "
                "(guidealign index) with the current retriever")
        from guidealign.retrieval.index import same_weights
        from guidealign.retrieval.train import weights_digest

        if not same_weights(meta, weights_digest(done)):
            raise IndexVersionError(
                f"the index was embedded by other weights of the retriever {want} than "
                f"{retriever_dir(workdir)} holds (retrained since): rebuild the index (guidealign index)")
        return str(model_dir(workdir))
    from guidealign.core.models import resolve

    return resolve(ref)


def make_shard_fn(cfg, workdir: Path):
    """Load the encoder and index once; return the per-shard function."""
    from guidealign.retrieval.embed import encode, load_encoder
    from guidealign.retrieval.index import index_dir, load_index
    from guidealign.retrieval.library_store import library_dir

    rc = cfg.retrieve
    set_threads(rc.threads)
    idx = load_index(index_dir(workdir), library_dir(workdir), use_gpu=cfg.index.use_gpu, k=rc.top_n)
    model = load_encoder(encoder_path(idx.meta, workdir))
    compared = idx.texts if rc.dedup_with_titles else idx.keys  # "Title: text", or the library's

    def fn(table: pa.Table, i: int):
        ids = table.column("id").to_pylist()
        prompts = table.column("prompt").to_pylist()
        good = [j for j, p in enumerate(prompts) if isinstance(p, str) and p.strip()]
        good_set = set(good)
        bad = [j for j in range(len(prompts)) if j not in good_set]
        out = {k: [] for k in RETRIEVE_SCHEMA.names}
        if good:
            q = encode(model, [prompts[j] for j in good], batch_size=rc.batch_size)
            sims, nbrs = idx.search(q, rc.top_n)
            for row, j in enumerate(good):
                kept = select(nbrs[row].tolist(), sims[row].tolist(), compared, keep=rc.keep,
                              dedup_ratio=rc.dedup_ratio)
                out["id"].append(ids[j])
                out["prompt"].append(prompts[j])
                out["guideline_ids"].append([idx.ids[c] for c, _ in kept])
                out["guideline_texts"].append([idx.texts[c] for c, _ in kept])
                out["scores"].append([float(s) for _, s in kept])
        quarantine = None
        if bad:
            quarantine = pa.table({"id": [ids[j] for j in bad],
                                   "prompt": [prompts[j] for j in bad],
                                   "reason": ["null prompt" if prompts[j] is None else
                                              "empty prompt" if isinstance(prompts[j], str) else
                                              f"prompt is not a string ({type(prompts[j]).__name__})"
                                              for j in bad]}, schema=QUARANTINE_SCHEMA)
        return pa.table(out, schema=RETRIEVE_SCHEMA), quarantine, {"prompts": len(good)}
    return fn


def run_retrieve(cfg, workdir: str | Path, *, rank: int = 0, world_size: int = 1, src: str | None = None,
                 dst: str = "retrieve", progress: bool = True, run_config: bool = True) -> StageReport:
    """Retrieve for every prompt of ``src`` (default: ``prompt_set(cfg, retrieve.prompts)``).

    ``run_config``: ``cfg`` is the config of the run in ``workdir``, so the index must be the
    one its library, index and retriever settings build (eval retrieves from links to a run's
    artifacts under a config of its own, and passes False: only versions and weights count)."""
    from guidealign.retrieval.index import IndexVersionError, check_version, index_dir, wait_current_index
    from guidealign.retrieval.library_store import library_dir

    rc = cfg.retrieve
    if not 1 <= rc.keep <= rc.top_n:
        raise ValueError("retrieve.keep must be between 1 and retrieve.top_n")
    if not 0 <= rc.dedup_ratio <= 1:
        raise ValueError(f"retrieve.dedup_ratio must be in [0, 1] (a fuzz.ratio / 100), not {rc.dedup_ratio}")
    workdir = Path(workdir)
    # No rank of this command builds the index: in `run` the index stage comes first (its other
    # ranks wait there for rank 0's), and alone (`launch retrieve`, a SLURM array, a Ray pool)
    # nothing builds it, so several workers waited out the stall clock (30 min) for nothing and
    # then blamed a dead rank. A missing or stale index fails at once (after
    # executor.wait_timeout_s when set), as for one worker.
    timeout = wait_timeout(cfg, 1)
    wait_done(index_dir(workdir), timeout=timeout)
    if run_config:  # an index of another library, index config or retriever: refused
        try:
            wait_current_index(cfg, workdir, timeout)
        except NotReady as e:
            raise IndexVersionError(
                f"{index_dir(workdir)} was built from another library (or the library from other "
                "guideline shards or under another library config), under another index config or by "
                "another encoder than this config's: run `guidealign index` (it builds the current "
                "one), then retrieve") from e
    # a stale index fails here, before any shard, and changes the fingerprint of every shard
    meta = check_version(index_dir(workdir), library_dir(workdir))
    encoder_path(meta, workdir)  # so does a retriever retrained since, also with nothing left to do
    # v3: near-duplicates compared by the library's comparison text, not the embedded "Title: text";
    # the encoder's weights too: a retriever retrained under its fingerprint gets a new index
    # and so new retrievals (the index's fingerprint names the retriever's config, not weights)
    titles = ["dedup_with_titles"] if rc.dedup_with_titles else []  # the default keeps v3's prints
    fp = fingerprint("retrieve-v3", rc.top_n, rc.keep, rc.dedup_ratio, meta["fingerprint"],
                     meta.get("model_weights"), *titles)
    src = src or prompt_set(cfg, rc.prompts)
    # which index the shards come from (status tells retrievals of an index rebuilt since)
    made_from = {"index_fingerprint": meta["fingerprint"], "index_weights": meta.get("model_weights"),
                 # and under which settings (for eval, which reads the run's; provenance only:
                 # the fingerprint above already counts them)
                 "retrieve_settings": {k: getattr(rc, k) for k in RESULT_SETTINGS}}
    return map_shards("retrieve", workdir / src, workdir / dst, fp,
                      make_fn=lambda: make_shard_fn(cfg, workdir), rank=rank, world_size=world_size,
                      columns=["id", "prompt"], progress=progress, record=made_from)
