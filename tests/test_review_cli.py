"""Review of the config / CLI layer: `check` against the Ray resources and the enumerated keys the
stages read, `status` on a crashed run directory, `run`'s error for a stage's own error types.
No engine, no Ray cluster, no model: config objects, temporary folders and the click CLI."""
from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.config import load_config


def _rows(cfg, check: str, item_prefix: str = ""):
    from guidealign.check import other_rows

    return [r for r in other_rows(cfg) if r.check == check and r.item.startswith(item_prefix)]


# --- check: Ray GPUs per engine stage, as the workers get them -----------------------------

_BY_STAGE_2 = "executor.ray_resources_by_stage={detect: {num_gpus: 2}, guidelines: {num_gpus: 2}, " \
              "respond: {num_gpus: 2}}"


def test_check_takes_ray_gpus_per_stage_not_only_ray_resources():
    """Every engine stage of the run gets 2 GPUs (ray_resources_by_stage) for its tensor-parallel
    size of 2; the 1 GPU of ray_resources is what the other stages get: a valid config."""
    from guidealign.check import FAIL
    from guidealign.ray_workers import resources_for

    cfg = load_config(None, ["executor.kind=ray", "engine.tensor_parallel_size=2",
                             "executor.ray_resources={num_gpus: 1}", _BY_STAGE_2])
    assert all(resources_for(cfg.executor, s)["num_gpus"] == 2 for s in ("detect", "guidelines", "respond"))
    bad = [r for r in _rows(cfg, "executor") if r.status == FAIL]
    assert not bad, f"check fails a valid Ray config: {bad}"


def test_check_fails_a_stage_whose_ray_workers_get_fewer_gpus_than_its_engine():
    """respond's own engine needs 4 GPUs, its workers get ray_resources' 1: the Ray workers
    refuse it at run time (ray_workers.check_engine_resources), so the preflight must too."""
    from guidealign.check import FAIL

    cfg = load_config(None, ["executor.kind=ray", "executor.ray_resources={num_gpus: 1}",
                             "respond.engine={tensor_parallel_size: 4}"])
    bad = [r for r in _rows(cfg, "executor") if r.status == FAIL]
    assert any("respond" in r.item + r.detail for r in bad), \
        f"check passes a config whose respond workers get 1 GPU for a 4-GPU engine: {_rows(cfg, 'executor')}"


# --- config: keys with a fixed set of values, which a stage refused only when it started -----

@pytest.mark.parametrize("item", [
    "sft.mode=LoRA",                  # refused by sft, after every other stage ran
    "index.kind=IVF",                 # refused by index
    "retriever.loss=MNRL",            # refused by train-retriever
    "library.candidates=models",      # refused by library
    "guidelines.unknown_verdict=risky",
    "detect.mode=scores",
    "engine.overlong=cut",
    "respond.engine={overlong: cut}",
    "sft.precision=bfloat16",
    "executor.assign=dynamc",
    "executor.kind=slurm",
    "eval.combine=mean",
])
def test_config_refuses_a_misspelt_choice_at_load(item):
    from guidealign.config import ConfigError

    key = item.split("=")[0] + (".overlong" if item.startswith("respond.engine") else "")
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected one of .*; got "):
        load_config(None, [item])


def test_config_takes_every_value_of_a_choice_key_and_the_shipped_configs():
    from pathlib import Path

    for item in ("sft.mode=lora", "index.kind=hnsw", "detect.mode=score", "sft.precision=float32",
                 "retriever.loss=cached_mnrl", "guidelines.unknown_verdict=skip", "executor.kind=ray"):
        key, value = item.split("=")
        cfg = load_config(None, [item])
        for part in key.split("."):
            cfg = getattr(cfg, part)
        assert cfg == value, item
    for y in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(y)


def test_check_wait_timeout_zero_is_described_as_no_clock():
    """0 = no clock of its own (config.wait_timeout: inf for several workers), not one day."""
    from guidealign.config import Config, wait_timeout

    cfg = Config()
    assert wait_timeout(cfg, 2) == float("inf")
    (row,) = _rows(cfg, "executor", "wait_timeout_s")
    assert "1 day" not in row.detail, row.detail


# --- status on a crashed run directory ------------------------------------------------------

def test_status_leaves_out_a_crashed_artifact_build_dir(tmp_path):
    """A library build killed half-way leaves WORKDIR/.library.tmp-*/ (with its manifest and
    some shards): it is no stage, and status must not list it as one."""
    from guidealign.shards import write_manifest, write_shard
    from guidealign.status import collect

    tmp = tmp_path / ".library.tmp-abc123"
    write_manifest(tmp, stage="library", num_shards=2, fingerprint="f", input=str(tmp_path / "guidelines"))
    write_shard(tmp, 0, pa.table({"id": ["a"]}), "f")
    write_manifest(tmp_path / "prompts", stage="prompts", num_shards=1, fingerprint="p")
    write_shard(tmp_path / "prompts", 0, pa.table({"id": ["a"]}), "p")
    assert [r["stage"] for r in collect(tmp_path)] == ["prompts"]


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]"])
def test_status_survives_a_damaged_done_marker(tmp_path, content):
    """A damaged _done.json is no completion record (shards.artifact.read_done): status shows
    the artifact as not done instead of crashing."""
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "_done.json").write_text(content)
    (tmp_path / "retriever").mkdir()
    (tmp_path / "retriever" / "_done.json").write_text(json.dumps({"rows": 7, "seconds": 2.0}))
    r = CliRunner().invoke(cli, ["status", str(tmp_path), "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    rows = {x["stage"]: x for x in json.loads(r.output)}
    assert (rows["retriever"]["shards_done"], rows["retriever"]["rows"]) == (1, 7)
    assert (rows["index"]["shards_done"], rows["index"]["shards_total"], rows["index"]["rows"]) == (0, 1, 0)


# --- run: a stage's own error types are one-line errors, as in the stage commands ----------

def test_run_with_a_missing_input_is_a_one_line_error(tmp_path):
    c = tmp_path / "c.yaml"
    c.write_text(f"inputs: [{json.dumps(str(tmp_path / 'nope.jsonl'))}]\n")
    r = CliRunner().invoke(cli, ["run", "-c", str(c), "-w", str(tmp_path / "w"), "--no-check",
                                 "--stages", "ingest", "--no-progress"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), repr(r.exception)
    assert "nope.jsonl: no such file" in r.output


# --- show: only current shards, as status counts them -----------------------------------------

def test_show_skips_a_shard_committed_under_an_earlier_config(tmp_path):
    """respond shard 0 was committed by a run with an earlier config (status: stale, redone by
    the next run), shard 1 by the current one: show's examples are the current responses."""
    from guidealign.shards import write_manifest, write_shard
    from guidealign.shards.stage import shard_fingerprint
    from guidealign.show import examples
    from guidealign.status import collect

    src, dst = tmp_path / "retrieve", tmp_path / "respond"
    write_manifest(src, stage="retrieve", num_shards=2, fingerprint="r")
    for i in range(2):
        write_shard(src, i, pa.table({"id": [f"p{i}"], "prompt": [f"q{i}"]}), f"r{i}")
    write_manifest(dst, stage="respond", num_shards=2, fingerprint="NEW", input=str(src))
    write_shard(dst, 0, pa.table({"id": ["p0"], "prompt": ["q0"], "response": ["old answer"]}),
                shard_fingerprint("OLD", src, 0))
    write_shard(dst, 1, pa.table({"id": ["p1"], "prompt": ["q1"], "response": ["new answer"]}),
                shard_fingerprint("NEW", src, 1))
    row = next(r for r in collect(tmp_path) if r["stage"] == "respond")
    assert (row["shards_done"], row["shards_stale"]) == (1, 1)
    got = [r["response"] for r in examples(tmp_path, n=5)]
    assert got == ["new answer"], f"show printed a stale shard's responses: {got}"
    with pytest.raises(RuntimeError, match="shard 0"):
        examples(tmp_path, shard=0)


def test_show_reads_the_first_shard_that_holds_rows(tmp_path):
    """With no --shard, show read the first committed shard; one of 0 rows (its block all
    quarantined) printed an empty line and exit 0, though later shards held responses."""
    from guidealign.shards import write_manifest, write_shard
    from guidealign.show import examples

    dst = tmp_path / "respond"
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string())])
    write_manifest(dst, stage="respond", num_shards=2, fingerprint="f")
    write_shard(dst, 0, schema.empty_table(), "f0")
    write_shard(dst, 1, pa.table({"id": ["p1"], "prompt": ["q1"], "response": ["an answer"]}, schema=schema), "f1")
    assert [r["response"] for r in examples(tmp_path, n=5)] == ["an answer"]
    write_shard(dst, 1, schema.empty_table(), "f1")
    with pytest.raises(RuntimeError, match="hold no rows"):
        examples(tmp_path)


def test_show_says_a_detect_shard_is_stale_rather_than_that_detect_never_ran(tmp_path):
    """detect rerun under a new config on some ranks only: show said "detect: not run on this
    prompt (detect/ does not hold it)" though detect/ holds it, under the earlier config."""
    from guidealign.shards import write_manifest, write_shard
    from guidealign.shards.stage import shard_fingerprint
    from guidealign.show import examples, render

    src, det, dst = tmp_path / "prompts", tmp_path / "detect", tmp_path / "respond"
    write_manifest(src, stage="ingest", num_shards=1, fingerprint="p")
    write_shard(src, 0, pa.table({"id": ["p0"], "prompt": ["q0"]}), "p0")
    write_manifest(det, stage="detect", num_shards=1, fingerprint="NEW", input=str(src))
    write_shard(det, 0, pa.table({"id": ["p0"], "prompt": ["q0"], "risky": [True], "rationale": ["r"]}),
                shard_fingerprint("OLD", src, 0))
    write_manifest(dst, stage="respond", num_shards=1, fingerprint="f")
    write_shard(dst, 0, pa.table({"id": ["p0", "p9"], "prompt": ["q0", "q9"], "response": ["a", "b"]}), "f0")
    text = render(examples(tmp_path, n=2))
    first, second = text.split("\n\n### ")
    assert "earlier config (stale)" in first and "not run on this prompt" in second, text


# --- launch: a config that is not YAML is a usage error, as in every other command --------------

def test_launch_with_a_config_that_is_not_yaml_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [\n")
    r = CliRunner().invoke(cli, ["launch", "--gpus", "0,1", "--dry-run", "detect", "-c", str(bad),
                                 "-w", str(tmp_path / "w")])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), repr(r.exception)
    assert "not valid YAML" in r.output


def test_config_section_with_every_key_commented_out_is_its_defaults(tmp_path):
    from guidealign.config import Config

    y = tmp_path / "c.yaml"
    y.write_text("push:\n  # repo_id: me/data\nsft:\n  epochs: 2\n")
    cfg = load_config(y)
    assert cfg.push == Config().push and cfg.sft.epochs == 2


def test_run_stages_list_may_have_spaces_after_commas(tmp_path, monkeypatch):
    import guidealign.pipeline as pipeline

    seen = {}

    def fake_run(cfg, workdir, rank, world_size, stages, progress, echo):
        seen["stages"] = stages

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    r = CliRunner().invoke(cli, ["run", "-w", str(tmp_path), "--no-check", "--stages", "detect, guidelines"])
    assert r.exit_code == 0, r.output
    assert seen["stages"] == ["detect", "guidelines"]



@pytest.mark.parametrize("given", [",", "", " , "])
def test_run_with_a_stages_list_that_names_no_stage_is_a_usage_error_not_every_stage(tmp_path, monkeypatch, given):
    """`--stages "$STAGES"` with an empty variable ran the whole pipeline."""
    import guidealign.pipeline as pipeline

    ran = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: ran.append(k))
    r = CliRunner().invoke(cli, ["run", "-w", str(tmp_path), "--no-check", "--stages", given])
    assert r.exit_code == 2 and "--stages names no stage" in r.output, r.output
    assert not ran

def test_config_refuses_a_guided_system_without_the_guidelines_placeholder():
    """Refused at load (so `guidealign run` fails before detect, not when respond starts)."""
    from guidealign.config import ConfigError

    with pytest.raises(ConfigError, match=r"respond.guided_system: no \{guidelines\} placeholder"):
        load_config(None, ["respond.guided_system=Answer carefully."])
    assert "{guidelines}" in load_config(None, ["respond.guided_system=Follow: {guidelines}"]).respond.guided_system


def test_a_map_stage_in_the_batch_script_of_a_multi_task_job_is_refused(tmp_path, monkeypatch):
    """`sbatch --ntasks=3` runs its batch script once, with PROCID 0 of 3 and no step: a map
    stage there would take rank 0 of 3 and leave 2/3 of its shards undone, so it is refused in
    one line before any work (`run` too). A stage rank 0 does alone (ingest) still runs there,
    and so does a map stage given --world-size (1: this process alone, or the Ray executor)."""
    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "3"}
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "hello"}\n{"prompt": "world"}\n')
    w = str(tmp_path / "w")
    r = CliRunner().invoke(cli, ["ingest", str(src), "-w", w, "--no-progress"], env=env)
    assert r.exit_code == 0, r.output
    export = ["export", "prompts", "-w", w, "--no-progress"]
    r = CliRunner().invoke(cli, export, env=env)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), repr(r.exception)
    assert "not one of its tasks" in r.output and "srun" in r.output
    assert not (tmp_path / "w" / "export").exists()
    r = CliRunner().invoke(cli, ["run", "-w", w, "--no-check", "--stages", "detect", "--no-progress"], env=env)
    assert r.exit_code == 2 and "not one of its tasks" in r.output
    r = CliRunner().invoke(cli, export + ["--world-size", "1"], env=env)
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "w" / "export" / "prompts").glob("shard-*.jsonl"))) == 1


def test_eval_in_the_batch_script_of_a_multi_task_job_is_refused_like_a_map_stage(tmp_path, monkeypatch):
    """eval is an artifact stage whose generation and judging are split across ranks: as rank 0
    of 3 in the batch script it would do a third of them and then wait for the other two ranks
    until its timeout. It is refused there before any work, as a map stage is; a stage rank 0
    does alone (library, sft) is not, and eval given --rank/--world-size is not."""
    from guidealign import executors
    from guidealign.shards.ranks import batch_script_refusal
    from guidealign.stages import STAGES, get

    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    with pytest.raises(ValueError, match="not one of its tasks"):
        executors.execute("eval", load_config(None), tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()
    assert get("eval").splits_across_ranks
    assert {s.name for s in STAGES if s.splits_across_ranks} == \
        {s.name for s in STAGES if s.kind == "map"} | {"eval"}
    assert batch_script_refusal(explicit_ranks=True) is None
    assert "3-task job" in batch_script_refusal(explicit_ranks=False)
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # under srun: a task of the step, not the script
    assert batch_script_refusal(explicit_ranks=False) is None
