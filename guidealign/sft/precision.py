"""Precision and sharding of the SFT job: the precision it trains in, the dtype the base model
is loaded in, whether FSDP or DeepSpeed shard it, and what cannot run sharded."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import get_args

from guidealign.config.sft import SFTPrecision


def choose_precision(requested: str, *, cuda: bool, native_bf16: bool, gpu: str = "") -> str:
    """``sft.precision`` settled for this machine: "auto" = bf16 on GPUs with bf16 units
    (compute capability 8.0+), else float32. An explicit bf16 on a GPU without them is an
    error: it would train in emulated bf16, many times slower, with no warning."""
    p = requested
    if p == "auto":
        p = "bf16" if cuda and native_bf16 else "float32"
    if p not in get_args(SFTPrecision):  # "auto" was settled above
        raise ValueError(f"sft.precision must be auto, bf16, fp16 or float32, not {p!r}")
    if p == "bf16" and cuda and not native_bf16:
        raise ValueError(f"sft.precision is bf16 but this GPU ({gpu or 'compute capability < 8.0'}) "
                         "has no bf16 support (needs compute capability 8.0+, e.g. A100/H100): "
                         "set sft.precision to fp16, float32 or auto")
    return p


def precision_flags(scfg) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    # including_emulation=False: torch's default also says True on pre-Ampere GPUs (V100, T4),
    # where bf16 only runs emulated
    native = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    gpu = torch.cuda.get_device_name() if cuda and not native else ""
    p = choose_precision(scfg.precision, cuda=cuda, native_bf16=native, gpu=gpu)
    return {"bf16": p == "bf16", "fp16": p == "fp16"}, p


def load_dtype(mode: str, dtype, trainer_args: dict):
    """The dtype the base model is loaded in for training with ``dtype`` (``precision``'s).

    Full fine-tuning keeps float32 master weights: the trainer's bf16/fp16 flags compute in half
    precision (autocast) while AdamW updates the float32 weights. Weights held in bf16 lose every
    update under about 1/256 of their size (most of them at SFT learning rates: 2e-5 moves a
    weight of 0.02 by 1/1000), and fp16 weights make the gradient scaler fail. FSDP 2
    (transformers' default) too: accelerate turns every trainable weight of the whole model to
    float32 on each process before sharding it (``fsdp2_prepare_model``), so a half-precision load
    saved no memory at the peak and only rounded the checkpoint (Llama-2's fp16 weights) to bf16
    before that. FSDP 1 shards first and makes float32 copies of the shards after, and DeepSpeed
    casts the model to half precision itself and keeps float32 copies from there: both load in
    half precision (each process holds a whole copy until it is sharded). LoRA trains float32
    adapters over a frozen base, which stays in half precision."""
    import torch

    if mode == "lora" or _deepspeed(trainer_args) or _fsdp_version(trainer_args) == 1:
        return dtype
    return torch.float32


def _fsdp_version(trainer_args: dict) -> int | None:
    """1 or 2 under FSDP (sft.trainer_args' ``fsdp_config.version``, transformers' default 2;
    an accelerate config's FSDP_VERSION, accelerate's default 1), else None."""
    if trainer_args.get("fsdp") or trainer_args.get("fsdp_config"):
        conf = trainer_args.get("fsdp_config") or {}
        return int(conf.get("version", 2)) if isinstance(conf, dict) else 2
    if _env_on("ACCELERATE_USE_FSDP"):
        return int(os.environ.get("FSDP_VERSION", "1") or 1)
    return None


def _deepspeed(trainer_args: dict) -> bool:
    return _env_on("ACCELERATE_USE_DEEPSPEED") or bool(trainer_args.get("deepspeed"))


def _env_on(name: str) -> bool:
    """An accelerate config's switch, passed on by ``accelerate launch --config_file``."""
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def sharded_training(trainer_args: dict) -> bool:
    """FSDP or DeepSpeed: from sft.trainer_args, or from an accelerate config the launcher
    passed on (``accelerate launch --config_file``: it sets ACCELERATE_USE_FSDP/DEEPSPEED)."""
    return _fsdp_version(trainer_args) is not None or _deepspeed(trainer_args)


def check_lora_merge(scfg) -> None:
    """Refuse, before any training, to merge a LoRA adapter under FSDP or DeepSpeed: the merge
    runs on one process over the unwrapped model, whose weights stay sharded there (the other
    processes never join the gathers it needs), so it would hang or write broken weights
    after the whole training run."""
    if scfg.mode == "lora" and scfg.merge_lora and sharded_training(scfg.trainer_args):
        raise ValueError("sft.merge_lora with FSDP/DeepSpeed (sft.trainer_args or the accelerate "
                         "config) is not supported: set sft.merge_lora: false (the adapter is saved; "
                         "merge it afterwards on one process) or train without sharding")


def keep_float32_names(model, precision: str) -> tuple[str, ...]:
    """The module names whose weights stay float32 in a half-precision checkpoint of ``model``,
    as transformers keeps them when it loads one: ``_keep_in_fp32_modules_strict`` in bf16 and
    fp16, ``_keep_in_fp32_modules`` in fp16 only (none for Llama)."""
    names = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if precision == "fp16":
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return tuple(sorted(names))


def save_in_training_precision(model_dir: Path, precision: str, keep_float32: tuple[str, ...] = ()) -> bool:
    """Rewrite the float32 weights of a saved model (``*.safetensors`` in ``model_dir``) in the
    half precision it was trained in (``precision`` bf16 or fp16; float32 stays as it is) and
    set config.json's dtype to match; True when something was rewritten.

    A full fine-tune keeps float32 master weights (``load_dtype``), so the trainer saves float32
    weights, twice the size of the half-precision model they compute as (Labrador-13B: 52 GB,
    not 26). This works on the files, after the trainer saved them, so one process's model and an
    FSDP state dict gathered onto the first process come out the same; weights saved in half
    precision already (DeepSpeed's 16-bit gather, a merged LoRA) are left as they are. One file's
    weights are held in memory at a time, in half precision (save_pretrained's files are up to
    50 GB: 25 GB for a 13B model's first). Tensors of other dtypes (integer buffers, float64) and
    those of ``keep_float32`` modules stay as they are."""
    import re

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None or not (model_dir / "config.json").exists():
        return False  # float32 training, or a PEFT adapter (its float32 weights are its own)
    keep = [re.compile(rf"(^|\.){re.escape(m)}($|\.)") for m in keep_float32]
    changed, sizes = False, {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out, cast = {}, False
        with safe_open(str(f), framework="pt") as r:
            meta = r.metadata()
            for name in r.keys():
                t = r.get_tensor(name)
                if t.dtype == torch.float32 and not any(k.search(name) for k in keep):
                    t, cast = t.to(dtype), True
                out[name] = t
        sizes[f.name] = sum(t.numel() * t.element_size() for t in out.values())
        if cast:
            part = f.with_name(f.name + ".part")
            save_file(out, str(part), metadata=meta)
            os.replace(part, f)
            changed = True
        del out
    if not changed:
        return False
    index = model_dir / "model.safetensors.index.json"
    if index.exists():  # its total_size is the weights' bytes
        doc = json.loads(index.read_text())
        doc.setdefault("metadata", {})["total_size"] = sum(sizes.values())
        index.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    conf_path = model_dir / "config.json"
    conf = json.loads(conf_path.read_text())
    name = str(dtype).removeprefix("torch.")
    conf["dtype"] = name  # transformers 5's key; older ones read torch_dtype
    if "torch_dtype" in conf:
        conf["torch_dtype"] = name
    conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return True
