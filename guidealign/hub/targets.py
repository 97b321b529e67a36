"""What a push sends: the directory a name points at, and its files with their paths in the repo.

A stage's shards go as `data/<version>/shard-NNNNN.parquet` (``versioned``: the version is a
hash of the shards' names and checksums, ``data_version``) with the sha256 their markers carry
(so they are not hashed again); a model directory goes file by file (huggingface_hub hashes
those).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)


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
    """("dataset" | "model", directory) for a stage name under WORKDIR, "model"/"sft", or a path
    (``target_dir``: a relative one is looked up under WORKDIR first)."""
    from guidealign.shards import read_manifest

    wd = Path(workdir)
    if what in ("sft", "model"):
        d = wd / "sft" / "model"
        if not (d / "config.json").exists() and not (d / "adapter_config.json").exists():
            raise PushError(f"{d} holds no trained model: run `guidealign sft` first")
        check_finished_model(d)
        return "model", d
    d = target_dir(wd, what)
    man = read_manifest(d)
    if man is not None and man.get("format") == "jsonl":
        # a push sends Parquet shards (the card's data_files name them): not an export's JSONL
        src = Path(str(man.get("input") or "")).name or "the stage it was made from"
        raise PushError(f"{d} is a JSONL export, and a push sends a stage's Parquet shards: push "
                        f"the dataset it was exported from instead (`guidealign push {src}`)")
    if man is not None:
        return "dataset", d
    if (d / "config.json").exists() or (d / "adapter_config.json").exists():
        if is_sft_output(d):  # a run's model named by its path: as finished as `model` must be
            check_finished_model(d)
        return "model", d
    where = "" if d.exists() else (
        ": it does not exist (WHAT names a stage under WORKDIR such as respond, `model`, a path under "
        "WORKDIR such as sft/model, or a path of your own: absolute, or starting with ./ or ../)")
    raise PushError(f"{d} is neither a stage's shard directory (no _stage.json) nor a model dir{where}")


def target_dir(wd: Path, what: str) -> Path:
    """The directory WHAT names: an absolute path (or one starting with ``./``, ``../``, ``~``)
    as it is; any other name under WORKDIR (``respond``, ``sft/model``, ``export/respond``),
    as every command's DATASET is, also when the command runs elsewhere; a path with a folder in
    it that is not under WORKDIR but here (the current directory) as a path of one's own."""
    p = Path(what).expanduser()
    if p.is_absolute() or what.startswith(("./", "../", "~")):
        return p
    under = wd / what
    if os.sep not in what or under.exists() or not p.exists():
        return under
    return p


def is_sft_output(d: Path) -> bool:
    """``d`` is (or links to) a run directory's SFT output, ``<run>/sft/model``."""
    real = d.resolve()
    return real.name == "model" and real.parent.name == "sft"


def check_finished_model(d: Path) -> None:
    """PushError unless the SFT output ``d`` (``<run>/sft/model``) is a finished model trained
    on the response shards there are now. SFT drops its _done.json before it replaces the model
    and writes it once the new one is whole: without it the folder may be half deleted (a push
    would then delete the Hub's weights as files gone here) or the checkpoint of a training
    still running. Its ``data`` records the checksums of the shards it trained on
    (``changed_training_data``)."""
    from guidealign.shards.artifact import read_done

    sft = d.resolve().parent
    done = read_done(sft)
    if done is None:
        raise PushError(f"{d} is not a finished model ({sft / '_done.json'} is missing: "
                        "SFT was stopped before it finished): run `guidealign sft` again first")
    changed = changed_training_data(done.get("data"), sft.parent, done.get("data_paths"))
    if changed:
        raise PushError(f"{d} was trained on responses that have changed since: the shards of "
                        f"{', '.join(changed)} differ from those {sft / '_done.json'} records. Train "
                        "the model again on them with `guidealign sft`, then push")


def changed_training_data(data, workdir: Path, paths=None) -> list[str]:
    """The datasets of SFT's _done.json ``data`` (name -> {"shards", "sha256": the shard markers'
    checksums in shard order}, as sft/data.py's ``iter_examples`` records them) whose shards are
    not those now: another number of shards, or a marker (missing, or with another checksum).
    ``paths`` (its ``data_paths``): where each was read, relative to the run directory or
    absolute. A model trained before SFT recorded them (its names alone do not say where a
    dataset outside the run directory was: "respond" may be another run's) and a dataset deleted
    since are not checked."""
    from guidealign.shards import read_manifest, read_marker

    if not isinstance(data, dict) or not isinstance(paths, dict):
        return []
    changed = []
    for name, rec in data.items():
        where = paths.get(name)
        if not isinstance(rec, dict) or not isinstance(where, str):
            continue
        path = Path(where) if Path(where).is_absolute() else Path(workdir) / where
        man = read_manifest(path)
        if man is None:
            log.debug("%s (a dataset the model was trained on) is not there: not checked", path)
            continue
        n = int(man["num_shards"])
        now = [getattr(read_marker(path, i), "sha256", None) for i in range(n)]
        if n != rec.get("shards") or now != list(rec.get("sha256") or []):
            changed.append(str(path))
    return changed


def dataset_files(d: Path, data_dir: str) -> tuple[list[LocalFile], int]:
    """The committed shards of a complete stage that hold rows (with the sha256 of their
    markers) and the number of rows they hold; PushError when a shard is not committed, or was
    committed under another config or input, or when no shard holds a row. A shard of 0 rows
    (a block whose every row went to quarantine) is left out: `datasets` fails on the whole repo
    with one in it ("BatchSize must be greater than 0"). Each marker is read once, so the files
    and their checksums agree."""
    from guidealign.shards import read_manifest, read_marker
    from guidealign.shards.layout import shard_path
    from guidealign.shards.manifest import shard_current

    man = read_manifest(d)
    out, rows, missing, stale = [], 0, [], []
    for i in range(int(man["num_shards"])):
        m = read_marker(d, i)
        p = shard_path(d, i)
        if m is None or not p.exists() or p.stat().st_size != m.bytes:
            missing.append(i)
            continue
        if not shard_current(d, i, m, man):  # its config, input and input's inputs current
            stale.append(i)
            continue
        rows += m.rows
        if m.rows:
            out.append(local_file(f"{data_dir}/{p.name}", p, sha256=m.sha256))
    if stale:
        raise PushError(f"{d} is incomplete: shard(s) {stale[:5]} were committed under another config "
                        "or input (finish the stage first)")
    if missing:
        raise PushError(f"{d} is incomplete: shard {missing[0]} is not committed (finish the stage first)")
    if not rows:  # the push's last commit would point the card at nothing and delete the Hub's data
        raise PushError(f"{d} holds no rows ({int(man['num_shards'])} shard(s)): nothing to push")
    return out, rows


def data_version(files: list[LocalFile]) -> str:
    """The version of a stage's shards: the first 12 hex digits of the sha256 over their sorted
    (file name, sha256) pairs. The same shards always get the same version (a rerun of a push
    finds its files where it left them), other shards another one."""
    import hashlib

    from guidealign.shards.write import file_sha256

    for f in files:
        if not f.sha256:  # a marker without a checksum: the content itself decides
            f.sha256 = file_sha256(f.local)
    pairs = sorted((f.path_in_repo.rsplit("/", 1)[-1], f.sha256) for f in files)
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:12]


def versioned(files: list[LocalFile], data_dir: str) -> tuple[list[LocalFile], str]:
    """``files`` (a stage's shards) moved to ``data_dir/<version>/`` and their version."""
    version = data_version(files)
    return [replace(f, path_in_repo=f"{data_dir}/{version}/{f.path_in_repo.rsplit('/', 1)[-1]}")
            for f in files], version


# The file transformers' Trainer.save_model writes the pickled training arguments to (its
# TRAINING_ARGS_NAME): every trainer argument, a hub_token among them, and the machine's paths.
# SFT deletes it from the model it saves; a push leaves it out of a model saved with it.
TRAINING_ARGS_NAME = "training_args.bin"


def model_files(d: Path) -> list[LocalFile]:
    """Every file of a model directory except hidden ones and the trainer's pickled arguments
    (TRAINING_ARGS_NAME, in any folder), the card (README.md) last, so that a repo with a card is
    a complete one."""
    out = []
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_file() and not rel.startswith(".") and "/." not in rel and p.name != TRAINING_ARGS_NAME:
            out.append(local_file(rel, p))
    out.sort(key=lambda f: f.path_in_repo == "README.md")
    return out


# Files a model directory is made of (what save_pretrained of a model, a PEFT adapter, a
# tokenizer or a trainer writes), matched on the file name. A model push deletes those on the
# Hub that it does not have (an adapter, shards, a tokenizer of an earlier push) at the top
# level or in a folder the pushed model has (push.owned_by_push), and keeps the rest, as a
# dataset push keeps what is outside its data folder: exports a user added beside the model
# (GGUF, ONNX, also in their own folders such as onnx/) stay.
MODEL_FILE_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack",
    "*.index.json", "config.json", "generation_config.json", "adapter_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json")


def is_model_file(path_in_repo: str) -> bool:
    """Whether a path in a model repo is part of a model (see MODEL_FILE_PATTERNS)."""
    from fnmatch import fnmatchcase

    name = path_in_repo.rsplit("/", 1)[-1]
    return any(fnmatchcase(name, pat) for pat in MODEL_FILE_PATTERNS)
