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


def run_ingest(cfg, workdir: str | Path, *, rank: int = 0, world_size: int = 1, progress: bool = True,
               inputs: list[str] | None = None, dataset: str | None = None):
    """Ingest on rank 0; the other ranks wait for the result.

    Default: ``cfg.inputs`` -> WORKDIR/prompts, and ``cfg.inputs_sft`` (when set) ->
    WORKDIR/prompts-sft. ``inputs``/``dataset`` ingest other files into one dataset."""
    from guidealign.config import wait_timeout
    from guidealign.ingest.run import ingest, wait_ingested

    if inputs is not None or dataset is not None:
        sets = [(list(inputs) if inputs else (cfg.inputs or cfg.ingest.inputs), dataset or "prompts")]
    else:
        sets = [(cfg.inputs or cfg.ingest.inputs, "prompts")]
        if cfg.inputs_sft:
            sets.append((cfg.inputs_sft, "prompts-sft"))
    if rank != 0:  # until rank 0's manifest for these very inputs and settings is there
        for files, name in sets:
            wait_ingested(Path(workdir) / name, files, cfg.ingest, wait_timeout(cfg, world_size))
        return None
    return IngestReports([ingest(files, workdir, cfg.ingest, progress=progress, dataset=name)
                          for files, name in sets])
