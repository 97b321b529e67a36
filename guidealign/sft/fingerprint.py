"""The SFT fingerprint: what decides whether a finished model (and its checkpoints) still
stands for the config and data, and what does not (speed, memory and reporting settings)."""
from __future__ import annotations


def sft_fingerprint(cfg, report) -> str:
    """Config (minus process-count and thread knobs) + input shard checksums by dataset name
    + the chat template's text: no absolute path, so a moved run directory redoes nothing."""
    from guidealign.config.sft import SFT_LORA_KEYS, SFT_PERFORMANCE
    from guidealign.gen.build import TOKENIZATION
    from guidealign.gen.outputs import own_template
    from guidealign.gen.templates import BUILTIN, template_hash
    from guidealign.shards import fingerprint
    from guidealign.shards.fingerprint import at_defaults

    # settings that change speed, memory or logging, not the model, count at their defaults:
    # changing one (gradient checkpointing or a smaller micro-batch after running out of
    # memory: the global batch stays, accumulation follows) keeps the checkpoints and a
    # finished model; runs with the defaults keep their fingerprint
    # The data and the template count by what they hold (the shards' checksums in
    # report.sources, the template's text), not by the paths written in sft.data or
    # sft.chat_template: a run directory moved elsewhere keeps its model; the datasets' order
    # (the examples' order) counts by their names in that order.
    # full fine-tuning reads no LoRA key: editing one (the recipe lists them) keeps the model
    unread = SFT_LORA_KEYS if cfg.sft.mode == "full" else ()
    keys = {k: v for k, v in at_defaults(cfg.sft, SFT_PERFORMANCE + unread).items()
            if k not in ("num_processes", "num_threads", "data", "chat_template")}
    # trainer_args count without their speed, memory and reporting keys (wandb, dataloader
    # workers, FSDP activation checkpointing...), as the sft keys above
    keys["trainer_args"] = trainer_args_for_fingerprint(cfg.sft.trainer_args)
    keys["data_order"] = list(report.sources)
    if cfg.sft.max_examples:  # since Stop 47 the cap is taken after the length filter (runs
        keys["max_examples_after"] = "length filter"  # without a cap keep their fingerprint)
    # a built-in template by its name as well: the name alone adds its special tokens and eos
    # (needed_tokens, turn_end_token), which a file with the same text does not
    keys["chat_template"] = cfg.sft.chat_template if cfg.sft.chat_template in BUILTIN else None
    # v3: chatml SFT makes <|im_end|> the eos token also when the tokenizer had it already;
    # v4: full fine-tuning in bf16/fp16 keeps float32 master weights (load_dtype)
    # v5: LoRA trains the embedding (and untied head) rows of tokens the template added
    # v6: answers to truncated prompts and (sft.drop_overlong) overlong examples are dropped
    # v7: examples are tokenized by gen/build.py's PromptBuilder, contents without parsing
    #     control-token strings (they were real turn markup in TRL's tokenization)
    # TOKENIZATION: how PromptBuilder turns an example into ids (a change there trains again)
    # the base model's own template (sft.chat_template null) counts by its text and turn end
    # too, as a configured one does: editing it trains again (runs with a template configured
    # keep their fingerprint)
    own = [] if cfg.sft.chat_template else [own_template(cfg.sft.base_model)]
    return fingerprint("sft/v7", TOKENIZATION, keys, report.sources, template_hash(cfg.sft.chat_template),
                       *own)



# `fsdp: true` (transformers' spelling since its string form was deprecated) counts as the
# string it replaced in the recipes, "full_shard auto_wrap": transformers 5.17-5.19 read both as
# FSDP 2 with full sharding and its transformer-layer wrap, and a run started with the string
# keeps its checkpoints and model after the recipe's switch
FSDP_TRUE_AS = "full_shard auto_wrap"


def trainer_args_for_fingerprint(trainer_args: dict) -> dict:
    """``sft.trainer_args`` as the SFT fingerprint counts them: without the keys that cannot
    change the weights (config.sft.TRAINER_ARGS_PERFORMANCE, fsdp_config's among them; an
    fsdp_config left empty by that goes too), and ``fsdp: true`` as FSDP_TRUE_AS. Trainer args
    with none of these keep the fingerprint they had."""
    from guidealign.config.sft import TRAINER_ARGS_PERFORMANCE

    top = {k for k in TRAINER_ARGS_PERFORMANCE if "." not in k}
    nested = {k.split(".", 1)[1] for k in TRAINER_ARGS_PERFORMANCE if k.startswith("fsdp_config.")}
    out = {k: v for k, v in trainer_args.items() if k not in top}
    conf = out.get("fsdp_config")
    if isinstance(conf, dict):
        kept = {k: v for k, v in conf.items() if k.removeprefix("fsdp_") not in nested}
        if kept or not conf:
            out["fsdp_config"] = kept
        else:
            del out["fsdp_config"]
    if out.get("fsdp") is True:
        out["fsdp"] = FSDP_TRUE_AS
    return out
