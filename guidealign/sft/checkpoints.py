"""Where SFT resumes from: its checkpoints under WORKDIR/sft/checkpoints/<fingerprint>/, the
newest complete one, and the loss over a run that was resumed."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from guidealign.core.checkpoints import newest_checkpoint, remove_other_runs

log = logging.getLogger(__name__)

# what the trainer names an FSDP checkpoint's model files (pytorch_model_fsdp.bin, or the folder
# pytorch_model_fsdp_0 of a sharded one): transformers' and accelerate's FSDP_MODEL_NAME
FSDP_MODEL_PREFIX = "pytorch_model_fsdp"


def checkpoint_dir(workdir, fp: str) -> Path:
    """WORKDIR/sft/checkpoints/<fingerprint>: the resume points of one config and data."""
    return Path(workdir) / "sft" / "checkpoints" / fp


def is_main_process() -> bool:
    """Rank 0 of the training job (before its process group exists: the launcher's RANK)."""
    from guidealign.sft.launcher import under_launcher

    return not under_launcher() or int(os.environ.get("RANK", "0") or 0) == 0


def resume_point(ckpt_dir: Path, scfg, *, main: bool, fsdp: bool = False) -> str | None:
    """The newest complete checkpoint in ``ckpt_dir`` to resume from (sft.save_steps > 0),
    else None; one cut off while being saved is passed over (``core.checkpoints``). A run resumes
    only from its own fingerprint's checkpoints: those of an earlier config or other data
    (another folder under checkpoints/) are never resumed, and the main process deletes them.

    ``fsdp``: this run trains under FSDP. The process count is not in the fingerprint, and FSDP
    is dropped with one process, so a job lost on a node of one GPU and run again on eight (or
    the other way) found a checkpoint of the other layout, which transformers cannot load
    either way (an FSDP checkpoint without FSDP raises; without FSDP's files the load fails):
    such a checkpoint is passed over with a warning, and the main process deletes it (the
    trainer's rotation would otherwise delete the new checkpoints, of lower steps, first)."""
    if main:
        remove_other_runs(ckpt_dir, "sft")
    if scfg.save_steps <= 0:
        return None
    newest = newest_checkpoint(ckpt_dir)
    if newest is None:
        return None
    saved_fsdp = any(newest.glob(f"{FSDP_MODEL_PREFIX}*"))
    if saved_fsdp != fsdp:
        log.warning("sft: %s was saved %s FSDP and this run trains %s it: transformers cannot resume "
                    "across that change (the number of training processes changed), so training starts "
                    "from the beginning", newest, "under" if saved_fsdp else "without",
                    "under" if fsdp else "without")
        if main:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        return None
    return str(newest)


def whole_run_loss(log_history: list[dict]) -> float | None:
    """The mean training loss over all logged steps, also those before a resume (the trainer's
    ``training_loss`` covers only the steps of its own call): each logged loss is the mean of
    the steps since the previous log, so it weighs by their number. Every step is logged when
    the trainer has ``loss_log_callback``'s (a log at each checkpoint and at the last step), so
    this is the loss an uninterrupted run reports. None when none was logged."""
    total, last = 0.0, 0
    for h in log_history:
        if "loss" in h and "step" in h and h["step"] > last:
            total += h["loss"] * (h["step"] - last)
            last = h["step"]
    return total / last if last else None


def loss_log_callback():
    """A transformers TrainerCallback that also logs the loss at each checkpoint and at the last
    step, not only every logging_steps: the logs then cover every step, the ones before a
    checkpoint (kept in its trainer state) and those after the last multiple of logging_steps, so
    a resumed run's ``whole_run_loss`` equals the uninterrupted run's train_loss. (The trainer's
    ``training_loss`` of a resumed call is divided by the steps of the call in transformers 5.19,
    by all steps in 5.17: it is not read.)"""
    from transformers import TrainerCallback

    class LogAtCheckpointsAndEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # after DefaultFlowCallback, which decided should_save; the same on every process
            if args.logging_strategy != "no" and (control.should_save or state.global_step >= state.max_steps):
                control.should_log = True
            return control

    return LogAtCheckpointsAndEnd()
