"""How SFT's training processes share the model: under FSDP, which process reads the base
model's weights (``load_on_first_process_only``, ``load_base_model``), and what _done.json
records of the layout (``training_layout``)."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def load_on_first_process_only(targs) -> bool:
    """Under FSDP with ``fsdp_config.cpu_ram_efficient_loading`` (the GPU recipes set it): have
    ``from_pretrained`` read the base model's weights on each node's first training process only;
    the others hold placeholders until accelerate shards the model and sends them the first
    process's weights. Without it every process holds the whole model on the host before
    sharding (8 x 52 GB for the 13B recipe's float32 copy). transformers does this only when the
    process group is up and ACCELERATE_USE_FSDP is set (``accelerate launch`` sets it; torchrun,
    which run_sft uses, does not): both are done here. True when it applies."""
    plugin = getattr(targs, "fsdp_plugin_args", None) or {}
    if not plugin.get("cpu_ram_efficient_loading"):
        return False
    _ = targs.device  # sets up the process group (transformers checks it is initialized)
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
    from transformers.integrations import is_fsdp_enabled  # what from_pretrained asks

    if not is_fsdp_enabled():
        log.warning("sft: fsdp_config.cpu_ram_efficient_loading is set but transformers will load "
                    "the whole base model in every training process")
        return False
    log.info("sft: FSDP cpu_ram_efficient_loading: the base model's weights are read by each "
             "node's first training process only (local rank %s %s)", _local_rank(),
             "reads them" if _local_rank() == 0 else "waits for them")
    return True


def load_base_model(base_path, dtype, first_process_only: bool):
    """The base model to train. With ``first_process_only`` (:func:`load_on_first_process_only`)
    a node's other training processes build it without reading the checkpoint: its parameters
    are uninitialized host memory (pages never written cost no RAM) that FSDP fills with the
    first process's weights when it shards the model (FSDP 2 broadcasts them, FSDP 1 syncs the
    module states); buffers computed at construction (rotary frequencies) are real.
    transformers 5 itself reads the whole checkpoint in every process under
    ``cpu_ram_efficient_loading`` and then overwrites the other processes' copies with zeros,
    so each held a whole float32 model on the host anyway (8 x 52 GB for the 13B recipe)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not first_process_only or _local_rank() == 0:
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    config = AutoConfig.from_pretrained(base_path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # every name, tied ones too (whichever of a tied pair comes first), then tied again
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if param.device.type == "meta":
            set_module_tensor_to_device(model, name, "cpu", value=torch.empty(param.shape, dtype=param.dtype))
    model.tie_weights()  # a tied head shares the embedding's new tensor again
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"sft: the base model built without its weights kept tensors without storage "
                           f"({', '.join(left[:5])}); set fsdp_config.cpu_ram_efficient_loading: false")
    log.info("sft: local rank %s built the base model without reading its weights (FSDP sends "
             "the first process's)", _local_rank())
    return model


def _local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def training_layout(trainer, world: int) -> dict:
    """How the training processes split the model, for _done.json: ``sharding`` (fsdp1, fsdp2,
    deepspeed, ddp or none) and who read the base model's weights from disk (``base_weights_read_by``)."""
    from transformers.integrations import is_fsdp_enabled

    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = trainer.accelerator.state.fsdp_plugin
        sharding = f"fsdp{getattr(plugin, 'fsdp_version', 1)}"
    elif getattr(trainer, "is_deepspeed_enabled", False):
        sharding = "deepspeed"
    else:
        sharding = "ddp" if world > 1 else "none"
    return {"sharding": sharding, "base_weights_read_by":
            "the first process of each node" if is_fsdp_enabled() else "every process"}
