"""Precision and sharding of the SFT job: the precision it trains in, the dtype the base model
is loaded in, whether FSDP or DeepSpeed shard it, and what cannot run sharded."""
from __future__ import annotations

import os
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
