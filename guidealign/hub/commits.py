"""Resumable, bounded commits on huggingface_hub's commit API.

Which files the Hub already has: huggingface_hub's preupload call (``_fetch_upload_modes``)
answers, per path, how the file is stored (regular or LFS) and the oid the Hub holds there;
a file whose local oid (``CommitOperationAdd._local_oid``: the git blob id of a regular file,
the sha256 of an LFS one) equals it has not changed. That is the test ``create_commit`` itself
applies before committing (``prepare``, ``is_unchanged``).

The ``CommitOperationAdd`` objects ``prepare`` makes are the ones uploaded and committed
(``commit_step``): ``preupload_lfs_files`` marks them uploaded, so ``create_commit`` neither
hashes nor uploads them again (with Xet it would read and chunk every file a second time).
``upload_lfs`` uploads the LFS objects of such operations in batches without committing (a
model push, which makes one commit); the LFS batch call answers "already there" for the objects
the Hub holds, so a push interrupted while uploading resumes without sending them again.
guidealign/hub/push.py decides what goes in which commit: a dataset's shards in commits of at
most push.files_per_commit files under a folder of their own version, then one small commit
with the card and the deletes.

Retries: huggingface_hub retries the requests it can safely repeat (preupload, LFS batch and
uploads, listings) itself, with ``http_backoff``. It sends creating a repo, a commit and a repo
info lookup once; ``retry_step`` runs such a step (and an upload batch) again on the failures
``http_backoff`` retries. A commit is retried with what is still to do worked out again (the
oids the Hub holds fetched anew, the deletes listed anew), so if a commit landed before its
answer was lost, the retry finds nothing left and makes no second commit.
"""
from __future__ import annotations

import logging
import time
from urllib.parse import quote

from guidealign.hub.targets import LocalFile

log = logging.getLogger(__name__)


def add_operation(f: LocalFile):
    """A CommitOperationAdd for ``f``, given its sha256 when known (so it is not hashed again)."""
    from huggingface_hub import CommitOperationAdd

    op = CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local))
    if f.sha256:
        op.upload_info.sha256 = bytes.fromhex(f.sha256)
    return op


def is_unchanged(op) -> bool:
    """create_commit's test for a file that has not changed: the oid the Hub holds at its path
    (known once its upload mode was fetched) is the local one."""
    remote = getattr(op, "_remote_oid", None)
    return remote is not None and remote == op._local_oid


def _remember_sha256(f: LocalFile, op) -> None:
    """Keep a sha256 that huggingface_hub computed, for the operations of a later attempt."""
    info = op.upload_info
    if f.sha256 is None and getattr(info, "is_hashed", True):
        f.sha256 = info.sha256.hex()


def _fetch_modes(api, ops: list, *, repo_id: str, repo_type: str, revision: str) -> None:
    """Set, on each of ``ops``, the upload mode and the oid the Hub holds at its path (one
    preupload call per 256 files, huggingface_hub's ``_fetch_upload_modes``, retried by its
    ``http_backoff``)."""
    from huggingface_hub._commit_api import _fetch_upload_modes
    from huggingface_hub.utils import build_hf_headers

    if ops:
        _fetch_upload_modes(additions=ops, repo_type=repo_type, repo_id=repo_id,
                            headers=build_hf_headers(token=api.token),
                            revision=quote(revision, safe=""), endpoint=api.endpoint)


def prepare(api, files: list[LocalFile], *, repo_id: str, repo_type: str, revision: str) -> list:
    """A CommitOperationAdd per file of ``files``, in order, each knowing how the Hub stores its
    path and the oid it holds there (``is_unchanged``). These are the operations to upload and
    commit: a new one for the same file would be prepared (hashed, with Xet chunked) again."""
    ops = [add_operation(f) for f in files]
    _fetch_modes(api, ops, repo_id=repo_id, repo_type=repo_type, revision=revision)
    for f, op in zip(files, ops):
        _remember_sha256(f, op)
    return ops


def commit_step(api, adds: list, *, repo_id: str, repo_type: str, revision: str, pcfg,
                title: str, what: str, stale=None, on_retry=None):
    """One commit, retried as a whole (``retry_step``): the prepared operations ``adds`` (see
    ``prepare``) whose file the Hub does not hold, their LFS objects uploaded first, and the
    deletes ``stale()`` returns (CommitOperationDelete list; called on each attempt). Each retry
    fetches the Hub's oids again and calls ``stale()`` again, so a commit that landed before its
    answer was lost leaves nothing to do (deleting a path that is not there is an error on the
    Hub). Returns (commit info or None, the operations of the last commit sent, or None when
    none was needed): a sent commit whose retry found nothing left is this push's all the same."""
    where = dict(repo_id=repo_id, repo_type=repo_type, revision=revision)
    sent: list = []
    tries = [0]

    def attempt():
        if tries[0]:  # a retry: what the Hub holds now
            _fetch_modes(api, adds, **where)
        tries[0] += 1
        todo = [op for op in adds if not is_unchanged(op)]
        gone = list(stale()) if stale is not None else []
        if not todo and not gone:
            return None
        # the same objects throughout: an uploaded one is marked so (``_is_uploaded``), and
        # create_commit's own preupload skips it
        if todo:
            api.preupload_lfs_files(repo_id, additions=todo, repo_type=repo_type,
                                    revision=revision, free_memory=False)
        sent[:] = [todo + gone]
        return api.create_commit(repo_id, operations=todo + gone, commit_message=title,
                                 repo_type=repo_type, revision=revision)

    info = retry_step(attempt, pcfg, what, on_retry)
    return info, (sent[0] if sent else None)


# -- retries of the steps huggingface_hub sends once --------------------------------------------

def _retry_policy() -> tuple[tuple[int, ...], tuple[type, ...]]:
    """The HTTP statuses and transport errors huggingface_hub's ``http_backoff`` retries."""
    from huggingface_hub.utils import _http

    return (getattr(_http, "_DEFAULT_RETRY_ON_STATUS_CODES", (408, 429, 500, 502, 503, 504)),
            getattr(_http, "_DEFAULT_RETRY_ON_EXCEPTIONS", ()))


def _causes(e: BaseException | None):
    """``e`` and the errors it was raised from (``raise ... from``: huggingface_hub wraps a
    failed LFS upload that way)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__


def _http_status(e: BaseException) -> tuple[int | None, dict]:
    """The status and headers of the first Hub HTTP error behind ``e`` (None, {} if none)."""
    from huggingface_hub.errors import HfHubHTTPError

    for c in _causes(e):
        if isinstance(c, HfHubHTTPError) and c.response is not None:
            return c.response.status_code, dict(c.response.headers)
    return None, {}


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` is a failure ``http_backoff`` would retry (rate limit, 5xx, dropped
    connection), raised directly or behind the error huggingface_hub wrapped it in."""
    codes, errors = _retry_policy()
    status, _ = _http_status(e)
    if status is not None:
        return status in codes
    return bool(errors) and any(isinstance(c, errors) for c in _causes(e))


def _delay(pcfg, attempt: int, headers: dict) -> float:
    """Seconds before retry ``attempt`` (1-based): the Hub's Retry-After when it sends one in
    seconds, else push.backoff_s doubled per retry; at most push.backoff_max_s."""
    retry_after = {k.lower(): v for k, v in headers.items()}.get("retry-after", "")
    try:
        delay = float(retry_after)
    except ValueError:
        delay = pcfg.backoff_s * 2 ** (attempt - 1)
    return max(0.0, min(pcfg.backoff_max_s, delay))


def retry_step(fn, pcfg, what: str, on_retry=None):
    """``fn()``, run again up to push.max_retries times while it fails transiently (see
    ``is_transient``); ``fn`` must be safe to repeat. ``on_retry()`` is called per retry."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - re-raised unless transient
            if attempt >= pcfg.max_retries or not is_transient(e):
                raise
            attempt += 1
            status, headers = _http_status(e)
            delay = _delay(pcfg, attempt, headers)
            log.warning("%s: %s (HTTP %s); retry %d/%d in %.1fs", what, type(e).__name__, status,
                        attempt, pcfg.max_retries, delay)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)


# -- the uploads -------------------------------------------------------------------------------

def upload_lfs(api, ops: list, *, repo_id: str, repo_type: str, revision: str, pcfg,
               on_retry=None, progress: bool = False) -> None:
    """Upload the LFS objects of the prepared operations ``ops`` (regular files go inline in
    the commit) in batches of push.files_per_commit, each retried as a whole; commits nothing.
    Objects the Hub already holds are not sent again (the LFS batch call answers "already
    there"); an uploaded operation is marked so and is not uploaded again by the commit."""
    todo = batches([op for op in ops if not is_unchanged(op)], pcfg.files_per_commit)
    for k, batch in enumerate(todo, 1):
        retry_step(lambda b=batch: api.preupload_lfs_files(repo_id, additions=b, repo_type=repo_type,
                                                           revision=revision, free_memory=False),
                   pcfg, f"upload {k}/{len(todo)}", on_retry)
        if progress:
            log.info("uploaded batch %d/%d (%d file(s)) to %s", k, len(todo), len(batch), repo_id)


def batches(files: list, size: int) -> list[list]:
    """``files`` in order, cut into lists of at most ``size`` (at least 1)."""
    n = max(1, int(size))
    return [files[i:i + n] for i in range(0, len(files), n)]
