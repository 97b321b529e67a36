"""Prompt building: chat template, few-shot prefix, length checks, template safety.

The chat template is the tokenizer's own or a configured one (``chat_template``: a built-in
name or a .jinja file, see gen/templates.py); a tokenizer with neither is a clear error.

A prompt is a list of chat messages whose contents are lists of segments: fixed text
(our template wording, the exemplars) and :class:`Slot` values (the input under review,
a detection turn), which may be truncated. The model's own chat template renders the
conversation (``apply_chat_template``), but with a private sentinel in place of every
content, so no content ever passes through the template engine. The text between the
sentinels (the template's own markup) is tokenized with its control tokens; every content
segment is tokenized with ``split_special_tokens=True``, so ``<|im_end|>``, ``</s>`` and
the like inside a prompt are plain text and cannot end a turn or start a new one.

The pieces are tokenized apart, yet give the ids of the whole rendered text tokenized at
once (what the model saw in training): whitespace ending a piece moves to the start of the
next (a space belongs to the word after it, as "ĠHow" or "▁How"), and a piece that continues
the text before it (no control token in between) is tokenized after a one-character anchor
whose ids are then dropped, so no tokenizer adds its start-of-text space ("▁") to it. One
exception, where the model was trained otherwise: text right after a BOS token that the template
writes (Vicuna v1.1's "<s>A chat ...", Llama-2's "<s>[INST]") is tokenized as the start of a text,
as ``tokenizer(text)`` does when it adds the BOS itself (FastChat's training and serving, Meta's
reference code). A Llama-style SentencePiece tokenizer with ``legacy: false`` (``Metaspace``
with ``prepend_scheme="first"``) gives "<s>", "A" for the rendered text at once, but "<s>", "▁A"
that way; a system message there is a content piece, which starts a run anyway, so prompts with
and without one begin alike. BPE tokenizers (SmolLM2, Qwen, Llama 3) give the same ids either
way. Our own
templates put the input last in its message and have no closing delimiter, and ``{input}``
is substituted once, in our wording only, so nothing in an input is ever substituted.

vLLM receives token ids (``TokensPrompt``), so the length check is exact: a prompt that
does not fit ``max_model_len`` with its output budget is truncated (the end of each
truncatable slot is kept) or skipped, as ``engine.overlong`` says, with the reason.

All prompts of one kind start with the same system message and exemplars, so they share
a long token prefix that vLLM's prefix cache computes once. The cache keeps whole KV blocks
only: the part of the shared prefix past its last full block would be computed again for
every prompt (28 of detect's 2,268 shared tokens with SmolLM2 and 32-token blocks, more than
the input itself on short prompts). With ``align`` (the engine's block size) the builder
pads the end of the first message's content with newline tokens so that the fixed tokens
before the first variable slot fill whole blocks.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import get_args

import yaml

from guidealign.config.engine import Overlong

log = logging.getLogger(__name__)

# How pieces become ids; part of every generation stage's fingerprint (shards built the
# earlier way are redone, not mixed with these)
TOKENIZATION = "joint-v3"  # v3: text after a BOS starts afresh
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class TemplateError(ValueError):
    """The chat template or a prompt file cannot be used."""


@dataclass
class Slot:
    """Variable content (an input, a detection turn); ``truncatable`` slots may be cut, in
    ascending ``cut_order`` (ties: in prompt order), each down to ``min_keep_tokens``."""
    text: str
    truncatable: bool = True
    cut_order: int = 0


Segment = str | Slot


@dataclass
class Message:
    role: str
    content: list[Segment]


@dataclass
class Built:
    """One prompt ready for vLLM (``token_ids``), or a skip with its reason."""
    token_ids: list[int] | None
    n_tokens: int
    truncated: bool = False
    skip_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        return self.token_ids is None

    def vllm_prompt(self) -> dict:
        return {"prompt_token_ids": self.token_ids}


# --- prompt files ------------------------------------------------------------------------

def builtin_prompt_path(name: str) -> Path:
    return Path(str(resources.files("guidealign.gen") / "prompts" / name))


def load_prompt_file(path: str | Path | None, default: str, required: tuple[str, ...]) -> tuple[dict, str]:
    """Load a prompt YAML (the built-in ``default`` when ``path`` is None); returns the
    data and a hash of the file's bytes (for fingerprints)."""
    p = Path(path) if path else builtin_prompt_path(default)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise TemplateError(f"prompt file {p}: {e}") from e
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise TemplateError(f"prompt file {p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise TemplateError(f"prompt file {p}: the top level must be a mapping")
    missing = [k for k in required if k not in data]
    if missing:
        raise TemplateError(f"prompt file {p}: missing key(s) {missing}")
    return data, hashlib.sha256(raw).hexdigest()[:16]


def fill(template: str, **slots: Segment) -> list[Segment]:
    """Split our wording at ``{name}`` placeholders into segments; each value is inserted
    as given (never re-scanned, so an input containing ``{input}`` stays literal)."""
    names = "|".join(re.escape(k) for k in slots)
    out: list[Segment] = []
    pos = 0
    for m in re.finditer(r"\{(" + names + r")\}", template):
        if m.start() > pos:
            out.append(template[pos:m.start()])
        v = slots[m.group(1)]
        out.append(v if isinstance(v, Slot) else str(v))
        pos = m.end()
    if pos < len(template):
        out.append(template[pos:])
    return out


# --- the builder ---------------------------------------------------------------------------

class PromptBuilder:
    """Renders message lists with the tokenizer's chat template into token ids."""

    def __init__(self, tokenizer, max_model_len: int, overlong: str = "truncate",
                 min_keep_tokens: int = 16, chat_template: str | None = None, align: int = 0):
        """``chat_template``: a built-in name or .jinja path set on ``tokenizer`` (in place);
        None keeps the tokenizer's own, and a tokenizer without one is a TemplateError.
        ``align``: pad the shared prefix to a multiple of this many tokens (0: never)."""
        from guidealign.gen.templates import ChatTemplateError, apply_template

        if overlong not in get_args(Overlong):
            raise ValueError(f"engine.overlong must be 'truncate' or 'skip', not {overlong!r}")
        try:
            apply_template(tokenizer, chat_template,
                           model=getattr(tokenizer, "name_or_path", None) or "the model")
        except ChatTemplateError as e:
            raise TemplateError(str(e)) from e
        self.tok = tokenizer
        self.max_model_len = int(max_model_len)
        self.overlong = overlong
        self.min_keep_tokens = min_keep_tokens
        self.align = int(align or 0)
        self._render_cache: dict = {}

    # tokenization: contents never parse special tokens, template markup does
    def _ids(self, text: str, markup: bool, cont: bool) -> list[int]:
        """Ids of ``text``; ``cont``: as it continues the text before it (see the module doc)."""
        if not text:
            return []
        bos = self._bos
        if markup and bos and bos in text and text != bos:
            # the text after a BOS the template writes starts afresh (see the module doc)
            head, *rest = text.split(bos)
            ids = self._ids(head, True, cont)
            for part in rest:
                ids += self._fixed_ids(bos, True, False) + self._fixed_ids(part, True, False)
            return ids
        kw = {} if markup else {"split_special_tokens": True}
        if cont:
            # an anchor of another kind than the text's first character, so the two do not merge
            first = ("a", "\n") if text[0].isspace() else ("\n", "a")
            for anchor in first:
                a = self._anchor_ids(anchor)
                ids = self.tok(anchor + text, add_special_tokens=False, **kw)["input_ids"]
                if ids[:len(a)] == a:
                    return list(ids[len(a):])
        return list(self.tok(text, add_special_tokens=False, **kw)["input_ids"])

    @functools.lru_cache(maxsize=8)
    def _anchor_ids(self, anchor: str) -> list[int]:
        return list(self.tok(anchor, add_special_tokens=False)["input_ids"])

    @functools.lru_cache(maxsize=4096)
    def _fixed_ids(self, text: str, markup: bool, cont: bool) -> tuple[int, ...]:
        return tuple(self._ids(text, markup, cont))

    def _slot_ids(self, slot: tuple) -> list[int]:
        text, cont = slot[0].text, slot[1]
        return self._ids(text, False, cont)

    @functools.cached_property
    def _bos(self) -> str | None:
        """The tokenizer's BOS string when it is a control token (SentencePiece models: "<s>")."""
        bos = getattr(self.tok, "bos_token", None)
        return bos if isinstance(bos, str) and bos and bos in self._specials else None

    @functools.cached_property
    def _specials(self) -> tuple[str, ...]:
        """The tokenizer's control-token strings (added special tokens)."""
        added = getattr(self.tok, "added_tokens_decoder", {}) or {}
        out = {t.content for t in added.values() if getattr(t, "special", False)}
        out.update(getattr(self.tok, "all_special_tokens", []) or [])
        return tuple(sorted(out, key=len, reverse=True))

    def _markup(self, roles: tuple[str, ...], add_generation_prompt: bool = True) -> list[str]:
        """The template's markup around ``len(roles)`` contents (cached per role sequence)."""
        key = (roles, add_generation_prompt)
        hit = self._render_cache.get(key)
        if hit is not None:
            return hit
        msgs = [{"role": r, "content": _SENTINEL.format(i)} for i, r in enumerate(roles)]
        # The template is passed explicitly: vLLM's tokenizer renders with pooled copies that
        # do not see a template set on it after it was built (gen/templates.py).
        tpl = getattr(self.tok, "chat_template", None)
        kw = {"chat_template": tpl} if isinstance(tpl, str) and tpl else {}
        try:
            text = self.tok.apply_chat_template(msgs, tokenize=False,
                                                add_generation_prompt=add_generation_prompt, **kw)
        except Exception as e:  # noqa: BLE001
            raise TemplateError(f"the chat template cannot render roles {roles}: {e}") from e
        parts = _SENTINEL_RE.split(text)
        # parts = [markup0, "0", markup1, "1", ..., markupN]
        idx = [int(x) for x in parts[1::2]]
        if idx != list(range(len(roles))):
            raise TemplateError("the chat template changes or reorders message contents "
                                "(sentinels came back as %s); it is not supported" % idx)
        markup = parts[0::2]
        self._render_cache[key] = markup
        return markup

    def pieces(self, messages: list[Message], *,
               add_generation_prompt: bool = True) -> list[tuple[str, object]]:
        """(kind, value) pieces in order: ("ids", tuple) for fixed tokens, ("slot", (Slot,
        continues)) for a slot, tokenized by ``_slot_ids``. ``add_generation_prompt`` False:
        the conversation as it is, its last turn closed (SFT's prompt + answer), no new one opened."""
        markup = self._markup(tuple(m.role for m in messages), add_generation_prompt)
        raw: list[list] = [[markup[0], True, None]]  # [text, is markup, the Slot or None]
        for m, after in zip(messages, markup[1:]):
            for seg in m.content:
                raw.append([seg.text, False, seg] if isinstance(seg, Slot) else [seg, False, None])
            raw.append([after, True, None])
        # whitespace ending a piece goes to the next one, unless that starts with a control token
        for cur, nxt in zip(raw, raw[1:]):
            kept = cur[0].rstrip()
            if len(kept) < len(cur[0]) and not nxt[0].startswith(self._specials):
                cur[0], nxt[0] = kept, cur[0][len(kept):] + nxt[0]
        out: list[tuple[str, object]] = []
        prev, prev_markup = "", False  # the last non-empty piece before this one
        for text, is_markup, slot in raw:
            # a piece after markup ending in a control token starts a new run of text
            cont = bool(prev) and not (prev_markup and prev.endswith(self._specials))
            if slot is not None:
                out.append(("slot", (Slot(text, slot.truncatable, slot.cut_order), cont)))
            else:
                out.append(("ids", self._fixed_ids(text, is_markup, cont)))
            if text:
                prev, prev_markup = text, is_markup
        return self._aligned(out, len(messages[0].content) if messages else 0)

    def _aligned(self, pieces: list, first_len: int) -> list:
        """``pieces`` with newline tokens after the first message's content, enough to make the
        fixed tokens before the first slot a whole number of ``align`` blocks. Unchanged when
        aligning is off, when the first message has a slot (nothing is shared), when there is
        no slot, or when a newline is not one token on its own."""
        if self.align <= 1 or not first_len:
            return pieces
        kinds = [k for k, _ in pieces]
        if "slot" not in kinds or "slot" in kinds[:first_len + 1]:
            return pieces
        shared = sum(len(v) for k, v in pieces[:kinds.index("slot")])
        pad = (-shared) % self.align
        nl = self._fixed_ids("\n", False, False)
        if not pad or len(nl) != 1:
            return pieces
        return pieces[:first_len + 1] + [("ids", nl * pad)] + pieces[first_len + 1:]

    def count(self, messages: list[Message]) -> int:
        n = 0
        for kind, v in self.pieces(messages):
            n += len(v) if kind == "ids" else len(self._slot_ids(v))
        return n

    def build(self, messages: list[Message], max_tokens: int, *,
              add_generation_prompt: bool = True) -> Built:
        pieces = self.pieces(messages, add_generation_prompt=add_generation_prompt)
        slot_ids = {i: self._slot_ids(v) for i, (k, v) in enumerate(pieces) if k == "slot"}
        total = sum(len(v) for k, v in pieces if k == "ids") + sum(len(x) for x in slot_ids.values())
        budget = self.max_model_len - max_tokens
        truncated = False
        notes: list[str] = []
        if total > budget:
            why = (f"prompt is {total} tokens; with max_tokens {max_tokens} it exceeds "
                   f"max_model_len {self.max_model_len}")
            if self.overlong == "skip":
                return Built(None, total, skip_reason=f"overlong: {why}")
            excess = total - budget
            for i in sorted(slot_ids, key=lambda i: (pieces[i][1][0].cut_order, i)):
                ids = slot_ids[i]
                if excess <= 0:
                    break
                if not pieces[i][1][0].truncatable:
                    continue
                # a slot opening its message holds the whitespace the template puts after the
                # role header (pieces() moved it in: "\n" after ChatML's "<|im_start|>user", "\n\n"
                # after Llama 3's header): its leading whitespace-only tokens stay
                lead = self._leading_space(ids)
                cut = min(excess, max(0, len(ids) - lead - self.min_keep_tokens))
                if cut > 0:
                    slot_ids[i] = ids[:lead] + ids[lead + cut:]  # keep the end
                    excess -= cut
                    truncated = True
                    notes.append(f"slot cut from {len(ids)} to {len(ids) - cut} tokens")
            if excess > 0:
                return Built(None, total, skip_reason=f"overlong: {why}, even after truncation")
            total = budget
        ids: list[int] = []
        for i, (k, v) in enumerate(pieces):
            ids.extend(v if k == "ids" else slot_ids[i])
        return Built(ids, len(ids), truncated=truncated, notes=notes)

    def _leading_space(self, ids: list[int]) -> int:
        """How many of ``ids``' first tokens decode to whitespace only."""
        n = 0
        while n < len(ids) and n < 8 and not self.tok.decode(ids[n:n + 1]).strip():
            n += 1
        return n

    def fit_exemplars(self, make_messages, n_available: int, max_tokens: int, reserve: int,
                      limit: int | None, what: str) -> int:
        """How many exemplars to use: at most ``limit``, and few enough that the prompt with an
        empty input leaves ``reserve`` tokens plus the output budget free."""
        n = n_available if limit is None else max(0, min(limit, n_available))
        start = n
        while n > 0 and self.count(make_messages(n)) + reserve + max_tokens > self.max_model_len:
            n -= 1
        if n < start:
            log.warning("%s: using %d of %d exemplars so that the few-shot prefix leaves %d tokens "
                        "for the input and %d for the output within max_model_len %d",
                        what, n, start, reserve, max_tokens, self.max_model_len)
        if self.count(make_messages(n)) + max_tokens >= self.max_model_len:
            raise TemplateError(f"{what}: even without exemplars the prompt and max_tokens "
                                f"{max_tokens} do not fit max_model_len {self.max_model_len}")
        return n


def clean_text(x) -> str | None:
    """A usable prompt string, or None (null, not a string, or only whitespace)."""
    if not isinstance(x, str) or not x.strip():
        return None
    return x


# --- running built prompts -------------------------------------------------------------------

def engine_max_len(llm, configured: int) -> int:
    """The engine's real max_model_len (an injected engine may differ from the config)."""
    try:
        real = int(llm.llm_engine.model_config.max_model_len)
    except Exception:  # noqa: BLE001
        return configured
    if real != configured:
        log.warning("engine max_model_len is %d but the config says %d; using %d", real,
                    configured, min(real, configured))
    return min(real, configured)


def generate_built(llm, builts: list[Built], params) -> list:
    """Generate for every non-skipped prompt in one vLLM call; returns a list aligned with
    ``builts`` holding a ``Generation`` or None (skipped). ``params`` is one SamplingParams
    or a list aligned with ``builts``."""
    from guidealign.gen.engine import generate

    todo = [i for i, b in enumerate(builts) if not b.skipped]
    ps = [params[i] for i in todo] if isinstance(params, list) else params
    gens = generate(llm, [builts[i].vllm_prompt() for i in todo], ps)
    out: list = [None] * len(builts)
    for i, g in zip(todo, gens):
        out[i] = g
    return out


def chat_template_hash(tok) -> str:
    from guidealign.gen.outputs import chat_template_text

    return hashlib.sha256((TOKENIZATION + chat_template_text(tok)).encode()).hexdigest()[:16]
