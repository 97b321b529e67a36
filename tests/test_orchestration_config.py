"""Orchestration and config: overrides, SLURM array ranks, Ray engines per stage, launch, claims,
run.sh. Pure functions and temporary folders only (no engine, no Ray or SLURM cluster)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from guidealign.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# --- --set overrides and YAML values ------------------------------------------------------

@pytest.mark.parametrize("item, want", [
    ("push.revision=1.10", "1.10"),            # YAML: the float 1.1
    ("push.revision=0123", "0123"),            # YAML 1.1: the octal 83
    ("push.license=no", "no"),                 # YAML 1.1: False
    ("ingest.delimiter=|", "|"),               # YAML: a block scalar, ""
    ("respond.unguided_system=Be kind #1", "Be kind #1"),  # YAML: a comment, "Be kind"
    ("push.revision='1.10'", "1.10"),          # quoted text is unquoted
    ('engine.chat_template="null"', "null"),
    ("engine.chat_template=null", None),       # null in an optional text field
    ("engine.model=", ""),
])
def test_override_of_a_text_field_keeps_the_text_as_written(item, want):
    key = item.split("=", 1)[0]
    assert _get(load_config(None, [item]), key) == want


@pytest.mark.parametrize("item", [
    "engine.max_num_seqs=true",                # a bool is not a count
    "engine.tensor_parallel_size=True",
    "detect.max_exemplars=yes",                # int | None
    "inputs=a.jsonl",                          # a list field given one string
    "sft.data=respond,respond-baseline",
    "augment.types=safety",
    "retriever.recall_at=[1,x]",               # list items are typed too
    "executor.ray_resources=4",                # a mapping field
    "library.use_gpu=1",                       # bool | str
    "engine.max_model_len=*x",                 # not YAML at all: a ConfigError, not a traceback
])
def test_override_of_the_wrong_type_is_an_error(item):
    with pytest.raises(ConfigError):
        load_config(None, [item])


def test_overrides_that_stay_valid():
    cfg = load_config(None, ["retriever.learning_rate=1e-5", "sft.learning_rate=5E-6",
                             "inputs=[a.jsonl, b.jsonl]", "engine.enforce_eager=null",
                             "library.use_gpu=auto", "index.use_gpu=false", "sft.num_processes=4",
                             "detect.sampling.stop=['</s>']", "executor.ray_resources={num_gpus: 1}"])
    assert cfg.retriever.learning_rate == 1e-5 and cfg.sft.learning_rate == 5e-6
    assert cfg.inputs == ["a.jsonl", "b.jsonl"] and cfg.engine.enforce_eager is None
    assert (cfg.library.use_gpu, cfg.index.use_gpu, cfg.sft.num_processes) == ("auto", False, 4)
    assert cfg.detect.sampling.stop == ["</s>"]
    assert cfg.executor.ray_resources == {"num_gpus": 1}  # a mapping given whole replaces the default's


def test_override_of_a_key_below_a_value_is_an_error():
    with pytest.raises(ConfigError, match="no keys"):
        load_config(None, ["engine=1", "engine.model=x"])


def test_yaml_values_of_the_wrong_type_are_errors(tmp_path):
    for text in ("inputs: a.jsonl\n", "push:\n  license: no\n", "engine:\n  max_num_seqs: true\n",
                 "executor:\n  ray_resources_by_stage: {detect: 4}\n"):
        y = tmp_path / "c.yaml"
        y.write_text(text)
        with pytest.raises(ConfigError):
            load_config(y)


def test_ray_resources_for_no_stage_are_not_ignored_silently():
    from guidealign.check import WARN, other_rows

    cfg = load_config(None, ["executor.ray_resources_by_stage.detcet.num_gpus=4",
                             "executor.ray_resources_by_stage.detect.num_gpus=1"])
    assert cfg.executor.ray_resources_by_stage == {"detcet": {"num_gpus": 4}, "detect": {"num_gpus": 1}}
    flagged = {r.item for r in other_rows(cfg) if r.status == WARN and "ray_resources_by_stage" in r.item}
    assert flagged == {"ray_resources_by_stage.detcet"}


# --- SLURM array ranks ----------------------------------------------------------------------

def _array_env(tid: int, lo: int, hi: int, step: int, count: int) -> dict:
    return {"SLURM_ARRAY_TASK_ID": str(tid), "SLURM_ARRAY_TASK_MIN": str(lo),
            "SLURM_ARRAY_TASK_MAX": str(hi), "SLURM_ARRAY_TASK_STEP": str(step),
            "SLURM_ARRAY_TASK_COUNT": str(count)}


@pytest.mark.parametrize("lo, hi, step", [(0, 4, 2), (5, 17, 3), (4, 7, 1)])
def test_stepped_slurm_array_covers_every_shard_once(lo, hi, step):
    from guidealign.shards import my_shards, resolve_rank

    ids = range(lo, hi + 1, step)
    ranks = [resolve_rank(env=_array_env(t, lo, hi, step, len(ids))) for t in ids]
    assert ranks == [(r, len(ids)) for r in range(len(ids))]
    shards = sorted(i for r, w in ranks for i in my_shards(11, r, w))
    assert shards == list(range(11))


def test_irregular_slurm_array_is_an_error():
    from guidealign.shards import resolve_rank

    # --array=0,3,4: ids that no 0..COUNT-1 numbering matches
    with pytest.raises(ValueError, match="evenly stepped"):
        resolve_rank(env=_array_env(3, 0, 4, 1, 3))


# --- the responder's engine on Ray and in launch ------------------------------------------

def test_ray_respond_worker_builds_the_responders_engine():
    from guidealign.pipeline import _pool_key
    from guidealign.ray_workers import StageWorker
    from guidealign.stages import get

    cfg = load_config(None, ["respond.engine.model=/m/vicuna", "respond.engine.tensor_parallel_size=2"])
    assert StageWorker(cfg, None, 0, "respond").engine._cfg.model == "/m/vicuna"
    assert StageWorker(cfg, None, 0, "guidelines").engine._cfg.model == cfg.engine.model
    # the guidelines workers (the writer's engine) are not reused for respond
    assert _pool_key(cfg, get("guidelines")) != _pool_key(cfg, get("respond"))
    assert _pool_key(cfg, get("detect")) == _pool_key(cfg, get("guidelines"))


def test_ray_respond_needs_the_responders_tensor_parallel_gpus():
    from guidealign.ray_workers import check_engine_resources, engine_config

    cfg = load_config(None, ["respond.engine.tensor_parallel_size=2"])
    with pytest.raises(ValueError, match="tensor_parallel_size is 2"):
        check_engine_resources("respond", {"num_gpus": 1},
                               engine_config(cfg, "respond").tensor_parallel_size, 8)


def test_launch_groups_gpus_by_the_responders_tensor_parallel_size():
    from guidealign.launch import tensor_parallel_size

    args = ["--set", "respond.engine.tensor_parallel_size=2"]
    assert tensor_parallel_size(args, "respond") == 2
    assert tensor_parallel_size(args, "run") == 2  # its workers run the responder too
    assert tensor_parallel_size(args, "detect") == 1


def test_launch_gpu_list_with_spaces(monkeypatch):
    from click.testing import CliRunner

    from guidealign.launch import launch

    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(k)
    res = CliRunner().invoke(launch, ["--dry-run", "--gpus", "0, 1", "--tp", "1", "export", "-w", "w"])
    assert res.exit_code == 0, res.output
    assert "CUDA_VISIBLE_DEVICES=1 " in res.output and "' 1'" not in res.output


# --- how many Ray workers a map stage gets: from the input it really reads -----------------

def test_ray_workers_are_counted_on_the_stage_input(tmp_path):
    from guidealign.executors import _input_shards
    from guidealign.shards import write_manifest
    from guidealign.stages import get

    write_manifest(tmp_path / "augment", stage="augment", num_shards=14, fingerprint="x")
    write_manifest(tmp_path / "prompts", stage="ingest", num_shards=3, fingerprint="x")
    write_manifest(tmp_path / "mine", stage="ingest", num_shards=5, fingerprint="x")
    assert _input_shards(get("detect"), load_config(None, ["detect.input=augment"]), tmp_path, {}) == 14
    # the unguided baseline reads the prompts (no retrieve dataset here)
    assert _input_shards(get("respond"), Config(), tmp_path, {"guided": False, "src": None}) == 3
    assert _input_shards(get("retrieve"), load_config(None, ["retrieve.prompts=mine"]), tmp_path,
                         {"src": None}) == 5


# --- claims --------------------------------------------------------------------------------

def test_claim_when_the_claims_folder_is_removed_under_it(tmp_path, monkeypatch):
    """Another worker saw every shard committed and removed DST/_claims between this worker's
    mkdir and its create: the claim is still made, not a FileNotFoundError."""
    from guidealign.shards import claims

    real = claims._create
    calls = []

    def racing_create(path, record):
        if not calls:
            path.parent.rmdir()  # what remove_claims_dir does on the other worker
        calls.append(path)
        return real(path, record)

    monkeypatch.setattr(claims, "_create", racing_create)
    claim = claims.try_claim(tmp_path / "dst", 3, ttl_s=60)
    assert claim is not None and claim.held()
    claim.release()


# --- run.sh ----------------------------------------------------------------------------------

def test_run_sh_gx_resolves_paths_in_the_callers_directory(tmp_path):
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "guidealign").exists():
        pytest.skip("no guidealign entry point next to this interpreter")
    (tmp_path / "my.yaml").write_text("engine:\n  seed: 7\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUIDEALIGN_")}
    p = subprocess.run([str(REPO / "run.sh"), "gx", "config", "show", "-c", "my.yaml"], cwd=tmp_path,
                       env={**env, "GUIDEALIGN_VENV": str(venv)}, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "  seed: 7\n" in p.stdout
