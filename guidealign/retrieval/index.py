"""``guidealign index``: embed the library (normalized) and build a FAISS inner-product index.

Output ``WORKDIR/index/``: ``index.faiss`` (always saved as a CPU index), ``rows.parquet``
(guideline_id, text, kind in index row order), ``meta.json`` (the library version it
indexes, the encoder, kind, dimension), then ``_done.json`` last.

Versioning: :func:`load_index` refuses an index whose library version differs from the
library's current one, since its row numbers would point at other guidelines.
GPU FAISS only where it works (``index.use_gpu``, see :mod:`guidealign.retrieval.faiss_gpu`):
the index is always built and saved on the CPU so that its file loads anywhere; flat and IVF
indexes are sharded over the GPUs for searching when FAISS's probe passed.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from guidealign.config import wait_timeout
from guidealign.config.retrieval import INDEX_PERFORMANCE, INDEX_UNREAD
from guidealign.core.threads import set_threads
from guidealign.retrieval.faiss_gpu import search_gpus, to_gpus
from guidealign.shards.artifact import build_dir, is_current, mark_done, read_done, wait_done
from guidealign.shards import fingerprint, write_json_atomic
from guidealign.shards.fingerprint import at_defaults

log = logging.getLogger(__name__)
STAGE = "index"
INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"
META_FILE = "meta.json"


class IndexVersionError(RuntimeError):
    """The index was built for another version of the library."""


class EmptyLibraryError(RuntimeError):
    """The library has no guideline to index (every generated guideline was empty)."""


@dataclass
class IndexReport:
    rows: int = 0
    kind: str = ""
    dim: int = 0
    gpus: int = 0
    library_version: str = ""
    seconds: dict = field(default_factory=dict)
    skipped: bool = False

    def summary(self) -> str:
        if self.skipped:
            return f"index: up to date ({self.rows} guidelines, library {self.library_version})"
        return (f"index: {self.rows} guidelines, {self.kind}, dim {self.dim}, "
                f"searched on {'%d GPU(s)' % self.gpus if self.gpus else 'the CPU'}, library {self.library_version}; "
                f"{self.seconds}")


def index_dir(workdir: str | Path) -> Path:
    return Path(workdir) / STAGE


def build_faiss(vecs: np.ndarray, ic) -> tuple[object, str]:
    """An inner-product index over unit vectors ``vecs`` (CPU index returned)."""
    import faiss

    n, d = vecs.shape
    if ic.kind == "flat":
        index, name = faiss.IndexFlatIP(d), "flat"
    elif ic.kind == "ivf":
        nlist = ic.nlist or max(1, int(4 * math.sqrt(max(n, 1))))
        if nlist > max(1, n // 39):  # FAISS wants ~39 training points per list
            if ic.nlist:
                log.warning("index.nlist %d is more lists than %d vectors can train (~39 each): "
                            "building %d lists (the index name records it)%s", ic.nlist, n,
                            max(1, n // 39), "; index.nprobe %d then searches every list" % ic.nprobe
                            if ic.nprobe >= max(1, n // 39) else "")
            nlist = max(1, n // 39)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234
        index.nprobe = ic.nprobe
        name = f"ivf{nlist}"
    elif ic.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, ic.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ic.ef_search
        name = f"hnsw{ic.hnsw_m}"
    else:
        raise ValueError(f"index.kind must be flat, ivf or hnsw, not {ic.kind!r}")
    # built (and saved) on the CPU: adding to flat/HNSW is cheap, and a CPU index file loads
    # anywhere; the GPUs serve the searches (load_index(use_gpu=True), retrieve, dedup)
    if not index.is_trained:
        index.train(vecs)
    index.add(vecs)
    return index, name


def model_ref(cfg, library_version: str) -> str:
    """What identifies the index's encoder in its fingerprint: the retriever of the current
    retriever config and library (its fingerprint, which any rank can compute), or ``index.model``."""
    if cfg.index.model == "retriever":
        from guidealign.retrieval.train import retriever_fingerprint

        return f"retriever:{retriever_fingerprint(cfg.retriever, library_version)}"
    return cfg.index.model


def index_fingerprint(cfg, library_version: str) -> str:
    """The fingerprint of the index of that library version under ``cfg`` (rank 0 builds it,
    the other ranks accept only an index that carries it)."""
    # the performance settings, and those the kind never reads, count at their defaults
    unread = INDEX_PERFORMANCE + INDEX_UNREAD.get(cfg.index.kind, ())
    return fingerprint("index-v1", at_defaults(cfg.index, unread), library_version,
                       model_ref(cfg, library_version))


def _encoder_ref(cfg, workdir: Path, library_version: str) -> tuple[str, str]:
    """(what to load, what identifies it for the fingerprint). The run's retriever is taken
    only when it was trained with the current retriever config on this library version: an
    index embedded by a stale retriever would carry a fingerprint that the other ranks (which
    compute the expected one) never accept."""
    ref = model_ref(cfg, library_version)
    if cfg.index.model == "retriever":
        from guidealign.retrieval.train import model_dir, retriever_dir

        want = ref.split(":", 1)[1]

        def current(done: dict) -> bool:
            """trained with another retriever config or on another library version"""
            return done.get("fingerprint") == want

        wait_done(retriever_dir(workdir), accept=current)
        return str(model_dir(workdir)), ref
    from guidealign.core.models import resolve

    return resolve(cfg.index.model), ref


def retriever_weights(cfg, workdir: Path) -> str | None:
    """With ``index.model: retriever``, the digest of the run's retriever's weights as they are
    now (``retrieval.train.weights_digest``; "" while no retriever is complete: being trained
    again), else None."""
    if cfg.index.model != "retriever":
        return None
    from guidealign.retrieval.train import retriever_dir, weights_digest

    done = read_done(retriever_dir(workdir))
    return weights_digest(done) if done else ""


def same_weights(recorded: dict, weights: str | None) -> bool:
    """Whether an index (its ``_done.json`` or meta) was embedded by the retriever weights
    ``weights``: one retrained under the same fingerprint has others, and its query vectors
    would be searched against the old weights' library vectors. An index or retriever that
    predates the record is taken as it is; none is while the retriever is incomplete."""
    if weights == "":  # no complete retriever now: no index is known to match it
        return False
    have = recorded.get("model_weights")
    return have is None or weights is None or have == weights


def wait_current_index(cfg, workdir: str | Path, timeout: float, poll: float = 5.0) -> dict:
    """Wait for rank 0's index, accepted only when it was built from the library of the
    current guideline shards and library config, with the current index config and encoder
    (its fingerprint: a rerun with a changed config never retrieves from the previous run's
    index). Returns the index's ``_done.json``."""
    from guidealign.retrieval.library_store import library_dir, library_fingerprint
    from guidealign.shards import wait_complete

    workdir = Path(workdir)
    src = workdir / cfg.library.src
    wait_complete(src, timeout=timeout, poll=poll)  # current guideline shards only
    want = library_fingerprint(cfg.library, src)

    def current(done: dict) -> bool:
        """built from another library version than the current one (or from other guideline shards, or under another library config), or with another index config or encoder"""
        lib = read_done(library_dir(workdir))
        return (bool(lib) and lib.get("fingerprint") == want and done.get("library_version") == lib.get("version")
                and done.get("fingerprint") == index_fingerprint(cfg, lib["version"])
                and same_weights(done, retriever_weights(cfg, workdir)))

    return wait_done(index_dir(workdir), timeout, poll, accept=current)


def run_index(cfg, workdir: str | Path, *, rank: int = 0, world_size: int = 1,
              progress: bool = True) -> IndexReport:
    from guidealign.retrieval.embed import doc_text, encode, load_encoder
    from guidealign.retrieval.library_store import library_dir, read_library, wait_library

    ic = cfg.index
    workdir = Path(workdir)
    dst = index_dir(workdir)
    if rank != 0:  # rank 0 builds it; take it only when built from the current library
        wait_current_index(cfg, workdir, timeout=wait_timeout(cfg, world_size))
        return IndexReport(skipped=True)
    version = wait_library(cfg, workdir, dst, rank, world_size)
    model_path, ref = _encoder_ref(cfg, workdir, version)
    weights = retriever_weights(cfg, workdir)
    fp = index_fingerprint(cfg, version)
    done = read_done(dst)
    if is_current(dst, fp) and same_weights(done, weights):
        return IndexReport(rows=done["rows"], kind=done.get("kind", ""), dim=done.get("dim", 0),
                           library_version=version, skipped=True)

    t0 = time.perf_counter()
    set_threads(ic.threads)
    library, _ = read_library(workdir, ["guideline_id", "title", "text", "kind"])
    if not library.num_rows:
        raise EmptyLibraryError(f"the library in {library_dir(workdir)} has no guidelines to index: "
                                "see its report.json (every generated guideline was empty?)")
    docs = [doc_text(t, x) for t, x in zip(library.column("title").to_pylist(),
                                           library.column("text").to_pylist())]
    # what retrieve will search on (its top_n and this index's nprobe decide as well); FAISS's
    # GPU probe (a child process) runs before the encoder takes a GPU in this process: on
    # EXCLUSIVE_PROCESS GPUs the probe would find them all taken after
    gpus = search_gpus(ic.kind, ic.use_gpu, k=cfg.retrieve.top_n, nprobe=ic.nprobe if ic.kind == "ivf" else 0,
                       warn=False)
    model = load_encoder(model_path)
    t1 = time.perf_counter()
    vecs = encode(model, docs, batch_size=ic.batch_size)
    t2 = time.perf_counter()
    index, name = build_faiss(vecs, ic)
    t3 = time.perf_counter()
    import faiss

    with build_dir(dst) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        pq.write_table(pa.table({"guideline_id": library.column("guideline_id"),
                                 "text": pa.array(docs, pa.string()),
                                 "kind": library.column("kind")}), tmp / ROWS_FILE)
        # the encoder by reference, not by path (retrieval.retrieve.encoder_path finds it), so a
        # moved run directory holds the same index
        meta = {"library_version": version, "model_ref": ref, "model_weights": weights,
                "kind": ic.kind, "name": name, "dim": int(vecs.shape[1]), "rows": len(docs),
                "nprobe": ic.nprobe, "ef_search": ic.ef_search}
        write_json_atomic(tmp / META_FILE, json.dumps(meta, indent=1))
    secs = {"load": round(t1 - t0, 3), "embed": round(t2 - t1, 3), "build": round(t3 - t2, 3),
            "total": round(time.perf_counter() - t0, 3)}
    mark_done(dst, fingerprint=fp, rows=len(docs), seconds=secs["total"], library_version=version,
              model_weights=weights, kind=name, dim=int(vecs.shape[1]), gpus=gpus, metrics=secs)
    rep = IndexReport(rows=len(docs), kind=name, dim=int(vecs.shape[1]), gpus=gpus,
                      library_version=version, seconds=secs)
    log.info(rep.summary())
    return rep


@dataclass
class LoadedIndex:
    index: object
    ids: list[str]
    texts: list[str]  # what was embedded: "Title: text"
    kinds: list[str]
    meta: dict
    fingerprint: str
    # what the library compared when it merged near-duplicates (its text, else its title):
    # retrieve's near-duplicate filter compares these, so two guidelines the library kept
    # apart are not dropped for sharing a title
    keys: list[str] = field(default_factory=list)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(q, dtype=np.float32), min(k, len(self.ids)))


def check_version(index_path: str | Path, library_path: str | Path) -> dict:
    """The index's meta, after checking it indexes the library's current version."""
    index_path, library_path = Path(index_path), Path(library_path)
    done = wait_done(index_path)
    meta = json.loads((index_path / META_FILE).read_text())
    lib_done = read_done(library_path)
    if lib_done is None:
        raise IndexVersionError(f"no complete library at {library_path} to check {index_path} against")
    if meta["library_version"] != lib_done.get("version"):
        raise IndexVersionError(
            f"the index at {index_path} was built for library version {meta['library_version']}, "
            f"but {library_path} is version {lib_done.get('version')}: rebuild it (guidealign index)")
    meta["fingerprint"] = done["fingerprint"]
    return meta


def load_index(index_path: str | Path, library_path: str | Path, *, use_gpu="auto", k: int = 0) -> LoadedIndex:
    """Load an index for searching (``k``: the most neighbours a search will ask for);
    :class:`IndexVersionError` when it indexes another library."""
    import faiss

    index_path = Path(index_path)
    meta = check_version(index_path, library_path)
    index = faiss.read_index(str(index_path / INDEX_FILE))
    rows = pq.read_table(index_path / ROWS_FILE)
    if meta["kind"] == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(meta.get("nprobe", 16))
    elif meta["kind"] == "hnsw":
        index.hnsw.efSearch = int(meta.get("ef_search", 128))
    if index.ntotal != rows.num_rows:
        raise IndexVersionError(f"{index_path}: index holds {index.ntotal} vectors for {rows.num_rows} rows")
    index = to_gpus(index, meta["kind"], use_gpu, k=k)
    ids = rows.column("guideline_id").to_pylist()
    texts = rows.column("text").to_pylist()
    from guidealign.shards import iter_tables

    # the library's text of a guideline is what it compared (its text, else its title)
    key_of = {}
    for t in iter_tables(Path(library_path), ["guideline_id", "text"]):
        key_of.update(zip(t.column("guideline_id").to_pylist(), t.column("text").to_pylist()))
    return LoadedIndex(index=index, ids=ids, texts=texts, kinds=rows.column("kind").to_pylist(),
                       meta=meta, fingerprint=meta["fingerprint"],
                       keys=[key_of.get(g, x) for g, x in zip(ids, texts)])
