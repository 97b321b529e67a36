"""Click commands for scale-out: ``guidealign export`` (a sharded stage) and ``guidealign launch``."""
from __future__ import annotations

import click

from guidealign.cli.options import ranks, stage_options
from guidealign.launch import launch  # noqa: F401  (registered in guidealign/cli.py)


@click.command()
@click.argument("dataset", default="respond")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: WORKDIR/export/DATASET).")
@click.option("--columns", default=None, help="Comma-separated columns to keep (default: all).")
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@stage_options
def export(dataset, out, columns, fmt, workdir, cfg, rank, world_size, no_progress):
    """Write the shards of WORKDIR/DATASET (default: respond) as JSONL, one file per shard.

    Sharded like every map stage (--rank/--world-size, RANK/WORLD_SIZE, a SLURM array, or
    --executor ray); committed shards are skipped on a rerun. `cat OUT/shard-*.jsonl`
    joins them in order.
    """
    from guidealign.export import run_export

    r, w = ranks(rank, world_size)
    try:
        rep = run_export(cfg, workdir, dataset=dataset, out=out, fmt=fmt, rank=r, world_size=w,
                         columns=[c for c in columns.split(",") if c] if columns else None,
                         progress=not no_progress)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(rep.summary())
    if rep.pending:
        raise click.ClickException(f"{len(rep.pending)} input shard(s) not committed yet")
