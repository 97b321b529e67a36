"""The options every stage command shares, and the rank they run as."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import get_args

import click

from guidealign.config import ConfigError, ExecutorKind, config_error, load_config, yaml_errors


def error_line(e: Exception) -> str:
    """A stage's error as one line: its message, named by its kind when that says more than
    the message (RankFailed, Stalled, AllPromptsFailed...; not a plain ValueError/RuntimeError)."""
    kind = type(e).__name__
    return str(e) if kind in ("ValueError", "RuntimeError") else f"{kind}: {e}"


def load_cli_config(config_path, overrides):
    """``load_config`` for a command: a bad file or --set is a usage error (one line, exit 2),
    never a traceback."""
    try:
        return load_config(config_path, overrides)
    except (ConfigError, OSError, UnicodeDecodeError, *yaml_errors()) as e:
        where = f"{config_path}: " if config_path and not isinstance(e, ConfigError) else ""
        raise click.UsageError(f"config: {where}{config_error(e)}") from e


def stage_options(f):
    """The options every stage command shares."""
    @click.option("--workdir", "-w", required=True, type=click.Path(file_okay=False),
                  help="Run directory; the stage writes under WORKDIR/<stage>/.")
    @click.option("--config", "-c", "config_path", type=click.Path(exists=True, dir_okay=False),
                  help="YAML config file (see configs/).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config key, e.g. --set engine.dtype=float32 (repeatable; a mapping "
                       "value replaces a free-form mapping such as respond.engine, KEY.sub=V sets one key).")
    @click.option("--rank", type=int, default=None, help="This worker's rank (default: from env).")
    @click.option("--world-size", type=int, default=None, help="Number of workers (default: from env).")
    @click.option("--no-progress", is_flag=True, help="Hide progress bars.")
    @click.option("--executor", type=click.Choice(get_args(ExecutorKind)), default=None,
                  help="local: this rank's shards here; ray: sharded stages on Ray worker actors (one engine each) "
                       "taking shard after shard, other stages as one Ray task (default: executor.kind).")
    @functools.wraps(f)
    def wrapper(*args, config_path=None, overrides=(), executor=None, **kwargs):
        cfg = load_cli_config(config_path, overrides)
        cfg.executor.kind = executor or cfg.executor.kind
        return f(*args, cfg=cfg, **kwargs)
    return wrapper


def run_directory(f):
    """A reading command's run directory: ``WORKDIR`` as its argument, or ``-w/--workdir`` as the
    stage commands take it."""
    path = click.Path(exists=True, file_okay=False)

    @click.argument("workdir", required=False, type=path)
    @click.option("--workdir", "-w", "workdir_option", type=path, default=None,
                  help="The run directory (the stages' -w), as an option instead of WORKDIR.")
    @functools.wraps(f)
    def wrapper(*args, workdir=None, workdir_option=None, **kwargs):
        # (the same folder spelt two ways, "w/" and "./w", is one run directory)
        if workdir and workdir_option and Path(workdir).resolve() != Path(workdir_option).resolve():
            raise click.UsageError(f"two run directories given: {workdir} and -w {workdir_option}")
        if not (workdir or workdir_option):
            raise click.UsageError("missing the run directory: give WORKDIR or -w/--workdir")
        return f(*args, workdir=workdir or workdir_option, **kwargs)
    return wrapper


def ranks(rank, world_size):
    from guidealign.shards import resolve_rank

    try:
        return resolve_rank(rank, world_size)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
