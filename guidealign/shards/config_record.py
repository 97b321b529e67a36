"""The config each stage last ran with, kept in the run directory: WORKDIR/_configs/<stage>.json.

A dataset card shows the config of the stage it publishes from this record (the config given
to ``push`` may be another one: the defaults, on a login node without the run's ``-c``).
Written by the orchestration after a stage returns on rank 0, secrets already left out; a
record only: nothing is skipped or redone by it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from guidealign.shards.write import write_json_atomic

CONFIGS_DIR = "_configs"


def config_record_path(workdir, stage: str) -> Path:
    return Path(workdir) / CONFIGS_DIR / f"{stage}.json"


def write_stage_config(workdir, stage: str, config: dict) -> None:
    """Record ``config`` (a config as a dict, secrets already out) as the one ``stage`` ran with."""
    path = config_record_path(workdir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"stage": stage, "recorded": time.time(), "config": config})


def read_stage_config(workdir, stage: str) -> dict | None:
    """The config ``stage`` last ran with in ``workdir``, or None (never recorded, or damaged)."""
    try:
        rec = json.loads(config_record_path(workdir, stage).read_text())
    except (OSError, ValueError):
        return None
    cfg = rec.get("config") if isinstance(rec, dict) else None
    return cfg if isinstance(cfg, dict) else None
