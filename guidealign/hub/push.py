"""`guidealign push`: a stage's Parquet shards, or the trained model, to the Hugging Face Hub.

The shards go up as they are (no reload into memory): `data/shard-NNNNN.parquet` plus a
dataset card (README.md) with provenance whose `configs` entry lets
`datasets.load_dataset(repo_id)` find them. A model dir's files go up as they are, its card too.

Resumable and atomic, on huggingface_hub's commit API (guidealign/hub/commits.py): the Hub's
preupload answer leaves out the files it already has; the LFS objects of the rest go up in
batches of `push.files_per_commit` files (`preupload_lfs_files`, which skips the objects the Hub
holds, so a push stopped while uploading resumes without sending them again). Then ONE commit
adds every changed file, the card included, and deletes the stale ones: shards under the data
folder that the Hub has and the stage no longer has (an earlier push of a larger stage), so
`load_dataset` reads exactly the stage's rows, and the model files (weights, adapter, tokenizer,
configs: targets.is_model_file) of a model repo that the pushed model does not have, so a
download does not mix two models. Other files (a user's) are kept. A push that fails or stops
before its commit leaves the revision as the previous push left it, never a mix of the two; a
push with nothing new makes no commit. huggingface_hub retries its own requests (http_backoff);
the steps it sends once (creating the repo, an upload batch, the commit) are retried here as a
whole.

The token comes from HF_TOKEN or the stored login (huggingface_hub resolves it); it is
never printed or logged here.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guidealign.hub.commits import add_operation, retry_step, split_unchanged, upload_lfs
from guidealign.hub.targets import (LocalFile, PushError, dataset_files, is_model_file, local_file,
                                    model_files, resolve_target)

__all__ = ["PushError", "PushReport", "run_push", "push_one"]

log = logging.getLogger(__name__)


@dataclass
class PushReport:
    """What one push did; written to WORKDIR/push/<namespace>__<name>.json (no token in it)."""
    repo_id: str
    repo_type: str
    url: str = ""
    files: int = 0
    uploaded: int = 0        # files in the commit this push made
    already_there: int = 0   # files the Hub already had, unchanged
    commits: int = 0         # 1 when this push made its commit, else 0
    retries: int = 0         # steps run again (creating the repo, an upload batch, the commit)
    bytes: int = 0           # size of the uploaded files
    seconds: float = 0.0
    commit: str = ""         # the head of the revision after the push
    uploaded_paths: list = field(default_factory=list)
    deleted_paths: list = field(default_factory=list)  # stale shards / model files removed

    def summary(self) -> str:
        """One line for the console."""
        gone = f", {len(self.deleted_paths)} stale file(s) deleted" if self.deleted_paths else ""
        return (f"push {self.repo_type} {self.repo_id}: {self.uploaded} file(s) pushed in {self.commits} "
                f"commit(s), {self.already_there} already on the Hub{gone}, {self.retries} retries, "
                f"{self.seconds:.1f}s")

    def count_retry(self) -> None:
        """Count one retried step."""
        self.retries += 1


def run_push(cfg, workdir, *, rank: int = 0, world_size: int = 1,
             progress: bool = True) -> PushReport | None:
    """Push ``push.what`` (a stage under WORKDIR, "model", or a path) to ``push.repo_id``; then,
    when it was a dataset and ``push.model_repo_id`` is set, the trained model there. Returns
    the first push's report (rank 0; other ranks do nothing and get None)."""
    if rank != 0:
        return None
    pcfg = cfg.push
    if not pcfg.repo_id:
        raise PushError("no repo id: set push.repo_id (or give REPO_ID to `guidealign push`)")
    with hub_progress(progress):
        rep = push_one(cfg, workdir, pcfg.what, pcfg.repo_id, progress=progress)
        log.info(rep.summary())
        if pcfg.model_repo_id and rep.repo_type == "dataset":
            log.info(push_one(cfg, workdir, "model", pcfg.model_repo_id, progress=progress).summary())
    return rep


@contextmanager
def hub_progress(enabled: bool):
    """huggingface_hub's progress bars off for the block unless ``enabled`` (then left as is)."""
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars)

    turn_off = not enabled and not are_progress_bars_disabled()
    if turn_off:
        disable_progress_bars()
    try:
        yield
    finally:
        if turn_off:
            enable_progress_bars()


def push_one(cfg, workdir, what: str, repo_id: str, *, progress: bool = True) -> PushReport:
    """Push WORKDIR/<what> (a stage's shards, or a model dir) to ``repo_id``, creating the repo
    when missing (visibility: push.private); returns the report, also written to WORKDIR/push/."""
    from huggingface_hub import HfApi, constants

    pcfg = cfg.push
    t0 = time.perf_counter()
    wd = Path(workdir)
    repo_type, src = resolve_target(wd, what)
    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set: unset it to push")
    data_dir = pcfg.data_dir.strip("/")
    if repo_type == "dataset" and not data_dir:
        # the shards need a folder of their own: stale ones are found (and deleted) there, and
        # the card's data_files glob names it
        raise PushError("push.data_dir is empty: name the folder the shards go to (default: data)")
    files = files_to_push(cfg, wd, repo_type, src, repo_id, data_dir)
    report = PushReport(repo_id=repo_id, repo_type=repo_type, files=len(files))

    api = HfApi()  # token: HF_TOKEN or the stored login, resolved by huggingface_hub
    report.url = str(retry_step(
        lambda: api.create_repo(repo_id, repo_type=repo_type, private=pcfg.private, exist_ok=True),
        pcfg, "create repo", report.count_retry))
    new, _ = split_unchanged(api, files, repo_id=repo_id, repo_type=repo_type,
                             revision=pcfg.revision)
    upload_lfs(api, new, repo_id=repo_id, repo_type=repo_type, revision=pcfg.revision, pcfg=pcfg,
               on_retry=report.count_retry, progress=progress)
    commit_push(api, files, report, pcfg, owned=owned_by_push(repo_type, data_dir, files),
                title=f"guide-align: push {src.name}")
    report.seconds = round(time.perf_counter() - t0, 3)
    write_report(wd, report, src, pcfg, constants.ENDPOINT)
    return report


def files_to_push(cfg, wd: Path, repo_type: str, src: Path, repo_id: str,
                  data_dir: str) -> list[LocalFile]:
    """The files of a push: a model dir's files, or a stage's shards (under ``data_dir``, no
    slashes around it) and its dataset card (written to WORKDIR/push/README-<stage>.md)."""
    from guidealign.hub.card import dataset_card

    if repo_type == "model":
        files = model_files(src)
        if not any(f.path_in_repo == "README.md" for f in files):
            log.warning("%s has no model card (README.md)", src)
        return files
    files, rows = dataset_files(src, data_dir)
    # the provenance of the run the data comes from: a stage pushed by its path may belong to
    # another run directory than WORKDIR
    card = dataset_card(repo_id=repo_id, stage=src.name, rows=rows, files=len(files), cfg=cfg,
                        workdir=src.parent, data_dir=data_dir)
    path = wd / "push" / f"README-{src.name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(card)
    return files + [local_file("README.md", path)]


def owned_by_push(repo_type: str, data_dir: str, files: list[LocalFile] = ()):
    """The paths on the Hub a push of ``repo_type`` answers for: a dataset's files under
    ``data_dir/`` (its shards), a model's model files (``is_model_file``) at the top level or in
    a folder the pushed model (``files``) has too. The others (a card's images, files a user
    added, an export in its own folder such as ``onnx/config.json``) are left alone."""
    if repo_type == "model":
        folders = {f.path_in_repo.rsplit("/", 1)[0] for f in files if "/" in f.path_in_repo}
        return lambda path: is_model_file(path) and ("/" not in path or path.rsplit("/", 1)[0] in folders)
    return lambda path: path.startswith(data_dir + "/")


def commit_push(api, files: list[LocalFile], report: PushReport, pcfg, *, owned, title: str) -> None:
    """One commit (retried) that adds the ``files`` the Hub does not hold as they are and deletes
    the paths ``owned(path)`` claims for this push that ``files`` lacks: shards of an earlier push
    of a larger stage, which ``load_dataset`` would read too; weights, an adapter or tokenizer
    files of an earlier model, which a download would mix with this one's. Nothing to do: no
    commit, and ``report.commit`` is the revision's head."""
    from huggingface_hub import CommitOperationDelete

    keep = {f.path_in_repo for f in files}
    where = dict(repo_type=report.repo_type, revision=pcfg.revision)
    sent: list = []  # (files added, paths deleted) by the last commit sent

    def attempt():
        # worked out again on each attempt: a commit that landed before its answer was lost
        # leaves nothing to do, and deleting a path that is not there is an error on the Hub
        add, _ = split_unchanged(api, files, repo_id=report.repo_id, **where)
        gone = sorted(p for p in api.list_repo_files(report.repo_id, **where)
                      if owned(p) and p not in keep)
        if not add and not gone:
            return None
        sent[:] = [add, gone]
        ops = [add_operation(f) for f in add] + [CommitOperationDelete(path_in_repo=p) for p in gone]
        return api.create_commit(report.repo_id, operations=ops, commit_message=title, **where)

    info = retry_step(attempt, pcfg, "commit", report.count_retry)
    # info None after a commit was sent: it landed, its answer was lost, and the retry found
    # nothing left to do; it is this push's commit all the same
    if sent:
        add, gone = sent
        report.commits = 1
        report.uploaded = len(add)
        report.bytes = sum(f.size for f in add)
        report.uploaded_paths = [f.path_in_repo for f in add]
        report.deleted_paths = gone
    report.already_there = len(files) - report.uploaded
    report.commit = getattr(info, "oid", "") or api.repo_info(report.repo_id, **where).sha


def write_report(wd: Path, report: PushReport, src: Path, pcfg, endpoint: str) -> Path:
    """WORKDIR/push/<namespace>__<name>.json: the report, its source and settings (no token)."""
    from guidealign.shards import write_json_atomic

    path = wd / "push" / f"{report.repo_id.replace('/', '__')}.json"
    write_json_atomic(path, {**asdict(report), "source": str(src), "private": pcfg.private,
                             "revision": pcfg.revision, "endpoint": endpoint})
    return path
