"""`guidealign check`: the preflight's table and exit status on the shipped recipe and on
local models with and without a chat template (no weights are loaded)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.config import load_config
from standins import model_without_template

REPO = Path(__file__).resolve().parents[1]
PAPER = str(REPO / "configs" / "gpu-paper.yaml")


@pytest.fixture(scope="module")
def bare_model(generator_path, module_tmp):
    return str(model_without_template(generator_path, module_tmp.mktemp("m") / "no-template"))


TIB = 2**40


@pytest.fixture(autouse=True)
def free_disk(monkeypatch):
    """The free space ``check`` sees, fixed (default 1 TiB): the paper recipe's ~49 GiB must not
    pass on one machine and fail on a CI machine with less free disk. Set ``.free`` to change it."""
    import shutil

    class Free:
        free = TIB

    real = shutil.disk_usage
    monkeypatch.setattr("guidealign.check.shutil.disk_usage",
                        lambda d: real(d)._replace(free=Free.free))
    return Free


def check(*args, env=None):
    # a fixed width: the table's rows must not wrap whatever terminal (or none) the suite has
    env = {"COLUMNS": "200", **(env or {})}
    r = CliRunner().invoke(cli, ["check", *args], env=env, catch_exceptions=False)
    return r.exit_code, r.output


def status_of(out: str, item: str) -> str:
    """The status column of the first row whose item starts with ``item``."""
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line)]
        if len(cells) > 3 and cells[2].startswith(item):
            return cells[3]
    raise AssertionError(f"no row {item!r} in\n{out}")


def test_paper_recipe_passes_with_models_to_download():
    code, out = check("-c", PAPER)
    assert code == 0, out
    assert "would download" in out and "meta-llama/Llama-2-13b-hf" in out
    assert status_of(out, "SFT base chat template") == "OK" and "vicuna_v1.1" in out
    assert status_of(out, "responder chat template") == "OK"
    assert "micro 4 x accumulation 50 x 8 = 1600" in out


def test_disk_row_fails_when_the_sft_model_does_not_fit(free_disk, tmp_path):
    """The paper recipe saves a 13B model trained in full (float32 weights, ~48 GiB)."""
    free_disk.free = 30 * 2**30
    code, out = check("-c", PAPER, "-w", str(tmp_path))
    assert code == 1 and status_of(out, "run directory") == "FAIL", out
    assert re.search(r"SFT model 4\d\.\d GiB", out) and "30.0 GiB free" in out
    free_disk.free = 60 * 2**30
    code, out = check("-c", PAPER, "-w", str(tmp_path))
    assert code == 0 and status_of(out, "run directory") == "OK", out


def test_paper_recipe_without_the_template_fails():
    code, out = check("-c", PAPER, "--set", "sft.chat_template=null")
    assert code == 1
    assert status_of(out, "SFT base chat template") == "FAIL" and "set sft.chat_template" in out
    code, out = check("-c", PAPER, "--set", "respond.engine.chat_template=null")
    assert code == 1 and status_of(out, "responder chat template") == "FAIL"


def test_local_model_without_template_fails_until_configured(bare_model):
    base = ["-c", PAPER, "--set", f"sft.base_model={bare_model}", "--set", f"engine.model={bare_model}"]
    code, out = check(*base, "--set", "sft.chat_template=null")
    assert code == 1
    assert status_of(out, "guideline writer chat template") == "FAIL"
    assert status_of(out, "SFT base chat template") == "FAIL"
    code, out = check(*base, "--set", "engine.chat_template=chatml")
    assert code == 0, out
    assert status_of(out, "guideline writer chat template") == "OK"
    # the tokenizer is local, so prompt lengths are counted, not estimated
    assert status_of(out, "detect") == "OK" and "chars/token" not in out.split("detect", 1)[1].split("\n")[0]


def test_failures_are_reported_and_exit_nonzero(bare_model):
    code, out = check("-c", PAPER, "--set", "sft.global_batch_size=10")
    assert code == 1 and status_of(out, "global batch") == "FAIL"
    code, out = check("-c", PAPER, "--set", "engine.model=embedded:smollm2-135m-instruct",
                      "--set", "engine.max_model_len=300")
    assert code == 1 and status_of(out, "detect") == "FAIL"
    code, out = check("-c", PAPER, "--set", "sft.chat_template=no-such-template")
    assert code == 1 and "neither a built-in" in out
    code, out = check("-c", PAPER, "--set", f"engine.model={bare_model}", "--set",
                      "engine.max_model_len=100000")
    assert code == 1 and "the model's context 8192" in out


def test_hub_token_checked_and_never_printed():
    code, out = check("-c", PAPER, "--set", "push.repo_id=org/x", env={"HF_TOKEN": ""})
    if status_of(out, "push") == "OK":
        pytest.skip("a stored Hub login exists on this machine")
    assert code == 1 and status_of(out, "push") == "FAIL"
    code, out = check("-c", PAPER, "--set", "push.repo_id=org/x", env={"HF_TOKEN": "hf_sekrit1234"})
    assert code == 0 and status_of(out, "push") == "OK" and "hf_sekrit1234" not in out


def test_tensor_parallel_size_against_visible_gpus():
    from guidealign.check import FAIL, OK, run_checks

    cfg = load_config(PAPER)
    rows = {r.item: r for r in run_checks(cfg, gpus=["0", "1"])}
    assert rows["guideline writer tensor_parallel_size"].status == FAIL
    cfg.engine.tensor_parallel_size = 2
    cfg.respond.engine["tensor_parallel_size"] = 2
    rows = {r.item: r for r in run_checks(cfg, gpus=["0", "1"])}
    assert rows["guideline writer tensor_parallel_size"].status == OK
    assert rows["responder tensor_parallel_size"].status == OK


def test_a_rank_whose_preflight_fails_leaves_a_failure_marker_for_the_others(tmp_path):
    """`run --rank 1 --world-size 2` whose preflight failed exited 1 and wrote nothing: under a
    plain `srun` (no --kill-on-bad-exit) the other ranks waited for its shards until the stall
    clock (30 min by default) ran out."""
    import json

    from guidealign.shards.failure import failures

    wd = tmp_path / "wd"
    r = CliRunner().invoke(cli, ["run", "-c", PAPER, "--set", "sft.global_batch_size=10", "-w", str(wd),
                                 "--rank", "1", "--world-size", "2", "--no-progress"],
                           env={"COLUMNS": "200"}, catch_exceptions=False)
    assert r.exit_code == 1 and "preflight failed" in r.output
    marker = json.loads((wd / "_failed" / "rank-00001.json").read_text())
    assert marker["stage"] == "preflight" and marker["world_size"] == 2
    assert "global_batch_size" in marker["error"]  # what failed, for the ranks it stops
    assert [m["rank"] for m in failures(wd)] == [1]  # what the other ranks' waits poll
    # one rank alone: nothing to tell
    r = CliRunner().invoke(cli, ["run", "-c", PAPER, "--set", "sft.global_batch_size=10", "-w",
                                 str(tmp_path / "one"), "--no-progress"], env={"COLUMNS": "200"},
                           catch_exceptions=False)
    assert r.exit_code == 1 and not (tmp_path / "one" / "_failed").exists()


def test_a_launch_worker_checks_sft_against_the_nodes_gpus_not_its_own(monkeypatch):
    """A `launch run` worker sees its engine's GPU (CUDA_VISIBLE_DEVICES=0) while SFT trains on
    the node's 8 (GUIDEALIGN_NODE_GPUS): the preflight sized the paper's SFT for 1 process
    (~194 GiB per GPU, FAIL: every worker refused to start) and passed a global batch that
    SFT then refused on 8 processes after all the generation had run."""
    from guidealign.check import FAIL, WARN, run_checks
    from guidealign.sft.launcher import NODE_GPUS_ENV

    monkeypatch.setenv(NODE_GPUS_ENV, ",".join(map(str, range(8))))
    rows = {r.item: r for r in run_checks(load_config(PAPER), gpus=["0"])}
    assert "x 8 process(es) = 1600" in rows["global batch"].detail, rows["global batch"]
    assert "sharded over 8 GPUs" in rows["SFT"].detail
    # 100 / (4 x 8) is no whole number: num_processes auto trains on 5 of the 8 (100 = 4 x 5 x 5)
    row = {r.item: r for r in run_checks(load_config(PAPER, ["sft.global_batch_size=100"]), gpus=["0"])}["global batch"]
    assert row.status == WARN and "5 of the 8 GPUs train" in row.detail, row
    cfg = load_config(PAPER, ["sft.global_batch_size=100", "sft.num_processes=8"])  # asked for 8: no whole number
    assert {r.item: r for r in run_checks(cfg, gpus=["0"])}["global batch"].status == FAIL


def test_tensor_parallel_over_mig_devices_fails(monkeypatch):
    """Four MIG devices passed the paper's tensor_parallel_size 4 (counted as four GPUs), which
    build_llm then refused on the node: a process can use one MIG device only. With one device
    an engine, each engine still gets a warning: vLLM 0.32 may not start on a MIG device."""
    from guidealign.check import FAIL, OK, WARN, run_checks

    migs = [f"MIG-{k}aaa0000-0000-0000-0000-00000000000{k}" for k in range(4)]
    cfg = load_config(PAPER)
    rows = {r.item: r for r in run_checks(cfg, gpus=migs)}
    assert rows["guideline writer tensor_parallel_size"].status == FAIL
    assert "MIG" in rows["guideline writer tensor_parallel_size"].detail
    cfg.engine.tensor_parallel_size = 1
    rows = {r.item: r for r in run_checks(cfg, gpus=migs)}
    assert rows["guideline writer tensor_parallel_size"].status == OK
    # vLLM 0.32 looks MIG devices up as whole GPUs (upstream issues): said for each engine
    assert rows["guideline writer on MIG devices"].status == WARN
    assert "41848" in rows["guideline writer on MIG devices"].detail
    assert "guideline writer on MIG devices" not in {r.item for r in run_checks(cfg, gpus=["0", "1"])}


def test_attention_heads_tensor_parallel_cannot_divide_fail():
    """vLLM splits an engine's attention heads evenly over its GPUs and refuses to start when
    tensor_parallel_size does not divide them: the embedded model's 9 heads on 2 GPUs FAIL for
    the generator where GPUs are visible (a WARN where none is: the CPU engine ignores
    tensor_parallel_size, as the paper recipe's CPU twin runs it), and the paper recipe's
    default eval judge (the same model with the responder's 4 GPUs, without the recipe's
    eval.judge_engine) is a WARN, since `run` never starts it."""
    from guidealign.check import FAIL, WARN, run_checks

    cfg = load_config(str(REPO / "configs" / "demo.yaml"), ["engine.tensor_parallel_size=2"])
    r = {r.item: r for r in run_checks(cfg, gpus=["0", "1"])}["guideline writer attention heads"]
    assert r.status == FAIL and "9 attention heads" in r.detail and "tensor_parallel_size 2" in r.detail
    r = {r.item: r for r in run_checks(cfg, gpus=[])}["guideline writer attention heads"]
    assert r.status == WARN and "the CPU engine here ignores it" in r.detail
    rows = {r.item: r for r in run_checks(load_config(str(REPO / "configs" / "demo.yaml"),
                                                      ["engine.tensor_parallel_size=3"]), gpus=[])}
    assert "guideline writer attention heads" not in rows  # 9 = 3 x 3
    rows = {r.item: r for r in run_checks(load_config(PAPER, ["eval.judge_engine={}"]), gpus=[])}
    assert rows["eval judge attention heads"].status == WARN
    assert "`guidealign run` does not use it" in rows["eval judge attention heads"].detail
    assert "eval.judge_engine.tensor_parallel_size" in rows["eval judge attention heads"].detail
    # the recipe gives its (embedded) judge an engine on one GPU: nothing to warn about
    rows = {r.item: r for r in run_checks(load_config(PAPER), gpus=[])}
    assert "eval judge attention heads" not in rows
    assert rows["eval judge tensor_parallel_size"].detail.startswith("1;")


def test_fsdp_true_counts_as_sharded(monkeypatch):
    """transformers wants ``fsdp: true`` (its string form is deprecated): the preflight sized
    the paper's full fine-tuning for one GPU with it (~194 GiB, FAIL) while SFT sharded it."""
    from guidealign.check import run_checks
    from guidealign.sft.launcher import NODE_GPUS_ENV

    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(NODE_GPUS_ENV, ",".join(map(str, range(8))))
    cfg = load_config(PAPER, ['sft.trainer_args={"fsdp": true, "fsdp_config": {"version": 2}}'])
    rows = {r.item: r for r in run_checks(cfg, gpus=["0"])}
    assert "sharded over 8 GPUs" in rows["SFT"].detail, rows["SFT"]
    cfg = load_config(PAPER, ["sft.trainer_args={}"])
    assert "sharded" not in {r.item: r for r in run_checks(cfg, gpus=["0"])}["SFT"].detail


def test_run_checks_only_the_models_of_the_stages_it_runs(tmp_path):
    """A GPU node given the encoder stages and SFT to run (the engine stages done elsewhere,
    `run --stages library,...,sft`) has no copy of the engine's model, and `run` never runs
    eval: its preflight failed on both models (seen on an H200 node without hub access) and
    the run never started. `run` checks the models of the stages it runs; `check` still
    checks every model."""
    from guidealign.check import FAIL, run_checks

    gone = str(tmp_path / "no-such-model")
    cfg = load_config(None, [f"engine.model={gone}", f"eval.judge_model={gone}",
                             "eval.harm_judge=classifier", f"eval.classifier_model={gone}"])
    failed = lambda rows: {r.item.split(":")[0] for r in rows if r.status == FAIL}  # noqa: E731
    every = failed(run_checks(cfg, gpus=[]))
    assert {"guideline writer", "eval judge", "eval classifier"} <= every
    downstream = ["library", "train-retriever", "index", "retrieve", "sft"]
    assert failed(run_checks(cfg, gpus=[], stages=downstream)) == set()
    assert failed(run_checks(cfg, gpus=[], stages=["respond"])) == {"guideline writer"}
    # another encoder than the trained retriever for index and retrieve: checked for those
    cfg.index.model = gone
    assert "index encoder" in failed(run_checks(cfg, gpus=[], stages=["retrieve"]))
    assert "index encoder" not in failed(run_checks(cfg, gpus=[], stages=["sft"]))
    # the Hub token only when push runs
    cfg = load_config(None, ["push.repo_id=org/x"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", "")
        if "push" in failed(run_checks(cfg, gpus=[])):  # (no stored Hub login on this machine)
            assert "push" not in failed(run_checks(cfg, gpus=[], stages=downstream))
            assert "push" in failed(run_checks(cfg, gpus=[], stages=downstream + ["push"]))
    # the CLI: `run --stages` passes its stages to the preflight (which then passes; the run
    # stops at the missing guidelines instead)
    r = CliRunner().invoke(cli, ["run", "--set", f"engine.model={gone}", "-w", str(tmp_path / "wd"),
                                 "--stages", ",".join(downstream), "--no-progress"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 1 and "preflight failed" not in r.output, r.output
    r = CliRunner().invoke(cli, ["run", "--set", f"engine.model={gone}", "-w", str(tmp_path / "wd2"),
                                 "--stages", "detect", "--no-progress"], env={"COLUMNS": "200"})
    assert r.exit_code == 1 and "preflight failed" in r.output


def test_inputs_that_match_no_file_fail_the_preflight_of_a_run_that_ingests(tmp_path, monkeypatch):
    """`check` only warned about inputs matching no file, so `run` passed its preflight and
    then failed in ingest with a failure marker (a config's relative inputs are read from the
    current directory, not the config's). A run that ingests now fails its preflight, saying
    where relative paths are read from; `check` alone and runs without ingest still warn."""
    from guidealign.check import FAIL, WARN, other_rows
    from guidealign.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["inputs=[data/samples/prompts.jsonl]"])

    def row(stages):
        return next(r for r in other_rows(cfg, stages) if r.item.startswith("inputs:"))

    r = row(["ingest", "detect"])
    assert r.status == FAIL and f"relative paths are read from {tmp_path}" in r.detail
    assert row(None).status == WARN and row(["detect"]).status == WARN
    (tmp_path / "data" / "samples").mkdir(parents=True)
    (tmp_path / "data" / "samples" / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    assert row(["ingest"]).status != FAIL


def test_inputs_the_preflight_counts_as_ingest_reads_them(tmp_path, monkeypatch):
    """The preflight globbed without ``**`` and took ``data[1].jsonl`` as a pattern: both fail
    `run` ("matches no file here") though ingest reads them (a ``**`` pattern, a file whose
    name holds brackets)."""
    from guidealign.check import FAIL, OK, other_rows
    from guidealign.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in" / "a" / "b").mkdir(parents=True)
    (tmp_path / "in" / "a" / "b" / "p.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "in" / "data[1].jsonl").write_text('{"prompt": "yo"}\n')
    for pat, n in (("in/**/*.jsonl", 2), ("in/data[1].jsonl", 1)):
        cfg = load_config(None, [f"inputs=['{pat}']"])
        r = next(r for r in other_rows(cfg, ["ingest"]) if r.item.startswith("inputs:"))
        assert (r.status, r.detail) == (OK, f"{n} file(s)"), (pat, r)
    missing = load_config(None, ["inputs=[in/none.jsonl]"])
    r = next(r for r in other_rows(missing, ["ingest"]) if r.item.startswith("inputs:"))
    assert r.status == FAIL and "matches no file" in r.detail


@pytest.mark.parametrize("edit,context", [
    ({"max_position_embeddings": 2048, "rope_scaling": {"type": "linear", "factor": 4.0}}, 8192),
    ({"max_position_embeddings": None}, 2048),  # left to LlamaConfig's default, as vLLM reads it
    ({"max_position_embeddings": 8192,
      "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}}, 8192),
    ({"max_position_embeddings": 4096, "n_positions": 1024}, 1024),  # the smallest length key
])
def test_the_models_context_is_derived_as_vllm_derives_it(tmp_path, edit, context):
    """check read max_position_embeddings alone: a linear RoPE factor (vicuna-13b-v1.5-16k:
    4096 x 4) was a false FAIL that stopped `run`, and a config without the key passed any
    max_model_len, which vLLM then refused."""
    import json

    from guidealign.core.models import model_context
    from guidealign.core.models import resolve

    raw = json.loads((Path(resolve("embedded:smollm2-135m-instruct")) / "config.json").read_text())
    raw.update({k: v for k, v in edit.items() if v is not None})
    for k in [k for k, v in edit.items() if v is None]:
        raw.pop(k)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert model_context(tmp_path, raw) == context
