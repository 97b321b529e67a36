"""Chat templates: built-in names or Jinja files, set on tokenizers that lack (or must
replace) their own.

Every model role has a ``chat_template`` key (``engine.chat_template``,
``respond.engine.chat_template``, ``sft.chat_template``, the eval judge's): None keeps the
tokenizer's own template; a built-in name (:data:`BUILTIN`) or a path to a ``.jinja`` file
replaces it. Base models (Llama-2-13b-hf) and some chat models (Vicuna v1.5) ship no
template, so their config must name one; ``guidealign check`` says so before any GPU hour.

Built-ins live in ``gen/templates/<name>.jinja`` (our own Jinja for the public formats).
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

# name -> special tokens the template's markup needs (SFT adds the missing ones).
BUILTIN = {
    "vicuna_v1.1": [],
    "llama-2": [],
    "chatml": ["<|im_start|>", "<|im_end|>"],
}
# name -> the token that ends an assistant turn when it is not the tokenizer's eos_token:
# a model trained or prompted in this format stops there (Qwen-style tokenizers have
# <|im_end|> but eos_token <|endoftext|>). vicuna_v1.1 and llama-2 end turns with eos_token.
TURN_END = {"chatml": "<|im_end|>"}


class ChatTemplateError(ValueError):
    """A configured chat template cannot be found or used, or a tokenizer has none."""


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("guidealign.gen") / "templates" / f"{name}.jinja"))


def resolve_template(spec: str) -> str:
    """The Jinja text of a built-in name or a file path."""
    if spec in BUILTIN:
        return builtin_path(spec).read_text()
    p = Path(spec).expanduser()
    if p.is_file():
        return p.read_text()
    raise ChatTemplateError(f"chat_template {spec!r} is neither a built-in ({', '.join(BUILTIN)}) "
                            "nor a readable Jinja file")


def needed_tokens(spec: str | None) -> list[str]:
    """Special tokens the template's markup uses that a tokenizer may lack (built-ins only)."""
    return list(BUILTIN.get(spec or "", []))


def turn_end_token(spec: str | None) -> str | None:
    """The token a built-in template ends assistant turns with, when it is not eos_token."""
    return TURN_END.get(spec or "")


_PROBE = "guidealign-turn-end-probe"


def rendered_turn_end(tok) -> str | None:
    """The special token ``tok``'s chat template writes right after an assistant answer, when
    it is not the eos_token: a model's own template (or a .jinja file) in ChatML on a tokenizer
    whose eos is ``<|endoftext|>``, as Qwen2.5's base models ship, or Gemma's
    ``<end_of_turn>``. None when the turn ends with eos or plain text, or when the template
    does not render a one-turn chat."""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": _PROBE}], tokenize=False)
    except Exception:  # noqa: BLE001 - whatever the template raises: nothing to learn from it
        return None
    k = text.rfind(_PROBE) if isinstance(text, str) else -1
    if k < 0:
        return None
    rest = text[k + len(_PROBE):].lstrip(" ")
    special = set(getattr(tok, "all_special_tokens", None) or [])
    added = getattr(tok, "get_added_vocab", None)
    special |= set(added()) if callable(added) else set()
    for t in sorted((t for t in special if t), key=len, reverse=True):
        if rest.startswith(t):
            return None if t == getattr(tok, "eos_token", None) else t
    return None


def turn_end_for(tok, spec: str | None) -> str | None:
    """The token that ends an assistant turn when it is not ``tok``'s eos_token: a built-in
    template's by its name (:data:`TURN_END`), any other template's as it renders
    (:func:`rendered_turn_end`, on ``tok`` with that template set)."""
    if spec in BUILTIN:
        return turn_end_token(spec)
    return rendered_turn_end(tok)


def turn_end_stop(tok, spec: str | None) -> tuple[list[int], list[str]]:
    """(stop token ids, stop strings) that end generation at the end of an assistant turn
    whose end is not ``tok``'s eos_token (:func:`turn_end_for`: chatml on a Qwen-style
    tokenizer, whose eos is ``<|endoftext|>``): the engine stops at eos only, so the model
    would run on past its turn into made-up next turns until the length cap. A tokenizer
    without the token as one piece gets it as a stop string."""
    end = turn_end_for(tok, spec)
    if not end or end == getattr(tok, "eos_token", None):
        return [], []
    vocab = tok.get_vocab()
    if end in vocab:
        return [int(vocab[end])], []
    return [], [end]


def template_hash(spec: str | None) -> str | None:
    """A hash of the configured template's text (for fingerprints); None = the model's own."""
    if not spec:
        return None
    return hashlib.sha256(resolve_template(spec).encode()).hexdigest()[:16]


def has_template(tok) -> bool:
    t = getattr(tok, "chat_template", None)
    if t is None and hasattr(tok, "tokenizer"):  # vLLM wrappers
        t = getattr(tok.tokenizer, "chat_template", None)
    return bool(t)


def apply_template(tok, spec: str | None, *, model: str = "the model"):
    """Set the configured template on ``tok`` (in place; returns it). With ``spec`` None the
    tokenizer's own template is kept, and a tokenizer without one is an error naming the key."""
    if spec:
        text = resolve_template(spec)
        tok.chat_template = text
        inner = getattr(tok, "tokenizer", None)
        if inner is not None and hasattr(inner, "chat_template"):
            inner.chat_template = text
        return tok
    if not has_template(tok):
        raise ChatTemplateError(
            f"{model} has no chat template: set chat_template for it in the config "
            f"(a built-in: {', '.join(BUILTIN)}, or a .jinja file)")
    return tok


def local_template_state(model_dir: str | Path) -> bool | None:
    """Whether a local model dir's tokenizer ships a chat template (without loading it):
    True/False, or None when the dir holds no tokenizer files."""
    import json

    d = Path(model_dir)
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    cfg = d / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return bool(data.get("chat_template"))
