"""`guidealign sft`: TRL SFTTrainer on the guided responses -> WORKDIR/sft/model.

``run_sft`` (from `guidealign run` on rank 0, `guidealign sft`, `launch sft`) trains in
``sft.num_processes`` processes: "auto" = one per visible GPU, started with torchrun and the
recipe's FSDP settings (sft/launcher.py); the pipeline's own rank/world size never leak into
training. Under a user's `torchrun`/`accelerate launch` it trains with that environment.
Gradient accumulation is derived so that the *global* batch stays `sft.global_batch_size`.

The chat template (``sft.chat_template``, or the base tokenizer's own) is set on the
tokenizer, missing special tokens are added (embeddings resized), a pad token is chosen, and
the tokenizer is saved with the model, so vLLM answers in the trained format. The
prompt/completion conversations are tokenized as respond and eval render prompts (sft/data.py
``tokenize_dataset``: control-token strings in a prompt or an answer stay text) and handed to
TRL tokenized; loss is on the assistant turn only (its ``completion_mask``). Rank 0 writes the
model into a temp dir, renames it to WORKDIR/sft/model, then writes WORKDIR/sft/_done.json last.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import get_args

from guidealign.config.sft import SFTMode
from guidealign.sft.layout import load_base_model, load_on_first_process_only, training_layout
from guidealign.sft.base_model import check_within_context, keep_eos_ids, name_adapter_base
from guidealign.sft.checkpoints import (checkpoint_dir, is_main_process, loss_log_callback, resume_point,
                                        whole_run_loss)
from guidealign.sft.fingerprint import sft_fingerprint
from guidealign.sft.precision import (check_lora_merge, keep_float32_names, load_dtype, precision_flags,
                                      save_in_training_precision)
from guidealign.shards.write import torch_threads

log = logging.getLogger(__name__)


def distributed_world_size() -> int:
    """Processes of this training job (the launcher's WORLD_SIZE; 1 outside a launcher)."""
    from guidealign.sft.launcher import launcher_world_size

    return launcher_world_size()


def accumulation_steps(scfg, world: int) -> int:
    per_step = scfg.micro_batch_size * world
    if scfg.global_batch_size < per_step or scfg.global_batch_size % per_step:
        raise ValueError(f"sft.global_batch_size ({scfg.global_batch_size}) must be a multiple of "
                         f"micro_batch_size ({scfg.micro_batch_size}) x processes ({world})")
    return scfg.global_batch_size // per_step


def hyperparameters(scfg, world: int, accum: int, precision: str) -> dict:
    hp = {k: getattr(scfg, k) for k in (
        "mode", "epochs", "max_steps", "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay",
        "global_batch_size", "micro_batch_size", "max_seq_length", "drop_overlong", "seed",
        "chat_template")}
    hp.update(processes=world, gradient_accumulation_steps=accum, precision=precision)
    if scfg.mode == "lora":
        hp.update(lora_r=scfg.lora_r, lora_alpha=scfg.lora_alpha, lora_dropout=scfg.lora_dropout,
                  lora_target_modules=scfg.lora_target_modules, merge_lora=scfg.merge_lora)
    return hp


def prepare_tokenizer(scfg, base_path: str):
    """The base tokenizer with the chat template set, missing special tokens added and a pad
    token; returns (tokenizer, tokens added)."""
    from transformers import AutoTokenizer

    from guidealign.gen.templates import apply_template, needed_tokens, turn_end_for

    tok = AutoTokenizer.from_pretrained(base_path)
    apply_template(tok, scfg.chat_template, model=scfg.base_model)
    vocab = tok.get_vocab()
    missing = [t for t in needed_tokens(scfg.chat_template) if t not in vocab]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    # The template ends an assistant turn with this token (chatml: <|im_end|>), so the model
    # learns to emit it and generation must stop there, whether it was just added or the
    # tokenizer already had it with another eos_token (Qwen-style: <|endoftext|>); a model's
    # own template (or a .jinja file) as it renders: a Qwen2.5 base model's ChatML too.
    end = turn_end_for(tok, scfg.chat_template)
    if end and tok.eos_token != end:
        tok.eos_token = end
    if not tok.model_max_length or tok.model_max_length > 1_000_000:
        tok.model_max_length = scfg.max_seq_length
    if tok.pad_token is None:  # labels are masked by the attention mask, so any token will do
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok, missing


def lora_config(scfg, model, new_token_ids: list[int]):
    """LoRA on ``sft.lora_target_modules``. The rows of tokens the chat template added (e.g.
    chatml's on Llama-2) start untrained, and LoRA does not touch embeddings: they are trained
    too (peft's trainable tokens), in the input embeddings and, where it is not tied to them,
    the output head, which must learn to emit the turn's end token."""
    from peft import LoraConfig

    tokens = None
    if new_token_ids:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        names = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
        tokens = {names[id(emb)]: list(new_token_ids)}
        if head is not None and head.weight is not emb.weight:
            tokens[names[id(head)]] = list(new_token_ids)
    targets = scfg.lora_target_modules
    return LoraConfig(
        r=scfg.lora_r, lora_alpha=scfg.lora_alpha, lora_dropout=scfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        trainable_token_indices=tokens, task_type="CAUSAL_LM")


def _head_bias_for_fused_loss(model) -> None:
    """TRL's fused LM head reads ``lm_head.weight`` and ``lm_head.bias``; peft's trainable-tokens
    wrapper around an untied head (LoRA with tokens the chat template added: chatml on Llama-2)
    passes on the weight, with the new rows, but not the bias, and the first step failed. A head
    without a bias (Llama's) gets ``bias = None`` on the wrapper; one with a bias is left as is."""
    head = model.get_output_embeddings()
    base = getattr(head, "original_module", None)
    if base is not None and getattr(base, "bias", None) is None and not hasattr(head, "bias"):
        head.bias = None


def build_trainer(cfg, workdir, dataset, *, world: int, progress: bool = True,
                  ckpt_dir: Path | None = None):
    """The TRL trainer run_sft trains with: (trainer, tokenizer, accumulation, precision);
    its checkpoints go to ``ckpt_dir`` (default WORKDIR/sft/checkpoints)."""
    import torch
    from transformers import set_seed
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from guidealign.core.gpu import torch_device
    from guidealign.core.models import resolve

    scfg = cfg.sft
    if scfg.mode not in get_args(SFTMode):
        raise ValueError(f"sft.mode must be 'full' or 'lora', not {scfg.mode!r}")
    accum = accumulation_steps(scfg, world)
    flags, precision = precision_flags(scfg)
    base_path = resolve(scfg.base_model)
    tok, added = prepare_tokenizer(scfg, base_path)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    extra = dict(scfg.trainer_args)
    if world == 1 and (extra.get("fsdp") or extra.get("fsdp_config")):
        log.warning("sft: one training process, so the FSDP settings in sft.trainer_args are "
                    "not used (FSDP shards over several processes)")
        extra.pop("fsdp", None)
        extra.pop("fsdp_config", None)
    ckpt_dir = Path(workdir) / "sft" / "checkpoints" if ckpt_dir is None else Path(ckpt_dir)
    args = dict(
        output_dir=str(ckpt_dir),
        num_train_epochs=scfg.epochs,
        max_steps=scfg.max_steps,
        learning_rate=scfg.learning_rate,
        lr_scheduler_type=scfg.lr_scheduler,
        warmup_steps=scfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=scfg.weight_decay,
        per_device_train_batch_size=scfg.micro_batch_size,
        gradient_accumulation_steps=accum,
        max_length=scfg.max_seq_length,
        completion_only_loss=True,
        gradient_checkpointing=scfg.gradient_checkpointing,
        logging_steps=scfg.logging_steps,
        save_strategy="steps" if scfg.save_steps > 0 else "no",
        save_steps=scfg.save_steps if scfg.save_steps > 0 else 500,
        # the last resume point is all a rerun needs (each ~12 B/param: float32 weights and Adam's
        # two moments; ~16 under FSDP, which writes its own copy of the weights beside them)
        save_total_limit=1,
        seed=scfg.seed,
        data_seed=scfg.seed,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        # On CPUs, transformers only sets up DDP (gloo) under torchrun/accelerate with use_cpu;
        # GPUs visible that torch cannot use stop here (GpuUnusable), not train on the CPU
        use_cpu=torch_device() == "cpu",
        # the other processes wait at a barrier while the first writes the model (tens of GB
        # for a 13B full fine-tune, then checksummed) or a checkpoint: NCCL's default 30 min can
        # end the job right after training
        ddp_timeout=4 * 3600,
        **flags,
    )
    args.update(extra)
    targs = TRLConfig(**args)
    # the training arguments come first: they start the process group and, under FSDP with
    # fsdp_config.cpu_ram_efficient_loading, let the model load its weights on each node's
    # first process only
    first_only = load_on_first_process_only(targs)
    model = load_base_model(base_path, load_dtype(scfg.mode, dtype, extra), first_only)
    if added:
        set_seed(scfg.seed)  # the new rows come from torch's global random state, not sft.seed
        model.resize_token_embeddings(len(tok))
        if scfg.mode == "lora" and not scfg.merge_lora:
            log.warning("sft: an unmerged LoRA adapter holds the rows of the tokens the template added "
                        "(%s) as deltas vLLM's LoRA may not load: set sft.merge_lora: true", ", ".join(added))
    keep_eos_ids(model, tok)  # the turn end first, and every eos id the base stopped at
    peft_config = None
    if scfg.mode == "lora":
        peft_config = lora_config(scfg, model, tok.convert_tokens_to_ids(added) if added else [])
    if world == 1:
        # one process (sft.num_processes 1) seeing several GPUs: TRL's SFTTrainer refuses the
        # DataParallel that Trainer would use there ("SFTTrainer does not support
        # nn.DataParallel"): train on the first GPU, as the accumulation was sized for
        from guidealign.core.distenv import one_device

        one_device(targs, "sft")
    from guidealign.sft.data import tokenize_dataset

    # tokenized as respond/eval render prompts; TRL takes input_ids + completion_mask as they are
    dataset = tokenize_dataset(tok, dataset)
    trainer = SFTTrainer(model=model, args=targs, train_dataset=dataset,
                         processing_class=tok, peft_config=peft_config)
    _head_bias_for_fused_loss(trainer.model)
    trainer.add_callback(loss_log_callback())  # the logs cover every step: a resumed run's loss
    if trainer.args.world_size != world:
        raise RuntimeError(f"{world} processes were launched but the trainer sees "
                           f"{trainer.args.world_size}: the distributed setup failed")
    return trainer, tok, accum, precision


def run_sft(cfg, workdir, *, rank: int = 0, world_size: int = 1, progress: bool = True,
            force: bool = False) -> dict:
    """Train, save the model dir and _done.json; returns the _done.json dict. A finished run with
    the same fingerprint (config + input shard checksums) is not redone unless ``force``.

    ``rank``/``world_size`` are the pipeline's (data workers): only rank 0 trains, and the
    training job's own process count is ``sft.num_processes`` (see sft/launcher.py)."""
    from guidealign.sft import launcher

    check_lora_merge(cfg.sft)
    if launcher.under_launcher():
        return _train(cfg, workdir, progress=progress, force=force)
    if rank != 0:
        return {"skipped": True, "reason": f"SFT trains on rank 0 (this is rank {rank})"}
    if world_size > 1:  # the other ranks may still be writing their response shards
        from guidealign.config import wait_timeout
        from guidealign.shards import wait_complete

        for name in cfg.sft.data:
            wait_complete(Path(workdir) / name, timeout=wait_timeout(cfg, world_size))
    done = _already_done(cfg, workdir, force)
    if done is not None:
        return done
    from guidealign.core.gpu import require_usable_gpus

    require_usable_gpus()  # before torchrun starts a training process per GPU torch cannot use
    _wait_for_the_node_gpus(world_size)
    n = launcher.resolve_num_processes(cfg.sft)
    if n == 1:
        with launcher.without_pipeline_dist_env():
            return _train(cfg, workdir, progress=progress, force=force)
    log.info("sft: starting %d training processes with torchrun", n)
    launcher.launch(cfg, Path(workdir), n, force=force, progress=progress)
    done_path = Path(workdir) / "sft" / "_done.json"
    if not done_path.exists():
        raise RuntimeError(f"torchrun finished but {done_path} was not written")
    return json.loads(done_path.read_text())


def _wait_for_the_node_gpus(world_size: int) -> None:
    """With other pipeline workers on this node, their engines may still be stopping when
    their last shard is committed: wait (at most 5 minutes) until the GPUs SFT trains on are
    free, so that it does not start beside an engine's gpu_memory_utilization."""
    import torch

    from guidealign.core.gpu import release_cached_gpu_memory, wait_gpus_free
    from guidealign.core.gpu import visible_gpus as gpu_ids
    from guidealign.sft import launcher

    if not torch.cuda.is_available():
        return
    release_cached_gpu_memory()  # this process's own cache (retrieve's embedder) counts as used
    if world_size <= 1:
        return
    gpus = launcher.node_gpus() or gpu_ids()
    busy = wait_gpus_free(gpus)
    if busy:
        log.warning("sft: GPU(s) %s still have most of their memory in use after 5 minutes "
                    "(another process?); training starts anyway", ",".join(busy))


def _already_done(cfg, workdir, force: bool) -> dict | None:
    from guidealign.sft.data import build_dataset

    out_dir = Path(workdir) / "sft"
    done_path = out_dir / "_done.json"
    if force or not done_path.exists() or not (out_dir / "model").exists():
        return None
    _, data_rep = build_dataset(cfg.sft, workdir)
    done = json.loads(done_path.read_text())
    if done.get("fingerprint") == sft_fingerprint(cfg, data_rep):
        log.info("sft already done with this fingerprint: %s", out_dir / "model")
        if "data_paths" not in done and is_main_process():
            # a model trained before SFT recorded where it read its data (Stop 49): the data
            # it was trained on is exactly what is there now, so record where, and `status` and
            # `push model` can tell from then on when it changes
            from guidealign.shards import write_json_atomic

            done = {**done, "data_paths": data_rep.paths}
            write_json_atomic(done_path, done)
        return {**done, "skipped": True}
    return None


def _train(cfg, workdir, *, progress: bool, force: bool) -> dict:
    from guidealign.sft.data import build_dataset
    from guidealign.shards import write_json_atomic

    scfg = cfg.sft
    workdir = Path(workdir)
    out_dir = workdir / "sft"
    model_dir = out_dir / "model"
    done_path = out_dir / "_done.json"
    t0 = time.perf_counter()
    dataset, data_rep = build_dataset(scfg, workdir)
    fp = sft_fingerprint(cfg, data_rep)
    if not force and done_path.exists() and model_dir.exists():
        done = json.loads(done_path.read_text())
        if done.get("fingerprint") == fp:
            log.info("sft already done with this fingerprint: %s", model_dir)
            if is_main_process():  # a run killed after its commit left its resume points
                shutil.rmtree(checkpoint_dir(workdir, fp).parent, ignore_errors=True)
            return {**done, "skipped": True}
    if is_main_process():  # a killed save's model (13B: ~26 GB) goes now, not after the training
        shutil.rmtree(out_dir / ".tmp-model", ignore_errors=True)
    import torch

    if not torch.cuda.is_available():  # 0: torch's default, also after a stage that set another
        from guidealign.core.threads import set_threads

        set_threads(scfg.num_threads)
    from guidealign.core.models import resolve
    from guidealign.sft.data import fit_max_seq_length, tokenize_dataset

    tok = prepare_tokenizer(scfg, resolve(scfg.base_model))[0]
    dataset = fit_max_seq_length(scfg, tokenize_dataset(tok, dataset), tok, data_rep)
    check_within_context(scfg, dataset, resolve(scfg.base_model))
    world = distributed_world_size()
    ckpt_dir = checkpoint_dir(workdir, fp)
    trainer, tok, accum, precision = build_trainer(cfg, workdir, dataset, world=world,
                                                   progress=progress, ckpt_dir=ckpt_dir)
    fsdp = bool(getattr(trainer, "is_fsdp_enabled", False))
    resume = resume_point(ckpt_dir, scfg, main=is_main_process(), fsdp=fsdp)
    # TRL drops the examples whose completion max_seq_length cuts off entirely (some of those
    # counted as cut above, with sft.drop_overlong false); packing cuts and drops nothing, and
    # its train_dataset holds packed sequences, not examples
    n_train = data_rep.kept if scfg.trainer_args.get("packing") else len(trainer.train_dataset)
    if n_train < data_rep.kept:
        gone = data_rep.kept - n_train
        data_rep.drop("no_response_tokens_within_max_seq_length", gone)
        data_rep.kept = n_train
        data_rep.cut_at_max_seq_length = max(0, data_rep.cut_at_max_seq_length - gone)
    if resume:
        log.info("resuming SFT from the last complete checkpoint: %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # a resumed run's training_loss covers only the steps after the checkpoint
    train_loss = whole_run_loss(trainer.state.log_history) if resume else None
    metrics = {"train_loss": result.training_loss if train_loss is None else train_loss,
               "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "losses": losses,
               "steps": trainer.state.global_step, "epochs": trainer.state.epoch}

    tmp = out_dir / ".tmp-model"
    is_main = trainer.is_world_process_zero()
    merged = scfg.mode == "lora" and scfg.merge_lora
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    if merged:
        if is_main:
            m = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            m.save_pretrained(tmp, safe_serialization=True)
    else:
        if fsdp:
            # the model is saved whole whatever the checkpoints were (fsdp_config.state_dict_type
            # SHARDED_STATE_DICT, faster to save): under a sharded type save_model wrote no
            # weights, after the whole run (accelerate's "train sharded, save full")
            plugin = trainer.accelerator.state.fsdp_plugin
            if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
                plugin.state_dict_config = plugin.optim_state_dict_config = None
                plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(tmp))  # all ranks: gathers sharded weights under FSDP/DeepSpeed
    seconds = time.perf_counter() - t0
    done = {"fingerprint": fp, "rows": data_rep.kept, "seconds": round(seconds, 2),
            "base_model": scfg.base_model, "chat_template": scfg.chat_template or "base tokenizer's",
            "processes": world, **training_layout(trainer, world), "data": data_rep.sources,
            "data_paths": data_rep.paths, "read": data_rep.rows,
            "dropped": data_rep.dropped, "cut_at_max_seq_length": data_rep.cut_at_max_seq_length,
            "kept_cut_at_max_tokens": data_rep.kept_cut_at_max_tokens,
            "threads": torch_threads(), **metrics}
    if is_main:
        from guidealign.hub.card import model_card

        if not any(any(tmp.glob(p)) for p in ("*.safetensors", "pytorch_model*.bin", "adapter_model.*")):
            raise RuntimeError(f"sft: the trainer saved no model weights in {tmp} (DeepSpeed ZeRO-3 "
                               "without 16-bit weights gathered?): "
                               "nothing is committed; save full weights and rerun (from the last checkpoint, if any)")
        # Trainer.save_model pickles the whole training arguments beside the weights: the
        # trainer_args (a hub_token among them) and this machine's paths; no model needs them,
        # and a push would upload them
        from guidealign.hub.targets import TRAINING_ARGS_NAME

        (tmp / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if scfg.mode == "lora" and not merged:
            name_adapter_base(tmp, scfg.base_model, resolve(scfg.base_model))
        if scfg.mode == "full" or merged:  # float32 master weights, saved in the training precision
            save_in_training_precision(tmp, precision, keep_float32_names(unwrapped, precision))
        tok.save_pretrained(tmp)  # tokenizer + chat template
        gen_cfg = getattr(unwrapped, "generation_config", None)
        if gen_cfg is not None and not (tmp / "generation_config.json").exists():
            gen_cfg.save_pretrained(tmp)
        data_info = {"datasets": list(data_rep.sources), "responses_read": data_rep.rows,
                     "examples": data_rep.kept, "dropped": data_rep.dropped,
                     "cut_at_max_seq_length": data_rep.cut_at_max_seq_length,
                     "kept_cut_at_max_tokens": data_rep.kept_cut_at_max_tokens,
                     "format": "prompt/completion conversations, no guidelines"}
        (tmp / "README.md").write_text(model_card(
            base_model=scfg.base_model, data=data_info,
            hyperparameters=hyperparameters(scfg, world, accum, precision),
            metrics={k: v for k, v in metrics.items() if k != "losses"},
            mode=scfg.mode, merged=merged or scfg.mode == "full"))
        # the earlier model's _done.json goes first: killed before the new one is written, a
        # rerun must not take the new files for the earlier config's finished model
        done_path.unlink(missing_ok=True)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
        from guidealign.shards.artifact_files import DONE, file_checksums
        from guidealign.sft.launcher import LAUNCH_CONFIG, TORCHRUN_LOGS

        # checksummed (minutes for a 13B model) and committed before the resume points go: a run
        # killed in between resumes from its last checkpoint instead of training from the start
        # (torchrun's log directory and the launch's config are not the model's: written, and
        # replaced by the next launch)
        done["files"] = file_checksums(out_dir, exclude=(DONE, ckpt_dir.parent.name, TORCHRUN_LOGS,
                                                         LAUNCH_CONFIG))
        write_json_atomic(done_path, done)
        shutil.rmtree(ckpt_dir.parent, ignore_errors=True)  # finished: resume points are not needed
    trainer.accelerator.wait_for_everyone()
    return done
