"""The newest complete checkpoint a transformers ``Trainer`` left in a folder (SFT, the retriever).

The Trainer writes a checkpoint's files in place (weights, optimizer, scheduler, RNG states) and
its trainer state last, with a plain ``open("w")``: a checkpoint whose trainer state is missing,
cut off or names another step was still being written when the run stopped, and ``train`` cannot
resume from it. Rotation (``save_total_limit``) deletes older checkpoints only after the newer one's
trainer state is written, so a complete one is left whenever one was ever finished.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# transformers.trainer_callback's TRAINER_STATE_NAME, written last into each checkpoint
TRAINER_STATE = "trainer_state.json"


def checkpoint_step(d: Path) -> int | None:
    """The step of checkpoint folder ``d`` (``checkpoint-<step>``) when it is complete, else None."""
    step = d.name.removeprefix("checkpoint-")
    if d.name == step or not step.isdigit() or not d.is_dir():
        return None
    try:
        state = json.loads((d / TRAINER_STATE).read_text())
    except (OSError, ValueError):  # missing, or cut off while being written
        return None
    return int(step) if isinstance(state, dict) and state.get("global_step") == int(step) else None


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The complete ``checkpoint-<step>`` folder with the highest step under ``ckpt_dir``, or None."""
    if not Path(ckpt_dir).is_dir():
        return None
    steps = {s: d for d in Path(ckpt_dir).glob("checkpoint-*") if (s := checkpoint_step(d)) is not None}
    return steps[max(steps)] if steps else None


def remove_other_runs(ckpt_dir: Path, what: str) -> None:
    """Delete the folders beside ``ckpt_dir`` (the checkpoints of another config, data or library):
    they are never resumed, and each holds weights plus optimizer state."""
    root = Path(ckpt_dir).parent
    if not root.is_dir():
        return
    for old in root.iterdir():
        if old.name != Path(ckpt_dir).name:
            log.info("%s: removing checkpoints of another config or data: %s", what, old)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
