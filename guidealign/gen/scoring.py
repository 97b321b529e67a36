"""Engine helpers beyond plain generation: verdict scoring and structured outputs.

Scoring (``detect.mode: score``): the detect prompt is the same few-shot conversation,
with the assistant's turn begun by the verdict label ("Verdict:", rendered by the chat
template as assistant content, so it follows the same markup and separator as the exemplars'
answers: "ASSISTANT: Verdict:", see gen/detect.py), so the next token is the verdict. One
forward pass with ``max_tokens=1`` returns the log-probabilities of the "Yes" and "No" tokens;
``risk_score = P(Yes) / (P(Yes) + P(No))``, and a prompt is risky when its score reaches a
threshold calibrated on labelled prompts (bench/detect_modes.py).

Structured outputs (``detect.structured``, ``guidelines.structured``): vLLM's
``StructuredOutputsParams`` with a regular expression of the format the exemplars show
and the parsers read ("<analysis>\\nVerdict: Yes|No"; "1. Title: text" lines), so an
output that finishes always parses.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

from guidealign.core.ids import WHITESPACE
from guidealign.gen.outputs import dtype_name

log = logging.getLogger(__name__)

VERDICT_PREFIX = "Verdict:"
# Token spellings of each verdict after "Verdict:"; those that are one token are scored.
_YES = (" Yes", "Yes", " yes")
_NO = (" No", "No", " no")


def verdict_token_ids(tok) -> tuple[list[int], list[int]]:
    """Single-token spellings of Yes and No in this tokenizer."""
    def one(words):
        out = []
        for w in words:
            ids = tok.encode(w, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in out:
                out.append(ids[0])
        return out

    yes, no = one(_YES), one(_NO)
    if not yes or not no:
        raise ValueError("detect.mode=score: this tokenizer has no single-token Yes/No")
    return yes, no


def score_params(yes: list[int], no: list[int]):
    """Greedy, one token, with the log-probabilities of exactly the verdict tokens."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=list(yes) + list(no))


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def score_from_logprobs(step: dict, yes: list[int], no: list[int]) -> float | None:
    """P(Yes) / (P(Yes) + P(No)) from one position's {token_id: Logprob}; None when absent."""
    def lp(ids):
        vals = [getattr(step[i], "logprob", step[i]) for i in ids if i in step]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        return _logsumexp(vals) if vals else None

    y, n = lp(yes), lp(no)
    if y is None or n is None:
        return None
    d = n - y  # the logistic of y - n, without overflow when the two are far apart
    return 1.0 / (1.0 + math.exp(d)) if d <= 0 else math.exp(-d) / (1.0 + math.exp(-d))


def score_prompts(llm, token_ids: list[list[int] | None], yes: list[int], no: list[int]):
    """[(score | None, error | None)] for each prompt (None ids: skipped, (None, None)).
    A prompt vLLM rejects gets its error; the others are scored in one call."""
    from guidealign.gen.deadline import watched_generate
    from guidealign.gen.engine import is_request_error

    params = score_params(yes, no)
    todo = [i for i, t in enumerate(token_ids) if t is not None]
    out: list[tuple[float | None, str | None]] = [(None, None)] * len(token_ids)

    def run(idx: list[int]):
        if not idx:
            return
        try:
            res = watched_generate(llm, [{"prompt_token_ids": token_ids[i]} for i in idx], params)
        except Exception as e:  # noqa: BLE001 - isolate the request that fails
            if not is_request_error(e):
                raise
            if len(idx) == 1:
                out[idx[0]] = (None, f"{type(e).__name__}: {e}")
                return
            mid = len(idx) // 2
            run(idx[:mid])
            run(idx[mid:])
            return
        for i, r in zip(idx, res):
            lps = r.outputs[0].logprobs
            s = score_from_logprobs(lps[0], yes, no) if lps else None
            out[i] = (s, None if s is not None else "no verdict log-probabilities returned")

    run(todo)
    return out


# what each entry of a threshold file's "prompt" fingerprint is, for messages (gen/detect.py
# score_fingerprint writes them)
PROMPT_FIELDS = {"spec": "detect prompt file hash", "exemplars": "exemplars in the prompt",
                 "chat_template": "chat template hash", "score_prefix": "score prefix version",
                 "align": "shared prefix padded to a KV block of", "yes_ids": "Yes token ids",
                 "no_ids": "No token ids"}


def engine_dtype(llm) -> str | None:
    """The dtype the engine runs in, as vLLM resolved it ("auto" -> the checkpoint's dtype, or
    bfloat16 for a float32 checkpoint); None for an engine that does not say (a stand-in)."""
    try:
        return dtype_name(llm.llm_engine.model_config.dtype)
    except AttributeError:
        return None


def load_threshold(value: float, path: str | None, engine=None, *, prompt: dict | None = None,
                   dtype: str | None = None) -> float:
    """The decision threshold: ``path`` (JSON with a "threshold" key, as written by
    bench/detect_modes.py --write-threshold) when given, else ``value``.

    A threshold separates the scores of the prompt it was calibrated on only: with ``prompt``
    (this run's :func:`guidealign.gen.detect.score_fingerprint`), a file whose recorded
    "prompt" differs (another prompt file, number of exemplars, chat template, ...) is refused
    with a ValueError, and a file without one (written before files recorded it) is used
    with a warning that it cannot be checked. With ``engine`` (the EngineConfig detect runs),
    a file calibrated with another model or dtype is named in a warning: P(Yes) differs
    between them. ``dtype``: the dtype the engine reports (:func:`engine_dtype`), else
    engine.dtype counts, and "auto" (not known before the engine starts) is not compared."""
    if not path:
        return float(value)
    p = Path(path)
    if not p.exists():
        raise ValueError(f"detect.threshold_file {path} does not exist; write it with "
                         "bench/detect_modes.py --write-threshold")
    data = json.loads(p.read_text())
    t = data.get("threshold")
    if not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise ValueError(f"{path}: 'threshold' must be a number in [0, 1], not {t!r}")
    if prompt is not None:
        check_threshold_prompt(path, data, prompt)
    other = []
    if engine is not None and data.get("model") not in (None, engine.model):
        other.append(f"model {data['model']!r} (this run: {engine.model!r})")
    ours = dtype_name(dtype) or dtype_name(getattr(engine, "dtype", None))
    theirs = dtype_name(data.get("dtype"))
    if engine is not None and None not in (ours, theirs) and "auto" not in (ours, theirs) and ours != theirs:
        other.append(f"dtype {data['dtype']!r} (this run: {ours!r})")
    if other:
        log.warning("detect.threshold_file %s was calibrated with %s: calibrate it for this "
                    "model and dtype (bench/detect_modes.py --write-threshold)", path, ", ".join(other))
    return float(t)


def check_threshold_prompt(path: str, data: dict, prompt: dict) -> None:
    """Refuse a threshold file calibrated on another score prompt than ``prompt``; warn when
    the file records none (then nothing can be checked)."""
    recorded = data.get("prompt")
    if not isinstance(recorded, dict):
        log.warning("detect.threshold_file %s does not record the prompt it was calibrated on "
                    "(written by an older bench/detect_modes.py), so whether its threshold fits this "
                    "run's prompt (prompt file, exemplars, chat template) cannot be checked; rewrite "
                    "it with bench/detect_modes.py --write-threshold", path)
        return
    diff = [f"{PROMPT_FIELDS.get(k, k)} {recorded[k]!r} (this run: {prompt[k]!r})"
            for k in prompt if k in recorded and recorded[k] != prompt[k]]
    if diff:
        raise ValueError(
            f"detect.threshold_file {path} was calibrated on another score-mode prompt: "
            f"{'; '.join(diff)}. A threshold fits only the prompt it was calibrated on; calibrate "
            f"one for this run's settings with python bench/detect_modes.py --write-threshold {path} "
            "(the same --config, engine and detect settings), or delete the file's \"prompt\" entry "
            "to use it anyway, unchecked")


# --- structured outputs --------------------------------------------------------------------

def detect_regex(max_lines: int = 8) -> str:
    """An analysis of 1 to max_lines non-empty lines, then the verdict line. (Long counted
    repetitions such as ``[^\\n]{0,400}`` make xgrammar's regex compiler time out, so the
    length of a line is left to max_tokens.)"""
    return r"[^\n]+(\n[^\n]+){0,%d}\nVerdict: (Yes|No)" % (max_lines - 1)


# What the guideline parser (gen/parse.py) reads as a title: at most 80 characters before the
# colon and at most 12 whitespace-separated words; lines are what str.splitlines() splits on.
_TITLE_CHARS = 80
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _class_chars(chars: str) -> str:
    """``chars`` written for a regex character class (\\uXXXX outside printable ASCII)."""
    return "".join(f"\\u{ord(c):04x}" if not 0x20 <= ord(c) <= 0x7e else ("\\" + c if c in "\\]^-" else c)
                   for c in chars)


def guidelines_regex(min_items: int = 5, max_items: int = 7, max_title_words: int = 8) -> str:
    """min_items to max_items numbered "N. Title: text" lines that the parser reads with
    titles: a title is 1 to max_title_words words (no whitespace but single spaces between
    them) of at most 80 characters in all (the parser's limit; a longer one came back
    untitled), and no item holds a character that splits lines. The length bound is written
    per word count (n words of at most (80 - n + 1) // n characters each), as short counted
    repetitions: a long one such as ``{0,400}`` makes xgrammar's regex compiler time out."""
    word = "[^:%s]" % _class_chars(WHITESPACE)
    shapes = []
    for n in range(1, max_title_words + 1):
        most = (_TITLE_CHARS - (n - 1)) // n
        first = "[A-Z]%s{%d,%d}" % (word, 1 if n == 1 else 0, most - 1)
        shapes.append(first + (" (%s{1,%d} ){%d}%s{1,%d}" % (word, most, n - 2, word, most) if n > 2
                               else " %s{1,%d}" % (word, most) if n == 2 else ""))
    item = r"%d\. (" + "|".join(shapes).replace("%", "%%") + ")" \
        + ": [^%s]+" % _class_chars(_LINE_BREAKS).replace("%", "%%")
    parts = [item % k for k in range(1, max_items + 1)]
    head = r"\n".join(parts[:min_items])
    tail = "".join(r"(\n" + p for p in parts[min_items:]) + ")?" * (max_items - min_items)
    return head + tail


def with_structured(params, regex: str):
    """Copies of ``params`` (one SamplingParams or a list) constrained to ``regex``."""
    from vllm.sampling_params import StructuredOutputsParams

    def one(p):
        q = copy.deepcopy(p)
        q.structured_outputs = StructuredOutputsParams(regex=regex)
        return q

    return [one(p) for p in params] if isinstance(params, list) else one(params)
