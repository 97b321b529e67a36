"""Resumable uploads and one atomic commit, on huggingface_hub's commit API.

Which files the Hub already has: huggingface_hub's preupload call (``_fetch_upload_modes``)
answers, per path, how the file is stored (regular or LFS) and the oid the Hub holds there;
a file whose local oid (``CommitOperationAdd._local_oid``: the git blob id of a regular file,
the sha256 of an LFS one) equals it has not changed. That is the test ``create_commit`` itself
applies before committing (``split_unchanged``).

The LFS objects of the files to push go up first, in batches (``upload_lfs``:
``HfApi.preupload_lfs_files``, which commits nothing): the LFS batch call answers "already
there" for the objects the Hub holds, so a push interrupted while uploading resumes without
sending them again. Then one ``create_commit`` adds every changed file and deletes every stale
one (guidealign/hub/push.py): the revision goes from the previous push to this one in one step,
never through a mix of both.

Retries: huggingface_hub retries the requests it can safely repeat (preupload, LFS batch and
uploads, listings) itself, with ``http_backoff``. It sends creating a repo and a commit once;
``retry_step`` runs such a step (and an upload batch) again on the failures ``http_backoff``
retries. The commit is retried with what is still to do worked out again, so if a commit landed
before its answer was lost, the retry finds nothing left and makes no second commit.
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


def split_unchanged(api, files: list[LocalFile], *, repo_id: str, repo_type: str,
                    revision: str) -> tuple[list[LocalFile], list[LocalFile]]:
    """(files to commit, files already on the Hub at ``revision``), from one preupload call per
    256 files (huggingface_hub's ``_fetch_upload_modes``, retried by its ``http_backoff``)."""
    from huggingface_hub._commit_api import _fetch_upload_modes
    from huggingface_hub.utils import build_hf_headers

    if not files:
        return [], []
    ops = [add_operation(f) for f in files]
    _fetch_upload_modes(additions=ops, repo_type=repo_type, repo_id=repo_id,
                        headers=build_hf_headers(token=api.token),
                        revision=quote(revision, safe=""), endpoint=api.endpoint)
    new, there = [], []
    for f, op in zip(files, ops):
        (there if is_unchanged(op) else new).append(f)
        _remember_sha256(f, op)
    return new, there


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

def upload_lfs(api, files: list[LocalFile], *, repo_id: str, repo_type: str, revision: str, pcfg,
               on_retry=None, progress: bool = False) -> None:
    """Upload the LFS objects of ``files`` (regular files go inline in the commit) in batches of
    push.files_per_commit, each retried as a whole; commits nothing. Objects the Hub already
    holds are not sent again (the LFS batch call answers "already there")."""
    todo = batches(files, pcfg.files_per_commit)
    for k, batch in enumerate(todo, 1):
        def attempt():
            ops = [add_operation(f) for f in batch]
            try:
                api.preupload_lfs_files(repo_id, additions=ops, repo_type=repo_type,
                                        revision=revision)
            finally:
                for f, op in zip(batch, ops):
                    _remember_sha256(f, op)

        retry_step(attempt, pcfg, f"upload {k}/{len(todo)}", on_retry)
        if progress:
            log.info("uploaded batch %d/%d (%d file(s)) to %s", k, len(todo), len(batch), repo_id)


def batches(files: list[LocalFile], size: int) -> list[list[LocalFile]]:
    """``files`` in order, cut into lists of at most ``size`` (at least 1)."""
    n = max(1, int(size))
    return [files[i:i + n] for i in range(0, len(files), n)]
