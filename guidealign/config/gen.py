"""Config sections of the gen stages (owned by the gen package).

Prompt files default to the ones shipped in ``gen/prompts/`` (our own wording and
exemplars); every ``*_file`` key may point at a user file with the same keys instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from guidealign.config.engine import Sampling

# Keys with a fixed set of values: the stage code takes its allowed values from these
# (typing.get_args), so the loader and the stage check one list.
DetectMode = Literal["rationale", "score"]
UnknownVerdict = Literal["safety", "quality", "skip"]


@dataclass
class DetectConfig:
    # Dataset under WORKDIR that detect reads ("prompts" from ingest; "augment" to label
    # the augmented safety questions). It needs the columns id and prompt.
    input: str = "prompts"
    # Paper: temperature 0.7, up to 400 new tokens.
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, max_tokens=400))
    # YAML with system/user/exemplars; None = gen/prompts/detect.yaml (13 exemplars, as the paper).
    prompt_file: str | None = None
    # Use at most this many exemplars (None = all). Exemplars are also dropped from the end
    # when the few-shot prefix would not leave reserve_input_tokens free (a warning says so).
    max_exemplars: int | None = None
    # Tokens of max_model_len kept free for the input when fitting exemplars (our default).
    reserve_input_tokens: int = 512
    # Give each prompt its own sampling seed (engine.seed + prompt id), so sampled outputs do
    # not depend on batching or resume; ignored at temperature 0, and on the CPU (vLLM CPU
    # crashes on seeded requests with chunked prefill; there they share the engine seed).
    seed_per_prompt: bool = True
    # "rationale" (the paper: the model writes its analysis, then "Verdict: Yes|No") or
    # "score" (the same few-shot prompt with the answer begun by "Verdict:"; one forward
    # pass reads P(Yes) vs P(No), no text is generated; rows get risk_score, no rationale).
    mode: DetectMode = "rationale"
    # score mode: risky when risk_score >= this (0.5 = the likelier verdict wins).
    score_threshold: float = 0.5
    # score mode: JSON file with a calibrated {"threshold": ...} that replaces score_threshold
    # (bench/detect_modes.py --write-threshold writes it, with the score prompt it was calibrated
    # on: a run whose prompt differs (prompt file, exemplars that fit, chat template, padding,
    # Yes/No tokens) is refused; another model or dtype is warned about); None = use score_threshold.
    threshold_file: str | None = None
    # rationale mode: constrain the output with vLLM structured outputs to
    # "<analysis>\nVerdict: Yes|No", so every finished output parses (off = the paper's free text).
    structured: bool = False
    # End the system message with newlines (up to one KV block less one) so the shared few-shot
    # prefix fills whole KV blocks: vLLM's prefix cache keeps whole blocks only, and without
    # the padding the prefix's last partial block is computed again for every prompt (off =
    # the prompt exactly as written; gen/build.py).
    align_prefix: bool = True


@dataclass
class GuidelinesConfig:
    # Paper: temperature 0.7, up to 400 new tokens.
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, max_tokens=400))
    # Safety-guideline prompt for risky inputs; None = gen/prompts/safety_guidelines.yaml
    # (13 exemplars shown as detection conversations; the authors' file has 12).
    safety_prompt_file: str | None = None
    # Quality-guideline prompt for the other inputs; None = gen/prompts/quality_guidelines.yaml
    # (7 exemplars, as in the authors' file).
    quality_prompt_file: str | None = None
    # At most this many exemplars per prompt kind (None = all that fit, see reserve_input_tokens).
    max_safety_exemplars: int | None = None
    max_quality_exemplars: int | None = None
    # Tokens of max_model_len kept free for the input (and detection turn) when fitting exemplars.
    reserve_input_tokens: int = 768
    # Inputs whose detection could not be parsed (risky is null): "safety" (treat as risky,
    # the cautious choice; our default), "quality", or "skip" (kept with parse_status "skipped").
    unknown_verdict: UnknownVerdict = "safety"
    # Per-prompt sampling seeds, as in detect.
    seed_per_prompt: bool = True
    # Constrain the output with vLLM structured outputs to 5-7 numbered "N. Title: text"
    # lines, so every finished output parses with titles (off = free text, as the paper).
    structured: bool = False
    # Pad each prompt set's shared few-shot prefix to whole KV blocks, as detect.align_prefix.
    align_prefix: bool = True


@dataclass
class AugmentConfig:
    # Self-instruct sampling; our default (the authors' augmentation script: temperature 1.0,
    # up to 512 tokens, as configs/gpu-paper.yaml sets).
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, max_tokens=400))
    # Risk types with descriptions and seed questions; None = gen/prompts/risk_types.yaml
    # (the paper's 8 unsafe scenarios and 6 instruction attacks, 3 seeds each, ours).
    risk_types_file: str | None = None
    # Only these risk types (names from the file); empty = all. One output shard per type.
    types: list[str] = field(default_factory=list)
    # Self-instruct prompt; None = gen/prompts/augment.yaml.
    prompt_file: str | None = None
    # Questions to keep per risk type, seeds included when include_seeds (our default).
    target_per_type: int = 100
    # Example questions shown in each request, sampled from the seeds and questions kept so far.
    examples_per_request: int = 4
    # New questions asked for in each request.
    new_per_request: int = 8
    # Requests per risk type per round; all types' requests go to vLLM in one call per round.
    requests_per_round: int = 4
    # Give up on a type after this many rounds (its shard is written with what was kept).
    max_rounds: int = 30
    # Paper's rule: drop a new question whose ROUGE-L F against any kept question exceeds this
    # (compared exactly: a score equal to the threshold is kept; tokens NFKC-normalized as ids are).
    rouge_threshold: float = 0.7
    # Keep the seed questions in the output (they count toward target_per_type).
    include_seeds: bool = True
    # New questions with fewer words or more characters than these are rejected (quarantined).
    min_words: int = 4
    max_chars: int = 600


DEFAULT_GUIDED_SYSTEM = (
    "You are a helpful, honest and harmless assistant. When you answer the user's question, "
    "follow these guidelines:\n{guidelines}"
)


@dataclass
class RespondConfig:
    # Decoding; the paper decodes greedily (temperature 0) with up to 512 new tokens.
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0, max_tokens=512))
    # When sampling (temperature > 0): each prompt its own seed (the responder engine's seed +
    # prompt id), so a response does not depend on batching or resume; as detect.seed_per_prompt
    # (not on the CPU, where vLLM 0.32 crashes on seeded requests with chunked prefill).
    seed_per_prompt: bool = True
    # System message of a guided prompt; "{guidelines}" is replaced by the numbered guideline
    # texts (one per line: "1. ..."). Default: the paper's "follow these guidelines" framing.
    guided_system: str = DEFAULT_GUIDED_SYSTEM
    # System message of an unguided prompt (baseline, or a prompt with no guideline);
    # "" = none, so the model's chat template applies its own default system message.
    unguided_system: str = ""
    # Use at most this many retrieved guidelines, in retrieval order; 0 = all (retrieve.keep).
    max_guidelines: int = 0
    # An overlong prompt keeps its guidelines and loses the start of its user text, down to
    # this many tokens; the lowest-ranked guidelines are dropped only to leave room for these,
    # and a prompt that cannot keep them is skipped (recorded) instead.
    min_user_tokens: int = 16
    # The responder's engine: EngineConfig keys that replace `engine`'s for this stage (e.g.
    # {model: lmsys/vicuna-13b-v1.5, chat_template: vicuna_v1.1, max_model_len: 4096});
    # {} = answer with `engine` (the guideline writer). The paper: Vicuna-13B answers.
    engine: dict = field(default_factory=dict)
    # Example conversations shown before the prompt (first N of exemplars_file).
    # 0 = none (our default, short prompts for small models); the paper: 2.
    num_exemplars: int = 0
    # YAML with `exemplars: [{prompt, answer}]`; None = gen/prompts/respond_exemplars.yaml.
    exemplars_file: str | None = None
    # Prompt set answered by the unguided baseline (a dataset under WORKDIR); "" = "prompts",
    # or "prompts-sft" when the config has inputs_sft (the paper's fine-tuning set).
    prompts: str = ""
