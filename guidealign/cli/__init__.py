"""The ``guidealign`` command line: one click group, one command per stage.

Every stage command takes ``--workdir``, ``--config`` (YAML), ``--set KEY=VALUE``
overrides, and ``--rank/--world-size`` (else taken from RANK/WORLD_SIZE or SLURM).
"""
from __future__ import annotations

import gc
import json
import logging
import sys

import click

from guidealign.cli.options import ranks, run_directory, stage_options
from guidealign.config import dump_yaml

log = logging.getLogger("guidealign")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="guide-align")
def cli(verbose):
    """guide-align: batch data generation with the Guide-Align method."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
@run_directory
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(workdir, as_json):
    """Per stage: shards done/total, rows, quarantined rows, throughput; then the ranks whose
    last run failed (their failure markers).

    Exits 1 when no stage has written in WORKDIR (a mistyped directory, a run not started) or
    a rank's last run failed."""
    from guidealign.status import collect, failed_ranks, render

    rows = collect(workdir)
    if rows or as_json:
        click.echo(json.dumps(rows, indent=1) if as_json else render(rows))
    failed = failed_ranks(workdir, rows)
    for line in failed:
        click.echo(f"FAILED: {line}", err=True)
    if failed:
        click.echo("(rerun the failed ranks, or the whole run: each stage skips what is done)", err=True)
    if not rows:  # a mistyped directory, or a run not started: not a run whose status is fine
        click.echo(f"no stage has written in {workdir} (is it the -w/--workdir of the stages?)", err=True)
    if failed or not rows:
        raise SystemExit(1)


@cli.command()
@run_directory
@click.option("-n", "count", default=3, show_default=True, type=click.IntRange(min=0),
              help="How many examples.")
@click.option("--shard", type=int, default=None, help="Which shard (default: the first committed).")
@click.option("--stage", default="respond", show_default=True,
              help="Response dataset under WORKDIR to read: respond, respond-baseline, "
                   "eval/<benchmark>/respond_guided (or respond_unguided).")
def show(workdir, count, shard, stage):
    """Print examples: prompt -> risk verdict -> retrieved guidelines -> response."""
    import pyarrow as pa

    from guidealign.show import examples, render

    try:
        click.echo(render(examples(workdir, count, shard, stage)))
    except RuntimeError as e:
        raise click.ClickException(str(e)) from e
    except (OSError, pa.ArrowException) as e:  # a shard file cut short, damaged or unreadable
        log.debug("show failed", exc_info=True)
        what = f"shard {shard}" if shard is not None else "a shard"
        first = (str(e).strip().splitlines() or [""])[0]
        raise click.ClickException(
            f"cannot read {what} of {stage} (or detect) in {workdir}, damaged or cut short? "
            f"({type(e).__name__}: {first}); run `guidealign verify {workdir} --repair`, then "
            "rerun the stage it names to write the shard again") from e


@cli.group()
def models():
    """The embedded default models."""


@models.command("prepare")
@click.option("--force", is_flag=True, help="Rebuild the generator checkpoint.")
def models_prepare(force):
    """Materialize SmolLM2 from its GGUF and locate MiniLM (offline, idempotent)."""
    from guidealign.core.models import embedder_dir, prepare_generator

    click.echo(f"generator: {prepare_generator(force=force)}")
    click.echo(f"embedder:  {embedder_dir()}")


@cli.group("config")
def config_group():
    """Inspect the config."""


@config_group.command("show")
@click.option("--config", "-c", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML config file (see configs/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set engine.dtype=float32 (repeatable).")
def config_show(config_path, overrides):
    """Print the effective config (defaults, file, overrides) as YAML."""
    from guidealign.cli.options import load_cli_config

    click.echo(dump_yaml(load_cli_config(config_path, overrides)), nl=False)


@cli.command()
@click.option("--stages", default=None, help="Comma-separated subset of stages to run (default: all).")
@click.option("--no-check", is_flag=True, help="Skip the preflight (`guidealign check`) run first.")
@stage_options
def run(workdir, cfg, rank, world_size, no_progress, stages, no_check):
    """Run the whole pipeline: ingest ... respond, sft (and push when push.repo_id is set, then
    the model too when push.model_repo_id is set; the model alone with push.model_repo_id alone)."""
    from guidealign.pipeline import choose, run_pipeline
    from guidealign.shards.ranks import array_refusal, batch_script_refusal

    explicit = rank is not None or world_size is not None
    if why := batch_script_refusal(explicit) or array_refusal(explicit):
        raise click.UsageError(why)  # rank 0 of n alone: 1/n of each map stage; an array: a stall
    names = [s.strip() for s in stages.split(",") if s.strip()] if stages is not None else None  # "a, b" too
    if names == []:  # --stages "$EMPTY": not "every stage"
        raise click.UsageError("--stages names no stage; leave it out to run every stage")
    try:
        chosen = [s.name for s in choose(cfg, names)]  # a misspelt stage: a usage error before any work
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    r, w = ranks(rank, world_size)
    if not no_check:
        from guidealign.cli.check import preflight

        if (failed := preflight(cfg, workdir, stages=chosen)) is not None:
            # (in the failure marker too: the other ranks stop with it)
            why = f"the preflight failed ({failed}); fix it or pass --no-check"
            if w > 1:  # the other ranks stop at once instead of waiting for this one's shards
                from guidealign.shards.failure import mark_failed

                mark_failed(workdir, r, why, stage="preflight", world_size=w)
            raise click.ClickException(why)

    from guidealign.ingest.readers import IngestError

    try:
        run_pipeline(cfg, workdir, rank=r, world_size=w, stages=names, progress=not no_progress, echo=click.echo)
    # e.g. a stage whose input is not there yet; and the errors the stage commands also print
    # as one line (an input file ingest cannot read, sft with no response shards, a model
    # neither local nor in the Hub cache on an offline node)
    except (ValueError, RuntimeError, IngestError, OSError) as e:
        log.debug("run failed", exc_info=True)
        from guidealign.cli.options import error_line

        raise click.ClickException(error_line(e)) from e


# --- the stage commands, registered in the stage table's order ------------------------------
from guidealign.cli import stage_commands as _sc  # noqa: E402
from guidealign.cli.check import check as _check  # noqa: E402
from guidealign.cli.eval import eval_cmd as _eval  # noqa: E402
from guidealign.cli.fetch import fetch as _fetch  # noqa: E402
from guidealign.cli.sft import push as _push  # noqa: E402
from guidealign.cli.verify import verify as _verify  # noqa: E402
from guidealign.launch import launch as _launch  # noqa: E402
from guidealign.stages import STAGES  # noqa: E402

STAGE_COMMANDS = {c.name: c for c in (_sc.ingest, _sc.detect, _sc.guidelines, _sc.library,
                                       _sc.train_retriever, _sc.index, _sc.retrieve, _sc.respond,
                                       _sc.sft, _push, _sc.augment, _sc.export, _eval)}
for _stage in STAGES:
    cli.add_command(STAGE_COMMANDS[_stage.name])
for _cmd in (_launch, _check, _verify):
    cli.add_command(_cmd)
models.add_command(_fetch)


def main():
    try:
        cli(prog_name="guidealign")
    finally:
        if _sc.QUICK_EXIT:
            # the objects left are moved out of the collector's reach: the collections of
            # interpreter shutdown skip them (~30 ms of a 1M-row ingest's ~1.3 s)
            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
