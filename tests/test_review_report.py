"""Review of core (threads, models), check_models, eval's report side and hub cards/export:
defects reproduced on small inputs (no engine, no network, no training)."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


# --- 1. a stage left at threads 0 gets torch's default, not the thread count of the stage
#        that ran before it in the same process ------------------------------------------------

_THREADS_SCRIPT = """
import torch
from guidealign.core.threads import set_threads
default = torch.get_num_threads()
seen = []
for n in (default + 1, 0, default + 2, None, 0):  # stages' *.threads settings, in run order
    set_threads(n)
    seen.append(torch.get_num_threads())
print(default, *seen)
"""


def test_threads_0_after_a_stage_that_set_threads_gives_torchs_default():
    """`guidealign run` runs library, index, retriever and retrieve in one process: with
    retriever.threads=1 and retrieve.threads=0 ("leave torch's default") the retrieve stage ran
    on 1 thread, and on torch's default only when the retriever was already done. (A fresh
    process, so that no earlier test's thread setting counts.)"""
    out = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], capture_output=True, text=True,
                         check=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    default, *seen = map(int, out.stdout.split())
    assert seen == [default + 1, default, default + 2, default, default], \
        f"threads 0/None kept the thread count an earlier stage set (torch's default {default})"


# --- 2. a model given as a local path: "~" expanded, a missing path named as such -----------------

def test_resolve_expands_a_home_relative_model_path(tmp_path, monkeypatch):
    """`guidealign check` and `models fetch` accept engine.model: ~/models/x as a local path, but
    resolve passed "~/models/x" on, which transformers/vLLM/sentence-transformers do not expand:
    they read it as a Hub repo id and fail ("Repo id must use alphanumeric chars ...")."""
    from guidealign.core.models import model_kind, resolve

    monkeypatch.setenv("HOME", str(tmp_path))
    d = tmp_path / "models" / "m"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    assert model_kind("~/models/m") == "local"
    assert resolve("~/models/m") == str(d)
    # a config that loads from it really finds it
    from transformers import PretrainedConfig

    PretrainedConfig.get_config_dict(resolve("~/models/m"))


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model-dir", "~/no-such-model"])
def test_resolve_of_a_missing_local_path_says_so(name, tmp_path, monkeypatch):
    """A mistyped local model path reached the loaders, which failed with "Repo id must be in the
    form 'repo_name' or 'namespace/repo_name'" (a Hub error, for a path)."""
    from guidealign.core.models import resolve

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such local model directory"):
        resolve(name)
    assert resolve("some-org/some-model") == "some-org/some-model"  # Hub ids pass unchanged


# --- 3. the model card names a Hub base model only --------------------------------------------

@pytest.mark.parametrize("base, want", [
    ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-hf"),
    ("~/models/llama", None),
    ("./models/llama", None),
    ("../models/llama", None),
    ("/data/models/llama", None),
    # (Stop 56) the embedded generator is named by the Hub model its GGUF was made from, as
    # an adapter trained on it names its base (core.models.hub_ref)
    ("embedded:smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("/data/hf/models--meta-llama--Llama-2-13b-hf/snapshots/" + "a" * 40, "meta-llama/Llama-2-13b-hf"),
])
def test_model_card_base_model_is_a_hub_id_or_absent(base, want, tmp_path, monkeypatch):
    """A base model given as a local path that does not exist where the card is written (a "~"
    path, which Path.exists does not expand, or a path on another machine) went into the card's
    `base_model`, which the Hub refuses ("base_model is not valid"), failing the push."""
    from guidealign.hub.card import model_card

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    card = model_card(base_model=base, data={}, hyperparameters={}, metrics={}, mode="lora",
                      merged=False)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front.get("base_model") == want
    from guidealign.hub.card import redact

    # the base model is still named in the text (a local path by its base name only)
    assert f"`{redact(base)}`" in card


# --- 4. check counts a checkpoint's parameters once when it ships both weight formats ---------

def _safetensors(path: Path, shapes: dict[str, list[int]], dtype: str = "F32") -> None:
    nbytes = {"F32": 4, "BF16": 2, "F16": 2}[dtype]
    header, off = {}, 0
    for k, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n * nbytes]}
        off += n * nbytes
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * off)


def test_check_counts_parameters_once_with_safetensors_and_bin_beside_each_other(tmp_path):
    """Many Hub repos ship model.safetensors and pytorch_model.bin (`models fetch` keeps both):
    check summed both files' bytes, doubling the parameters and every memory/disk estimate
    made from them (a false "GPU memory" FAIL)."""
    from guidealign.check_models import ModelInfo, _describe_local

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    _safetensors(d / "model.safetensors", {"a": [1000, 100], "b": [1000]})
    (d / "pytorch_model.bin").write_bytes(b"\0" * (101_000 * 4))
    info = _describe_local(ModelInfo("m", "local", path=str(d)))
    assert info.params == 101_000, info.params_source


def test_check_counts_safetensors_parameters_whatever_dtype_the_config_names(tmp_path):
    """float32 weights under a config that says bfloat16 (common after a float32 save): bytes / 2
    doubled the parameter count."""
    from guidealign.check_models import ModelInfo, _describe_local

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    _safetensors(d / "model.safetensors", {"a": [300, 100]}, dtype="F32")
    info = _describe_local(ModelInfo("m", "local", path=str(d)))
    assert info.params == 30_000, info.params_source


# --- 5. the dataset card names the model that wrote the responses -----------------------------

def test_dataset_card_names_the_responder_model_of_the_pushed_responses(tmp_path):
    """With respond.engine.model set (the paper answers with Vicuna/GPT-3.5 while a stronger model
    writes the guidelines) the card's Models section named engine.model only: the card of the
    pushed responses credited them to the guideline writer."""
    from guidealign.config import load_config
    from guidealign.hub.card import dataset_card

    cfg = load_config(None, ["engine.model=org/writer-70b", "respond.engine.model=lmsys/vicuna-13b-v1.5",
                             "respond.engine.chat_template=vicuna_v1.1"])
    card = dataset_card(repo_id="org/x", stage="respond", rows=3, files=1, cfg=cfg,
                        workdir=tmp_path, data_dir="data")
    body = card.split("### Models\n\n```yaml\n", 1)[1].split("```", 1)[0]
    models = yaml.safe_load(body)
    assert models.get("responder") == "lmsys/vicuna-13b-v1.5", models
    assert models["generator"] == "org/writer-70b"
    # no responder engine of its own: the generator answers
    plain = dataset_card(repo_id="org/x", stage="respond", rows=3, files=1,
                         cfg=load_config(None, ["engine.model=org/writer-70b"]), workdir=tmp_path)
    body = plain.split("### Models\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(body)["responder"] == "org/writer-70b"


def test_dataset_card_names_the_models_the_run_recorded_not_pushs_config(tmp_path):
    """The card named the models of the config given to `push`: pushing a run made with other
    models (or with the default config) credited the data to models that never wrote it. The
    generation stages record their model in their manifest (through map_shards), the retriever
    and SFT their base in _done.json; the config fills in only what no stage recorded."""
    import pyarrow as pa

    from guidealign.config import load_config
    from guidealign.hub.card import dataset_card
    from guidealign.shards import map_shards, write_manifest, write_shard
    from guidealign.shards.artifact import mark_done

    src = tmp_path / "prompts"
    write_manifest(src, stage="ingest", num_shards=1, fingerprint="p")
    write_shard(src, 0, pa.table({"id": ["a"], "prompt": ["hi"]}), "p0")
    same = lambda t, i: (t, None, {})  # noqa: E731
    map_shards("guidelines", src, tmp_path / "guidelines", "fg", fn=same, progress=False,
               record={"model": "org/writer-that-ran"})
    map_shards("respond", src, tmp_path / "respond", "fr", fn=same, progress=False,
               record={"model": "org/responder-that-ran"})
    (tmp_path / "retriever").mkdir()
    mark_done(tmp_path / "retriever", fingerprint="r", rows=1, seconds=0, base_model="org/encoder-that-ran")

    cfg = load_config(None, ["engine.model=org/configured", "sft.base_model=org/configured-base"])
    card = dataset_card(repo_id="org/x", stage="respond", rows=1, files=1, cfg=cfg, workdir=tmp_path)
    models = yaml.safe_load(card.split("### Models\n\n```yaml\n", 1)[1].split("```", 1)[0])
    assert models == {"generator": "org/writer-that-ran", "responder": "org/responder-that-ran",
                      "retriever_base": "org/encoder-that-ran", "sft_base": "org/configured-base",
                      "from_config": ["sft_base"]}, models


# --- 6. the shell entry points import modules that exist ---------------------------------------

def test_shell_scripts_import_only_existing_guidealign_modules():
    """`GUIDEALIGN_EXTRA=gpu ./run.sh setup` checked the GPUs with
    `from guidealign.gpu_check import require_usable_gpus`, a module that became
    guidealign.core.gpu: under `set -euo pipefail` every gpu setup died there with
    ModuleNotFoundError, before the embedded models were prepared, on any GPU node."""
    import importlib
    import re

    repo = Path(__file__).resolve().parents[1]
    found = []
    for script in [repo / "run.sh", *sorted((repo / "scripts").glob("*.sh"))]:
        text = script.read_text()
        for mod, names in re.findall(r"from (guidealign[\w.]*) import ([\w, ]+?)(?: as \w+)?[;\"'\n]", text):
            found.append((script.name, mod, names))
        for mod in re.findall(r"-m (guidealign[\w.]*)", text):
            found.append((script.name, mod, ""))
    assert any(s == "run.sh" for s, _, _ in found)
    for script, mod, names in found:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            pytest.fail(f"{script}: {mod}: {e}")
        for name in filter(None, (n.strip() for n in names.split(","))):
            assert hasattr(m, name), f"{script}: {mod} has no {name}"


# --- 7. a model `models fetch` downloaded counts as cached afterwards --------------------------

def _fetched_repo(cache: Path, repo_id: str) -> Path:
    """What `guidealign models fetch` leaves in the Hugging Face cache for a repo that also holds
    files it skips (models._IGNORE: original/ checkpoints, ONNX): the snapshot without them, and
    huggingface_hub's cached listing of the whole repo tree."""
    d = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True)
    kept = {"config.json": b"{}", "model.safetensors": b"\0" * 16, "tokenizer.json": b"{}"}
    for name, data in kept.items():
        (snap / name).write_bytes(data)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(commit)
    tree = {**{n: len(b) for n, b in kept.items()}, "original/consolidated.00.pth": 64,
            "original/params.json": 2, "onnx/model.onnx": 32}
    (d / "trees").mkdir()
    (d / "trees" / f"{commit}.json").write_text(json.dumps(
        {"format_version": 1,
         "files": {p: {"size": n, "blob_id": f"{i:040x}"} for i, (p, n) in enumerate(tree.items())}}))
    return snap


def test_models_fetch_offline_accepts_a_model_it_fetched_itself(tmp_path, monkeypatch):
    """`models fetch` downloads without original/, ONNX, ... files; huggingface_hub records the
    whole repo listing, so the cache lookup without those ignore patterns called the snapshot
    incomplete: on the offline node the documented check (`models fetch` again) failed with
    "NOT CACHED ... HF_HUB_OFFLINE=1 forbids downloading them" for a fully fetched model, and
    `guidealign check` said "would download"."""
    import huggingface_hub.constants as hfc

    from guidealign.check_models import locate
    from guidealign.config import load_config
    from guidealign.core.models import fetch_models

    cache = tmp_path / "hub"
    snap = _fetched_repo(cache, "example-org/chat-model-7b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["engine.model=example-org/chat-model-7b"])
    seen = fetch_models(cfg, cache_dir=str(cache), echo=lambda *_: None)
    assert seen["example-org/chat-model-7b"] == f"cached at {snap}"
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))
    info = locate("example-org/chat-model-7b")
    assert (info.where, info.path) == ("hub cache", str(snap)), info.notes
    # a snapshot that really lacks a file it needs is still not cached
    (snap / "model.safetensors").unlink()
    from guidealign.core.models import FetchError

    with pytest.raises(FetchError, match="example-org/chat-model-7b"):
        fetch_models(cfg, cache_dir=str(cache), echo=lambda *_: None)


def test_a_stage_pushed_by_its_path_gets_the_provenance_of_its_own_run(tmp_path, monkeypatch):
    """`guidealign push /runs/b/respond org/x -w runs/a` wrote the card's stage table, library
    size and retriever metrics from runs/a while the data came from runs/b."""
    import pyarrow as pa

    import guidealign.hub.card as card
    from guidealign.config import load_config
    from guidealign.hub.push import files_to_push
    from guidealign.shards import write_manifest, write_shard

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    write_shard(b / "respond", 0, pa.table({"id": ["x"], "prompt": ["p"], "response": ["r"]}), "fp")
    write_manifest(b / "respond", stage="respond", num_shards=1, fingerprint="fp")
    seen = {}

    def capture(**k):
        seen.update(k)
        return "card"

    monkeypatch.setattr(card, "dataset_card", capture)
    files_to_push(load_config(None), a, "dataset", b / "respond", "org/x", "data")
    assert Path(seen["workdir"]) == b
