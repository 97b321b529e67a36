"""Retriever training checkpoints: where they go, which one a rerun resumes from, and the trainer
pieces that make them usable (a picklable batch sampler, the configured save interval after a
resume, no checkpoint after the last step, the test/chaos kill hook)."""
from __future__ import annotations

from pathlib import Path

from guidealign.core.checkpoints import newest_checkpoint, remove_other_runs
from guidealign.shards import fingerprint

# Test/chaos hook: the process SIGKILLs itself right after this many checkpoints are written.
KILL_AFTER_SAVES_ENV = "GUIDEALIGN_RETRIEVER_KILL_AFTER_SAVES"


def checkpoint_dir(workdir: str | Path, fp: str) -> Path:
    """WORKDIR/.retriever-checkpoints/<fingerprint>-<versions>: the resume points of one config and
    library (beside the retriever, which is replaced whole when a build finishes), written by these
    versions of torch, transformers and sentence-transformers: a checkpoint of others may not load
    (its trainer state, optimizer or RNG files), so after an upgrade or a downgrade training starts over."""
    from importlib.metadata import version

    libs = fingerprint(*(version(d) for d in ("torch", "transformers", "sentence-transformers")))[:8]
    return Path(workdir) / ".retriever-checkpoints" / f"{fp}-{libs}"


def remove_checkpoints(workdir: str | Path) -> None:
    import shutil

    shutil.rmtree(Path(workdir) / ".retriever-checkpoints", ignore_errors=True)


def resume_point(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint of this fingerprint; those of other fingerprints (another
    config or library, other library versions) are deleted, never resumed."""
    remove_other_runs(ckpt_dir, "retriever")
    return newest_checkpoint(ckpt_dir)


class PicklableSampler:
    """The trainer's ``batch_sampler`` (a callable making the sampler), picklable: the Trainer
    saves its arguments, this included, into every checkpoint (``training_args.bin``). Only a
    placeholder is written there, not the sampler class (made inside a function) nor the pair
    data it holds; resuming never reads that file (the run builds its sampler again)."""

    def __init__(self, cls):
        self.cls = cls

    def __call__(self, *args, **kwargs):
        return self.cls(*args, **kwargs)

    def __reduce__(self):
        return (_no_sampler, ())

    def __repr__(self) -> str:  # sentence-transformers lists it in the model card
        return self.cls.__name__


def _no_sampler():
    return None


def checkpoint_callback():
    """A trainer callback: the configured save interval also after a resume, no checkpoint after
    the last step (the Trainer saves one there with ``save_strategy="steps"``, and it is deleted
    right after), and the test/chaos hook that SIGKILLs this process once ``KILL_AFTER_SAVES_ENV``
    checkpoints are written."""
    import os
    import signal

    from transformers import TrainerCallback

    kill_after = int(os.environ.get(KILL_AFTER_SAVES_ENV, "0") or 0)

    class Checkpoints(TrainerCallback):
        saves = 0

        def on_train_begin(self, args, state, control, **kwargs):
            # a resumed run has the checkpoint's trainer state, and with it the save interval of
            # the run that wrote it: the configured one holds from here on
            state.save_steps = args.save_steps

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False
            return control

        def on_save(self, args, state, control, **kwargs):
            self.saves += 1
            if kill_after and self.saves >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    return Checkpoints()
