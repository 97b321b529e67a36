"""The `push` command."""
from __future__ import annotations

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


@click.command("push")
@click.argument("what")
@click.argument("repo_id", required=False)
@click.option("--private/--public", "private", default=None,
              help="Visibility of a new repo (default: push.private).")
@stage_options
def push(what, repo_id, private, workdir, cfg, rank, world_size, no_progress):
    """Push WHAT (a stage under WORKDIR, e.g. respond, or `model` for the SFT output) to the Hub
    repo REPO_ID (default: push.repo_id). Token: HF_TOKEN or `hf auth login`."""
    from dataclasses import replace

    from huggingface_hub.errors import HfHubHTTPError

    from guidealign.hub.push import PushError, run_push

    r, w = ranks(rank, world_size)
    cfg.push = replace(cfg.push, what=what, repo_id=repo_id or cfg.push.repo_id, model_repo_id="",
                       private=cfg.push.private if private is None else private)
    try:
        rep = run_push(cfg, workdir, rank=r, world_size=w, progress=not no_progress)
    except (PushError, HfHubHTTPError, ValueError) as e:  # ValueError: HFValidationError, a bad repo id
        raise click.ClickException(str(e)) from e
    except _transport_errors() as e:  # the endpoint cannot be reached (after the retries)
        from huggingface_hub import constants

        raise click.ClickException(f"{type(e).__name__}: {e} (endpoint {constants.ENDPOINT}; HF_ENDPOINT "
                                   "sets another)") from e
    if rep is None:
        click.echo(f"push runs on rank 0; rank {r} has nothing to do")
        return
    click.echo(rep.summary())
