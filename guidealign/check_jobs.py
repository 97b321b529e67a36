"""The checks of ``guidealign check`` that need no model: what SFT's trainer would refuse at its
start, disk for the run directory, the inputs, push (a repo id, the Hub token) and the executor
(Ray's resources); and the :class:`Row` every check gives (``guidealign.check`` runs them all)."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from guidealign.check_models import ModelInfo, gib
from guidealign.config import ExecutorKind

OK, WARN, FAIL, INFO = "OK", "WARN", "FAIL", "INFO"


@dataclass
class Row:
    check: str
    item: str
    status: str
    detail: str



def sft_rows(cfg) -> list[Row]:
    """What SFT refuses only when it starts, after every earlier stage ran: a LoRA merge under
    FSDP/DeepSpeed (sft/precision.py's own check), a scheduler transformers does not know, a
    trainer_args key TRL's SFTConfig does not take (TRL raises a TypeError on it)."""
    from guidealign.sft.precision import check_lora_merge

    s = cfg.sft
    rows = []
    try:
        check_lora_merge(s)
    except ValueError as e:
        rows.append(Row("SFT trainer", "sft.merge_lora", FAIL, str(e)))
    try:  # transformers and TRL load torch (seconds): only when SFT is checked
        from transformers.trainer_utils import SchedulerType
    except ImportError:
        rows.append(Row("SFT trainer", "sft.lr_scheduler", WARN,
                        "transformers is not installed here: not checked"))
    else:
        names = [t.value for t in SchedulerType]
        if s.lr_scheduler not in names:
            rows.append(Row("SFT trainer", "sft.lr_scheduler", FAIL,
                            f"{s.lr_scheduler!r} is not a transformers scheduler: {', '.join(names)}"))
    try:
        from trl import SFTConfig as TRLConfig
    except ImportError:
        rows.append(Row("SFT trainer", "sft.trainer_args", WARN,
                        "TRL is not installed here: its keys are not checked"))
    else:
        import difflib

        known = {f.name for f in dataclasses.fields(TRLConfig) if f.init}
        for key in sorted(set(s.trainer_args) - known, key=str):
            near = difflib.get_close_matches(str(key), known, n=1)
            rows.append(Row("SFT trainer", f"sft.trainer_args.{key}", FAIL,
                            "not a key of TRL's SFTConfig" + (f" (did you mean {near[0]}?)" if near else "")))
    if not rows:
        keys = sorted(s.trainer_args, key=str)
        rows.append(Row("SFT trainer", "settings", OK,
                        f"lr_scheduler {s.lr_scheduler}; "
                        + (f"trainer_args keys {keys} are SFTConfig's" if keys else "no trainer_args")))
    return rows


def _input_files(pattern: str, dataset: Path | None = None) -> tuple[list[Path], str]:
    """(the files ingest reads for an input, why none): ingest's own expansion (``**``
    patterns, a name like ``data[1].jsonl`` that exists as written; with ``dataset``, the
    dataset it writes under WORKDIR, less what lies in the run's own output)."""
    from guidealign.ingest.readers import IngestError, expand_inputs

    try:
        files = [f for f in expand_inputs([pattern], dataset) if f.exists()]  # a plain name is taken as given
    except IngestError as e:
        return [], str(e).removeprefix(f"{pattern}: ")
    return files, "" if files else "matches no file here"


def disk_row(cfg, workdir: str | None, sft: ModelInfo | None) -> Row:
    files = [f for pat in list(cfg.inputs) + list(cfg.inputs_sft) for f in _input_files(pat)[0]]
    inputs = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    # full fine-tuning keeps (and saves) float32 weights whatever the compute precision; a
    # merged LoRA model is saved in the base's half precision
    full = cfg.sft.mode == "full" or cfg.sft.precision == "float32"
    params = (sft.params if sft else 0) or 0
    model = params * (4 if full else 2)
    # one checkpoint is kept (weights + Adam state, ~16 B/param), two while the next is written
    ckpt = params * 32 if cfg.sft.save_steps > 0 and cfg.sft.mode == "full" else 0
    need = inputs * 12 + model + ckpt + 2**28  # every stage keeps the prompts + guidelines/answers
    d = Path(workdir or ".").resolve()
    while not d.exists():
        d = d.parent
    free = shutil.disk_usage(d).free
    detail = (f"~{gib(need)} needed (inputs {gib(inputs)} x 12, SFT model {gib(model)}, checkpoints "
              f"{gib(ckpt)}), {gib(free)} free at {d}")
    return Row("disk", "run directory", OK if need < free else FAIL, detail)


def other_rows(cfg, stages: list[str] | None = None, workdir: str | None = None) -> list[Row]:
    """Inputs, the Hub token and the executor; with ``stages``, the token only when push runs
    and Ray's engine resources only for the engine stages among them; with ``workdir``, inputs
    are counted as ingest counts them there (the run's own output left out)."""
    def runs(stage: str) -> bool:
        return stages is None or stage in stages

    rows = []
    if not (cfg.inputs or cfg.ingest.inputs):
        rows.append(Row("inputs", "inputs", WARN, "none configured (give them to ingest)"))
    # a pattern that matches nothing fails the run's preflight when it ingests (ingest would
    # stop on it after the check); `guidealign check` alone only warns (e.g. on a login node)
    missing = FAIL if stages is not None and "ingest" in stages else WARN
    for key, pats in (("inputs", cfg.inputs or cfg.ingest.inputs), ("inputs_sft", cfg.inputs_sft)):
        dataset = Path(workdir) / ("prompts" if key == "inputs" else "prompts-sft") if workdir else None
        for pat in pats:
            files, why = _input_files(pat, dataset)
            where = "" if os.path.isabs(pat) else f" (relative paths are read from {os.getcwd()})"
            rows.append(Row("inputs", f"{key}: {pat}", OK if files else missing,
                            f"{len(files)} file(s)" if files else why + where))
    if stages is not None and "push" in stages and not cfg.push.repo_id and not cfg.push.model_repo_id:
        # `run --stages push` runs it without a repo id, and it fails after every other stage
        rows.append(Row("push", "push.repo_id", FAIL,
                        "empty, yet push is among the stages run: set push.repo_id (the dataset "
                        "repo; push.model_repo_id is pushed after it) or leave push out"))
    if (cfg.push.repo_id or cfg.push.model_repo_id) and runs("push"):
        from huggingface_hub import get_token

        ok = bool(get_token())
        rows.append(Row("Hub token", "push", OK if ok else FAIL,
                        "present" if ok else "none: set HF_TOKEN or run `hf auth login`"))
        # a bad repo id, or HF_HUB_OFFLINE, failed the push only after every other stage had run
        from guidealign.hub.push import OFFLINE, config_problems

        for problem in config_problems(cfg.push):
            # `check` alone may run where the job does not (a login node's environment): a warning
            warn = problem == OFFLINE and stages is None
            rows.append(Row("push", "settings", WARN if warn else FAIL, problem))
    ex = cfg.executor
    if ex.kind not in get_args(ExecutorKind):
        rows.append(Row("executor", "kind", FAIL, f"{ex.kind!r} is not local or ray"))
    elif ex.kind == "ray":
        has = importlib.util.find_spec("ray") is not None
        rows.append(Row("executor", "ray", OK if has else FAIL,
                        f"address {ex.ray_address or 'local'}, task resources {ex.ray_resources}"
                        if has else "ray is not installed (GUIDEALIGN_EXTRA=ray ./run.sh setup)"))
        from guidealign.ray_workers import engine_config, resources_for
        from guidealign.stages import STAGES

        rows += ray_resource_rows(ex)
        for stage in (s.name for s in STAGES if s.engine and s.in_run and runs(s.name)):
            # what a worker of the stage gets (its ray_resources_by_stage entry, else
            # ray_resources) against its engine (respond: the responder's), as ray_workers checks
            res = resources_for(ex, stage)
            gpus, tp = res.get("num_gpus", 0), engine_config(cfg, stage).tensor_parallel_size
            if not _number(gpus):
                continue  # a FAIL row of ray_resource_rows already
            if gpus and gpus < tp:
                key = "ray_resources_by_stage" if stage in (ex.ray_resources_by_stage or {}) else "ray_resources"
                rows.append(Row("executor", f"{key} ({stage})", FAIL,
                                f"num_gpus {gpus} < the {stage} engine's tensor_parallel_size {tp}"))
    else:
        rows.append(Row("executor", "local", OK, "this rank's shards in this process"))
    from guidealign.stages import BY_NAME

    for stage in ex.ray_resources_by_stage:  # a misspelt stage would silently get ray_resources
        if stage not in BY_NAME:
            rows.append(Row("executor", f"ray_resources_by_stage.{stage}", WARN,
                            f"names no stage of the pipeline ({', '.join(sorted(BY_NAME))}): "
                            "its resources apply only to a custom stage of that name"))
    rows.append(Row("executor", "wait_timeout_s", FAIL if ex.wait_timeout_s < 0 else OK,
                    f"{ex.wait_timeout_s:g} s" + (" (0: no clock of its own; waits end on a failed rank or after "
                                                  f"stall_timeout_s {ex.stall_timeout_s:g} s without progress)"
                                                  if not ex.wait_timeout_s else "")))
    return rows


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ray_resource_rows(ex) -> list[Row]:
    """Ray takes a number of CPUs, GPUs and bytes of memory: text ("4", quoted in YAML) is
    refused only when a worker is placed, after the stages before it ran."""
    rows = []
    given = [("executor.ray_resources", ex.ray_resources)]
    given += [(f"executor.ray_resources_by_stage.{st}", r) for st, r in ex.ray_resources_by_stage.items()]
    for key, res in given:
        for name in ("num_cpus", "num_gpus", "memory"):
            v = (res or {}).get(name)
            if v is not None and not _number(v):
                rows.append(Row("executor", f"{key}.{name}", FAIL, f"{v!r} is not a number"))
    return rows
