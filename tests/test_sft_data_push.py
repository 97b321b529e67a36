"""SFT data/training and model pushes: a model push deletes the model files of an
earlier push (keeping a user's other files), a LoRA adapter dir can be pushed by path and is
carded as a PEFT repo, a push reads each shard marker once, and SFT refuses an incomplete or
unreadable response stage and never resumes from checkpoints of another config."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from guidealign.config import load_config
from guidealign.gen.respond import RESPOND_SCHEMA
from guidealign.shards import write_manifest, write_shard
from guidealign.shards.layout import shard_path
from hubserver import HubServer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "sft-tiny-cpu.yaml"
TOKEN = "hf_TESTsecretTOKEN0123456789"


def rows(shard: int, n: int = 3) -> list[dict]:
    return [dict(id=f"s{shard}-{i}", prompt=f"question {shard}/{i}", guideline_ids=["g"],
                 guideline_texts=["GUIDELINE"], response=f"answer {shard}/{i}", finish_reason="stop",
                 model="m", prompt_tokens=1, output_tokens=1, note="") for i in range(n)]


def write_respond(workdir: Path, planned: int, written: int) -> Path:
    d = workdir / "respond"
    write_manifest(d, stage="respond", num_shards=planned, fingerprint="t")
    for i in range(written):
        write_shard(d, i, pa.Table.from_pylist(rows(i), schema=RESPOND_SCHEMA), f"fp{i}")
    return d


def hub_env(hub: HubServer, tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN=TOKEN,
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def push(workdir: Path, what: str, repo_id: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guidealign", "push", what, repo_id, "-w",
                           str(workdir), "--set", "push.backoff_s=0.05", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


# -- model pushes ------------------------------------------------------------------------------

def test_model_push_deletes_the_model_files_of_an_earlier_push(tmp_path, workdir):
    """A LoRA adapter with sharded weights, then a merged single-file model: the adapter, the
    shards and their index go from the Hub (a download would mix both models); a non-model file
    stays, as a dataset push keeps what is outside its data folder."""
    m = workdir / "sft" / "model"
    m.mkdir(parents=True)
    for name in ("adapter_config.json", "config.json", "model.safetensors.index.json"):
        (m / name).write_text("{}")
    for name in ("adapter_model.safetensors", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors"):
        (m / name).write_bytes(os.urandom(3000))
    (m / "notes").mkdir()
    (m / "notes" / "eval.txt").write_text("a user's notes")
    (m / "README.md").write_text("# card 1\n")
    (workdir / "sft" / "_done.json").write_text(json.dumps({"fingerprint": "f"}))  # SFT finished
    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        p = push(workdir, "model", "org/lab", env)
        assert p.returncode == 0, p.stderr[-3000:]
        shutil.rmtree(m)
        m.mkdir()
        (m / "config.json").write_text('{"model_type": "llama"}')
        (m / "model.safetensors").write_bytes(os.urandom(3000))
        (m / "README.md").write_text("# card 2\n")
        p = push(workdir, "model", "org/lab", env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "5 stale file(s) deleted" in p.stdout
        assert set(hub.files("org/lab", "model")) == {
            ".gitattributes", "README.md", "config.json", "model.safetensors", "notes/eval.txt"}
        report = json.loads((workdir / "push" / "model__org__lab.json").read_text())
        assert report["deleted_paths"] == sorted([
            "adapter_config.json", "adapter_model.safetensors", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json"])
        n = len(hub.commits("org/lab", "model"))
        assert push(workdir, "model", "org/lab", env).returncode == 0
        assert len(hub.commits("org/lab", "model")) == n  # nothing new, nothing stale: no commit


def test_is_model_file():
    from guidealign.hub.targets import is_model_file

    for p in ("model.safetensors", "sub/pytorch_model-00001-of-00003.bin", "adapter_config.json",
              "tokenizer.model", "chat_template.jinja", "model.safetensors.index.json"):
        assert is_model_file(p), p
    for p in ("README.md", ".gitattributes", "notes/eval.txt", "images/loss.png", "model-q4_k_m.gguf", "model.onnx"):
        assert not is_model_file(p), p


def test_a_model_push_owns_model_files_at_the_top_and_in_its_own_folders_only():
    """A model push deleted every Hub file whose name looks like a model file at any depth:
    a user's ONNX or GGUF export in its own folder (onnx/config.json, onnx/tokenizer.json,
    gguf/ggml-model-q4_0.bin) went with the next push. Only the top level and the folders the
    pushed model has are its own now."""
    from guidealign.hub.push import owned_by_push
    from guidealign.hub.targets import LocalFile

    files = [LocalFile(path_in_repo=p, local=Path("x"), size=1) for p in
             ("config.json", "model.safetensors", "tokenizer.json", "checkpoint-best/model.safetensors")]
    owned = owned_by_push("model", "data", files)
    for p in ("adapter_config.json", "pytorch_model.bin", "checkpoint-best/adapter_model.bin"):
        assert owned(p), p
    for p in ("onnx/config.json", "onnx/tokenizer.json", "gguf/ggml-model-q4_0.bin", "README.md",
              "model-q4_k_m.gguf"):
        assert not owned(p), p


def test_a_lora_adapter_dir_can_be_pushed_by_its_path(workdir):
    from guidealign.hub.targets import resolve_target

    m = workdir / "sft" / "model"
    m.mkdir(parents=True)
    (m / "adapter_config.json").write_text("{}")
    (workdir / "sft" / "_done.json").write_text("{}")  # SFT finished
    assert resolve_target(workdir, "model") == ("model", m)
    assert resolve_target(workdir, str(m)) == ("model", m)  # was: "neither a stage ... nor a model dir"


def test_the_card_of_an_unmerged_adapter_is_a_peft_card():
    import yaml

    from guidealign.hub.card import model_card

    def meta(mode, merged):
        card = model_card(base_model="meta-llama/Llama-2-13b-hf", data={}, hyperparameters={},
                          metrics={}, mode=mode, merged=merged)
        return yaml.safe_load(card.split("---")[1])

    assert meta("lora", False)["library_name"] == "peft"
    assert meta("lora", False)["base_model"] == "meta-llama/Llama-2-13b-hf"
    assert meta("lora", True)["library_name"] == "transformers"
    assert meta("full", True)["library_name"] == "transformers"


def test_dataset_files_reads_each_marker_once(workdir, monkeypatch):
    """The files pushed and the sha256 they are pushed with come from one read of each marker
    (they were read up to three times, so a shard rewritten meanwhile could pass one check and
    be pushed with another's checksum)."""
    import guidealign.shards as shards
    import guidealign.shards.manifest as manifest
    import guidealign.shards.marker as marker
    from guidealign.hub.targets import dataset_files

    d = write_respond(workdir, planned=3, written=3)
    reads = []
    real = marker.read_marker

    def counting(dataset, index):
        reads.append((Path(dataset).name, index))
        return real(dataset, index)

    for mod in (shards, manifest, marker):
        monkeypatch.setattr(mod, "read_marker", counting)
    files, n = dataset_files(d, "data")
    assert n == 9 and [f.path_in_repo for f in files] == [f"data/shard-{i:05d}.parquet" for i in range(3)]
    assert sorted(reads) == [("respond", i) for i in range(3)]


# -- SFT data ----------------------------------------------------------------------------------

def test_sft_refuses_an_incomplete_response_stage(workdir):
    """3 shards planned, 1 committed: SFT trained on a third of the responses, silently."""
    from guidealign.sft.data import build_dataset

    write_respond(workdir, planned=3, written=1)
    with pytest.raises(ValueError, match=r"incomplete: of its 3 shard\(s\), 2 not committed"):
        build_dataset(load_config(TINY).sft, workdir)


def test_sft_refuses_shards_committed_under_another_config(workdir):
    from guidealign.shards import map_shards
    from guidealign.sft.data import build_dataset

    src = workdir / "retrieve"
    for i in range(2):
        write_shard(src, i, pa.Table.from_pylist(rows(i), schema=RESPOND_SCHEMA), "in")
    write_manifest(src, stage="retrieve", num_shards=2, fingerprint="in")
    map_shards("respond", src, workdir / "respond", "config-a", fn=lambda t, i: t, progress=False)
    map_shards("respond", src, workdir / "respond", "config-b", fn=lambda t, i: t, progress=False,
               rank=0, world_size=2, assign="static")  # shard 1 still has config-a's
    with pytest.raises(ValueError, match="committed under another config"):
        build_dataset(load_config(TINY).sft, workdir)


def test_an_unreadable_shard_is_a_clear_error_naming_it(workdir):
    from guidealign.sft.data import build_dataset

    d = write_respond(workdir, planned=2, written=2)
    p = shard_path(d, 1)
    b = bytearray(p.read_bytes())
    b[-6:-4] = b"XX"  # a flipped footer, same size: the marker still matches
    p.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=r"shard-00001\.parquet cannot be read.*guidealign verify"):
        build_dataset(load_config(TINY).sft, workdir)


def test_a_shard_without_the_response_columns_is_a_clear_error(workdir):
    """A stage without finish_reason (sft.data pointing at the wrong stage) had every row
    dropped as 'finish_reason_None', or only some of them when one shard lacked it."""
    from guidealign.sft.data import build_dataset

    d = workdir / "respond"
    write_manifest(d, stage="respond", num_shards=2, fingerprint="t")
    write_shard(d, 0, pa.Table.from_pylist(rows(0), schema=RESPOND_SCHEMA), "fp0")
    write_shard(d, 1, pa.table({"id": ["b"], "prompt": ["p"], "response": ["r"]}), "fp1")
    with pytest.raises(ValueError, match=r"shard-00001\.parquet has no column\(s\) \['finish_reason'\]"):
        build_dataset(load_config(TINY).sft, workdir)


# -- SFT resume ----------------------------------------------------------------------------------

def test_sft_resumes_only_from_checkpoints_of_its_own_config(workdir, monkeypatch):
    """A run crashed after a checkpoint; a rerun with the same config resumes from it, one with
    another learning rate starts over (it resumed the old run's steps, optimizer and schedule)."""
    import guidealign.sft.train as train

    write_respond(workdir, planned=1, written=1)

    class Crash(Exception):
        pass

    seen = []

    def fake_build_trainer(cfg, wd, ds, *, world, progress, ckpt_dir=None):
        out = Path(ckpt_dir) if ckpt_dir else Path(wd) / "sft" / "checkpoints"

        class Trainer:
            train_dataset = [None]

            def train(self, resume_from_checkpoint=None):
                seen.append(resume_from_checkpoint)
                (out / "checkpoint-5").mkdir(parents=True, exist_ok=True)  # saved, then the crash
                (out / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')  # written last
                raise Crash

        return Trainer(), None, 1, "float32"

    monkeypatch.setattr(train, "build_trainer", fake_build_trainer)

    def run(lr):
        cfg = load_config(TINY, ["sft.save_steps=1", f"sft.learning_rate={lr}"])
        with pytest.raises(Crash):
            train._train(cfg, workdir, progress=False, force=False)

    run(1e-5)
    run(1e-5)
    run(3e-4)
    assert seen[0] is None and seen[2] is None and Path(seen[1]).name == "checkpoint-5"
    left = list((workdir / "sft" / "checkpoints").iterdir())
    assert len(left) == 1  # the other config's checkpoints were deleted


def test_the_loss_of_a_resumed_run_covers_the_whole_run():
    """A run resumed at its last checkpoint reported train_loss 0.0 (the trainer's
    training_loss averages only the steps of its own call) in _done.json and the model card."""
    from guidealign.sft.checkpoints import whole_run_loss

    history = [{"loss": 3.0, "step": 2}, {"loss": 1.0, "step": 3}, {"train_runtime": 1.0, "step": 3}]
    assert whole_run_loss(history) == pytest.approx((3.0 * 2 + 1.0) / 3)
    assert whole_run_loss([{"train_runtime": 1.0}]) is None


def test_a_dataset_push_with_an_empty_data_dir_is_refused(workdir, monkeypatch):
    from huggingface_hub import constants

    from guidealign.hub.push import PushError, push_one

    write_respond(workdir, 1, 1)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cfg = load_config(None, ["push.data_dir=/"])
    # "" would name the shards "/shard-00000.parquet" and the card's glob "/*.parquet"
    with pytest.raises(PushError, match="data_dir is empty"):
        push_one(cfg, workdir, "respond", "user/ds", progress=False)
