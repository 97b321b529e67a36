"""Per-file checksums for artifact stages (a trained model, an index, the library).

An artifact stage records ``files`` in its ``_done.json``::

    mark_done(dst, ..., files=file_checksums(dst))

``guidealign verify`` then re-checksums each file against that list. The list maps a path
relative to the directory holding ``_done.json`` to ``{"sha256": ..., "bytes": ...}``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from guidealign.shards.write import file_sha256, fsync_dir

DONE = "_done.json"


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _checksum_synced(p: Path) -> dict:
    """sha256 and size of ``p``, after its data is on disk (fsync)."""
    with open(p, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
        os.fsync(f.fileno())
        return {"sha256": sha, "bytes": os.fstat(f.fileno()).st_size}


def file_checksums(root: str | Path, *, exclude: tuple[str, ...] = (DONE,)) -> dict:
    """sha256 and size of every regular file under ``root`` (hidden temp entries and files or
    directories named in ``exclude`` skipped), keyed by the path relative to ``root`` (POSIX
    separators).

    Each file, and each directory holding one, is fsynced on the way: the artifact's writers
    (faiss, torch, pyarrow) do not, and the ``_done.json`` written with these checksums is;
    after a power loss it must never commit files whose data was still in the page cache."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in exclude)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root)
            if name in exclude or _is_hidden(rel) or not p.is_file():
                continue
            out[rel.as_posix()] = _checksum_synced(p)
        fsync_dir(Path(dirpath))
    return out


def check_files(root: str | Path, files: dict) -> list[tuple[str, str, str]]:
    """Compare ``files`` (as :func:`file_checksums` returns) with the disk.

    Returns ``(kind, relpath, detail)`` for each problem; kind is ``missing`` or ``corrupt``.
    """
    root = Path(root)
    problems = []
    for rel, want in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            problems.append(("missing", rel, "listed in _done.json but absent"))
            continue
        size = p.stat().st_size
        if "bytes" in want and size != int(want["bytes"]):
            problems.append(("corrupt", rel, f"{size} bytes, _done.json says {want['bytes']}"))
            continue
        if "sha256" in want and file_sha256(p) != want["sha256"]:
            problems.append(("corrupt", rel, "sha256 differs from _done.json"))
    return problems


__all__ = ["file_checksums", "check_files"]
