"""Review of session 46 (config, check, launch): what `check` passed that a stage refused hours
later, `--set KEY={mapping}` that merged into the file's mapping, `launch --tp` that regrouped
the GPUs but left the engines' size, `launch` options in attached form, `launch eval`'s plan,
and checks that crashed instead of reporting a FAIL row. No engine starts, no weights load."""
from __future__ import annotations

import shlex
import sys
import typing

import pytest
from click.testing import CliRunner

from guidealign.check import FAIL, WARN, run_checks
from guidealign.cli import cli
from guidealign.config import ConfigError, dump_yaml, load_config, yaml_load
from test_check import PAPER, check


def fails(rows) -> dict[str, str]:
    """item -> detail of the FAIL rows."""
    return {r.item: r.detail for r in rows if r.status == FAIL}


def status_of(out: str, item: str) -> str:
    """The status of the printed row whose item is ``item`` (test_check's helper takes the first
    row that starts with it: "respond" would be the responder's model row)."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.replace("|", "│").split("│")]
        if len(cells) > 3 and cells[2] == item:
            return cells[3]
    raise AssertionError(f"no row {item!r} in\n{out}")


# --- 1. what SFT and vLLM refuse only when they start ------------------------------------

@pytest.mark.parametrize("override, item, says", [
    # the paper recipe's FSDP trainer_args: sft/precision.py's check_lora_merge refuses at SFT's start
    ("sft.mode=lora", "sft.merge_lora", "FSDP/DeepSpeed"),
    ("sft.lr_scheduler=cosin", "sft.lr_scheduler", "'cosin' is not a transformers scheduler"),
    ("sft.trainer_args.fsdp_confg={}", "sft.trainer_args.fsdp_confg", "did you mean fsdp_config"),
])
def test_check_fails_what_the_sft_trainer_refuses_at_its_start(override, item, says):
    pytest.importorskip("trl")
    cfg = load_config(PAPER, [override])
    bad = fails(run_checks(cfg, gpus=[]))
    assert says in bad.get(item, ""), bad
    # a run whose stages leave SFT out is not stopped by SFT's settings
    assert item not in fails(run_checks(cfg, gpus=[], stages=["detect", "guidelines"]))
    assert item in fails(run_checks(cfg, gpus=[], stages=["respond", "sft"]))
    # the CLI: a FAIL row and a non-zero exit, no traceback
    code, out = check("-c", PAPER, "--set", override)
    assert code == 1 and status_of(out, item) == "FAIL", out


def test_the_recipes_sft_settings_pass_and_without_trl_its_keys_are_a_warning(monkeypatch):
    rows = run_checks(load_config(PAPER), gpus=[], stages=["sft"])
    assert not [r for r in fails(rows) if r.startswith("sft.")], fails(rows)
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl: ImportError
    rows = run_checks(load_config(PAPER, ["sft.trainer_args.fsdp_confg={}"]), gpus=[], stages=["sft"])
    row = next(r for r in rows if r.item == "sft.trainer_args")
    assert row.status == WARN and "TRL is not installed" in row.detail


def test_engine_dtype_takes_only_the_names_vllm_takes():
    """`engine.dtype=bf16` loaded, and vLLM refused it when the engine started (after ingest)."""
    for key in ("engine.dtype", "respond.engine.dtype", "eval.judge_engine.dtype"):
        with pytest.raises(ConfigError, match="expected one of"):
            load_config(PAPER, [f"{key}=bf16"])
        assert load_config(PAPER, [f"{key}=bfloat16"])
    code, out = check("-c", PAPER, "--set", "engine.dtype=bf16")
    assert code == 2 and "bf16" in out
    pytest.importorskip("vllm")
    from vllm.config.model import ModelDType

    from guidealign.config.engine import EngineDType

    assert typing.get_args(EngineDType) == typing.get_args(ModelDType)


# --- 2. --set KEY={mapping} replaces a free-form mapping -----------------------------------

def test_a_mapping_override_replaces_a_free_form_mapping():
    cfg = load_config(PAPER, ["respond.engine={model: Qwen/Qwen2.5-7B-Instruct}",
                              "sft.trainer_args={deepspeed: ds.json}",
                              "executor.ray_resources={num_gpus: 2}",
                              "executor.ray_resources_by_stage.detect={num_gpus: 8}"])
    # the file's chat_template (vicuna_v1.1) and max_model_len (4096) are gone
    assert cfg.respond.engine == {"model": "Qwen/Qwen2.5-7B-Instruct"}
    assert cfg.sft.trainer_args == {"deepspeed": "ds.json"}  # the file's FSDP keys are gone
    assert cfg.executor.ray_resources == {"num_gpus": 2}
    by_stage = cfg.executor.ray_resources_by_stage  # detect's entry replaced, the file's others kept
    assert by_stage["detect"] == {"num_gpus": 8} and by_stage["sft"] == {"num_gpus": 8, "num_cpus": 64}
    assert yaml_load(dump_yaml(cfg))["respond"]["engine"] == {"model": "Qwen/Qwen2.5-7B-Instruct"}
    # one key of a mapping still merges into it; a later key lands in the replaced mapping
    cfg = load_config(PAPER, ["respond.engine.model=X"])
    assert cfg.respond.engine == {"model": "X", "chat_template": "vicuna_v1.1", "max_model_len": 4096}
    cfg = load_config(PAPER, ["respond.engine={model: X}", "respond.engine.max_model_len=2048"])
    assert cfg.respond.engine == {"model": "X", "max_model_len": 2048}
    # a section is no free-form mapping: its keys merge
    cfg = load_config(PAPER, ["engine={model: Y}"])
    assert cfg.engine.model == "Y" and cfg.engine.tensor_parallel_size == 4
    r = CliRunner().invoke(cli, ["config", "show", "-c", PAPER, "--set",
                                 "respond.engine={model: Qwen/Qwen2.5-7B-Instruct}"], catch_exceptions=False)
    assert r.exit_code == 0 and "vicuna_v1.1" not in yaml_load(r.output)["respond"]["engine"].values()


# --- 3-5. launch ---------------------------------------------------------------------------

def dry_run(*args) -> list[list[str]]:
    """The worker commands of `launch --dry-run` (one node of one, given GPUs), as argv lists."""
    from guidealign.launch import launch

    r = CliRunner().invoke(launch, ["--dry-run", "--node-rank", "0", "--nodes", "1", *args],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    words = [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]
    return [w[w.index("-m"):] for w in words]


def worker_config(argv: list[str]):
    """The config a worker loads from its command line (its -c and --set, as click reads them)."""
    path, sets = None, []
    for i, a in enumerate(argv):
        if a == "-c":
            path = argv[i + 1]
        elif a == "--set":
            sets.append(argv[i + 1])
    return load_config(path, sets)


GPUS8 = ["--gpus", "0,1,2,3,4,5,6,7"]


def test_launch_tp_gives_the_workers_engines_that_size(tmp_path):
    workers = dry_run(*GPUS8, "--tp", "2", "detect", "-c", PAPER, "-w", "W")
    assert len(workers) == 4
    assert all(worker_config(w).engine.tensor_parallel_size == 2 for w in workers)
    # the responder's own size, where the config sets it
    two = tmp_path / "two.yaml"
    two.write_text("engine: {tensor_parallel_size: 4}\nrespond:\n  engine: {tensor_parallel_size: 8}\n")
    for stage in ("respond", "run"):
        workers = dry_run(*GPUS8, "--tp", "2", stage, "-c", str(two), "-w", "W")
        assert len(workers) == 4
        cfgs = [worker_config(w) for w in workers]
        assert all(c.respond.engine["tensor_parallel_size"] == 2 for c in cfgs), stage
        if stage == "run":
            assert all(c.engine.tensor_parallel_size == 2 for c in cfgs)
    # --tp as the config has it: the commands stay as given
    workers = dry_run(*GPUS8, "--tp", "4", "detect", "-c", PAPER, "-w", "W")
    assert len(workers) == 2 and not any("--set" in w for w in workers)
    # the help says what decides the default for respond and run
    from guidealign.launch import launch

    help_text = CliRunner().invoke(launch, ["--help"]).output
    assert "respond.engine" in help_text and "for run the larger" in help_text


def test_launch_reads_config_and_workdir_in_attached_form(tmp_path):
    from guidealign.launch import _opt_values

    args = ["-cA.yaml", "--config=B.yaml", "-wW1", "--workdir=W2", "--set", "x=1", "--set=y=2"]
    assert _opt_values(args, "--config", "-c") == ["A.yaml", "B.yaml"]
    assert _opt_values(args, "--workdir", "-w") == ["W1", "W2"]
    assert _opt_values(args, "--set") == ["x=1", "y=2"]
    # the config's tensor_parallel_size 2 groups 4 GPUs in 2 (one worker a GPU had it been missed)
    cfg = tmp_path / "tp.yaml"
    cfg.write_text("engine:\n  tensor_parallel_size: 2\n")
    for given in ([f"-c{cfg}"], [f"--config={cfg}"]):
        workers = dry_run("--gpus", "0,1,2,3", "detect", *given, "-wW")
        assert len(workers) == 2, given


def test_launch_eval_plans_a_worker_per_engine():
    """eval splits its generation and judging across ranks: one process per node left the
    node's other GPUs idle."""
    from guidealign.launch import plan
    from guidealign.stages import STAGES

    gpus = [str(i) for i in range(8)]
    workers = plan("eval", ["-w", "W"], gpus=gpus, tp=4, node_rank=0, nodes=1)
    assert [w.gpus for w in workers] == [gpus[:4], gpus[4:]]
    assert [w.argv[-4:] for w in workers] == [["--rank", "0", "--world-size", "2"],
                                              ["--rank", "1", "--world-size", "2"]]
    for s in STAGES:
        n = len(plan(s.name, ["-w", "W"], gpus=gpus, tp=1, node_rank=0, nodes=1))
        assert (n == 8) == s.splits_across_ranks, s.name
    # with the recipe, eval's groups are the responder's (tp 4; the judge's own engine is 1)
    assert len(dry_run(*GPUS8, "eval", "-c", PAPER, "-w", "W")) == 2


# --- 6. checks that crashed, and push without a repo id -----------------------------------

@pytest.mark.parametrize("override, item, key", [
    ("respond.num_exemplars=5", "respond", "respond.num_exemplars"),
    ("detect.prompt_file={missing}", "detect", "detect.prompt_file"),
    ("guidelines.quality_prompt_file={missing}", "guidelines (quality)", "guidelines.quality_prompt_file"),
    ("respond.exemplars_file={missing}", "respond", "respond.exemplars_file"),
])
def test_a_check_that_raises_is_a_fail_row_naming_its_key(override, item, key, tmp_path):
    override = override.format(missing=tmp_path / "nope.yaml")
    bad = fails(run_checks(load_config(PAPER, [override]), gpus=[], stages=["detect", "respond"]))
    assert bad.get(item, "").startswith(key), bad
    code, out = check("-c", PAPER, "--set", override)
    assert code == 1 and status_of(out, item) == "FAIL", out


def test_ray_resources_that_are_not_numbers_fail_the_check():
    cfg = load_config(PAPER, ["executor.kind=ray", 'executor.ray_resources.num_gpus="4"',
                              'executor.ray_resources_by_stage.index={num_cpus: "2"}'])
    bad = fails(run_checks(cfg, gpus=[], stages=["detect", "index"]))
    assert bad.get("executor.ray_resources.num_gpus") == "'4' is not a number", bad
    assert "executor.ray_resources_by_stage.index.num_cpus" in bad
    code, out = check("-c", PAPER, "--set", "executor.kind=ray", "--set", 'executor.ray_resources.num_gpus="4"')
    assert code == 1 and status_of(out, "executor.ray_resources.num_gpus") == "FAIL", out


def test_push_among_the_stages_run_without_a_repo_id_fails_the_preflight(tmp_path):
    cfg = load_config(None)
    assert "push.repo_id" in fails(run_checks(cfg, gpus=[], stages=["push"]))
    assert "push.repo_id" not in fails(run_checks(cfg, gpus=[]))  # `check`: run leaves push out
    assert "push.repo_id" not in fails(run_checks(cfg, gpus=[], stages=["sft"]))
    cfg = load_config(None, ["push.repo_id=org/x"])
    assert "push.repo_id" not in fails(run_checks(cfg, gpus=[], stages=["push"]))
    # `run --stages push` stops at its preflight, before any stage
    wd = tmp_path / "wd"
    r = CliRunner().invoke(cli, ["run", "-w", str(wd), "--stages", "push", "--no-progress"],
                           env={"COLUMNS": "200"}, catch_exceptions=False)
    assert r.exit_code == 1 and "preflight failed" in r.output and "push.repo_id" in r.output, r.output
    assert not (wd / "push").exists()


def test_launch_refuses_a_tensor_parallel_recipe_where_no_gpu_is_visible(tmp_path):
    """A job submitted without GPUs planned one CPU worker for gpu-paper.yaml's tp-4 engines and
    said "tensor_parallel_size 1"; `--gpus none` still runs CPU workers on purpose."""
    import subprocess
    import sys

    from test_executors_launch import BASE_ENV, REPO

    cfg = tmp_path / "tp.yaml"
    cfg.write_text("engine:\n  tensor_parallel_size: 4\n")
    env = {**BASE_ENV, "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}  # no GPU, no nvidia-smi

    def launch(*args):
        return subprocess.run([sys.executable, "-m", "guidealign.launch", "--dry-run", *args],
                              env=env, capture_output=True, text=True, timeout=300, cwd=REPO)

    p = launch("detect", "-w", "r", "-c", str(cfg))
    assert p.returncode == 2 and "no GPU is visible" in p.stderr and "--gpus none" in p.stderr
    assert launch("--gpus", "none", "detect", "-w", "r", "-c", str(cfg)).returncode == 0
    assert launch("library", "-w", "r", "-c", str(cfg)).returncode == 0  # no engine: no GPU needed
    assert launch("detect", "-w", "r").returncode == 0  # a tp-1 config runs on the CPU as before


def test_run_as_the_tasks_of_a_slurm_array_is_refused(tmp_path, monkeypatch):
    """README: never run `run` as an array (its tasks are not started together, and its ranks
    wait for each other both ways); `run` and `launch run` took the array's ranks without a word."""
    import subprocess
    import sys

    from click.testing import CliRunner

    from guidealign.cli import cli
    from test_executors_launch import BASE_ENV, REPO

    array = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0"}
    for k, v in array.items():
        monkeypatch.setenv(k, v)
    # (--stages nope: the old code, taking the array's rank, fails on it instead of waiting)
    res = CliRunner().invoke(cli, ["run", "-w", str(tmp_path / "w"), "--no-check", "--stages", "nope"])
    assert res.exit_code == 2 and "8-task job array" in res.output and "guidealign.sbatch" in res.output
    p = subprocess.run([sys.executable, "-m", "guidealign.launch", "--dry-run", "--gpus", "none", "run",
                        "-w", "r"], env={**BASE_ENV, **array}, capture_output=True, text=True,
                       timeout=300, cwd=REPO)  # (a dry run: the old code printed its plan)
    assert p.returncode == 2 and "job array" in p.stderr
    p = subprocess.run([sys.executable, "-m", "guidealign.launch", "--dry-run", "--gpus", "none", "detect",
                        "-w", "r"], env={**BASE_ENV, **array}, capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr  # a map stage as an array: what arrays are for
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "1")  # an array of one task runs alone
    assert "job array" not in CliRunner().invoke(cli, ["run", "-w", str(tmp_path / "w"), "--no-check",
                                                       "--stages", "nope"]).output


def test_launch_tp_resizes_the_eval_judges_engine_too(tmp_path):
    from guidealign.launch import tp_overrides

    cfg = tmp_path / "e.yaml"
    cfg.write_text("eval:\n  judge_engine: {tensor_parallel_size: 4}\n")
    got = tp_overrides(["-c", str(cfg)], "eval", 2)
    assert "eval.judge_engine.tensor_parallel_size=2" in got and "engine.tensor_parallel_size=2" in got
    assert "eval.judge_engine.tensor_parallel_size=2" not in tp_overrides(["-c", str(cfg)], "detect", 2)


def test_an_array_task_given_rank_and_world_size_by_the_environment_is_not_refused():
    """RANK/WORLD_SIZE win over the array's numbering (resolve_rank): the layout is the user's."""
    from guidealign.shards.ranks import array_refusal

    array = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert array_refusal(False, env=array) is not None
    assert array_refusal(False, env={**array, "RANK": "0", "WORLD_SIZE": "1"}) is None


def test_launch_tp_never_raises_a_judge_size_the_config_set(tmp_path):
    """gpu-paper.yaml keeps the judge at 1 GPU on purpose (the embedded judge's 9 heads do not
    split over 4): `launch --tp 4 eval` set it to 4, and eval failed at the judge after
    answering every benchmark prompt."""
    from guidealign.launch import tp_overrides

    cfg = tmp_path / "e.yaml"
    cfg.write_text("engine: {tensor_parallel_size: 4}\neval:\n  judge_engine: {tensor_parallel_size: 1}\n")
    assert not any("judge_engine" in a for a in tp_overrides(["-c", str(cfg)], "eval", 4))
    assert not any("judge_engine" in a for a in tp_overrides(["-c", str(cfg)], "eval", 2))
