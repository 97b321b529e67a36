"""What a push sends: the directory a name points at, and its files with their paths in the repo.

A stage's shards go as `data/shard-NNNNN.parquet` with the sha256 their markers carry (so they
are not hashed again); a model directory goes file by file (huggingface_hub hashes those).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class PushError(RuntimeError):
    """A push that cannot start: no repo id, an unfinished stage, nothing to push."""


@dataclass
class LocalFile:
    """One file to push: where it goes in the repo, where it is here, its size and, when
    known already, its sha256 (hex)."""
    path_in_repo: str
    local: Path
    size: int
    sha256: str | None = None


def local_file(path_in_repo: str, local: Path, sha256: str | None = None) -> LocalFile:
    """A LocalFile for ``local`` (its size read from the file system)."""
    return LocalFile(path_in_repo, local, local.stat().st_size, sha256)


def resolve_target(workdir, what: str) -> tuple[str, Path]:
    """("dataset" | "model", directory) for a stage name under WORKDIR, "model"/"sft", or a path."""
    from guidealign.shards import read_manifest

    wd = Path(workdir)
    if what in ("sft", "model"):
        d = wd / "sft" / "model"
        if not (d / "config.json").exists() and not (d / "adapter_config.json").exists():
            raise PushError(f"{d} holds no trained model: run `guidealign sft` first")
        return "model", d
    d = Path(what) if (os.sep in what or Path(what).is_absolute()) else wd / what
    if read_manifest(d) is not None:
        return "dataset", d
    if (d / "config.json").exists():
        return "model", d
    raise PushError(f"{d} is neither a stage's shard directory (no _stage.json) nor a model dir")


def dataset_files(d: Path, data_dir: str) -> tuple[list[LocalFile], int]:
    """The committed shards of a complete stage (with the sha256 of their markers) and the
    number of rows they hold; PushError when a shard is not committed."""
    from guidealign.shards import read_manifest, read_marker
    from guidealign.shards.layout import shard_path
    from guidealign.shards.manifest import shard_states

    man = read_manifest(d)
    st = shard_states(d)
    if st is not None and st[1]:
        raise PushError(f"{d} is incomplete: shard(s) {st[1][:5]} were committed under another config "
                        "or input (finish the stage first)")
    out, rows = [], 0
    for i in range(int(man["num_shards"])):
        m = read_marker(d, i)
        p = shard_path(d, i)
        if m is None or not p.exists() or p.stat().st_size != m.bytes:
            raise PushError(f"{d} is incomplete: shard {i} is not committed (finish the stage first)")
        rows += m.rows
        out.append(local_file(f"{data_dir}/{p.name}", p, sha256=m.sha256))
    return out, rows


def model_files(d: Path) -> list[LocalFile]:
    """Every file of a model directory except hidden ones, the card (README.md) last, so that a
    repo with a card is a complete one."""
    out = []
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_file() and not rel.startswith(".") and "/." not in rel:
            out.append(local_file(rel, p))
    out.sort(key=lambda f: f.path_in_repo == "README.md")
    return out
