"""SFT: the training set (no guidelines, drops counted), the assistant-only loss mask, a few real
TRL steps whose loss falls, and a checkpoint that loads in vLLM (in a subprocess) and answers."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from guidealign.gen.respond import RESPOND_SCHEMA
from guidealign.config import load_config
from guidealign.shards import write_manifest, write_shard

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "sft-tiny-cpu.yaml"
GUIDELINE = "SECRET-GUIDELINE-TEXT: refuse harmful requests politely."
ANSWER = "I can't help with that, but I can point you to safety resources instead."


def respond_rows(n_good=6):
    good = [dict(id=f"g{i}", prompt=f"Question number {i}: how do I do something risky?",
                 guideline_ids=["x1"], guideline_texts=[GUIDELINE], response=f" {ANSWER} ",
                 finish_reason="stop", model="m", prompt_tokens=10, output_tokens=10, note="")
            for i in range(n_good)]
    bad = [
        dict(id="t", prompt="Tell me a long story.", guideline_ids=[], guideline_texts=[],
             response="Once upon a", finish_reason="length", model="m", prompt_tokens=1,
             output_tokens=1, note=""),
        dict(id="e", prompt="Say nothing.", guideline_ids=[], guideline_texts=[], response="  ",
             finish_reason="stop", model="m", prompt_tokens=1, output_tokens=0, note=""),
        dict(id="x", prompt="Broken.", guideline_ids=[], guideline_texts=[], response="",
             finish_reason="error", model="m", prompt_tokens=1, output_tokens=0, note="boom"),
    ]
    return good, bad


def write_respond(workdir, shards):
    d = Path(workdir) / "respond"
    write_manifest(d, stage="respond", num_shards=len(shards), fingerprint="test")
    for i, rows in enumerate(shards):
        write_shard(d, i, pa.Table.from_pylist(rows, schema=RESPOND_SCHEMA), f"fp{i}")


def tiny_cfg(*overrides):
    return load_config(TINY, list(overrides))


def test_training_set_has_no_guidelines_and_counts_drops(workdir):
    from guidealign.sft.data import build_dataset

    good, bad = respond_rows(4)
    write_respond(workdir, [good[:2] + bad, good[2:]])
    ds, rep = build_dataset(tiny_cfg().sft, workdir)
    assert rep.rows == 7 and rep.kept == 4 == len(ds)
    assert rep.dropped == {"truncated": 1, "empty_response": 1, "finish_reason_error": 1}
    ex = ds[0]
    assert ex["prompt"] == [{"role": "user", "content": good[0]["prompt"]}]
    assert ex["completion"] == [{"role": "assistant", "content": ANSWER}]
    assert GUIDELINE not in json.dumps(ds.to_list())


def test_no_examples_is_a_clear_error(workdir):
    from guidealign.sft.data import build_dataset

    _, bad = respond_rows(0)
    write_respond(workdir, [bad])
    with pytest.raises(ValueError, match="no training examples"):
        build_dataset(tiny_cfg().sft, workdir)
    with pytest.raises(FileNotFoundError, match="guidealign respond"):
        build_dataset(tiny_cfg("sft.data=[nothing]").sft, workdir)


def test_sft_cli_without_responses_is_a_clear_error(workdir):
    from click.testing import CliRunner

    from guidealign.cli import cli

    r = CliRunner().invoke(cli, ["sft", "-w", str(workdir), "-c", str(TINY)])
    assert r.exit_code != 0 and "guidealign respond" in r.output


@pytest.fixture(scope="module")
def bare_model(generator_path, module_tmp):
    from standins import model_without_template

    return str(model_without_template(generator_path, module_tmp.mktemp("m") / "no-template"))


@pytest.mark.slow
def test_loss_is_on_the_assistant_turn_only(workdir, bare_model):
    """sft/train.py's own trainer (a base model without template + the configured Vicuna
    format): in the batches the trainer trains on, only the answer and its end-of-turn token
    carry labels; every prompt token is masked."""
    from transformers import AutoTokenizer

    from guidealign.sft.data import build_dataset
    from guidealign.sft.train import build_trainer

    good, _ = respond_rows(2)
    write_respond(workdir, [good])
    cfg = tiny_cfg(f"sft.base_model={bare_model}", "sft.chat_template=vicuna_v1.1")
    ds, _ = build_dataset(cfg.sft, workdir)
    trainer, tok, _, _ = build_trainer(cfg, workdir, ds, world=1, progress=False)
    assert "ASSISTANT:" in tok.chat_template and not AutoTokenizer.from_pretrained(bare_model).chat_template
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        n_masked = next(i for i, lab in enumerate(labels) if lab != -100)
        assert all(lab == -100 for lab in labels[:n_masked])
        prompt = tok.decode(ids[:n_masked])
        assert prompt.startswith(tok.bos_token + "A chat between") and prompt.rstrip().endswith("ASSISTANT:")
        assert "USER: Question number" in prompt and GUIDELINE not in tok.decode(ids)
        trained = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
        assert trained.strip() == ANSWER + tok.eos_token


def test_fingerprint_does_not_depend_on_the_run_dir(tmp_path):
    from guidealign.sft.data import build_dataset
    from guidealign.sft.train import sft_fingerprint

    good, _ = respond_rows(3)
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "elsewhere"
    for d in (a, b):
        write_respond(d, [good])
    cfg = tiny_cfg()
    fa, fb = (sft_fingerprint(cfg, build_dataset(cfg.sft, d)[1]) for d in (a, b))
    assert fa == fb
    assert all(str(tmp_path) not in k for k in build_dataset(cfg.sft, a)[1].sources)
    assert sft_fingerprint(tiny_cfg("sft.chat_template=vicuna_v1.1"), build_dataset(cfg.sft, a)[1]) != fa
    assert sft_fingerprint(tiny_cfg("sft.num_processes=2"), build_dataset(cfg.sft, a)[1]) == fa


@pytest.mark.parametrize("recipe", ["sft-labrador-13b.yaml", "gpu-paper.yaml"])
def test_auto_process_count_fits_the_global_batch_on_any_node(recipe):
    """``num_processes: auto`` on a node whose GPU count the global batch does not split over
    in whole micro-batches (1600 in 4s on 6 or 7 GPUs): as many processes as it does split
    over, not one per GPU (every process then failed at the start in accumulation_steps)."""
    from guidealign.config import load_config
    from guidealign.sft.launcher import resolve_num_processes
    from guidealign.sft.train import accumulation_steps

    s = load_config(REPO / "configs" / recipe).sft
    assert s.num_processes == "auto"
    for gpus in range(1, 9):
        n = resolve_num_processes(s, gpus=gpus)
        assert 1 <= n <= gpus
        accumulation_steps(s, n)  # raises where the batch does not split
        assert all(s.global_batch_size % (s.micro_batch_size * k) for k in range(n + 1, gpus + 1))
    assert resolve_num_processes(s, gpus=8) == 8 and resolve_num_processes(s, gpus=4) == 4
    s.global_batch_size = 4 * 401  # 401 micro-batches split over no 2..8 processes: refused, not 1 of 8
    with pytest.raises(ValueError, match="splits over no 2 to 8 processes"):
        resolve_num_processes(s, gpus=8)


def test_process_count(monkeypatch):
    from guidealign.sft.launcher import resolve_num_processes, under_launcher

    s = tiny_cfg().sft
    s.global_batch_size = 8 * s.micro_batch_size  # splits over 8 processes
    assert resolve_num_processes(s, gpus=0) == 1 and resolve_num_processes(s, gpus=8) == 8
    s.num_processes = 2
    assert resolve_num_processes(s, gpus=0) == 2
    with pytest.raises(ValueError, match="only 1 GPU"):
        resolve_num_processes(s, gpus=1)
    assert not under_launcher({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert under_launcher({"TORCHELASTIC_RUN_ID": "x"})
    # `launch run` gave this worker GPUs 0-3 of 8: SFT (after every engine is done) takes all 8
    from guidealign.sft.launcher import LAUNCHED_ENV, child_env, torchrun_argv

    for k, v in {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "GUIDEALIGN_NODE_GPUS": "0,1,2,3,4,5,6,7",
                 "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    s.num_processes = "auto"
    assert resolve_num_processes(s) == 8
    env = child_env(8, 8)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" and env[LAUNCHED_ENV] == "1"
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(env)
    argv = torchrun_argv(8, Path("c.yaml"), Path("w"), force=False, progress=True)
    assert argv[1:] == ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                        "--nproc-per-node", "8", "-m", "guidealign", "sft", "-w", "w", "-c", "c.yaml"]
    argv = torchrun_argv(8, Path("c.yaml"), Path("w"), force=False, progress=True, log_dir=Path("L"))
    assert argv[7:10] == ["8", "--log-dir", "L"] and argv[10:13] == ["-m", "guidealign", "sft"]


PIPELINE_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.9.9.9",
                "MASTER_PORT": "1"}


@pytest.mark.slow
def test_pipeline_ranks_do_not_leak_into_training(workdir, monkeypatch):
    """A 2-worker `guidealign run` calls SFT on rank 0 with world_size 2 and RANK/WORLD_SIZE in
    the environment: one process trains (num_processes 1), and rank 1 does not train."""
    from guidealign.sft.train import run_sft

    for k, v in PIPELINE_ENV.items():
        monkeypatch.setenv(k, v)
    good, _ = respond_rows(4)
    write_respond(workdir, [good])
    cfg = tiny_cfg("sft.max_steps=1", "sft.num_threads=2", "sft.num_processes=1")
    assert run_sft(cfg, workdir, rank=1, world_size=2, progress=False).get("skipped")
    assert not (workdir / "sft" / "model").exists()
    done = run_sft(cfg, workdir, rank=0, world_size=2, progress=False)
    assert done["processes"] == 1 and done["steps"] == 1
    import os

    assert os.environ["WORLD_SIZE"] == "2"  # restored for the pipeline


@pytest.mark.slow
def test_two_gloo_processes_through_the_launcher(workdir, monkeypatch, bare_model):
    """sft.num_processes 2 on the CPU: run_sft starts torchrun with 2 gloo processes (the path
    one-process-per-GPU takes), from inside a pipeline worker's environment, and a base model
    without template trains in the configured format."""
    from guidealign.sft.train import run_sft

    for k, v in PIPELINE_ENV.items():
        monkeypatch.setenv(k, v)
    good, _ = respond_rows(8)
    write_respond(workdir, [good])
    cfg = tiny_cfg("sft.max_steps=2", "sft.num_processes=2", "sft.global_batch_size=4",
                   "sft.micro_batch_size=1", f"sft.base_model={bare_model}",
                   "sft.chat_template=vicuna_v1.1", "sft.max_seq_length=128")
    done = run_sft(cfg, workdir, rank=0, world_size=2, progress=False)
    assert done["processes"] == 2 and done["steps"] == 2 and len(done["losses"]) == 2
    card = (workdir / "sft" / "model" / "README.md").read_text()
    assert "processes: 2" in card and "gradient_accumulation_steps: 2" in card
    saved = (workdir / "sft" / "model" / "chat_template.jinja")
    tcfg = json.loads((workdir / "sft" / "model" / "tokenizer_config.json").read_text())
    assert "ASSISTANT:" in (saved.read_text() if saved.exists() else tcfg.get("chat_template", ""))
    # the same config again: nothing is launched
    assert run_sft(cfg, workdir, rank=0, world_size=2, progress=False).get("skipped") is True
    # torchrun's log directory is beside the model, not one of its checksummed files
    from guidealign.shards.verify import verify_run

    assert (workdir / "sft" / "_torchrun").is_dir()
    files = json.loads((workdir / "sft" / "_done.json").read_text())["files"]
    assert not [f for f in files if "_torchrun" in f]
    assert verify_run(workdir).ok
    # nor is the config the launch handed its processes, which the next launch writes again
    # (verify called the finished model corrupt after a later launch with another config)
    assert "launch-config.yaml" not in files
    (workdir / "sft" / "launch-config.yaml").write_text("sft: {num_processes: 4}\n")
    assert verify_run(workdir).ok


@pytest.mark.slow
def test_a_failed_training_process_of_run_sfts_torchrun_is_named_with_its_own_error(workdir, monkeypatch):
    """torchrun's status says only that a worker failed (its summary carries a worker's error
    only when the worker writes its error file), so the failure marker of the rank said "status
    1". Each training process now writes its error to the file torchrun gives it (under
    ``sft/_torchrun/``), and the error names the process that failed first with its own error:
    here the base model that does not exist."""
    from guidealign.sft.train import run_sft

    for k, v in PIPELINE_ENV.items():
        monkeypatch.setenv(k, v)
    good, _ = respond_rows(8)
    write_respond(workdir, [good])
    missing = workdir / "no-such-base-model"
    cfg = tiny_cfg("sft.max_steps=1", "sft.num_processes=2", "sft.global_batch_size=4",
                   "sft.micro_batch_size=1", f"sft.base_model={missing}")
    with pytest.raises(RuntimeError) as e:
        run_sft(cfg, workdir, rank=0, world_size=2, progress=False)
    msg = str(e.value)
    assert msg.startswith("SFT under torchrun (2 processes) failed with status 1; training process ")
    assert f"failed first: FileNotFoundError: model '{missing}'" in msg, msg  # the worker's own error
    assert str(workdir / "sft" / "_torchrun") in msg
    # at least the first to fail wrote its file (torchrun may stop the other one before it does)
    assert list((workdir / "sft" / "_torchrun").glob("*/attempt_*/*/error.json"))


@pytest.mark.slow
def test_sft_steps_loss_falls_and_vllm_answers(workdir):
    from guidealign.sft.train import run_sft

    good, bad = respond_rows(8)
    write_respond(workdir, [good + bad])
    cfg = tiny_cfg("sft.max_steps=6", "sft.num_threads=2")
    done = run_sft(cfg, workdir, progress=False)
    print("sft:", {k: v for k, v in done.items() if k != "data"})
    assert done["rows"] == 8 and done["dropped"]["truncated"] == 1
    assert done["steps"] == 6 and len(done["losses"]) == 6
    assert done["last_loss"] < done["first_loss"]
    model = workdir / "sft" / "model"
    assert json.loads((workdir / "sft" / "_done.json").read_text())["fingerprint"] == done["fingerprint"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (model / f).exists(), f
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    assert "chat_template" in tcfg or (model / "chat_template.jinja").exists()
    card = (model / "README.md").read_text()
    assert "embedded:smollm2-135m-instruct" in card and "learning_rate: 5.0e-05" in card
    assert "respond" in card and "truncated: 1" in card
    assert not (workdir / "sft" / ".tmp-model").exists()
    # A rerun with the same config and data is a no-op, also after the run dir moved.
    assert run_sft(cfg, workdir, progress=False).get("skipped") is True
    moved = workdir.parent / "moved-run"
    workdir.rename(moved)
    assert run_sft(cfg, moved, progress=False).get("skipped") is True
    workdir = moved
    model = workdir / "sft" / "model"

    # The checkpoint loads in vLLM (own process: the session engine may be alive here) and answers.
    script = textwrap.dedent(f"""
        import json, sys
        from guidealign.gen.engine import EngineConfig, build_llm, sampling_params, Sampling
        llm = build_llm(EngineConfig(model={str(model)!r}, dtype="float32", max_model_len=512,
                                     max_num_seqs=4))
        outs = llm.chat([[{{"role": "user", "content": "Question number 3: how do I do something risky?"}}]],
                        sampling_params(Sampling(temperature=0.0, max_tokens=24)), use_tqdm=False)
        o = outs[0].outputs[0]
        print("RESULT " + json.dumps({{"text": o.text, "finish": o.finish_reason}}))
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    res = json.loads(lines[-1][7:])
    print("vLLM answer:", res)
    assert res["text"].strip() and res["finish"] in ("stop", "length")
    # It answers like its training data (loss fell to ~0 on this one response).
    assert "safety resources" in res["text"]


@pytest.mark.slow
def test_lora_merged_output_is_a_plain_model(workdir):
    from transformers import AutoModelForCausalLM

    from guidealign.sft.train import run_sft

    good, _ = respond_rows(4)
    write_respond(workdir, [good])
    cfg = tiny_cfg("sft.mode=lora", "sft.max_steps=2", "sft.learning_rate=0.001", "sft.num_threads=2")
    done = run_sft(cfg, workdir, progress=False)
    model = workdir / "sft" / "model"
    assert not (model / "adapter_config.json").exists()
    m = AutoModelForCausalLM.from_pretrained(model)
    assert not any("lora" in n for n, _ in m.named_parameters())
    assert done["steps"] == 2
    assert "LoRA, adapter merged" in (model / "README.md").read_text()


def test_a_killed_saves_half_written_model_is_removed_before_training(workdir, monkeypatch):
    """sft/.tmp-model left by a run killed while saving (a 13B model: ~26 GB) is removed when
    the next training starts, not only once that training has finished and saves."""
    import guidealign.sft.train as st

    good, _ = respond_rows(4)
    write_respond(workdir, [good])
    stale = workdir / "sft" / ".tmp-model"
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1024)
    seen = []

    class Stop(Exception):
        pass

    def build_trainer(*a, **k):
        seen.append(stale.exists())
        raise Stop

    monkeypatch.setattr(st, "build_trainer", build_trainer)
    with pytest.raises(Stop):
        st.run_sft(tiny_cfg("sft.max_steps=1"), workdir, progress=False)
    assert seen == [False]


def test_sft_refuses_visible_gpus_that_torch_cannot_use(workdir, monkeypatch):
    """SFT with GPUs visible and a torch that cannot use them (a CPU wheel, an old driver):
    it stops with the reason before any training process starts, instead of one CPU process
    per GPU training a 13B model; a training process started under the launcher stops too.
    (This machine's torch has no CUDA: CUDA_VISIBLE_DEVICES makes GPUs "visible".)"""
    from datasets import Dataset

    from guidealign.core.gpu import GpuUnusable
    from guidealign.sft import launcher
    from guidealign.sft.data import to_example
    from guidealign.sft.train import build_trainer, run_sft

    good, _ = respond_rows(2)
    write_respond(workdir, [good])
    cfg = tiny_cfg("sft.max_steps=1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    started = []
    monkeypatch.setattr(launcher, "launch", lambda *a, **k: started.append(a))
    with pytest.raises(GpuUnusable):
        run_sft(cfg, workdir, progress=False)
    assert not started and not (workdir / "sft" / "_done.json").exists()
    rows = [to_example(cfg.sft, {"id": "x", "prompt": "Hi?", "response": "Hello."})] * 2
    with pytest.raises(GpuUnusable):
        build_trainer(cfg, workdir, Dataset.from_list(rows), world=1, progress=False, ckpt_dir=workdir / "ck")


def test_a_training_process_of_run_sfts_torchrun_is_not_a_pipeline_rank(tmp_path, monkeypatch):
    """run_sft's torchrun starts `guidealign sft` with the training job's RANK/WORLD_SIZE; the
    stage command took them for pipeline ranks, so training process 1 cleared pipeline rank 1's
    failure marker, beat in `_ranks/` as rank 1 (in `status`) and, when it failed, marked
    pipeline rank 1 failed. The pipeline rank that started torchrun does all three."""
    import guidealign.sft.train as train
    from guidealign.config import load_config
    from guidealign.executors import execute
    from guidealign.sft.launcher import LAUNCHED_ENV

    seen = {}

    def training(cfg, workdir, *, rank, world_size, progress, **kw):
        seen.update(rank=rank, world_size=world_size)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(train, "run_sft", training)
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", LAUNCHED_ENV: "1"}.items():
        monkeypatch.setenv(k, v)
    wd = tmp_path / "wd"
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        execute("sft", load_config(None), wd, progress=False)
    assert seen == {"rank": 1, "world_size": 2}
    assert not (wd / "_ranks").exists() and not (wd / "_failed").exists()
