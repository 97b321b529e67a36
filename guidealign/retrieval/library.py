"""``guidealign library``: guideline shards -> a de-duplicated guideline library.

Steps (each one's size goes to the report):
1. explode the guideline lists into single guidelines (empty ones are counted, not kept);
2. drop exact duplicates (comparison form: NFKC, case-folded, whitespace collapsed);
3. merge near-duplicates (``fuzz.ratio >= fuzzy_threshold``; candidates from hashed character
   n-grams, with ``candidates=model`` from sentence embeddings as well; see :mod:`retrieval.dedup`);
4. write training pairs (prompt_id, guideline_id), with a held-out split by prompt (none
   for a prompt without text, null or blank: counted, its guidelines kept).

Each cluster keeps one canonical guideline: its most frequent member (ties: the shorter,
then the lexicographically first comparison form). Its kind is "safety" when at least half
of the producing prompts were given safety guidelines (their ``kind``: for a prompt without a
verdict, what ``guidelines.unknown_verdict`` chose; shards without the column: their risky
flag), else "quality" (also when no producing prompt's kind is known). The guideline id is a hash of that
canonical text, so it is stable across reruns and across unrelated library changes; its title
and text are written as most of that member's occurrences wrote them (they may differ in case
or spacing), so they do not depend on the order the guideline shards are read in either.

Output ``WORKDIR/library/``: the library as a sharded table (``shard-*.parquet`` +
markers + ``_stage.json``; columns guideline_id, title, text, kind, members, prompt_ids),
``pairs/train.parquet`` and ``pairs/heldout.parquet`` (prompt_id, prompt, risky,
guideline_id), ``report.json``, and ``_done.json`` last, whose ``version`` (a hash of the
library shards and the pairs files) is what a retriever and an index are tied to. Guidelines and
prompts are numbered in sorted order, so nothing depends on the order the shards were read in.
"""
from __future__ import annotations

import hashlib
import logging
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from guidealign.config import wait_timeout
from guidealign.shards.artifact import build_dir, is_current, mark_done, read_done, wait_done
from guidealign.retrieval.embed import normalize_text
from guidealign.retrieval.library_candidates import candidate_vectors
from guidealign.retrieval.library_store import (LIBRARY_SCHEMA, PAIRS_SCHEMA, STAGE, content_version,
                                                library_dir, library_fingerprint)
from guidealign.retrieval.split import heldout_flags
from guidealign.shards import iter_batches, wait_complete, write_manifest, write_shard
from guidealign.shards.manifest import checksums_digest, input_checksums

log = logging.getLogger(__name__)


@dataclass
class LibraryReport:
    prompts: int = 0
    prompts_missing_id: int = 0
    prompts_without_guidelines: int = 0
    exploded: int = 0
    empty_dropped: int = 0
    after_exact: int = 0
    after_near: int = 0
    candidate_pairs: int = 0
    confirmed_pairs: int = 0
    safety: int = 0
    quality: int = 0
    pairs_train: int = 0
    pairs_heldout: int = 0
    prompts_heldout: int = 0
    # prompts with guidelines but no text (null or blank): in the library, not in the pairs
    prompts_without_text: int = 0
    pairs_without_prompt: int = 0
    search: str = ""
    seconds: dict = field(default_factory=dict)
    version: str = ""
    skipped: bool = False

    def summary(self) -> str:
        if self.skipped and not self.exploded:
            return "library: up to date, nothing to do"
        return (f"library: {self.prompts} prompts -> {self.exploded} guidelines exploded "
                f"({self.empty_dropped} empty dropped) -> {self.after_exact} after exact dedup -> "
                f"{self.after_near} after near-dup merge (ratio >= threshold; {self.candidate_pairs} "
                f"candidate pairs, {self.confirmed_pairs} confirmed, search {self.search}); "
                f"{self.safety} safety / {self.quality} quality; pairs {self.pairs_train} train / "
                f"{self.pairs_heldout} held-out ({self.prompts_heldout} held-out prompts)"
                + (f"; {self.pairs_without_prompt} pairs of {self.prompts_without_text} prompts without "
                   "text left out" if self.pairs_without_prompt else "")
                + (" [up to date]" if self.skipped else ""))


def _written_forms(forms: Counter) -> tuple[str, str]:
    """The title and the text a guideline is written with, from the ways its occurrences wrote
    them (``(title, text) -> count``; they differ in case or spacing only): each the most frequent,
    ties to the lexicographically first; the title among the non-empty ones ("" when none is).
    Counting makes the choice independent of the order the guidelines were read in."""
    titles, texts = Counter(), Counter()
    for (title, text), n in forms.items():
        if title:
            titles[title] += n
        texts[text] += n

    def most(c: Counter) -> str:
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] if c else ""

    return most(titles), most(texts)


def guideline_id(key: str) -> str:
    return "g" + hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _has_column(src: Path, name: str) -> bool:
    """Whether the committed shards of ``src`` have column ``name`` (the first one tells)."""
    import pyarrow.parquet as pq

    from guidealign.shards import committed
    from guidealign.shards.layout import shard_path

    done = committed(src)
    return bool(done) and name in pq.read_schema(shard_path(src, done[0])).names


def _kind(kind, risky) -> str | None:
    """The prompt set a prompt's guidelines were written with: its ``kind``, else its verdict."""
    if kind in ("safety", "quality"):
        return kind
    return None if risky is None else ("safety" if risky else "quality")


def _rank(kind, risky, prompt) -> tuple:
    """The order in which rows of one prompt id win: safety, quality, neither; a verdict of
    risky, of not, none; then the text (any total order: it only has to be the same each run)."""
    return ({"safety": 2, "quality": 1}.get(_kind(kind, risky) or "", 0),
            {True: 2, False: 1}.get(risky, 0), prompt or "")


def _visible(key: str) -> bool:
    """Whether a guideline's comparison text shows anything: not only spaces, format and
    control characters (a zero-width space, a BOM), which strip() and \\s leave."""
    return any(unicodedata.category(c)[0] not in "ZC" for c in key)


def run_library(cfg, workdir: str | Path, *, rank: int = 0, world_size: int = 1,
                progress: bool = True) -> LibraryReport:
    from guidealign.retrieval.dedup import cluster, sorted_unique

    lc = cfg.library
    workdir = Path(workdir)
    src = workdir / lc.src
    dst = library_dir(workdir)
    if rank != 0:  # a reduce stage: rank 0 builds, the others wait for it
        # for the library of these guidelines and this config, not any complete one: in a rerun
        # rank 0 is about to rebuild the previous run's (as the index's other ranks wait)
        wait_complete(src, timeout=wait_timeout(cfg, world_size))
        want = library_fingerprint(lc, src)

        def current(done: dict) -> bool:
            """built from other guidelines or with another library config than this run's"""
            return done.get("fingerprint") == want

        wait_done(dst, timeout=wait_timeout(cfg, world_size), accept=current)
        return LibraryReport(skipped=True)
    if not 0 < lc.fuzzy_threshold <= 1:
        raise ValueError("library.fuzzy_threshold must be in (0, 1]")
    wait_complete(src, timeout=wait_timeout(cfg, world_size))
    made_from = input_checksums(src)  # (status tells a library whose guidelines changed since)
    fp = library_fingerprint(lc, src, made_from)
    if is_current(dst, fp):
        done = read_done(dst)
        rep = LibraryReport(**{k: v for k, v in done.get("metrics", {}).items()
                               if k in LibraryReport.__dataclass_fields__})
        rep.skipped = True
        return rep

    t_start = time.perf_counter()
    rep = LibraryReport()
    secs: dict[str, float] = {}

    # 1. explode -------------------------------------------------------------------------
    t0 = time.perf_counter()
    prompt_text: dict[str, str] = {}
    prompt_risky: dict[str, bool | None] = {}
    prompt_kind: dict[str, str | None] = {}   # the prompt set its guidelines were written with
    occ_prompt: list[int] = []      # occurrence -> prompt number
    occ_unique: list[int] = []      # occurrence -> unique guideline number
    prompt_ids: list[str] = []
    prompt_no: dict[str, int] = {}
    key_index: dict[str, int] = {}
    u_keys: list[str] = []
    u_forms: list[Counter] = []     # (title, text) as written -> occurrences, per unique key
    cols = ["id", "prompt", "risky", "guidelines"]
    has_kind = _has_column(src, "kind")
    for batch in iter_batches(src, columns=cols + ["kind"] if has_kind else cols):
        kinds = batch.column("kind").to_pylist() if has_kind else [None] * batch.num_rows
        for (pid, prompt, risky, gls), kind in zip(zip(*(batch.column(c).to_pylist() for c in cols)), kinds):
            rep.prompts += 1
            if pid is None:  # counted in the report; such rows cannot be paired or cited
                rep.prompts_missing_id += 1
                continue
            if not gls:
                rep.prompts_without_guidelines += 1
                continue
            pno = prompt_no.get(pid)
            if pno is None:  # a repeated id (e.g. augmented copies) adds to the same prompt
                pno = prompt_no[pid] = len(prompt_ids)
                prompt_text[pid] = prompt or ""
                prompt_risky[pid] = risky
                prompt_kind[pid] = _kind(kind, risky)
                prompt_ids.append(pid)
            elif _rank(kind, risky, prompt) > _rank(prompt_kind[pid], prompt_risky[pid], prompt_text[pid]):
                # rows of one id that disagree: the same one wins in any read order (safety
                # over quality over none), so the library does not depend on the shards' order
                prompt_text[pid], prompt_risky[pid] = prompt or "", risky
                prompt_kind[pid] = _kind(kind, risky)
            kept_one = False
            for g in gls:
                g = g or {}
                title = (g.get("title") or "").strip()
                text = (g.get("text") or "").strip()
                if not _visible(text):  # a zero-width space: as empty (the title stands in)
                    text = ""
                if not _visible(title):  # as empty too: no "\u200b: text" embedded and shown
                    title = ""
                key = normalize_text(text or title)
                if not _visible(key):
                    rep.empty_dropped += 1
                    continue
                kept_one = True
                rep.exploded += 1
                u = key_index.get(key)
                if u is None:
                    u = key_index[key] = len(u_keys)
                    u_keys.append(key)
                    u_forms.append(Counter())
                u_forms[u][(title, text or title)] += 1
                occ_prompt.append(pno)
                occ_unique.append(u)
            if not kept_one:  # every guideline blank: as good as none
                rep.prompts_without_guidelines += 1
    del key_index
    # guidelines numbered in comparison-form order and prompts in id order, not in the order
    # they were read: the approximate (IVF) candidate search trains on, and the pairs files
    # list, rows in this order, so the library must not depend on the shards' order
    occ_prompt_a = np.asarray(occ_prompt, dtype=np.int64)
    occ_unique_a = np.asarray(occ_unique, dtype=np.int64)
    del occ_prompt, occ_unique
    by_key = sorted(range(len(u_keys)), key=u_keys.__getitem__)
    by_id = sorted(range(len(prompt_ids)), key=prompt_ids.__getitem__)
    if len(occ_unique_a):
        occ_unique_a = np.argsort(np.asarray(by_key, dtype=np.int64))[occ_unique_a]
        occ_prompt_a = np.argsort(np.asarray(by_id, dtype=np.int64))[occ_prompt_a]
    u_keys = [u_keys[i] for i in by_key]
    u_forms = [u_forms[i] for i in by_key]
    prompt_ids = [prompt_ids[i] for i in by_id]
    del by_key, by_id
    secs["explode"] = time.perf_counter() - t0

    # 2. exact duplicates are gone by construction of u_keys ------------------------------
    rep.after_exact = len(u_keys)
    u_count = np.bincount(occ_unique_a, minlength=len(u_keys))

    # 3. near duplicates ------------------------------------------------------------------
    secs["vectors"] = 0.0
    vecs = candidate_vectors(u_keys, lc, secs) if u_keys else [np.zeros((0, 1), np.float32)]
    labels, dstats = cluster(u_keys, vecs, threshold=lc.fuzzy_threshold, k=lc.neighbors,
                             min_cosine=lc.min_cosine, exact_max=lc.exact_search_max,
                             nprobe=lc.nprobe, use_gpu=lc.use_gpu)
    del vecs
    for k, v in dstats.seconds.items():
        secs[k] = v
    # the search consumed the vectors as it went: its time without theirs
    secs["search"] = max(secs.get("search", 0.0) - secs["vectors"], 0.0)
    rep.candidate_pairs, rep.confirmed_pairs, rep.search = (
        dstats.candidate_pairs, dstats.confirmed_pairs, dstats.search)

    # canonical member per cluster: most frequent, then shortest, then lexicographically first
    t0 = time.perf_counter()
    n_u = len(u_keys)
    lens = np.fromiter((len(k) for k in u_keys), dtype=np.int64, count=n_u)
    lex = np.empty(n_u, dtype=np.int64)
    lex[np.array(sorted(range(n_u), key=u_keys.__getitem__), dtype=np.int64)] = np.arange(n_u)
    order = np.lexsort((lex, lens, -u_count, labels))  # grouped by label, best member first
    first = np.ones(n_u, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    canon_of_root = dict(zip(labels[order][first].tolist(), order[first].tolist()))
    gid_of_root = {r: guideline_id(u_keys[c]) for r, c in canon_of_root.items()}
    # clusters numbered in guideline-id order (the library's row order), so the pairs files
    # do not depend on which member the clustering names as a cluster's label
    roots = sorted(canon_of_root, key=lambda r: (gid_of_root[r], r))
    cluster_no = {r: i for i, r in enumerate(roots)}
    canon = [canon_of_root[r] for r in roots]
    gids = [gid_of_root[r] for r in roots]
    rep.after_near = len(canon)

    u_cluster = np.fromiter((cluster_no[r] for r in labels.tolist()), dtype=np.int64, count=n_u)
    occ_cluster = u_cluster[occ_unique_a] if n_u else occ_unique_a
    members = np.bincount(occ_cluster, minlength=len(canon))
    # (cluster, prompt) pairs, unique, grouped by cluster
    cp = sorted_unique(occ_cluster * max(len(prompt_ids), 1) + occ_prompt_a)
    cp_cluster = cp // max(len(prompt_ids), 1)
    cp_prompt = cp % max(len(prompt_ids), 1)
    bounds = np.searchsorted(cp_cluster, np.arange(len(canon) + 1))
    safety_arr = np.array([prompt_kind[p] == "safety" for p in prompt_ids], dtype=bool)
    known_arr = np.array([prompt_kind[p] is not None for p in prompt_ids], dtype=bool)

    rows = []
    for c in range(len(canon)):
        ps = cp_prompt[bounds[c]:bounds[c + 1]]
        n_known = int(known_arr[ps].sum())
        n_safety = int(safety_arr[ps].sum())
        kind = "safety" if n_known and 2 * n_safety >= n_known else "quality"
        title, text = _written_forms(u_forms[canon[c]])
        rows.append((gids[c], title, text, kind, int(members[c]),
                     sorted(prompt_ids[p] for p in ps.tolist())))
    rows.sort(key=lambda r: r[0])
    rep.safety = sum(r[3] == "safety" for r in rows)
    rep.quality = len(rows) - rep.safety
    secs["canonical"] = time.perf_counter() - t0

    # 4. pairs ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    pair_rows = {"train": {k: [] for k in PAIRS_SCHEMA.names},
                 "heldout": {k: [] for k in PAIRS_SCHEMA.names}}
    held = heldout_flags(prompt_ids, [prompt_text[p] for p in prompt_ids], lc.heldout_fraction)
    # a prompt without text (null or blank; guideline shards from elsewhere: the guidelines
    # stage quarantines such prompts) keeps its guidelines in the library but gets no pair: an
    # empty anchor teaches the retriever nothing, and all of them would be one anchor text to
    # the sampler and one twin group to the split (retrieve quarantines such prompts too)
    has_text = [_visible(prompt_text[p]) for p in prompt_ids]
    textless: set[int] = set()
    for c in range(len(canon)):
        for p in cp_prompt[bounds[c]:bounds[c + 1]].tolist():
            if not has_text[p]:
                textless.add(p)
                rep.pairs_without_prompt += 1
                continue
            d = pair_rows["heldout" if held[p] else "train"]
            d["prompt_id"].append(prompt_ids[p])
            d["prompt"].append(prompt_text[prompt_ids[p]])
            d["risky"].append(prompt_risky[prompt_ids[p]])
            d["guideline_id"].append(gids[c])
    rep.pairs_train = len(pair_rows["train"]["prompt_id"])
    rep.pairs_heldout = len(pair_rows["heldout"]["prompt_id"])
    rep.prompts_heldout = len(set(pair_rows["heldout"]["prompt_id"]))
    rep.prompts_without_text = len(textless)
    if textless:
        log.warning("library: %d prompt(s) with guidelines have no text (null or blank): their %d "
                    "pair(s) are left out of the retriever's training and held-out pairs (their "
                    "guidelines stay in the library)", len(textless), rep.pairs_without_prompt)
    secs["pairs"] = time.perf_counter() - t0

    # write: temp dir, rename, _done.json last ----------------------------------------------
    t0 = time.perf_counter()
    table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(LIBRARY_SCHEMA.names)},
                     schema=LIBRARY_SCHEMA)
    with build_dir(dst) as tmp:
        n_shards = max(1, -(-table.num_rows // max(lc.shard_rows, 1)))
        write_manifest(tmp, stage=STAGE, num_shards=n_shards, fingerprint=fp, input=str(src))
        for i in range(n_shards):
            write_shard(tmp, i, table.slice(i * lc.shard_rows, lc.shard_rows), fp)
        (tmp / "pairs").mkdir()
        pairs = {split: pa.table(data, schema=PAIRS_SCHEMA) for split, data in pair_rows.items()}
        for split, t in pairs.items():
            pq.write_table(t, tmp / "pairs" / f"{split}.parquet")
        # the rows, not the files: how they are cut into shards (library.shard_rows) or what
        # wrote them is not a new version; the pairs count too: the retriever is trained (and
        # evaluated) on them, and it (and so the index) is current only for its version
        rep.version = content_version([table, *pairs.values()])
        secs["write"] = time.perf_counter() - t0
        secs["total"] = time.perf_counter() - t_start
        rep.seconds = {k: round(v, 3) for k, v in secs.items()}
        from guidealign.shards import write_json_atomic

        write_json_atomic(tmp / "report.json", asdict(rep))
    mark_done(dst, fingerprint=fp, rows=table.num_rows, seconds=secs["total"], version=rep.version,
              metrics=asdict(rep), input_checksums=checksums_digest(made_from))
    log.info(rep.summary())
    return rep
