"""Engine and decoding settings (the `engine` section, and every stage's `sampling`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Keys with a fixed set of values: the stage code takes its allowed values from these
# (typing.get_args), so the loader and the stage check one list.
Overlong = Literal["truncate", "skip"]
# vLLM's ModelDType (vllm/config/model.py): the engine refuses any other spelling ("bf16") only
# when it starts, after the earlier stages ran; here the config refuses it when it loads.
EngineDType = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 400
    # Stop strings, in addition to the model's end-of-turn token.
    stop: list[str] = field(default_factory=list)
    # vLLM's repetition penalty (1.0 = off); > 1 discourages the loops that keep a small
    # model writing until max_tokens.
    repetition_penalty: float = 1.0
    # vLLM's frequency penalty (0 = off): subtracts this times a token's count so far from its
    # logit, so a loop grows costlier each time round while the end-of-turn token is untouched.
    frequency_penalty: float = 0.0


@dataclass
class EngineConfig:
    # Local path, Hub id, or "embedded:smollm2-135m-instruct" (the default generator).
    model: str = "embedded:smollm2-135m-instruct"
    # "auto" (the checkpoint's dtype; bf16 for the embedded model), "float32", "bfloat16", "float16"
    # ("float" and "half" are vLLM's other names for float32 and float16).
    dtype: EngineDType = "auto"
    # Context length the engine reserves per sequence: prompt + template + output must fit.
    # 8192 = SmolLM2's context; the paper's full few-shot prompts (13 safety exemplars shown
    # as conversations) need ~4k tokens. Smaller values drop exemplars (with a warning).
    max_model_len: int = 8192
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.90
    # Sequences the scheduler runs at once.
    max_num_seqs: int = 128
    # Tokens one engine step may compute (prompt chunks and decoded tokens together); None =
    # vLLM's default (4096 on the CPU, more on GPUs). On this repo's 2-core CPU, detect's score
    # mode was no faster with 1024 or 8192 (README figures).
    max_num_batched_tokens: int | None = None
    # None: eager on the CPU (engine up in ~3 s instead of ~50 s), graphs on GPUs.
    enforce_eager: bool | None = None
    seed: int = 0
    enable_prefix_caching: bool = True
    # KV-cache block size in tokens; None = 32 on the CPU (the smallest vLLM's CPU attention
    # takes; its own default is 128), 16 on GPUs (vLLM's CUDA default, asked for by name: detect
    # and guidelines pad their shared prefix to it, so it is part of their fingerprints; an
    # engine that starts with another block stops them with the value to set; MLA models such
    # as DeepSeek's: set 64, which their fast attention backends need). Prefix caching reuses whole
    # blocks only, so the part of a shared few-shot prefix past its last full block is computed
    # again for every prompt. On the CPU, detect's score mode ran ~3x faster with 32 than with
    # 128 (bench/detect_modes.py --short, with and without --block-size 128; README figures).
    block_size: int | None = None
    # CPU only: KV-cache size in GiB (vLLM otherwise asks for most of the RAM).
    cpu_kvcache_gib: int = 1
    # CPU only: cores the OpenMP threads are bound to, "auto" = all cores this process may use.
    cpu_threads_bind: str = "auto"
    # What to do with a prompt that does not fit max_model_len with its output budget:
    # "truncate" (keep the end of the user text) or "skip" (record it, generate nothing).
    overlong: Overlong = "truncate"
    # Chat template: None = the tokenizer's own; a built-in name ("vicuna_v1.1", "llama-2",
    # "chatml") or a .jinja path replaces it (needed for models that ship none; gen/templates.py).
    chat_template: str | None = None
    # Seconds the engine may take to start (load the model, profile memory, capture graphs)
    # before its processes are killed and the stage fails; 0 = no limit. vLLM itself waits
    # for ever for an engine that neither starts nor dies (a tensor-parallel worker stuck in
    # NCCL's setup), and the rank's heartbeat beats meanwhile, so executor.stall_timeout_s
    # never ends it. A 13B model from a slow shared file system can take 10-20 minutes.
    start_timeout_s: float = 3600
    # Seconds a generation call may go without any request finishing before the engine's
    # processes are killed and the stage fails (its shard uncommitted: a rerun resumes it);
    # 0 = no limit. vLLM waits for ever on an engine that stops mid-run (a tensor-parallel
    # worker stuck in an NCCL collective), and the rank's heartbeat beats meanwhile. Raise it
    # only if one batch's first request can take longer (very long outputs, a slow engine).
    progress_timeout_s: float = 1800
