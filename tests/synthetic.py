"""Synthetic guideline data for tests and benchmarks: shards shaped like the ones the
guidelines stage writes, and realistic near-duplicates (word swaps, drops, case and
punctuation changes), as an LLM produces when it writes the same advice again."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa

from guidealign.shards import fingerprint, write_manifest, write_shard

GUIDELINE_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("risky", pa.bool_()),
    ("guidelines", pa.list_(pa.struct([("title", pa.string()), ("text", pa.string())]))),
    ("raw", pa.string()), ("parse_status", pa.string()), ("finish_reason", pa.string()),
])
PROMPT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()),
                           ("source", pa.string()), ("metadata", pa.string())])

_SUBJECTS = ["the assistant", "the response", "the answer", "a reply", "the model"]
_VERBS = ["should", "must", "ought to", "needs to"]
_ACTIONS = [
    "refuse to give instructions for", "explain the risks of", "point the user to experts on",
    "avoid speculating about", "give balanced views on", "cite reliable sources about",
    "stay neutral on", "decline to write content about", "add a safety warning to advice on",
    "ask clarifying questions about", "give step-by-step help with", "keep a respectful tone about",
    "avoid stereotypes in discussing", "protect personal data when discussing",
    "recommend professional help for", "correct misinformation about",
]
_TOPICS = [
    "weapons", "self-harm", "medical dosages", "tax fraud", "hacking accounts", "elections",
    "religion", "investment tips", "legal disputes", "dieting", "chemistry experiments",
    "home wiring", "immigration", "mental health", "privacy of minors", "drug use", "gambling",
    "conspiracy theories", "climate science", "vaccines", "firearms storage", "cyberbullying",
    "workplace harassment", "cryptocurrency scams", "car repair", "pet medication",
]
_TAILS = [
    "even when the user insists", "and explain why briefly", "while staying helpful",
    "in plain language", "without judging the user", "and mention local regulations",
    "using concrete examples", "and keep it short", "unless the context is clearly educational",
    "and suggest safer alternatives",
]
_SYNONYMS = {"should": "must", "must": "should", "explain": "describe", "risks": "dangers",
             "avoid": "refrain from", "give": "provide", "user": "person", "help": "assistance",
             "short": "brief", "clearly": "plainly", "respectful": "polite", "balanced": "fair"}


_CONS, _VOWS = "bcdfghklmnprstvz", "aeiou"


def _vocab(size: int = 4000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out = set()
    while len(out) < size:
        out.add("".join(rng.choice(_CONS) + rng.choice(_VOWS) for _ in range(rng.randint(2, 4))))
    return sorted(out)


_VOCAB = _vocab()


def base_guideline(rng: random.Random, specifics: int = 10) -> tuple[str, str]:
    """A (title, text) pair: a guideline-shaped sentence whose specifics (``specifics``
    words from a 4,000-word pseudo-vocabulary) make distinct guidelines far apart in ratio."""
    action, topic = rng.choice(_ACTIONS), rng.choice(_TOPICS)
    detail = " ".join(rng.choice(_VOCAB) for _ in range(specifics))
    text = (f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {action} {topic}: "
            f"{detail}, {rng.choice(_TAILS)}.")
    title = f"{action.split()[0].capitalize()} {topic}"
    return title, text


def near_duplicate(text: str, rng: random.Random, edits: int = 2) -> str:
    """A light rewrite of ``text``: word swaps, a dropped or added word, case/punctuation."""
    words = text.split()
    for _ in range(edits):
        op = rng.random()
        i = rng.randrange(len(words))
        w = words[i].strip(".,:").lower()
        if op < 0.3:
            words[i] = _SYNONYMS.get(w, rng.choice(_VOCAB))
        elif op < 0.5 and len(words) > 6:
            del words[i]
        elif op < 0.7:
            words.insert(i, rng.choice(["always", "really", "also", "please"]))
        elif op < 0.9:
            words[i] = words[i].upper() if rng.random() < 0.5 else words[i].capitalize()
        else:
            words[-1] = words[-1].rstrip(".") + rng.choice(["!", ".", " ."])
    return " ".join(words)


def synthetic_library(n: int, n_base: int, *, seed: int = 0, exact_share: float = 0.6,
                      edits: int = 2) -> tuple[list[str], list[int]]:
    """``n`` guideline texts around ``n_base`` distinct ones: ``exact_share`` of them verbatim
    repeats (LLMs repeat themselves a lot), the rest light rewrites. Returns (texts, base index)."""
    rng = random.Random(seed)
    bases = []
    seen = set()
    while len(bases) < n_base:
        _, t = base_guideline(rng)
        if t not in seen:
            seen.add(t)
            bases.append(t)
    texts, origin = [], []
    for i in range(n):
        b = i if i < n_base else rng.randrange(n_base)
        t = bases[b]
        if i >= n_base and rng.random() >= exact_share:
            t = near_duplicate(t, rng, edits)
        texts.append(t)
        origin.append(b)
    return texts, origin


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 2:
        return word
    i = rng.randrange(len(word))
    return word[:i] + rng.choice("abcdefghiklmnoprstuy") + word[i + 1:]


def rewrite(text: str, rng: random.Random, edits: int, kind: str = "words") -> str:
    """A heavier rewrite than :func:`near_duplicate`, for measuring the near-duplicate merge
    against exhaustive comparison. ``"words"``: ``edits`` word-level changes (a word replaced by
    another, dropped, added, two neighbours swapped, a typo); ``"typos"``: one changed letter
    in about ``edits`` of every 16 words, spread over the whole text (what stripped accents or
    a careless copy do, and what hurts a character n-gram search most)."""
    words = text.split()
    if kind == "typos":
        return " ".join(_typo(w, rng) if rng.random() < edits / 16 else w for w in words)
    for _ in range(edits):
        op, i = rng.random(), rng.randrange(len(words))
        if op < 0.3:
            words[i] = rng.choice(_VOCAB)
        elif op < 0.45 and len(words) > 4:
            del words[i]
        elif op < 0.6:
            words.insert(i, rng.choice(_VOCAB))
        elif op < 0.75 and i + 1 < len(words):
            words[i], words[i + 1] = words[i + 1], words[i]
        else:
            words[i] = _typo(words[i], rng)
    return " ".join(words)


def rewrite_families(n: int, n_base: int, *, seed: int = 0, kind: str = "words",
                     max_edits: int = 15) -> list[str]:
    """``n`` distinct texts: rewrites of ``n_base`` guideline sentences, each with 1 to
    ``max_edits`` edits (see :func:`rewrite`), so pairs spread across the 0.75 ratio line and a
    family is held together by chains of close members, as a large guideline set is."""
    rng = random.Random(seed)
    bases = [base_guideline(rng)[1].lower() for _ in range(n_base)]
    out: set[str] = set()
    while len(out) < n:
        out.add(rewrite(rng.choice(bases), rng, rng.randint(1, max_edits), kind))
    return sorted(out)


def write_guideline_shards(dst: str | Path, rows: list[dict], shard_rows: int = 100) -> None:
    """Rows: {id, prompt, risky, guidelines: [{title, text}]} -> committed shards + manifest."""
    dst = Path(dst)
    n = max(1, -(-len(rows) // shard_rows))
    fp = fingerprint("synthetic-guidelines", len(rows))
    write_manifest(dst, stage="guidelines", num_shards=n, fingerprint=fp)
    for i in range(n):
        part = rows[i * shard_rows:(i + 1) * shard_rows]
        table = pa.table({
            "id": [r["id"] for r in part], "prompt": [r["prompt"] for r in part],
            "risky": [r.get("risky") for r in part],
            "guidelines": [r.get("guidelines") for r in part],
            "raw": [json.dumps(r.get("guidelines")) for r in part],
            "parse_status": ["ok" if r.get("guidelines") else "empty" for r in part],
            "finish_reason": ["stop"] * len(part),
        }, schema=GUIDELINE_SCHEMA)
        if any("kind" in r for r in rows):  # the prompt set the guidelines were written with
            table = table.append_column("kind", pa.array([r.get("kind") for r in part], pa.string()))
        write_shard(dst, i, table, fingerprint(fp, i))


def write_prompt_shards(dst: str | Path, rows: list[dict], shard_rows: int = 100) -> None:
    """Rows: {id, prompt} -> committed prompt shards + manifest (the ingest schema)."""
    dst = Path(dst)
    n = max(1, -(-len(rows) // shard_rows))
    fp = fingerprint("synthetic-prompts", len(rows))
    write_manifest(dst, stage="prompts", num_shards=n, fingerprint=fp)
    for i in range(n):
        part = rows[i * shard_rows:(i + 1) * shard_rows]
        table = pa.table({"id": [r["id"] for r in part], "prompt": [r["prompt"] for r in part],
                          "source": ["synthetic"] * len(part), "metadata": ["{}"] * len(part)},
                         schema=PROMPT_SCHEMA)
        write_shard(dst, i, table, fingerprint(fp, i))


def write_respond_shards(run: str | Path, shards: int = 1, rows: int = 4) -> Path:
    """A committed respond dataset (what `run` leaves; no input recorded) of ``shards`` shards
    of ``rows`` (id, prompt, response) rows under ``run``; returns its directory."""
    dst = Path(run) / "respond"
    write_manifest(dst, stage="respond", num_shards=shards, fingerprint="f")
    for i in range(shards):
        write_shard(dst, i, pa.table({"id": [f"p{i}-{k}" for k in range(rows)],
                                      "prompt": [f"question {i}-{k}" for k in range(rows)],
                                      "response": [f"answer {i}-{k}" for k in range(rows)]}), f"f{i}")
    return dst


_FILLERS = [
    "I have a question and would like a clear answer.", "Could you help me out with this today?",
    "Please reply as soon as you can, thanks.", "My friend told me to ask you about it.",
    "What would you recommend in this situation?", "I am not sure where to start with this.",
    "Tell me what you think, be honest.", "This came up at work this week.",
    "Explain it to me like I am new to it.", "I need an answer for a school project.",
    "Give me the short version please.", "I keep wondering about this one.",
]


def coded_guideline_rows(n_topics: int = 24, prompts_per_topic: int = 10, *, seed: int = 0) -> list[dict]:
    """Guideline-stage rows where a prompt and its guideline are linked only by an arbitrary
    code word: the prompt says "case <code>" plus unrelated filler, the guideline talks about
    its topic. A general-purpose encoder cannot know the link; a fine-tuned one learns it."""
    rng = random.Random(seed)
    codes = rng.sample(_VOCAB, n_topics)
    topics = []
    seen = set()
    while len(topics) < n_topics:
        title, text = base_guideline(rng, specifics=6)
        if text not in seen:
            seen.add(text)
            topics.append((title, text))
    rows = []
    for t in range(n_topics):
        for j in range(prompts_per_topic):
            rows.append({
                "id": f"t{t:03d}p{j:03d}",
                "prompt": f"{rng.choice(_FILLERS)} This is about case {codes[t]}.",
                "risky": t % 2 == 0,
                "guidelines": [{"title": topics[t][0], "text": topics[t][1]}],
            })
    rng.shuffle(rows)
    return rows
