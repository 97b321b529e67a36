"""Where the library lives and what it is: its directory and table schemas, its fingerprint
(the guideline shards and the library config it is built from) and its version (a hash of
its rows and pairs), and how the stages built on it (train-retriever, index, retrieve) wait
for it and read it. Built by :mod:`retrieval.library`."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from guidealign.config import wait_timeout
from guidealign.config.retrieval import LIBRARY_PERFORMANCE, LIBRARY_UNREAD
from guidealign.shards.artifact import read_done, wait_done
from guidealign.shards import fingerprint, iter_tables, read_manifest, wait_complete
from guidealign.shards.fingerprint import at_defaults
from guidealign.shards.manifest import input_checksums

LIBRARY_SCHEMA = pa.schema([
    ("guideline_id", pa.string()), ("title", pa.string()), ("text", pa.string()),
    ("kind", pa.string()), ("members", pa.int64()), ("prompt_ids", pa.list_(pa.string())),
])
PAIRS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("prompt", pa.string()), ("risky", pa.bool_()),
    ("guideline_id", pa.string()),
])
STAGE = "library"


def library_dir(workdir: str | Path) -> Path:
    return Path(workdir) / STAGE


def wait_library(cfg, workdir: str | Path, dst: str | Path, rank: int, world_size: int,
                 stale=None) -> str | None:
    """For the stages built on the library (train-retriever, index): rank 0 waits for the
    complete library and gets its version; the other ranks wait for ``dst``, which rank 0
    writes, and get None. They take ``dst`` only once the library is the one of this run's
    guideline shards and library config, and ``stale(dst's _done.json, that library's
    version)`` says nothing against it (it returns what makes ``dst`` another run's, or None):
    in a rerun rank 0 is about to rebuild the previous run's ``dst``, which is complete."""
    timeout = wait_timeout(cfg, world_size)
    lib = library_dir(workdir)
    src = Path(workdir) / cfg.library.src
    if rank != 0:
        want = None  # (without the guidelines here, e.g. a library copied alone: as rank 0 takes it)
        if read_manifest(src) is not None:
            wait_complete(src, timeout=timeout)
            want = library_fingerprint(cfg.library, src)

        def why(done: dict) -> str | None:
            have = read_done(lib)
            if have is None:
                return f"{lib} is not complete"
            if want is not None and have.get("fingerprint") != want:
                return (f"{lib} was built from other guidelines or with another library config than "
                        "this run's: the library stage rebuilds it first")
            return stale(done, have["version"]) if stale is not None else None

        wait_done(dst, timeout=timeout, accept=_accepting(why))
        return None
    wait_complete(lib, timeout=timeout)
    done = wait_done(lib, timeout=timeout)
    # rank 0 builds the library itself, so one of another config or other guidelines will not
    # change while it waits: say so now (the other ranks accept only what the current one gives;
    # without the guidelines here, e.g. a library copied alone, it is taken as it is)
    if read_manifest(src) is not None and done.get("fingerprint") != library_fingerprint(cfg.library, src):
        raise RuntimeError(f"{lib} was built from other guidelines or with another library config than "
                           f"this run's: run the library stage first (guidealign library)")
    return done["version"]


def _accepting(why):
    """``wait_done``'s ``accept`` from ``why(done)``, what a ``_done.json`` lacks (None: nothing).
    wait_done says a refused one's reason from accept's docstring: it is set to the last one."""
    def accept(done: dict) -> bool:
        accept.__doc__ = why(done)
        return accept.__doc__ is None
    return accept


def library_fingerprint(lc, src: Path, checksums: list[str] | None = None) -> str:
    """The fingerprint of the library built from the guideline shards in ``src`` with ``lc``
    (other ranks compute it to accept only a library, and an index, built from them)."""
    # v2: a guideline's kind is voted by the prompt sets its guidelines were written with;
    # v3: guidelines and prompts numbered in sorted order (the IVF search and the pairs files
    # do not depend on the read order), the version covers the pairs files; the performance
    # settings, and those the candidate space never reads, count at their defaults; v4: the
    # n-gram candidate vectors are made from the text with its accents folded (fold_marks), and
    # prompts that differ only in case share a split (heldout_flags); v5: no pairs for prompts
    # without text (they were pairs with an empty prompt), invisible titles as empty ones
    # model candidates: the n-gram ones too (candidate_spaces), so the libraries they built
    # before are rebuilt; the n-gram libraries keep their prints
    unread = LIBRARY_PERFORMANCE + LIBRARY_UNREAD.get(lc.candidates, ())
    also = ["with-ngram-candidates"] if lc.candidates == "model" else []
    return fingerprint("library-v5", at_defaults(lc, unread),
                       input_checksums(src) if checksums is None else checksums, *also)


def content_version(tables: list[pa.Table]) -> str:
    """A hash of the tables' schemas and rows (each as one Arrow IPC stream of one chunk)."""
    import hashlib

    h = hashlib.sha256()
    for t in tables:
        sink = pa.BufferOutputStream()
        t = t.combine_chunks().replace_schema_metadata(None)
        with pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        h.update(sink.getvalue())
    return h.hexdigest()[:20]


def library_version(d: str | Path) -> str | None:
    done = read_done(d)
    return done.get("version") if done else None


def read_library(workdir: str | Path, columns: list[str] | None = None) -> tuple[pa.Table, str]:
    """The whole library table (in guideline_id order) and its version; raises when absent."""
    d = library_dir(workdir)
    done = wait_done(d)
    tables = list(iter_tables(d, columns))
    table = pa.concat_tables(tables) if tables else LIBRARY_SCHEMA.empty_table()
    return table, done["version"]
