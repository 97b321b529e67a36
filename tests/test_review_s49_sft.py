"""Review s49 of SFT and the model push: the Hub token in the saved training arguments, trainer
args that cannot change the weights in the fingerprint, the saved weights' precision, a resumed
run's loss, the recipe's FSDP spelling and a push of a model trained on responses since changed."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from guidealign.config import load_config
from guidealign.gen.respond import RESPOND_SCHEMA
from guidealign.shards import write_manifest, write_shard

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "sft-tiny-cpu.yaml"
RECIPE = ROOT / "configs" / "sft-labrador-13b.yaml"
TOKEN = "hf_s49SecretTokenThatMustNotLeave0123"


@pytest.fixture(scope="module")
def tiny_base(module_tmp) -> Path:
    """scripts/tiny_models.py's Llama-2-like base (2 layers, fp16 weights, byte tokenizer)."""
    spec = importlib.util.spec_from_file_location("tiny_models", ROOT / "scripts" / "tiny_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = module_tmp.mktemp("tiny") / "llm-base"
    mod.llm_base(out)
    return out


def _row(i, response="I cannot help with that, but here is why."):
    return dict(id=f"r{i}", prompt=f"Question number {i}?", guideline_ids=["g"], guideline_texts=["Be kind."],
                response=response, finish_reason="stop", model="m", prompt_tokens=10, output_tokens=10,
                note="")


def _write_respond(workdir, n=8, response="I cannot help with that, but here is why."):
    d = Path(workdir) / "respond"
    write_manifest(d, stage="respond", num_shards=1, fingerprint="test")
    write_shard(d, 0, pa.Table.from_pylist([_row(i, response) for i in range(n)], schema=RESPOND_SCHEMA), "fp0")


def _tiny_cfg(base: Path, *overrides):
    return load_config(TINY, [f"sft.base_model={base}", "sft.chat_template=vicuna_v1.1", "sft.num_processes=1",
                              "sft.num_threads=1", "sft.max_seq_length=512", *overrides])


# -- 1: the Hub token in training_args.bin --------------------------------------------------------

def test_a_hub_token_in_trainer_args_is_in_no_file_of_the_saved_model(workdir, tiny_base):
    """Trainer.save_model pickled the whole training arguments (sft.trainer_args' hub_token,
    absolute paths) into sft/model/training_args.bin, and `push model` uploads every file there."""
    from guidealign.hub.targets import model_files, resolve_target
    from guidealign.sft.train import run_sft

    _write_respond(workdir, 4)
    cfg = _tiny_cfg(tiny_base, "sft.max_steps=1", f'sft.trainer_args={{"hub_token": "{TOKEN}"}}')
    run_sft(cfg, workdir, progress=False)
    model = workdir / "sft" / "model"
    assert not (model / "training_args.bin").exists()
    leaked = [p.name for p in model.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    kind, d = resolve_target(workdir, "model")
    assert kind == "model" and "training_args.bin" not in [f.path_in_repo for f in model_files(d)]


def test_a_model_saved_with_its_training_arguments_is_pushed_without_them(tmp_path):
    """A model an earlier version saved keeps its training_args.bin on disk; the push leaves it
    out (also in a subfolder) and sends the rest."""
    from guidealign.hub.targets import model_files

    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "training_args.bin", "sub/training_args.bin",
                 "pytorch_model.bin", "README.md"):
        (d / name).write_bytes(b"x")
    assert [f.path_in_repo for f in model_files(d)] == ["config.json", "model.safetensors",
                                                        "pytorch_model.bin", "README.md"]


# -- 2: trainer args that cannot change the weights ----------------------------------------------

def _fp(trainer_args: dict, seen: list | None = None, cfg_file=TINY) -> str:
    from guidealign.sft.fingerprint import sft_fingerprint

    cfg = load_config(cfg_file, ["sft.chat_template=vicuna_v1.1"])
    cfg.sft.trainer_args = trainer_args
    report = SimpleNamespace(sources={"respond": {"shards": 1, "sha256": ["ab" * 32]}})
    return sft_fingerprint(cfg, report)


def test_trainer_args_that_cannot_change_the_weights_keep_the_fingerprint():
    """Every sft.trainer_args key counted: turning on wandb, more dataloader workers or FSDP
    activation checkpointing (after running out of memory) deleted all checkpoints (those of
    another fingerprint) and retrained a finished model."""
    fsdp = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    assert _fp({}) == _fp({"report_to": "wandb", "run_name": "x", "logging_steps": 5, "logging_first_step": True,
                           "dataloader_num_workers": 4, "dataloader_pin_memory": False, "ddp_timeout": 60,
                           "hub_token": TOKEN, "push_to_hub": True, "hub_model_id": "org/m",
                           "disable_tqdm": True, "save_on_each_node": True})
    more = {"fsdp": fsdp["fsdp"], "fsdp_config": {**fsdp["fsdp_config"], "activation_checkpointing": True,
                                                  "cpu_ram_efficient_loading": True, "fsdp_cpu_offload": True}}
    assert _fp(fsdp) == _fp(more)
    # an fsdp_config of memory options only is as none
    assert _fp({"fsdp": "full_shard"}) == _fp({"fsdp": "full_shard", "fsdp_config": {"activation_checkpointing": True}})
    # what can change the weights, or decides the checkpoints, still counts
    for key, value in (("optim", "sgd"), ("packing", True), ("max_grad_norm", 0.5), ("save_total_limit", 3),
                       ("fsdp", "full_shard"), ("fsdp_config", {"version": 1})):
        assert _fp({key: value}) != _fp({}), key


def test_trainer_args_without_such_keys_keep_the_fingerprint_they_had(monkeypatch):
    """Runs keep their checkpoints after the change: the trainer args the fingerprint counts are
    the configured ones when none of them is left out, and the recipe's `fsdp: true` counts as
    the string it replaced."""
    import guidealign.shards as shards
    from guidealign.sft.fingerprint import trainer_args_for_fingerprint

    counted = []
    real = shards.fingerprint
    monkeypatch.setattr(shards, "fingerprint", lambda *parts: counted.append(parts) or real(*parts))
    args = {"packing": True, "optim": "adamw_torch", "fsdp": "full_shard auto_wrap",
            "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "version": 2}}
    for trainer_args in ({}, args):
        counted.clear()
        _fp(dict(trainer_args))
        assert counted[0][2]["trainer_args"] == trainer_args
    recipe = load_config(RECIPE).sft.trainer_args
    assert recipe["fsdp"] is True
    assert trainer_args_for_fingerprint(recipe) == {
        "fsdp": "full_shard auto_wrap", "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}


# -- 3: weights saved in the training precision --------------------------------------------------

def test_a_full_fine_tune_in_bf16_saves_bf16_weights(workdir, tiny_base):
    """Full fine-tuning keeps float32 master weights and saved them: twice the size of the bf16
    model (Labrador-13B: 52 GB, not 26)."""
    import torch
    from safetensors import safe_open

    from guidealign.sft.train import run_sft

    _write_respond(workdir, 4)
    torch.set_num_threads(1)
    run_sft(_tiny_cfg(tiny_base, "sft.max_steps=1", "sft.precision=bf16"), workdir, progress=False)
    model = workdir / "sft" / "model"
    dtypes = set()
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as r:
            dtypes |= {r.get_slice(k).get_dtype() for k in r.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(model).dtype == torch.bfloat16
    # _done.json's checksums are those of the files as committed
    from guidealign.shards.artifact_files import check_files

    done = json.loads((workdir / "sft" / "_done.json").read_text())
    assert check_files(workdir / "sft", done["files"]) == []
    assert done["threads"] >= 1  # as every other marker and _done.json records


def test_sharded_float32_weights_are_rewritten_in_half_precision(tmp_path):
    """What the trainer saved (one process, or an FSDP state dict gathered onto the first):
    float32 shards and their index; rewritten in fp16 the index's total size follows, a module
    transformers keeps in float32 stays, and the model loads with the same (rounded) weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from guidealign.sft.precision import save_in_training_precision

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False))
    d = tmp_path / "m"
    m.save_pretrained(d, state_dict=m.state_dict(), max_shard_size="20KB")
    assert len(list(d.glob("*.safetensors"))) > 1
    assert save_in_training_precision(d, "float32") is False  # float32 training: as saved
    assert save_in_training_precision(d, "fp16", keep_float32=("norm",))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert json.loads((d / "config.json").read_text())["dtype"] == "float16"
    sd = {}
    for f in d.glob("*.safetensors"):
        sd.update(load_file(f))
    assert sd["model.norm.weight"].dtype == torch.float32
    assert sd["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v.to(sd[k].dtype)), k
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    assert not list(d.glob("*.part"))
    assert AutoModelForCausalLM.from_pretrained(d).dtype == torch.float16


# -- 4: a resumed run's loss -------------------------------------------------------------------

def test_a_resumed_run_reports_the_loss_of_an_uninterrupted_one(tmp_path, tiny_base, monkeypatch):
    """A run resumed at a checkpoint averaged the logged windows only: with 5 steps logged every
    2, step 5 was left out, and the loss differed from the uninterrupted run's."""
    import torch
    from transformers import TrainerCallback

    import guidealign.sft.train as train

    torch.set_num_threads(1)
    overrides = ("sft.max_steps=5", "sft.logging_steps=2", "sft.save_steps=2", "sft.learning_rate=1e-3")
    whole = tmp_path / "whole"
    whole.mkdir()
    _write_respond(whole, 8)
    ref = train.run_sft(_tiny_cfg(tiny_base, *overrides), whole, progress=False)

    class Killed(Exception):
        pass

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4:
                raise Killed

    real = train.build_trainer

    def with_kill(*a, **k):
        out = real(*a, **k)
        out[0].add_callback(KillAfterSave())
        return out

    cut = tmp_path / "cut"
    cut.mkdir()
    _write_respond(cut, 8)
    monkeypatch.setattr(train, "build_trainer", with_kill)
    with pytest.raises(Killed):
        train.run_sft(_tiny_cfg(tiny_base, *overrides), cut, progress=False)
    monkeypatch.setattr(train, "build_trainer", real)
    resumed = train.run_sft(_tiny_cfg(tiny_base, *overrides), cut, progress=False)
    assert resumed["steps"] == ref["steps"] == 5
    assert resumed["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)


# -- 5: the recipe's FSDP spelling -------------------------------------------------------------

def test_the_recipes_fsdp_settings_load_without_the_deprecation_and_as_before(tmp_path, monkeypatch):
    """`fsdp: full_shard auto_wrap` made transformers warn that the string form goes in v5.20;
    `fsdp: true` gives accelerate the same FSDP plugin settings."""
    from trl import SFTConfig as TRLConfig

    # transformers writes this variable while it reads fsdp_config: put back after the test
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    tf_log = logging.getLogger("transformers")
    tf_log.addHandler(handler)
    try:
        args = load_config(RECIPE).sft.trainer_args
        now = TRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **json.loads(json.dumps(args)))
        assert not [m for m in records if "deprecated" in m]
        before = TRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                           **{**json.loads(json.dumps(args)), "fsdp": "full_shard auto_wrap"})
    finally:
        tf_log.removeHandler(handler)
    assert now.fsdp_plugin_args == before.fsdp_plugin_args
    assert now.fsdp_plugin_args["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert now.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert now.fsdp_plugin_args["reshard_after_forward"] is True


# -- 6: push of a model trained on responses that changed since -----------------------------------

def _finished_model(workdir, cfg=None) -> Path:
    """A finished SFT output whose _done.json records the data as SFT does (build_dataset)."""
    from guidealign.shards import write_json_atomic
    from guidealign.sft.data import build_dataset

    _, rep = build_dataset((cfg or load_config(TINY)).sft, workdir)
    model = workdir / "sft" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w")
    write_json_atomic(workdir / "sft" / "_done.json", {"fingerprint": "x", "data": rep.sources,
                                                       "data_paths": rep.paths})
    return model


def test_a_model_trained_on_responses_that_changed_since_is_not_pushed(workdir):
    """check_finished_model looked for _done.json only: a model trained before respond was rerun
    was pushed as if trained on the new responses."""
    from guidealign.hub.targets import PushError, resolve_target

    _write_respond(workdir, 3)
    model = _finished_model(workdir)
    assert resolve_target(workdir, "model") == ("model", model)
    assert resolve_target(workdir, str(model))[0] == "model"
    _write_respond(workdir, 3, response="Another answer, from a rerun of respond.")
    for what in ("model", str(model)):
        with pytest.raises(PushError, match="guidealign sft"):
            resolve_target(workdir, what)


def test_a_model_whose_responses_lost_a_shard_is_not_pushed(workdir):
    from guidealign.hub.targets import PushError, resolve_target

    _write_respond(workdir, 3)
    _finished_model(workdir)
    d = workdir / "respond"
    write_manifest(d, stage="respond", num_shards=2, fingerprint="test")  # a rerun with more shards
    with pytest.raises(PushError, match="respond"):
        resolve_target(workdir, "model")


def test_a_model_trained_on_another_runs_responses_is_pushed(tmp_path):
    """sft.data naming a dataset outside the run directory is recorded by its folder name
    ("respond"): the check compared it with this run's own respond/ and refused the push for
    good (retraining skipped: the data had not changed)."""
    from guidealign.hub.targets import resolve_target
    from guidealign.shards import write_json_atomic

    other, here = tmp_path / "other", tmp_path / "here"
    _write_respond(other, 3)
    _write_respond(here, 2, response="This run's own answers, not trained on.")
    model = _finished_model(here, load_config(TINY, [f"sft.data=[{other / 'respond'}]"]))
    done = json.loads((here / "sft" / "_done.json").read_text())
    assert list(done["data"]) == ["respond"] and done["data_paths"] == {"respond": str((other / "respond").resolve())}
    assert resolve_target(here, "model") == ("model", model)
    # a model recorded before data_paths existed: not checked (its names do not say where)
    write_json_atomic(here / "sft" / "_done.json", {"fingerprint": "x", "data": done["data"]})
    assert resolve_target(here, "model") == ("model", model)


def test_a_model_trained_before_data_paths_is_checked_from_its_next_run(workdir):
    """A model whose _done.json predates data_paths was never checked again (its fingerprint
    unchanged, SFT skipped and left the record as it was): the skip records where the data is."""
    from guidealign.hub.targets import PushError, resolve_target
    from guidealign.sft.data import build_dataset
    from guidealign.sft.fingerprint import sft_fingerprint
    from guidealign.sft.train import _already_done
    from guidealign.shards import write_json_atomic

    _write_respond(workdir, 3)
    cfg = load_config(TINY)
    _, rep = build_dataset(cfg.sft, workdir)
    model = workdir / "sft" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"w")
    write_json_atomic(workdir / "sft" / "_done.json", {"fingerprint": sft_fingerprint(cfg, rep), "data": rep.sources})
    assert _already_done(cfg, workdir, False)["skipped"]
    assert json.loads((workdir / "sft" / "_done.json").read_text())["data_paths"] == {"respond": "respond"}
    _write_respond(workdir, 3, response="Another answer, from a rerun of respond.")
    with pytest.raises(PushError, match="guidealign sft"):
        resolve_target(workdir, "model")
