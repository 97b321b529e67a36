"""What SFT checks and records about its base model: that the examples fit its context
(before the model loads), the eos ids the fine-tuned model stops at, and the Hub id an
unmerged LoRA adapter names as its base."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from guidealign.core.models import hub_ref, model_context

log = logging.getLogger(__name__)


def name_adapter_base(model_dir: Path, base_model: str, base_path: str) -> None:
    """Point an unmerged LoRA adapter's ``adapter_config.json`` at its base model's Hub id.
    peft writes there the path the base was loaded from: for a local or embedded base a
    directory of this machine (``~/.cache/guide-align/models/...``, a Hub cache snapshot), which
    a pushed adapter published and no other machine could load. A Hub cache snapshot also pins
    its commit (``revision``: peft's AutoPeftModel loads the base at it). A local directory with
    no Hub id keeps its path, with a warning."""
    path = model_dir / "adapter_config.json"
    if not path.exists():
        return
    conf = json.loads(path.read_text())
    repo_id, revision = hub_ref(base_model, base_path)
    if repo_id is None:
        log.warning("sft: the LoRA adapter's base model %s is a local directory with no known Hub id: "
                    "adapter_config.json's base_model_name_or_path names that path, which loads on this "
                    "machine only (and a push publishes it); set sft.base_model to the Hub id (or a Hub "
                    "cache snapshot folder of it), or edit base_model_name_or_path before sharing the "
                    "adapter", conf.get("base_model_name_or_path") or base_model)
        return
    conf["base_model_name_or_path"] = repo_id
    if revision and not conf.get("revision"):
        conf["revision"] = revision
    path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def _id_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def keep_eos_ids(model, tok) -> None:
    """Make the model stop where its answers are trained to end (``tok``'s eos: the chat
    template's turn end, prepare_tokenizer) and wherever the base model stopped: the eos ids
    its config and generation config list (Llama 3: <|end_of_text|> and <|eot_id|>; Qwen2.5:
    <|im_end|> and <|endoftext|>) stay, after the turn end. Only the turn end was kept, so
    vLLM and transformers, which stop at every id generation_config.json lists, ran on past
    the others. A one-id config.json stays one id (some architectures' configs take no list);
    a base with one eos, the turn end, keeps it as the one id it was."""
    if tok.eos_token_id is None:
        return
    gen = getattr(model, "generation_config", None)
    conf_ids = _id_list(model.config.eos_token_id)
    ids = list(dict.fromkeys([tok.eos_token_id, *conf_ids, *_id_list(getattr(gen, "eos_token_id", None))]))
    eos = ids[0] if len(ids) == 1 else ids
    model.config.eos_token_id = eos if isinstance(model.config.eos_token_id, list) else tok.eos_token_id
    if gen is not None:
        gen.eos_token_id = eos
        gen.pad_token_id = tok.pad_token_id


def base_context(base_path: str) -> int | None:
    """The longest sequence the base model takes (``core.models.model_context``: its position
    keys, RoPE scaling included), or None when its config says none."""
    conf = Path(base_path) / "config.json"
    try:
        raw = json.loads(conf.read_text()) if conf.is_file() else {}
    except (OSError, ValueError):
        raw = {}
    return model_context(Path(base_path), raw)


def check_within_context(scfg, dataset, base_path: str) -> None:
    """Refuse, before the model is loaded, to train examples longer than the base model's
    context (``sft.max_seq_length`` above it: 4096 on Llama-2, 1024 on GPT-2): a model with
    learned positions failed in the middle of training ("IndexError: index out of range in
    self"), a RoPE model trained them on positions it never saw, with no word."""
    context = base_context(base_path)
    if not context or scfg.max_seq_length <= context:
        return
    over = sum(min(len(ids), scfg.max_seq_length) > context for ids in dataset["input_ids"])
    if over:
        raise ValueError(f"sft.max_seq_length ({scfg.max_seq_length}) is longer than the base model's context "
                         f"({context} tokens), and {over} training example(s) are longer than that: set "
                         f"sft.max_seq_length to {context} at most (longer examples are then dropped, or cut "
                         "with sft.drop_overlong: false)")
