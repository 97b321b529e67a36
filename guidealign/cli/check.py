"""``guidealign check``: the preflight's command (registered in guidealign/cli.py)."""
from __future__ import annotations

import json
import sys

import click


def preflight(cfg, workdir, echo=click.echo, stages: list[str] | None = None) -> str | None:
    """Run the checks (of ``stages`` only, when given), print the table; None when nothing
    failed, else the failures in one line (``run`` calls this first, for the stages it runs)."""
    from guidealign.check import failures, render, run_checks

    rows = run_checks(cfg, workdir, stages=stages)
    echo(render(rows))
    bad = failures(rows)
    if not bad:
        return None
    summary = "; ".join(f"{r.item}: {r.detail}" for r in bad)
    echo(f"check: {len(bad)} failure(s): {summary}")
    return summary


@click.command("check")
@click.option("--config", "-c", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML config file (see configs/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (repeatable). A mapping value replaces a free-form mapping "
                   "(--set 'respond.engine={model: M}' drops the file's other respond.engine keys); "
                   "KEY.sub=V sets one key in it; a section's keys merge.")
@click.option("--workdir", "-w", default=None, type=click.Path(file_okay=False),
              help="Run directory (for the disk check; default: the current directory).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable rows.")
def check(config_path, overrides, workdir, as_json):
    """Preflight without loading weights: models, chat templates, lengths, GPUs, SFT batch,
    memory, disk, Hub token, executor. Exits non-zero on any failure."""
    from dataclasses import asdict

    from guidealign.check import failures, run_checks
    from guidealign.cli.options import load_cli_config

    cfg = load_cli_config(config_path, overrides)
    if as_json:
        rows = run_checks(cfg, workdir)
        click.echo(json.dumps([asdict(r) for r in rows], indent=1))
        ok = not failures(rows)
    else:
        ok = preflight(cfg, workdir) is None
    sys.exit(0 if ok else 1)
