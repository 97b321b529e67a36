"""The `push` command."""
from __future__ import annotations

from pathlib import Path

import click

from guidealign.cli.options import ranks, stage_options


def _transport_errors() -> tuple:
    """What huggingface_hub's HTTP client raises when a connection fails (httpx2 in 2.x, httpx
    in 1.x), and OSError."""
    errors: list = [OSError]
    for mod in ("httpx2", "httpx"):
        try:
            errors.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_failure(e: BaseException) -> bool:
    """A failure huggingface_hub wrapped in a RuntimeError ("Error while uploading '...' to the
    Hub.", raised from the HTTP or connection error of an LFS upload): not a bug of ours."""
    from huggingface_hub.errors import HfHubHTTPError

    from guidealign.hub.commits import _causes

    wrapped = (HfHubHTTPError,) + _transport_errors()
    return str(e).startswith("Error while uploading") or \
        any(isinstance(c, wrapped) for c in _causes(e.__cause__))


def _hint(e: BaseException, workdir) -> str:
    """What to do about a failed push, by the HTTP status behind ``e``: a missing or refused
    token; an upload the Hub refused (a shard whose bytes are no longer those its marker
    checksummed: push sends the marker's sha256, and the Hub checks the bytes against it); an
    endpoint that cannot be reached."""
    from huggingface_hub import constants

    from guidealign.hub.commits import _causes, _http_status

    status, _ = _http_status(e)
    if status == 401:
        return "no valid token: set HF_TOKEN or run `hf auth login`"
    if status == 403:
        return ("the token may not write there: use a token with write access (HF_TOKEN or "
                "`hf auth login`) or a namespace it may write to")
    if status in (400, 422) and isinstance(e, RuntimeError):
        return (f"a file may have changed since it was committed: check with `guidealign verify "
                f"{workdir}` (--repair, then rerun the stage)")
    if status is None and any(isinstance(c, _transport_errors()) for c in _causes(e)):
        return f"endpoint {constants.ENDPOINT} not reached (HF_ENDPOINT sets another)"
    return ""


def _first_line(x) -> str:
    """The first line of an error's (or a text's) message; its type's name when it has none."""
    return (str(x).strip().splitlines() or [type(x).__name__])[0]


def _one_line(e: BaseException, workdir) -> str:
    """``e`` as one line for the console: its first line, the error behind it (huggingface_hub's
    wrapper names neither the HTTP status nor the Hub's message), and a hint."""
    from huggingface_hub.errors import HfHubHTTPError

    from guidealign.hub.commits import _causes, _http_status

    text = _first_line(e).rstrip(".")  # "... to the Hub.": the status and hint follow
    status, _ = _http_status(e)
    if status is not None:
        http = next(c for c in _causes(e) if isinstance(c, HfHubHTTPError) and c.response is not None)
        said = (getattr(http, "server_message", None) or "").strip()
        text += f" (HTTP {status}: {_first_line(said)})" if said else f" (HTTP {status})"
    elif e.__cause__ is not None:
        text += f" ({type(e.__cause__).__name__}: {_first_line(e.__cause__)})"
    hint = _hint(e, workdir)
    return f"{text}: {hint}" if hint else text


def _default_repo(cfg, workdir, what: str) -> str:
    """The repo WHAT goes to without REPO_ID: the trained model (`model`, `sft`, or its folder by
    its path, e.g. sft/model) to push.model_repo_id when that is set (it went to push.repo_id,
    the dataset's repo name, as a new model repo); anything else to push.repo_id."""
    from guidealign.hub.targets import is_sft_output, target_dir

    model = what in ("model", "sft")
    if not model:
        try:
            model = is_sft_output(target_dir(Path(workdir), what))
        except (OSError, ValueError):  # run_push says what is wrong with WHAT
            pass
    return (cfg.push.model_repo_id if model else "") or cfg.push.repo_id


@click.command("push")
@click.argument("what", required=False)
@click.argument("repo_id", required=False)
@click.option("--private/--public", "private", default=None,
              help="Visibility of a new repo (default: push.private); an existing repo keeps "
                   "its own, with a warning when it is not the one asked for.")
@stage_options
def push(what, repo_id, private, workdir, cfg, rank, world_size, no_progress):
    """Push WHAT (a stage under WORKDIR, e.g. respond, or `model` for the SFT output) to the Hub
    repo REPO_ID (default: push.repo_id; for the model, push.model_repo_id when set); WHAT only. Without WHAT, push what `guidealign run`
    pushes at its end: push.what (default respond) to push.repo_id, then the model to
    push.model_repo_id when set (with push.model_repo_id alone: the model alone), as the SLURM
    chain's last job does (PUSH=1). Token: HF_TOKEN or `hf auth login`."""
    from dataclasses import replace

    r, w = ranks(rank, world_size)
    visible = cfg.push.private if private is None else private
    if what is None:  # `run`'s push (run_push on the config as it is)
        if not (cfg.push.repo_id or cfg.push.model_repo_id):
            raise click.UsageError("nothing to push: give WHAT (and REPO_ID), or set push.repo_id "
                                   "(push.what: the stage it pushes) and/or push.model_repo_id "
                                   "(the model), as `guidealign run` pushes them")
        cfg.push = replace(cfg.push, private=visible)
    else:
        default = _default_repo(cfg, workdir, what)
        cfg.push = replace(cfg.push, what=what, repo_id=repo_id or default, model_repo_id="",
                           private=visible)
    reports: list = []  # each push's: without WHAT, the dataset's and then the model's
    try:
        rep = _run_push(cfg, workdir, r, w, not no_progress, reports)
    finally:  # a push that finished before the next one failed is on the Hub: said so too
        # (push.private set in the config asks for a private repo as --private does: an existing
        # public one is pushed to as it is, and said so; a config at its default, public, asks
        # nothing: a private repo is not warned about)
        _show(reports, private if private is not None else (True if cfg.push.private else None))
    if rep is None:
        click.echo(f"push runs on rank 0; rank {r} has nothing to do")


def _run_push(cfg, workdir, r: int, w: int, progress: bool, reports: list):
    """run_push, its failures as one-line errors (with a hint) for the console."""
    from huggingface_hub.errors import HfHubHTTPError

    from guidealign.hub.push import PushError, run_push

    try:
        return run_push(cfg, workdir, rank=r, world_size=w, progress=progress, reports=reports)
    except PushError as e:
        raise click.ClickException(str(e)) from e
    except (HfHubHTTPError, ValueError) as e:  # ValueError: HFValidationError, a bad repo id
        hint = _hint(e, workdir)
        raise click.ClickException(f"{e}\n{hint}" if hint else str(e)) from e
    except _transport_errors() as e:  # the endpoint cannot be reached (after the retries)
        from huggingface_hub import constants

        raise click.ClickException(f"{type(e).__name__}: {e} (endpoint {constants.ENDPOINT}; HF_ENDPOINT "
                                   "sets another)") from e
    except RuntimeError as e:  # an upload huggingface_hub wrapped; any other is a bug: its traceback
        if not _hub_failure(e):
            raise
        raise click.ClickException(_one_line(e, workdir)) from e


def _show(reports: list, private: bool | None) -> None:
    """Each push's summary; a warning for a repo whose visibility is not the one --private,
    --public or push.private asked for (create_repo keeps an existing repo's visibility: it is
    not changed behind the user's back)."""
    from guidealign.hub.push import visibility

    for one in reports:
        if private is not None and one.private is not None and one.private != private:
            click.echo(f"warning: {one.repo_type} {one.repo_id} is {visibility(one.private)}, not "
                       f"{visibility(private)} as asked: push.private and --private/--public apply "
                       "to a new repo only (change it in the repo's settings on the Hub)", err=True)
        click.echo(one.summary())
