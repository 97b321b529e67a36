"""The SFT training set: response shards -> prompt/completion conversations.

Each example is the user prompt and the assistant response, *without* the guidelines
(the point of Guide-Align's SFT: the model learns to behave well unprompted). In TRL's
conversational prompt/completion format, SFTTrainer computes the loss on the completion
(the assistant turn) only, so no generation markers are needed in the chat template.
Truncated (finish_reason "length"), failed and empty responses are dropped and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = ["id", "prompt", "response", "finish_reason"]


@dataclass
class DataReport:
    rows: int = 0           # response rows read
    kept: int = 0           # training examples
    dropped: dict = field(default_factory=dict)  # reason -> count
    # dataset name (as configured in sft.data, never an absolute path of the run dir) ->
    # {"shards", "sha256": [...]}: what the fingerprint depends on, so a moved run dir is reused
    sources: dict = field(default_factory=dict)

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.rows} responses read, {self.kept} examples kept, dropped: {why}"


def data_paths(cfg, workdir) -> list[Path]:
    out = []
    for d in cfg.data:
        p = Path(d)
        out.append(p if p.is_absolute() else Path(workdir) / d)
    return out


def source_name(path: Path, workdir) -> str:
    """A dataset's name for reports and fingerprints: relative to the run dir when inside it,
    else its directory name (its contents are identified by the shard checksums)."""
    try:
        return path.resolve().relative_to(Path(workdir).resolve()).as_posix()
    except ValueError:
        return path.name


def drop_reason(cfg, row: dict) -> str | None:
    prompt, resp, fr = row.get("prompt"), row.get("response"), row.get("finish_reason")
    if not isinstance(prompt, str) or not prompt.strip():
        return "empty_prompt"
    if fr not in cfg.keep_finish_reasons:
        return "truncated" if fr == "length" else f"finish_reason_{fr}"
    if not isinstance(resp, str) or len(resp.strip()) < cfg.min_response_chars:
        return "empty_response"
    return None


def to_example(cfg, row: dict) -> dict:
    prompt = [{"role": "user", "content": row["prompt"]}]
    if cfg.system_prompt:
        prompt.insert(0, {"role": "system", "content": cfg.system_prompt})
    return {"id": row["id"], "prompt": prompt,
            "completion": [{"role": "assistant", "content": row["response"].strip()}]}


def iter_examples(cfg, workdir, report: DataReport):
    """Stream the examples of all committed response shards (one record batch in memory)."""
    from guidealign.shards import committed, iter_batches, read_manifest, read_marker

    for path in data_paths(cfg, workdir):
        if read_manifest(path) is None:
            raise FileNotFoundError(f"{path} holds no response shards: run `guidealign respond` first")
        idx = committed(path)
        report.sources[source_name(path, workdir)] = {"shards": len(idx),
                                     "sha256": [read_marker(path, i).sha256 for i in idx]}
        for batch in iter_batches(path, columns=COLUMNS):
            for row in batch.to_pylist():
                report.rows += 1
                why = drop_reason(cfg, row)
                if why:
                    report.dropped[why] = report.dropped.get(why, 0) + 1
                    continue
                if cfg.max_examples and report.kept >= cfg.max_examples:
                    report.dropped["over_max_examples"] = report.dropped.get("over_max_examples", 0) + 1
                    continue
                report.kept += 1
                yield to_example(cfg, row)


def build_dataset(cfg, workdir):
    """(datasets.Dataset with id/prompt/completion, DataReport)."""
    from datasets import Dataset

    report = DataReport()
    rows = list(iter_examples(cfg, workdir, report))
    if not rows:
        raise ValueError(f"no training examples in {[str(p) for p in data_paths(cfg, workdir)]} "
                         f"({report.summary()})")
    return Dataset.from_list(rows), report
