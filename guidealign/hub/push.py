"""`guidealign push`: a stage's Parquet shards, or the trained model, to the Hugging Face Hub.

The shards go up as they are (no reload into memory) under a folder of their own version,
`data/<version>/shard-NNNNN.parquet` (the version: a hash of the shards' names and checksums,
targets.data_version), plus a dataset card (README.md) with provenance whose `configs` entry
(`data_files: data/<version>/*.parquet`) lets `datasets.load_dataset(repo_id)` find them. A
model dir's files go up as they are, its card too.

Resumable, bounded and atomic for readers, on huggingface_hub's commit API
(guidealign/hub/commits.py). The Hub's preupload answer leaves out the files it already has. A
dataset's shards go up in commits of at most `push.files_per_commit` files each (the Hub
recommends under 100 files per commit), each retried as a whole; a rerun of the same stage has
the same version, so it skips the shards committed before and resumes. Only then ONE small
commit writes the card, which switches `data_files` to the new version's folder, and deletes
every other path under the data folder (earlier versions' folders, as folder deletes, and the
flat `data/shard-*.parquet` of older pushes). Until that commit the card names the previous
version's folder, whose shards are all still there: `load_dataset` reads one whole version,
never a mix of two, whether a push stops between its commits or not. A model push uploads its
LFS objects in batches of `push.files_per_commit` and makes ONE commit that adds every changed
file and deletes the model files (weights, adapter, tokenizer, configs: targets.is_model_file)
of a model repo that the pushed model does not have, so a download does not mix two models.
Other files (a user's) are kept. The operations prepared for the upload are the ones
committed (nothing hashed or uploaded twice); a push with nothing new makes no commit.
huggingface_hub retries its own requests (http_backoff); the steps it sends once (creating the
repo, an upload batch, a commit, the lookup of the head) are retried here as a whole. Every
request is bounded in time (``hub_timeouts``: huggingface_hub's own client waits without end).
The repo ids, and the model that follows a dataset, are checked before anything is sent.

The token comes from HF_TOKEN or the stored login (huggingface_hub resolves it); it is
never printed or logged here.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guidealign.hub.commits import batches, commit_step, is_unchanged, prepare, retry_step, upload_lfs
from guidealign.hub.targets import (LocalFile, PushError, dataset_files, is_model_file, local_file,
                                    model_files, resolve_target, versioned)

__all__ = ["PushError", "PushReport", "run_push", "push_one", "config_problems"]

log = logging.getLogger(__name__)


@dataclass
class PushReport:
    """What one push did; written to WORKDIR/push/<dataset|model>__<namespace>__<name>.json (no token in it)."""
    repo_id: str
    repo_type: str
    url: str = ""
    files: int = 0
    uploaded: int = 0        # files added by the commits this push made
    already_there: int = 0   # files the Hub already had, unchanged
    commits: int = 0         # commits this push made (a dataset: its shard commits + the last)
    retries: int = 0         # steps run again (creating the repo, an upload batch, a commit, ...)
    bytes: int = 0           # size of the uploaded files
    seconds: float = 0.0
    commit: str = ""         # the head of the revision after the push
    card_kept: bool = False  # a model card edited on the Hub kept (the model's own is unchanged)
    card_blob: str = ""      # the git blob id of the card this push wrote (tells a card edited on
    #                          the Hub since from ours)
    private: bool | None = None  # the repo's visibility as the Hub reports it after the push
    #                              (push.private applies to a new repo only)
    uploaded_paths: list = field(default_factory=list)
    deleted_paths: list = field(default_factory=list)  # files removed (older versions' shards,
    #                                                     stale model files)

    def summary(self) -> str:
        """One line for the console."""
        gone = f", {len(self.deleted_paths)} stale file(s) deleted" if self.deleted_paths else ""
        return (f"push {self.repo_type} {self.repo_id}: {self.uploaded} file(s) pushed in {self.commits} "
                f"commit(s), {self.already_there} already on the Hub{gone}, {self.retries} retries, "
                f"{self.seconds:.1f}s")

    def count_retry(self) -> None:
        """Count one retried step."""
        self.retries += 1


def run_push(cfg, workdir, *, rank: int = 0, world_size: int = 1, progress: bool = True,
             reports: list | None = None) -> PushReport | None:
    """Push ``push.what`` (a stage under WORKDIR, "model", or a path) to ``push.repo_id``; then,
    when it was a dataset and ``push.model_repo_id`` is set, the trained model there (with
    ``push.model_repo_id`` alone: the model only). Both repo ids, and the model, are checked
    before the first push sends anything. Returns the first push's report (rank 0; other ranks
    do nothing and get None); ``reports``, when given, gets every push's report in order (the
    model's too: the `push` command shows each and checks each repo's visibility)."""
    out = reports if reports is not None else []
    if rank != 0:
        return None
    pcfg = cfg.push
    problems = repo_id_problems(pcfg)
    if problems:  # before anything is sent: a bad model_repo_id was found after the dataset went up
        raise PushError("; ".join(problems))
    if not pcfg.repo_id and pcfg.model_repo_id:
        with hub_progress(progress):
            rep = push_one(cfg, workdir, "model", pcfg.model_repo_id, progress=progress)
        out.append(rep)
        log.info(rep.summary())
        return rep
    if not pcfg.repo_id:
        raise PushError("no repo id: set push.repo_id (or give REPO_ID to `guidealign push`)")
    kind, d = resolve_target(workdir, pcfg.what)
    if world_size > 1 and kind == "dataset":
        # a stage's shards come from every rank: the others may still be writing theirs
        from guidealign.config import wait_timeout
        from guidealign.shards import wait_complete

        wait_complete(d, timeout=wait_timeout(cfg, world_size), workdir=workdir)
    if pcfg.model_repo_id and kind == "dataset":
        # the model that follows the dataset is finished (and trained on these responses), or
        # nothing goes up: not the dataset alone, then an error
        try:
            resolve_target(workdir, "model")
        except PushError as e:
            raise PushError(f"{e} (push.model_repo_id is set; nothing was pushed: `guidealign push "
                            f"{pcfg.what} {pcfg.repo_id}` pushes the dataset alone)") from e
    with hub_progress(progress):
        rep = push_one(cfg, workdir, pcfg.what, pcfg.repo_id, progress=progress)
        out.append(rep)
        log.info(rep.summary())
        if pcfg.model_repo_id and rep.repo_type == "dataset":
            out.append(push_one(cfg, workdir, "model", pcfg.model_repo_id, progress=progress))
            log.info(out[-1].summary())
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


def repo_id_problems(pcfg) -> list[str]:
    """What is wrong with push.repo_id and push.model_repo_id (each one set): not a Hub repo id
    (``name`` or ``namespace/name``, as huggingface_hub's ``validate_repo_id`` checks it; the
    Hub would refuse it only once the data pushed before it were sent). Empty: nothing."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    out = []
    for key in ("repo_id", "model_repo_id"):
        value = getattr(pcfg, key)
        if not value:
            continue
        try:
            validate_repo_id(value)
        except HFValidationError as e:
            out.append(f"push.{key} {value!r} is not a Hub repo id: {e}")
    return out


OFFLINE = "HF_HUB_OFFLINE is set: unset it to push"  # what push_one refuses, and check says


def config_problems(pcfg) -> list[str]:
    """Why the push settings ``pcfg`` cannot push, found without the network (empty: none):
    HF_HUB_OFFLINE set, and ``repo_id_problems``; for a check before a run that ends with a
    push (`guidealign run` ran every stage, then failed at its push)."""
    from huggingface_hub import constants

    offline = [OFFLINE] if constants.HF_HUB_OFFLINE else []
    return offline + repo_id_problems(pcfg)


# huggingface_hub's HTTP client waits for an answer without end (its timeout is None): an
# endpoint, proxy or mirror that takes the connection and never answers hung a push for good.
# A push gives each request these limits in seconds (``hub_timeouts``; a download keeps its
# own; repo_info, which asks for "no limit" itself, is given HUB_READ_TIMEOUT_S here). One
# that runs out is a dropped connection to huggingface_hub and to retry_step: retried
# (push.max_retries), then the push fails naming the endpoint. Generous: a commit of many
# files is answered within a minute or two; an upload's body goes in chunks, each under the
# write limit.
HUB_CONNECT_TIMEOUT_S = 60.0
HUB_READ_TIMEOUT_S = 300.0


@contextmanager
def hub_timeouts():
    """huggingface_hub's requests bounded in time for the block (HUB_CONNECT_TIMEOUT_S,
    HUB_READ_TIMEOUT_S: the parts of the client's timeout that are unset), through its client
    factory, which is put back after."""
    from huggingface_hub.utils import _http, set_client_factory

    before = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    if before is None:  # another huggingface_hub: its own client, as it is
        yield
        return

    def bounded():
        client = before()
        t = client.timeout
        client.timeout = type(t)(connect=t.connect or HUB_CONNECT_TIMEOUT_S,
                                 read=t.read or HUB_READ_TIMEOUT_S,
                                 write=t.write or HUB_READ_TIMEOUT_S,
                                 pool=t.pool or HUB_READ_TIMEOUT_S)
        return client

    set_client_factory(bounded)
    try:
        yield
    finally:
        set_client_factory(before)


def push_one(cfg, workdir, what: str, repo_id: str, *, progress: bool = True) -> PushReport:
    """Push WORKDIR/<what> (a stage's shards, or a model dir) to ``repo_id``, creating the repo
    when missing (visibility: push.private); returns the report, also written to WORKDIR/push/.
    Every request to the Hub is bounded in time (``hub_timeouts``)."""
    with hub_timeouts():
        return _push_one(cfg, workdir, what, repo_id, progress=progress)


def _push_one(cfg, workdir, what: str, repo_id: str, *, progress: bool) -> PushReport:
    from huggingface_hub import HfApi, constants

    pcfg = cfg.push
    t0 = time.perf_counter()
    wd = Path(workdir)
    repo_type, src = resolve_target(wd, what)
    if constants.HF_HUB_OFFLINE:
        raise PushError(OFFLINE)
    data_dir = pcfg.data_dir.strip("/")
    if repo_type == "dataset" and not data_dir:
        # the shards need a folder of their own: stale ones are found (and deleted) there, and
        # the card's data_files glob names it
        raise PushError("push.data_dir is empty: name the folder the shards go to (default: data)")
    files = files_to_push(cfg, wd, repo_type, src, repo_id, data_dir)
    report = PushReport(repo_id=repo_id, repo_type=repo_type, files=len(files))

    api = HfApi()  # token: HF_TOKEN or the stored login, resolved by huggingface_hub
    created = retry_step(
        lambda: api.create_repo(repo_id, repo_type=repo_type, private=pcfg.private, exist_ok=True),
        pcfg, "create repo", report.count_retry)
    report.url = str(created)
    # an id without a namespace ("mydata") is created under the token's user: every later call
    # needs the full id the Hub answered with ("user/mydata"), and so do the card and the report
    full_id = getattr(created, "repo_id", None) or repo_id
    if full_id != repo_id:
        repo_id = report.repo_id = full_id
        files = files_to_push(cfg, wd, repo_type, src, repo_id, data_dir)
    report.private = repo_visibility(api, report, pcfg)
    where = dict(repo_id=repo_id, repo_type=repo_type, revision=pcfg.revision)
    title = f"guide-align: push {src.name}"
    # prepared once: these operations are uploaded and committed (nothing hashed twice)
    ops = prepare(api, files, **where)
    stale = StaleFiles(api, files, owned_by_push(repo_type, data_dir, files), **where)
    if repo_type == "dataset":
        shards = [op for op in ops if op.path_in_repo.startswith(data_dir + "/")]
        commit_shards(api, shards, report, pcfg, title=title, progress=progress)
        last = [op for op in ops if not op.path_in_repo.startswith(data_dir + "/")]  # the card
    else:
        upload_lfs(api, ops, **where, pcfg=pcfg, on_retry=report.count_retry, progress=progress)
        last = ops
    if repo_type == "dataset":
        report.card_blob = save_card_edited_on_hub(api, wd, src, report, pcfg, where)
    elif (src / "README.md").is_file():
        # a model's card changes only with the model: an edit made on the Hub since our last
        # push is kept while the card we would push is the one we pushed then
        report.card_blob = save_card_edited_on_hub(api, wd, src, report, pcfg, where, model=True)
        if report.card_kept:
            last = [op for op in last if op.path_in_repo != "README.md"]
    # the card (a dataset: it switches load_dataset to this version) and the deletes, in one commit
    info, sent = commit_step(api, last, **where, pcfg=pcfg, title=title, what="commit",
                             stale=stale, on_retry=report.count_retry)
    count_commit(report, sent, stale)
    report.already_there = len(files) - report.uploaded
    # info None: no commit was needed, or the last one landed and its retry found nothing left
    report.commit = getattr(info, "oid", "") or retry_step(
        lambda: api.repo_info(repo_id, repo_type=repo_type, revision=pcfg.revision,
                              timeout=HUB_READ_TIMEOUT_S).sha,
        pcfg, "head lookup", report.count_retry)
    report.seconds = round(time.perf_counter() - t0, 3)
    write_report(wd, report, src, pcfg, constants.ENDPOINT)
    return report


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub) gives a file's content: sha1 of "blob <size>\\0" + the bytes."""
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def save_card_edited_on_hub(api, wd: Path, src: Path, report: PushReport, pcfg, where: dict,
                            model: bool = False) -> str:
    """The blob id of the card this push would write: a dataset's, generated into
    WORKDIR/push/README-<stage>.md (its data_files must name this version's folder), so a card
    edited on the Hub since our last push (or one the repo had before) is replaced: its text is
    first saved to WORKDIR/push/ and a warning names it. A model's (``model``: its README.md):
    a card edited on the Hub since our last push is kept (``report.card_kept``) while ours is
    the one pushed then."""
    card = src / "README.md" if model else wd / "push" / f"README-{src.name}.md"
    ours = git_blob_id(card.read_bytes())
    info = retry_step(lambda: list(api.get_paths_info(paths=["README.md"], **where)), pcfg,
                      "card lookup", report.count_retry)
    theirs = next((getattr(e, "blob_id", None) for e in info if getattr(e, "path", "") == "README.md"), None)
    before = _last_pushed_card(wd, report)
    if theirs is None or theirs in (ours, before):
        return ours
    if model and ours == before:
        report.card_kept = True
        log.info("the card of %s %s was edited on the Hub since the last push and the model's own card "
                 "has not changed: the Hub's is kept", report.repo_type, report.repo_id)
        return ours
    path = retry_step(lambda: api.hf_hub_download(filename="README.md", local_dir=wd / "push" / ".hub-card",
                                                  **where), pcfg, "card download", report.count_retry)
    kept = wd / "push" / f"README-{src.name}.on-hub-{theirs[:8]}.md"
    kept.write_bytes(Path(path).read_bytes())
    log.warning("the card of %s %s %s: this push replaces it with the %s card; the card as it was is "
                "saved at %s", report.repo_type, report.repo_id,
                "was edited on the Hub since the last push" if before else "is not one this run pushed",
                "model's" if model else "generated (whose data_files name the new version's folder)",
                kept)
    return ours


def _last_pushed_card(wd: Path, report: PushReport) -> str | None:
    """The blob id of the card this run directory last pushed to the repo (its push report)."""
    import json

    try:
        return json.loads(report_path(wd, report).read_text()).get("card_blob") or None
    except (OSError, ValueError, AttributeError):
        return None


def repo_visibility(api, report: PushReport, pcfg) -> bool | None:
    """Whether the repo is private, as the Hub says: create_repo leaves an existing repo's
    visibility as it is, whatever push.private asks (logged when they differ; the visibility is
    never changed here)."""
    info = retry_step(lambda: api.repo_info(report.repo_id, repo_type=report.repo_type,
                                            timeout=HUB_READ_TIMEOUT_S),
                      pcfg, "visibility lookup", report.count_retry)
    private = getattr(info, "private", None)
    if private is not None and private != pcfg.private:
        log.info("%s %s is %s; push.private (%s) applies to a new repo only: its visibility is left "
                 "as it is", report.repo_type, report.repo_id, visibility(private), pcfg.private)
    return private


def visibility(private: bool | None) -> str:
    """"private", "public", or "of unknown visibility" for a repo's ``private`` flag."""
    return {True: "private", False: "public"}.get(private, "of unknown visibility")


def files_to_push(cfg, wd: Path, repo_type: str, src: Path, repo_id: str,
                  data_dir: str) -> list[LocalFile]:
    """The files of a push: a model dir's files, or a stage's shards (under
    ``data_dir/<version>/``, ``data_dir`` with no slashes around it) and its dataset card
    (written to WORKDIR/push/README-<stage>.md), whose data_files name that folder."""
    from guidealign.hub.card import dataset_card

    if repo_type == "model":
        files = model_files(src)
        if not any(f.path_in_repo == "README.md" for f in files):
            log.warning("%s has no model card (README.md)", src)
        return files
    files, rows = dataset_files(src, data_dir)
    files, version = versioned(files, data_dir)
    # the provenance of the run the data comes from: a stage pushed by its path may belong to
    # another run directory than WORKDIR
    card = dataset_card(repo_id=repo_id, stage=src.name, rows=rows, files=len(files), cfg=cfg,
                        workdir=src.parent, data_dir=f"{data_dir}/{version}")
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


class StaleFiles:
    """The deletes of a push's last commit, listed anew on each call (a retry after a commit
    that landed finds nothing left): the paths ``owned(path)`` claims for the push that its
    ``files`` lack. Those are the shards of other versions (``load_dataset`` reads only the
    card's folder, but they would pile up) and the flat shards of older pushes; weights, an
    adapter or tokenizer files of an earlier model, which a download would mix with this one's.
    A folder that holds only such paths goes as one folder delete (an earlier version's folder),
    to keep the commit small. ``removed`` maps each delete to the files it removes."""

    def __init__(self, api, files: list[LocalFile], owned, *, repo_id: str, repo_type: str,
                 revision: str):
        self.api, self.owned = api, owned
        self.keep = {f.path_in_repo for f in files}
        self.where = dict(repo_type=repo_type, revision=revision)
        self.repo_id = repo_id
        self.removed: dict[str, list[str]] = {}

    def __call__(self) -> list:
        from huggingface_hub import CommitOperationDelete

        present = self.api.list_repo_files(self.repo_id, **self.where)
        gone = sorted(p for p in present if self.owned(p) and p not in self.keep)
        ops = []
        # what this commit adds stays too: a folder that will hold one is not deleted whole
        for target, paths in stale_targets(gone, list(present) + sorted(self.keep)).items():
            self.removed[target] = paths
            folder = target.endswith("/")
            ops.append(CommitOperationDelete(path_in_repo=target, is_folder=folder))
        return ops


def stale_targets(gone: list[str], present: list[str]) -> dict[str, list[str]]:
    """The paths ``gone`` (of the repo's ``present`` ones) as few deletes as can be: the
    topmost folder (``"a/b/"``) that holds no path that stays, else the file itself; each with
    the files it removes."""
    stays = set(present) - set(gone)
    held = {p.rsplit("/", k)[0] for p in stays for k in range(1, p.count("/") + 1)}
    out: dict[str, list[str]] = {}
    for p in gone:
        parts = p.split("/")
        target = p
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder not in held:
                target = folder + "/"
                break
        out.setdefault(target, []).append(p)
    return out


def count_commit(report: PushReport, sent: list | None, stale: StaleFiles | None = None) -> None:
    """Count in ``report`` the commit whose operations were ``sent`` (None: no commit was
    needed). A commit sent, whose answer was lost and whose retry found nothing left, landed:
    it counts once."""
    from huggingface_hub import CommitOperationAdd

    if not sent:
        return
    report.commits += 1
    for op in sent:
        if isinstance(op, CommitOperationAdd):
            report.uploaded += 1
            report.bytes += op.upload_info.size
            report.uploaded_paths.append(op.path_in_repo)
        else:
            removed = stale.removed.get(op.path_in_repo) if stale is not None else None
            report.deleted_paths += removed or [op.path_in_repo]


def commit_shards(api, ops: list, report: PushReport, pcfg, *, title: str,
                  progress: bool = True) -> None:
    """A dataset's shards (prepared operations) that the Hub does not hold, in commits of at
    most push.files_per_commit files, each uploaded and committed as one retried step (see
    commits.commit_step); counted in ``report``. They land in their version's folder, which the
    card does not name yet, so readers still see the previous version whole."""
    todo = batches([op for op in ops if not is_unchanged(op)], pcfg.files_per_commit)
    for k, batch in enumerate(todo, 1):
        _, sent = commit_step(api, batch, repo_id=report.repo_id, repo_type=report.repo_type,
                              revision=pcfg.revision, pcfg=pcfg,
                              title=f"{title}: shards {k}/{len(todo)} ({len(batch)} file(s))",
                              what=f"commit {k}/{len(todo)}", on_retry=report.count_retry)
        count_commit(report, sent)
        if progress:
            log.info("pushed shard commit %d/%d (%d file(s)) to %s", k, len(todo), len(batch),
                     report.repo_id)


def report_path(wd: Path, report: PushReport) -> Path:
    return wd / "push" / f"{report.repo_type}__{report.repo_id.replace('/', '__')}.json"


def write_report(wd: Path, report: PushReport, src: Path, pcfg, endpoint: str) -> Path:
    """WORKDIR/push/<dataset|model>__<namespace>__<name>.json: the report, its source and settings
    (no token); the repo type in the name, as a dataset and a model may share an id."""
    from guidealign.shards import write_json_atomic

    path = report_path(wd, report)
    # "private" (the report's): the repo's real visibility, which may not be push.private
    write_json_atomic(path, {**asdict(report), "source": str(src), "requested_private": pcfg.private,
                             "revision": pcfg.revision, "endpoint": endpoint})
    return path
