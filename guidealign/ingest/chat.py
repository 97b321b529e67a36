"""Prompts given as chat conversations: a list of turns, each an object with a role and its text.

Chat exports hold the prompt as a conversation instead of a text field: OpenAI-style
``messages`` (``{"role": "user", "content": ...}``), ShareGPT's ``conversations``
(``{"from": "human", "value": ...}``), or TRL's conversational prompt (``"prompt": [turns]``).
A conversation with exactly one user turn is one prompt: that turn's text (system and assistant
turns around it are context, not the question; the whole conversation stays in the row's
metadata). One with no user turn or several is quarantined, saying so: which turn is "the"
prompt is the user's choice, and a later turn alone may not read without the earlier ones.
"""
from __future__ import annotations

from guidealign.ingest.keys import norm_key

# fields that hold a row's conversation, tried (in this order) after the prompt field and its
# aliases, for a row that has none of them
CHAT_FIELDS = ("messages", "conversations", "conversation")
_ROLE_KEYS = ("role", "from")
_TEXT_KEYS = ("content", "value")
_USER_ROLES = {"user", "human"}


class ChatKey(str):
    """A prompt key found among ``CHAT_FIELDS`` (not the prompt field or an alias): its value is
    the prompt only when it is a conversation."""


# a chat field whose value is no conversation: the row has no prompt (``batch.check_value``)
NO_CHAT = object()


def chat_key(keys) -> ChatKey | None:
    """The first of ``CHAT_FIELDS`` among ``keys`` (any case/spacing), or None."""
    by_norm: dict[str, str] = {}
    for k in keys:
        by_norm.setdefault(norm_key(k), k)
    for want in CHAT_FIELDS:
        if want in by_norm:
            return ChatKey(by_norm[want])
    return None


def chat_turns(value) -> list[tuple[str, object]] | None:
    """(role, text) of each turn when ``value`` is a conversation (a non-empty list of objects,
    each with a string role under ``role``/``from`` and its text under ``content``/``value``),
    else None."""
    if not isinstance(value, list) or not value:
        return None
    turns = []
    for t in value:
        if not isinstance(t, dict):
            return None
        role = next((t[k] for k in _ROLE_KEYS if k in t), None)
        text_key = next((k for k in _TEXT_KEYS if k in t), None)
        if not isinstance(role, str) or text_key is None:
            return None
        turns.append((role, t[text_key]))
    return turns


def user_turns(turns: list[tuple[str, object]]) -> list[object]:
    return [text for role, text in turns if role.strip().casefold() in _USER_ROLES]


def chat_prompt(value):
    """The prompt of a conversation with one user turn (that turn's text); else ``value``."""
    turns = chat_turns(value)
    if turns is None:
        return value
    users = user_turns(turns)
    return users[0] if len(users) == 1 else value


def chat_reason(turns: list[tuple[str, object]]) -> str:
    """Why a conversation (not of one user turn) is no prompt."""
    n = len(user_turns(turns))
    roles = ", ".join(dict.fromkeys(role for role, _ in turns))
    return (f"chat conversation with {n} user turns (roles: {roles}): a conversation is taken as a "
            "prompt only when it has one user turn; put the prompt meant in a 'prompt' field")
