"""``guidealign models fetch``: download a recipe's Hub models once, before the job."""
from __future__ import annotations

import click

from guidealign.cli.options import load_cli_config


@click.command("fetch")
@click.option("--config", "-c", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="The recipe (YAML config) whose models to fetch.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override.")
@click.option("--dry-run", is_flag=True, help="Say what would be downloaded; download nothing.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Hugging Face cache to fill (default: HF_HUB_CACHE / HF_HOME's, which the "
                   "workers must share).")
def fetch(config_path, overrides, dry_run, cache_dir):
    """Download every Hub model of a recipe into the shared cache (run once, before the job;
    the workers then run with HF_HUB_OFFLINE=1 and never download at once)."""
    from guidealign.core.models import FetchError, fetch_models

    cfg = load_cli_config(config_path, overrides)
    try:
        fetch_models(cfg, dry_run=dry_run, cache_dir=cache_dir, echo=click.echo)
    except FetchError as e:
        raise click.ClickException(str(e)) from e
