"""`guidealign push`: a stage's Parquet shards, or the trained model, to the Hugging Face Hub.

The shards go up as they are (no reload into memory): `data/shard-NNNNN.parquet` plus a
dataset card (README.md) with provenance whose `configs` entry lets
`datasets.load_dataset(repo_id)` find them. A model dir goes up file by file, with its card.

Resumable: files go up in commits of `push.files_per_commit`; before each push the remote
tree is listed and files whose remote sha256 (LFS) or git blob id (regular) already match
are skipped. An interrupted push therefore redoes at most the batch in flight, and even
its LFS objects already on the Hub are not sent again (the LFS batch endpoint says so).
Rate limits (429), server errors (5xx) and dropped connections are retried with
exponential backoff (the Hub's Retry-After wins).

The token comes from HF_TOKEN or the stored login (huggingface_hub resolves it); it is
never printed or logged here.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guidealign.shards.write import file_sha256

log = logging.getLogger(__name__)

RETRY_STATUS = (429, 500, 502, 503, 504)
REGULAR_MAX = 10 << 20  # files below this size also get a git blob id to compare with


class PushError(RuntimeError):
    pass


@dataclass
class LocalFile:
    path_in_repo: str
    local: Path
    size: int
    sha256: str
    git_oid: str | None = None


@dataclass
class PushReport:
    repo_id: str
    repo_type: str
    url: str = ""
    files: int = 0
    uploaded: int = 0
    already_there: int = 0
    commits: int = 0
    retries: int = 0
    bytes: int = 0
    seconds: float = 0.0
    uploaded_paths: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"push {self.repo_type} {self.repo_id}: {self.uploaded} file(s) pushed in {self.commits} "
                f"commit(s), {self.already_there} already on the Hub, {self.retries} retries, "
                f"{self.seconds:.1f}s")


def _git_oid(path: Path, size: int) -> str:
    h = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_file(path_in_repo: str, local: Path, sha256: str | None = None) -> LocalFile:
    size = local.stat().st_size
    return LocalFile(path_in_repo, local, size, sha256 or file_sha256(local),
                     _git_oid(local, size) if size < REGULAR_MAX else None)


# -- what to push ---------------------------------------------------------------------------

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
    """The committed shards of a complete stage, with the checksums their markers carry."""
    from guidealign.shards import read_manifest, read_marker
    from guidealign.shards.layout import shard_path

    man = read_manifest(d)
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
    out = []
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_file() and not rel.startswith(".") and "/." not in rel:
            out.append(local_file(rel, p))
    return out


# -- Hub calls with retries -----------------------------------------------------------------

def _status(e: Exception) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def with_retries(pcfg, report: PushReport, what: str, fn, *args, **kwargs):
    from huggingface_hub.errors import HfHubHTTPError

    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below
            status = _status(e)
            transient = (isinstance(e, HfHubHTTPError) and status in RETRY_STATUS) or \
                (not isinstance(e, HfHubHTTPError) and _is_connection_error(e))
            if not transient or attempt >= pcfg.max_retries:
                raise
            delay = min(pcfg.backoff_max_s, pcfg.backoff_s * (2 ** attempt))
            resp = getattr(e, "response", None)
            ra = resp.headers.get("Retry-After") if resp is not None else None
            if ra:
                try:
                    delay = min(pcfg.backoff_max_s, float(ra))
                except ValueError:
                    pass
            attempt += 1
            report.retries += 1
            log.warning("%s: %s (HTTP %s); retry %d/%d in %.1fs", what, type(e).__name__, status,
                        attempt, pcfg.max_retries, delay)
            time.sleep(delay)


def _is_connection_error(e: Exception) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "TransportError", "TimeoutException", "NetworkError",
                         "RemoteProtocolError", "ConnectError", "ReadError", "WriteError"})


def remote_state(api, repo_id: str, repo_type: str, revision: str) -> dict[str, tuple]:
    """path -> (sha256 or None, git blob id) of the files on the Hub (empty for a new repo)."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        items = api.list_repo_tree(repo_id, repo_type=repo_type, revision=revision, recursive=True)
        out = {}
        for it in items:
            if getattr(it, "blob_id", None) is None:
                continue  # a folder
            lfs = getattr(it, "lfs", None)
            out[it.path] = (lfs.sha256 if lfs else None, it.blob_id)
        return out
    except (RevisionNotFoundError, EntryNotFoundError):
        return {}


def is_same(f: LocalFile, remote: tuple | None) -> bool:
    if remote is None:
        return False
    sha, blob = remote
    return (sha is not None and sha == f.sha256) or (f.git_oid is not None and blob == f.git_oid)


# -- the push ------------------------------------------------------------------------------

def run_push(cfg, workdir, what: str | None = None, *, repo_id: str | None = None,
             private: bool | None = None, progress: bool = True) -> PushReport:
    """Push WORKDIR/<what> (a stage's shards) or the trained model to the Hub; returns a report,
    also written to WORKDIR/push/<repo>.json (no token in it).

    Without ``what`` (the pipeline's call): ``push.what`` to ``push.repo_id``, then, when
    ``push.model_repo_id`` is set, the trained model there (the dataset's report is returned).
    """
    if what is None:
        rep = push_one(cfg, workdir, cfg.push.what, repo_id=repo_id, private=private,
                       progress=progress)
        log.info(rep.summary())
        if cfg.push.model_repo_id:
            log.info(push_one(cfg, workdir, "model", repo_id=cfg.push.model_repo_id,
                              private=private, progress=progress).summary())
        return rep
    return push_one(cfg, workdir, what, repo_id=repo_id, private=private, progress=progress)


def push_one(cfg, workdir, what: str, *, repo_id: str | None = None, private: bool | None = None,
             progress: bool = True) -> PushReport:
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    from guidealign.shards import write_json_atomic
    from guidealign.hub.card import dataset_card

    pcfg = cfg.push
    repo_id = repo_id or pcfg.repo_id
    if not repo_id:
        raise PushError("no repo id: give one (push.repo_id or the REPO_ID argument)")
    private = pcfg.private if private is None else private
    t0 = time.perf_counter()
    wd = Path(workdir)
    repo_type, src = resolve_target(wd, what)
    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set: unset it to push")
    report = PushReport(repo_id=repo_id, repo_type=repo_type)

    if repo_type == "dataset":
        files, rows = dataset_files(src, pcfg.data_dir.strip("/"))
        card = dataset_card(repo_id=repo_id, stage=src.name, rows=rows, files=len(files), cfg=cfg,
                            workdir=wd, data_dir=pcfg.data_dir.strip("/"))
        stage_dir = wd / "push"
        stage_dir.mkdir(parents=True, exist_ok=True)
        card_path = stage_dir / f"README-{src.name}.md"
        card_path.write_text(card)
        files.append(local_file("README.md", card_path))
    else:
        files = model_files(src)
        if not any(f.path_in_repo == "README.md" for f in files):
            log.warning("%s has no model card (README.md)", src)
        # The card goes last, so that a repo with a card is a complete one.
        files.sort(key=lambda f: f.path_in_repo == "README.md")
    report.files = len(files)

    api = HfApi()  # token: HF_TOKEN or the stored login, resolved by huggingface_hub
    url = with_retries(pcfg, report, "create_repo", api.create_repo, repo_id, repo_type=repo_type,
                       private=private, exist_ok=True)
    report.url = str(url)
    remote = with_retries(pcfg, report, "list files", remote_state, api, repo_id, repo_type,
                          pcfg.revision)
    todo = [f for f in files if not is_same(f, remote.get(f.path_in_repo))]
    report.already_there = len(files) - len(todo)
    n = max(1, pcfg.files_per_commit)
    batches = [todo[i:i + n] for i in range(0, len(todo), n)]
    for k, batch in enumerate(batches, 1):
        ops = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local))
               for f in batch]
        msg = f"guide-align: push {src.name} ({k}/{len(batches)}, {len(batch)} file(s))"
        with_retries(pcfg, report, f"commit {k}/{len(batches)}", api.create_commit, repo_id,
                     operations=ops, commit_message=msg, repo_type=repo_type,
                     revision=pcfg.revision)
        report.commits += 1
        report.uploaded += len(batch)
        report.bytes += sum(f.size for f in batch)
        report.uploaded_paths += [f.path_in_repo for f in batch]
        if progress:
            log.info("pushed %d/%d commit(s) to %s", k, len(batches), repo_id)
    report.seconds = round(time.perf_counter() - t0, 3)
    write_json_atomic(wd / "push" / f"{repo_id.replace('/', '__')}.json",
                      {**asdict(report), "source": str(src), "private": private,
                       "endpoint": constants.ENDPOINT})
    return report
