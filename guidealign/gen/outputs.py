"""What a stage's fingerprint counts of its engine: the settings that change generated text
(model, dtype, context, overlong rule, the seed where outputs are sampled, where a turn ends)
and the tokenizer with its chat template, read without starting an engine."""
from __future__ import annotations

from guidealign.config.engine import EngineConfig


# vLLM's other names for a dtype -> one name each
_DTYPE_NAMES = {"float": "float32", "half": "float16"}


def dtype_name(dtype) -> str | None:
    """One name per dtype ("half", "float16" and torch.float16 -> "float16"); None for None."""
    if dtype is None:
        return None
    s = str(dtype).removeprefix("torch.")
    return _DTYPE_NAMES.get(s, s)


def output_fields(cfg: EngineConfig, sampled: bool = True, tok=None) -> dict:
    """The engine settings that change generated text (for stage fingerprints); pure
    performance knobs (parallelism, memory, batch size, caching, threads) are left out, and
    so is the seed where nothing is sampled (``sampled`` false, see :func:`counted_seed`).
    ``tok``: the engine's tokenizer, whose template's turn end counts when it is not eos."""
    # (dtype: vLLM's other names for one dtype count as one)
    out = {"model": cfg.model, "dtype": dtype_name(cfg.dtype), "max_model_len": cfg.max_model_len,
           "seed": counted_seed(cfg.seed, sampled), "overlong": cfg.overlong}
    return out | turn_end(cfg.chat_template, tok)


def counted_seed(seed: int, sampled: bool) -> int:
    """A seed as a fingerprint counts it: itself when outputs are sampled; at temperature 0
    (or a scoring pass) no seed changes an output, so it counts at ``engine.seed``'s default,
    and a greedy run keeps the fingerprint it had when every seed counted (at the default)."""
    return seed if sampled else EngineConfig.__dataclass_fields__["seed"].default


def turn_end(spec: str | None, tok=None) -> dict:
    """For fingerprints: where an assistant turn ends when generation stops there and not at
    eos (:func:`use_template`): a built-in template's by its name, another's as it renders on
    ``tok`` (given); {} otherwise, so every other fingerprint stays as it was."""
    from guidealign.gen.templates import BUILTIN, turn_end_for, turn_end_token

    end = turn_end_token(spec) if spec in BUILTIN or tok is None else turn_end_for(tok, spec)
    return {"turn_end": end} if end else {}


def load_tokenizer(cfg: EngineConfig, llm=None):
    """The engine's tokenizer (from ``llm`` when given, else loaded from the model dir)."""
    if llm is not None:
        return llm.get_tokenizer()
    from transformers import AutoTokenizer

    from guidealign.core.models import not_loadable, resolve

    from guidealign.gen.templates import apply_template

    try:
        tok = AutoTokenizer.from_pretrained(resolve(cfg.model))
    except OSError as e:  # not a local directory, not in the Hub cache (an offline node)
        raise not_loadable(cfg.model, e) from e
    return apply_template(tok, cfg.chat_template, model=cfg.model)


def chat_template_text(tok) -> str:
    """The chat template the tokenizer renders with (for fingerprints)."""
    t = getattr(tok, "chat_template", None)
    if t is None and hasattr(tok, "tokenizer"):
        t = getattr(tok.tokenizer, "chat_template", None)
    return t if isinstance(t, str) else str(t)


def own_template(model: str) -> dict:
    """A model's own chat template, for a fingerprint: its hash and where it ends an assistant
    turn when that is not eos (the tokenizer files only, no weights)."""
    from transformers import AutoTokenizer

    from guidealign.core.models import resolve
    from guidealign.gen.build import chat_template_hash
    from guidealign.gen.templates import has_template, rendered_turn_end

    tok = AutoTokenizer.from_pretrained(resolve(model))
    if not has_template(tok):  # a stage refuses it, naming its chat_template key
        return {"own_template": None}
    return {"own_template": chat_template_hash(tok), "turn_end": rendered_turn_end(tok)}
