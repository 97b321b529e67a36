"""Config sections of SFT and push (owned by the sft package).

Defaults of ``SFTConfig`` are the paper's Labrador recipe where the paper gives one
(1 epoch, learning rate 5e-6, total batch size 1600); the rest are common SFT defaults.
``configs/sft-labrador-13b.yaml`` and ``configs/sft-tiny-cpu.yaml`` set them explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Keys with a fixed set of values: the stage code takes its allowed values from these
# (typing.get_args), so the loader and the stage check one list.
SFTMode = Literal["full", "lora"]
# sft keys that change speed, memory or logging only (the global batch is fixed, accumulation
# follows the micro-batch): they count at their defaults in the SFT fingerprint
SFT_PERFORMANCE = ("micro_batch_size", "gradient_checkpointing", "logging_steps", "save_steps")
# sft.trainer_args keys (TRL/transformers SFTConfig) that change speed, memory, logging or where
# things are reported, not the weights: the SFT fingerprint leaves them out, so changing one
# (wandb logging, more dataloader workers, a longer timeout, FSDP activation checkpointing after
# running out of memory) keeps the checkpoints and a finished model. "fsdp_config.<key>" is a key
# of the fsdp_config dict (also spelled with transformers' "fsdp_" prefix). What decides the
# checkpoints (save_strategy, save_steps, save_total_limit, save_only_model, fsdp_config's
# state_dict_type) and all else counts.
TRAINER_ARGS_PERFORMANCE = (
    "report_to", "run_name", "project", "trackio_space_id", "disable_tqdm",
    "logging_dir", "logging_strategy", "logging_steps", "logging_first_step",
    "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node",
    "include_num_input_tokens_seen", "include_tokens_per_second", "skip_memory_metrics",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataset_num_proc",
    "ddp_timeout", "ddp_backend", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
    "ddp_broadcast_buffers",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
    "hub_always_push", "hub_revision",
    "save_safetensors", "save_on_each_node",
    "gradient_checkpointing_kwargs", "torch_empty_cache_steps", "activation_offloading",
    "fsdp_config.activation_checkpointing", "fsdp_config.cpu_ram_efficient_loading",
    "fsdp_config.cpu_offload", "fsdp_config.offload_params", "fsdp_config.limit_all_gathers",
    "fsdp_config.forward_prefetch", "fsdp_config.backward_prefetch",
    "fsdp_config.sync_module_states", "fsdp_config.reshard_after_forward",
)
# sft keys that only LoRA reads (mode "lora"): in a full fine-tune they count at their defaults
SFT_LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora")
def process_count(value) -> int | None:
    """``sft.num_processes`` as the launcher and the config check read it: None for "auto" (any
    case, spaces around), else the count it writes (an int, or digits); ValueError otherwise."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text == "auto":
        return None
    if isinstance(text, bool) or not (isinstance(text, int) or (isinstance(text, str) and text.isdigit())):
        raise ValueError(f"sft.num_processes must be 'auto' or a number, not {value!r}")
    return int(text)


SFTPrecision = Literal["auto", "bf16", "fp16", "float32"]


@dataclass
class SFTConfig:
    # Base model to fine-tune: local path, Hub id, or the embedded SmolLM2 (default; tests).
    base_model: str = "embedded:smollm2-135m-instruct"
    # Response datasets to train on: stage names under WORKDIR (or paths). Default: the guided
    # responses of `guidealign respond`.
    data: list[str] = field(default_factory=lambda: ["respond"])
    # Keep only responses with these finish reasons ("length" = truncated, "error" = failed);
    # the others are dropped and counted in the report and the model card. Answers to a prompt
    # respond truncated (its note says so) are always dropped and counted (input_truncated).
    keep_finish_reasons: list[str] = field(default_factory=lambda: ["stop"])
    # Responses shorter than this many characters (after strip) count as empty and are dropped.
    min_response_chars: int = 1
    # Use at most this many training examples (in shard order); 0 = all. Smoke tests only.
    max_examples: int = 0
    # System message put before the user prompt in training conversations; "" = none, so the chat
    # template's default applies (as it will at inference). Never the guidelines.
    system_prompt: str = ""
    # "full" fine-tuning or "lora" (peft adapters on `lora_target_modules`).
    mode: SFTMode = "full"
    # LoRA rank, alpha and dropout (mode: lora). Common defaults.
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # Modules that get adapters: "all-linear" or a list of module names (mode: lora).
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Merge the adapter into the base weights in the output model (mode: lora); otherwise the
    # output is the adapter plus tokenizer (vLLM then needs enable_lora and the base model); its
    # adapter_config.json names the base by its Hub id (that of an embedded name or of a Hub cache
    # snapshot folder; a warning says when a local base has none).
    merge_lora: bool = True
    # Epochs over the training set. Paper: 1.
    epochs: float = 1.0
    # Stop after this many optimizer steps; -1 = run the epochs.
    max_steps: int = -1
    # Peak learning rate. Paper: 5e-6.
    learning_rate: float = 5e-6
    # "cosine", "linear", "constant", ... (transformers' scheduler names).
    lr_scheduler: str = "cosine"
    # Fraction of steps spent warming up the learning rate.
    warmup_ratio: float = 0.03
    # AdamW weight decay.
    weight_decay: float = 0.0
    # Total examples per optimizer step over all processes. Paper: 1600. Gradient accumulation
    # is derived: global_batch_size / (micro_batch_size * world size), which must divide exactly.
    global_batch_size: int = 1600
    # Examples per device per forward pass.
    micro_batch_size: int = 4
    # Sequence length cap in tokens (prompt + response, as the chat template renders them); at
    # most the base model's context where an example is longer than that (refused before training).
    max_seq_length: int = 2048
    # Drop the examples longer than max_seq_length (counted as longer_than_max_seq_length in
    # _done.json and the model card). false: train them cut at the end, so the answer loses its
    # end-of-turn token and the model learns answers that do not stop (counted as
    # cut_at_max_seq_length).
    drop_overlong: bool = True
    # Training precision: "auto" (bf16 on GPUs that support it, else float32), "bf16", "fp16",
    # "float32". bf16/fp16 compute in half precision over float32 master weights (full
    # fine-tuning: 16 bytes a parameter with AdamW before activations, so a 13B model needs FSDP
    # over several GPUs). The base model is loaded in float32 for a full fine-tune on one
    # process and under FSDP 2 (transformers' default: accelerate makes the weights float32
    # before sharding anyway), in half precision under FSDP 1, DeepSpeed and LoRA (a frozen base).
    # The saved model (a full fine-tune, a merged LoRA) holds its weights in this half precision
    # (config.json's dtype says so), a float32 training's in float32 (sft/precision.py).
    precision: SFTPrecision = "auto"
    # Trade compute for memory on large models.
    gradient_checkpointing: bool = False
    # Log the training loss every this many optimizer steps.
    logging_steps: int = 1
    # Save a resumable checkpoint every this many steps under WORKDIR/sft/checkpoints/<fingerprint>
    # (a rerun with the same config and data resumes from the last one; checkpoints of another
    # config or data are deleted, never resumed); 0 = no intermediate checkpoints.
    save_steps: int = 0
    # Random seed for data order and initialization of adapters.
    seed: int = 0
    # CPU only: torch threads for training; 0 = torch's default. Set it when other heavy work
    # shares the cores.
    num_threads: int = 0
    # Chat template of the training conversations, saved with the model (vLLM answers with it):
    # None = the base tokenizer's own; a built-in ("vicuna_v1.1", "llama-2", "chatml") or a
    # .jinja path. A base model without one (Llama-2-13b-hf) needs it; the paper's Labrador
    # answers in the Vicuna v1.1 format.
    chat_template: str | None = None
    # Training processes: "auto" = one per visible GPU (1 on the CPU; on a node where
    # global_batch_size does not split evenly over all of them in micro-batches, as many as it
    # does: 5 of 6 or 7 GPUs for 1600 in 4s, with a warning), or a number (on the CPU,
    # N gloo processes). More than one: run_sft starts them with torchrun (one per GPU, with
    # trainer_args' FSDP settings) unless it already runs under torchrun/accelerate.
    num_processes: int | str = "auto"
    # Extra keyword arguments for TRL's SFTConfig (e.g. {"deepspeed": "ds.json",
    # "fsdp": "full_shard"}); they win over the keys above, except the ones in
    # TRAINER_ARGS_OWNED (below), which are refused: SFT's data and batch bookkeeping rest on them.
    trainer_args: dict = field(default_factory=dict)


# SFTConfig keys that SFT sets from its own settings and that trainer_args may not change: with
# them TRL would cut examples SFT counted as fitting (max_length, truncation_mode), train on the
# prompt too, make another global batch, or write checkpoints where no rerun resumes. Key -> what
# to set instead.
TRAINER_ARGS_OWNED = {
    "max_length": "sft.max_seq_length (overlong examples are dropped or counted before TRL sees them: sft.drop_overlong)",
    "truncation_mode": "sft.max_seq_length and sft.drop_overlong",
    "completion_only_loss": "nothing: the loss is on the assistant turn only (the README's method section)",
    "per_device_train_batch_size": "sft.micro_batch_size",
    "gradient_accumulation_steps": "sft.global_batch_size (the accumulation follows from it, the micro-batch and the process count)",
    "output_dir": "nothing: checkpoints go to WORKDIR/sft/checkpoints, where a rerun resumes",
    "auto_find_batch_size": "sft.micro_batch_size (it shrank the micro-batch after an out-of-memory "
                            "error and kept the accumulation: another global batch, in silence)",
    "bf16": "sft.precision",
    "fp16": "sft.precision",
}


def owned_trainer_args(trainer_args: dict) -> list[str]:
    """Why each key of ``trainer_args`` that SFT owns is refused."""
    return [f"sft.trainer_args.{k}: set by SFT, not here; use {TRAINER_ARGS_OWNED[k]}"
            for k in trainer_args if k in TRAINER_ARGS_OWNED]


# The formats `guidealign export --format` writes (export reads its settings from this section).
ExportFormat = Literal["jsonl"]


@dataclass
class PushConfig:
    # Hub repo id, e.g. "org/guide-align-responses"; empty disables push in `guidealign run`
    # (the `push` command can take it as an argument).
    repo_id: str = ""
    # What run_push (`guidealign run`; the `push` command's WHAT) pushes to repo_id: a stage
    # under WORKDIR (its Parquet shards), "model" for the SFT output, or a path.
    what: str = "respond"
    # Hub repo id for the trained model; when set, `guidealign run` also pushes WORKDIR/sft/model
    # there after the dataset (so does `push` with no WHAT). Empty: the model is not pushed by
    # `run` (nor by `push WHAT`, which pushes WHAT only).
    model_repo_id: str = ""
    # Create the repo private (True) or public; an existing repo keeps its visibility.
    private: bool = True
    # Branch to push to (it must exist).
    revision: str = "main"
    # Most files in one commit (the Hub recommends under 100). Files the Hub already has are
    # left out. A dataset's shards go to data_dir/<version>/ (a hash of the shards) in commits of
    # at most this many, each retried as a whole; a rerun finds the committed ones there and does
    # not send them again. Then one small commit writes the card, which switches load_dataset to
    # that folder, and deletes the other versions (readers see one whole version, never a mix).
    # A model push uploads in batches of this many, then makes one commit.
    files_per_commit: int = 20
    # huggingface_hub retries its own requests (preupload, LFS uploads, listings) with its
    # http_backoff. The steps it sends once, creating the repo, an upload batch, a commit and the
    # lookup of the head, are run again on the same failures (HTTP 408/429/5xx, dropped
    # connections) up to max_retries times, waiting backoff_s doubled per retry, at most
    # backoff_max_s (Retry-After wins).
    max_retries: int = 8
    backoff_s: float = 2.0
    backoff_max_s: float = 120.0
    # Directory of the Parquet shards inside a dataset repo (each version in a folder of its own;
    # a push deletes everything else under it).
    data_dir: str = "data"
    # Dataset card: a pretty name and license for the card's metadata ("" = left out).
    pretty_name: str = ""
    license: str = ""
