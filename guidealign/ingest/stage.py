"""The ingest stage with the common stage signature (guidealign/stages.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class IngestReports:
    """One report per prompt set ingested (the library set, and the fine-tuning set)."""
    reports: list = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join(r.summary() for r in self.reports)


def prompt_sets(cfg, inputs: list[str] | None = None, dataset: str | None = None) -> list[tuple[list, str]]:
    """(files, dataset) to ingest. Files given: into ``dataset`` (default "prompts"). None
    given: the config's sets, ``inputs`` -> prompts and ``inputs_sft`` (when set) ->
    prompts-sft, or the one of them that ``dataset`` names; another dataset needs its files."""
    from guidealign.ingest.readers import IngestError

    if inputs:
        return [(list(inputs), dataset or "prompts")]
    sets = [(cfg.inputs or cfg.ingest.inputs, "prompts")]
    if cfg.inputs_sft:
        sets.append((cfg.inputs_sft, "prompts-sft"))
    if dataset is None:
        return sets
    named = [s for s in sets if s[1] == dataset]
    if not named:
        what = "inputs_sft is not set in the config" if dataset == "prompts-sft" else "the config names none"
        raise IngestError(f"no input files for dataset {dataset!r} ({what}): give them on the command "
                          "line (the config's inputs go to prompts, inputs_sft to prompts-sft)")
    return named


def run_ingest(cfg, workdir: str | Path, *, rank: int = 0, world_size: int = 1, progress: bool = True,
               inputs: list[str] | None = None, dataset: str | None = None):
    """Ingest on rank 0; the other ranks wait for the result. What goes where:
    :func:`prompt_sets` (by default ``cfg.inputs`` -> WORKDIR/prompts and ``cfg.inputs_sft``,
    when set, -> WORKDIR/prompts-sft)."""
    from guidealign.config import wait_timeout
    from guidealign.ingest.run import ingest, wait_ingested

    sets = prompt_sets(cfg, inputs, dataset)
    if rank != 0:  # until rank 0's manifest for these very inputs and settings is there
        for files, name in sets:
            wait_ingested(Path(workdir) / name, files, cfg.ingest, wait_timeout(cfg, world_size))
        return None
    return IngestReports([ingest(files, workdir, cfg.ingest, progress=progress, dataset=name)
                          for files, name in sets])
