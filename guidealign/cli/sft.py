"""Click commands of the respond, sft and push stages (registered in guidealign/cli.py)."""
from __future__ import annotations

import json

import click

from guidealign.cli.options import ranks, stage_options


@click.command("respond")
@click.option("--no-guidelines", is_flag=True,
              help="Unguided baseline: answer WORKDIR/prompts without guidelines "
                   "(into WORKDIR/respond-baseline).")
@click.option("--src", default=None, help="Input dataset under WORKDIR (default: retrieve, or "
                                          "prompts with --no-guidelines).")
@click.option("--dst", default=None, help="Output dataset under WORKDIR (default: respond, or "
                                          "respond-baseline with --no-guidelines).")
@stage_options
def respond(no_guidelines, src, dst, workdir, cfg, rank, world_size, no_progress):
    """Answer each prompt with vLLM, guided by its retrieved guidelines (the aligned dataset)."""
    from guidealign.gen.respond import run_respond

    r, w = ranks(rank, world_size)
    try:
        rep = run_respond(cfg, workdir, rank=r, world_size=w, guided=not no_guidelines, src=src,
                          dst=dst, progress=not no_progress)
    except (RuntimeError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(rep.summary())


@click.command("sft")
@click.option("--force", is_flag=True, help="Train again even if WORKDIR/sft is done with this config.")
@stage_options
def sft(force, workdir, cfg, rank, world_size, no_progress):
    """Fine-tune the base model on the guided responses (without guidelines) with TRL.

    Several GPUs: `accelerate launch -m guidealign sft ...` or `torchrun --nproc-per-node N
    -m guidealign sft ...` with the same config.
    """
    from guidealign.sft.train import run_sft

    r, w = ranks(rank, world_size)
    try:
        done = run_sft(cfg, workdir, rank=r, world_size=w, progress=not no_progress, force=force)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    if r != 0:
        return
    if done.get("skipped"):
        click.echo(f"sft: already done ({workdir}/sft/model)")
    else:
        click.echo(f"sft: {done['rows']} examples, {done['steps']} steps, loss {done['first_loss']:.4f} "
                   f"-> {done['last_loss']:.4f}, dropped {json.dumps(done['dropped'])}, "
                   f"{done['seconds']:.0f}s -> {workdir}/sft/model")


@click.command("push")
@click.argument("what")
@click.argument("repo_id", required=False)
@click.option("--private/--public", "private", default=None,
              help="Visibility of a new repo (default: push.private).")
@stage_options
def push(what, repo_id, private, workdir, cfg, rank, world_size, no_progress):
    """Push WHAT (a stage under WORKDIR, e.g. respond, or `model` for the SFT output) to the Hub
    repo REPO_ID (default: push.repo_id). Token: HF_TOKEN or `hf auth login`."""
    from guidealign.hub.push import PushError, run_push

    r, _ = ranks(rank, world_size)
    if r != 0:
        click.echo(f"push runs on rank 0; rank {r} has nothing to do")
        return
    try:
        rep = run_push(cfg, workdir, what, repo_id=repo_id, private=private,
                       progress=not no_progress)
    except PushError as e:
        raise click.ClickException(str(e)) from e
    click.echo(rep.summary())
