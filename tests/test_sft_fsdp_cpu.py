"""The FSDP path of SFT (the 13B recipe's: `fsdp: true`, FSDP 2, cpu_ram_efficient_loading) run
for real with two gloo training processes on the CPU: accelerate keeps its FSDP plugin for
accelerators only and would silently train with DDP here, so the training processes load
tests/fsdp_cpu/sitecustomize.py, which keeps the plugin on CPU processes (nothing else is
replaced: transformers' Trainer, accelerate's FSDP 2 wrapping, the gathered save and the
checkpoints are the real code).

Shown: the sharded run trains the same model as one unsharded process (same losses, same
weights to float32 rounding), the base model's weights are read by the first process only and
reach the other, and a job lost right after a checkpoint resumes from it and ends the same."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from guidealign.config import load_config
from guidealign.gen.respond import RESPOND_SCHEMA
from guidealign.shards import write_manifest, write_shard

REPO = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().parent / "fsdp_cpu"
TINY = REPO / "configs" / "sft-tiny-cpu.yaml"
FSDP = ('sft.trainer_args={fsdp: true, fsdp_config: {transformer_layer_cls_to_wrap: [LlamaDecoderLayer], '
        'cpu_ram_efficient_loading: true}}')
SAME = ("sft.max_steps=2", "sft.global_batch_size=4", "sft.micro_batch_size=1", "sft.max_seq_length=128",
        "sft.num_threads=1")


def _write_respond(workdir: Path, n: int = 8) -> None:
    rows = [dict(id=f"g{i}", prompt=f"Question {i}: how should I store cleaning products safely?",
                 guideline_ids=["x"], guideline_texts=["a guideline the training set must not hold"],
                 response=f"Keep them high up and locked, away from food; answer {i}.",
                 finish_reason="stop", model="m", prompt_tokens=10, output_tokens=10, note="")
            for i in range(n)]
    d = workdir / "respond"
    write_manifest(d, stage="respond", num_shards=1, fingerprint="test")
    write_shard(d, 0, pa.Table.from_pylist(rows, schema=RESPOND_SCHEMA), "fp0")


def _weights(workdir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted((workdir / "sft" / "model").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_trains_as_one_process_and_resumes(tmp_path, monkeypatch):
    import torch

    from guidealign.sft.train import run_sft

    torch.set_num_threads(1)
    one = tmp_path / "one"
    one.mkdir()
    _write_respond(one)
    ref = run_sft(load_config(TINY, [*SAME, "sft.num_processes=1"]), one, progress=False)
    assert ref["sharding"] == "none" and ref["steps"] == 2

    sharded = tmp_path / "fsdp"
    sharded.mkdir()
    _write_respond(sharded)
    monkeypatch.setenv("PYTHONPATH", str(SHIM))
    monkeypatch.setenv("GUIDEALIGN_TEST_CPU_FSDP", "1")
    reads = tmp_path / "weight-reads"
    monkeypatch.setenv("GUIDEALIGN_TEST_WEIGHT_READS", str(reads))
    cfg = load_config(TINY, [*SAME, "sft.num_processes=2", "sft.save_steps=1", FSDP])
    # the job is lost right after its step-1 checkpoint: the rerun resumes from it
    monkeypatch.setenv("GUIDEALIGN_TEST_EXIT_AFTER_SAVE", "1")
    with pytest.raises(RuntimeError, match="SFT under torchrun"):
        run_sft(cfg, sharded, progress=False)
    ckpts = list((sharded / "sft" / "checkpoints").glob("*/checkpoint-1/trainer_state.json"))
    assert len(ckpts) == 1 and not (sharded / "sft" / "_done.json").exists()
    monkeypatch.delenv("GUIDEALIGN_TEST_EXIT_AFTER_SAVE")
    done = run_sft(cfg, sharded, progress=False)

    assert done["processes"] == 2 and done["sharding"] == "fsdp2"
    assert done["base_weights_read_by"] == "the first process of each node"
    # and so it was: the checkpoint was read by local rank 0 only, once a run (transformers 5
    # read it in the second process too, and overwrote that copy with zeros)
    assert reads.read_text().split() == ["0", "0"]
    assert done["steps"] == 2
    # resumed at step 1: the second step's loss and the whole run's are the one process's
    assert done["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert done["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
    a, b = _weights(one), _weights(sharded)
    assert set(a) <= set(b)
    for k in a:  # a base model that never reached the second process would differ here
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    # a tied head FSDP saved on its own (its gathered state dict no longer shares storage) is
    # still the embedding, so loading ties them as trained
    if "lm_head.weight" in b and "lm_head.weight" not in a:
        assert torch.equal(b["lm_head.weight"], b["model.embed_tokens.weight"])
    recorded = json.loads((sharded / "sft" / "_done.json").read_text())
    assert recorded["sharding"] == "fsdp2"
    assert not (sharded / "sft" / "checkpoints").exists()  # finished: resume points removed


@pytest.mark.slow
def test_a_one_process_checkpoint_is_passed_over_by_fsdp_and_sharded_checkpoints_still_save_a_model(
        tmp_path, monkeypatch, capfd):
    """Two fixes, one run (each FSDP start costs a minute here):

    - The process count is not in SFT's fingerprint and one process drops FSDP: a job lost on a
      node of one GPU left a checkpoint that the rerun on two (FSDP) found and could not load
      (transformers looks for FSDP's files), so the rerun failed, and every rerun after it. The
      checkpoint is passed over with a warning and the run trains from the start.
    - ``fsdp_config.state_dict_type: SHARDED_STATE_DICT`` (faster checkpoints) made the final
      save_model write no weights: the run failed after training, and a rerun could not help (the
      type is in the fingerprint). The final save now gathers the whole model whatever the type."""
    import subprocess
    import sys

    import torch

    from guidealign.sft.train import run_sft

    _write_respond(tmp_path, 4)
    fsdp = FSDP.replace("cpu_ram_efficient_loading: true",
                        "cpu_ram_efficient_loading: true, state_dict_type: SHARDED_STATE_DICT")
    over = ["sft.max_steps=2", "sft.global_batch_size=2", "sft.micro_batch_size=1", "sft.max_seq_length=128",
            "sft.num_threads=1", "sft.save_steps=1", fsdp]
    # one process, lost right after its step-1 checkpoint (tests/fsdp_cpu: the process exits, status 3)
    script = ("import sys; from guidealign.config import load_config; from guidealign.sft.train import run_sft; "
              "run_sft(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2], progress=False)")
    env = {**os.environ, "PYTHONPATH": str(SHIM), "GUIDEALIGN_TEST_EXIT_AFTER_SAVE": "1"}
    p = subprocess.run([sys.executable, "-c", script, str(TINY), str(tmp_path), *over, "sft.num_processes=1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 3, p.stderr[-3000:]
    (ckpt,) = (tmp_path / "sft" / "checkpoints").glob("*/checkpoint-1")
    assert not list(ckpt.glob("pytorch_model_fsdp*"))  # one process: no FSDP files

    monkeypatch.setenv("PYTHONPATH", str(SHIM))
    monkeypatch.setenv("GUIDEALIGN_TEST_CPU_FSDP", "1")
    done = run_sft(load_config(TINY, [*over, "sft.num_processes=2"]), tmp_path, progress=False)
    assert done["processes"] == 2 and done["sharding"] == "fsdp2" and done["steps"] == 2
    assert "cannot resume across that change" in capfd.readouterr().err
    # its checkpoints were of the sharded type, its final model is whole
    w = _weights(tmp_path)
    assert "model.embed_tokens.weight" in w and all(torch.isfinite(t.float()).all() for t in w.values())


@pytest.mark.parametrize("saved_fsdp", [True, False])
def test_resume_point_passes_over_a_checkpoint_of_the_other_layout(tmp_path, saved_fsdp):
    """Both ways: an FSDP checkpoint (``pytorch_model_fsdp.bin``, or the folder
    ``pytorch_model_fsdp_0`` of a sharded one) is resumed only by an FSDP run, any other only
    without FSDP; the main process removes one it passes over."""
    from types import SimpleNamespace

    from guidealign.sft.checkpoints import resume_point

    for main in (False, True):
        ckpt_dir = tmp_path / f"fp-{main}"
        ck = ckpt_dir / "checkpoint-3"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
        (ck / "model.safetensors").write_bytes(b"")
        if saved_fsdp and main:
            (ck / "pytorch_model_fsdp_0").mkdir()  # a sharded checkpoint's folder
        elif saved_fsdp:
            (ck / "pytorch_model_fsdp.bin").write_bytes(b"")  # a full one's file
        scfg = SimpleNamespace(save_steps=1)
        assert resume_point(ckpt_dir, scfg, main=main, fsdp=saved_fsdp) == str(ck)
        assert resume_point(ckpt_dir, scfg, main=main, fsdp=not saved_fsdp) is None
        assert ck.exists() != main  # the main process removed it
