"""Click commands of the gen stages: detect, guidelines, augment."""
from __future__ import annotations

import json

import click

from guidealign.cli.options import ranks, stage_options


def _report(rep) -> None:
    click.echo(rep.summary())
    if rep.stats:
        click.echo(json.dumps(rep.stats, sort_keys=True))


def _guard(fn, *args, **kwargs):
    from guidealign.gen.build import TemplateError

    try:
        return fn(*args, **kwargs)
    except (TemplateError, ValueError) as e:
        raise click.ClickException(str(e)) from e


@click.command()
@stage_options
def detect(workdir, cfg, rank, world_size, no_progress):
    """Label each prompt risky or not (WORKDIR/prompts -> WORKDIR/detect)."""
    from guidealign.gen.detect import run_detect

    r, w = ranks(rank, world_size)
    _report(_guard(run_detect, cfg, workdir, rank=r, world_size=w, progress=not no_progress))


@click.command()
@stage_options
def guidelines(workdir, cfg, rank, world_size, no_progress):
    """Write safety or quality guidelines per prompt (WORKDIR/detect -> WORKDIR/guidelines)."""
    from guidealign.gen.guidelines import run_guidelines

    r, w = ranks(rank, world_size)
    _report(_guard(run_guidelines, cfg, workdir, rank=r, world_size=w, progress=not no_progress))


@click.command()
@stage_options
def augment(workdir, cfg, rank, world_size, no_progress):
    """Generate new risky questions per risk type, self-instruct style (-> WORKDIR/augment).

    Use them as a run's prompts with --set detect.input=augment, or ingest them:
    guidealign ingest 'WORKDIR/augment/shard-*.parquet' -w OTHER_WORKDIR."""
    from guidealign.gen.augment import run_augment

    r, w = ranks(rank, world_size)
    _report(_guard(run_augment, cfg, workdir, rank=r, world_size=w, progress=not no_progress))
