"""The range each numeric setting must lie in, checked when the config loads: a count of 0, a
ratio of 1.5 or a negative timeout is refused with its key at once, instead of failing (or,
worse, running on: an empty library from ``library.shard_rows=0``) hours into a run."""
from __future__ import annotations

import math
import operator

from guidealign.config.sft import owned_trainer_args, process_count

# What a generated row's finish_reason can say (vLLM's stop/length/abort, ours error/skipped)
FINISH_REASONS = ("stop", "length", "abort", "error", "skipped")
# Counts: at least 1 (None, where a key is optional, is not checked).
COUNTS = (
    "ingest.shard_rows", "ingest.max_chars", "ingest.block_bytes", "ingest.dedup_memory_mib",
    "engine.max_model_len", "engine.tensor_parallel_size", "engine.max_num_seqs",
    "engine.max_num_batched_tokens", "engine.block_size",
    "detect.sampling.max_tokens", "guidelines.sampling.max_tokens", "augment.sampling.max_tokens",
    "respond.sampling.max_tokens", "eval.judge_sampling.max_tokens",
    "augment.target_per_type", "augment.examples_per_request", "augment.new_per_request",
    "augment.requests_per_round",
    "library.shard_rows", "library.batch_size", "library.neighbors", "library.ngram_dim",
    "library.nprobe", "retriever.batch_size", "retriever.mini_batch_size", "retriever.epochs",
    "retriever.max_seq_length", "retriever.encode_batch_size", "index.batch_size",
    "index.nprobe", "index.hnsw_m", "index.ef_search", "retriever.risk_top_k", "retrieve.top_n", "retrieve.keep", "retrieve.batch_size",
    "sft.global_batch_size", "sft.micro_batch_size", "sft.max_seq_length", "sft.lora_r",
    "sft.logging_steps", "push.files_per_commit", "sft.num_processes", "eval.shard_rows",
    "eval.classifier_batch_size", "eval.classifier_max_length",
    "engine.cpu_kvcache_gib", "augment.max_rounds", "augment.max_chars", "eval.risk_top_k",
)
# Shares and ratios: (key, low, high, is high itself allowed).
RANGES = (
    ("engine.gpu_memory_utilization", 0, 1, True),  # 0 itself is refused below
    ("library.fuzzy_threshold", 0, 1, True),  # 0 itself is refused below
    ("library.min_cosine", -1, 1, True),
    ("library.heldout_fraction", 0, 1, False),
    ("retrieve.dedup_ratio", 0, 1, True),
    ("augment.rouge_threshold", 0, 1, False),  # 1 keeps exact duplicates (ROUGE-L 1)
    ("detect.score_threshold", 0, 1, True),
    ("sft.lora_dropout", 0, 1, False),
    # passed as transformers' warmup_steps, which reads a value >= 1 as a number of steps
    ("retriever.warmup_ratio", 0, 1, False),
    ("sft.warmup_ratio", 0, 1, False),
    # vLLM's own range; repetition penalties must be above 0 (below)
    *((f"{s}.frequency_penalty", -2, 2, True) for s in ("detect.sampling", "guidelines.sampling",
                                                      "augment.sampling", "respond.sampling",
                                                      "eval.judge_sampling")),
    *((f"{s}.top_p", 0, 1, True) for s in ("detect.sampling", "guidelines.sampling",
                                           "augment.sampling", "respond.sampling",
                                           "eval.judge_sampling")),
)
# Must be above 0.
POSITIVE = ("engine.gpu_memory_utilization", "library.fuzzy_threshold", "sft.learning_rate", "retriever.learning_rate",
            "executor.claim_ttl_s", "detect.sampling.top_p", "guidelines.sampling.top_p",
            "augment.sampling.top_p", "respond.sampling.top_p", "eval.judge_sampling.top_p",
            "sft.epochs", "sft.lora_alpha",
            *(f"{s}.repetition_penalty" for s in ("detect.sampling", "guidelines.sampling", "augment.sampling",
                                                  "respond.sampling", "eval.judge_sampling")))
# Must not be below 0.
NOT_NEGATIVE = ("detect.sampling.temperature", "guidelines.sampling.temperature",
                "augment.sampling.temperature", "respond.sampling.temperature",
                "eval.judge_sampling.temperature", "respond.min_user_tokens",
                "executor.wait_timeout_s", "executor.stall_timeout_s", "executor.ray_workers",
                "executor.ray_max_restarts", "push.max_retries", "index.nlist", "library.exact_search_max",
                "retriever.save_steps", "engine.start_timeout_s", "engine.progress_timeout_s",
                # 0 means "all", "none", "off" or "as many threads as cores" for these
                "detect.max_exemplars", "guidelines.max_safety_exemplars", "guidelines.max_quality_exemplars",
                "detect.reserve_input_tokens", "guidelines.reserve_input_tokens", "augment.min_words",
                "respond.max_guidelines", "respond.num_exemplars", "retriever.max_eval_queries",
                "sft.min_response_chars", "sft.max_examples", "sft.save_steps", "sft.weight_decay",
                "library.threads", "retriever.threads", "index.threads", "retrieve.threads", "sft.num_threads",
                "push.backoff_s", "push.backoff_max_s", "executor.ray_start_timeout_s")


def _why(key: str, v) -> str | None:
    if isinstance(v, float) and math.isnan(v):  # NaN passes every comparison test below
        return "a number (not NaN)"
    if isinstance(v, float) and math.isinf(v) and not key.endswith("_s"):  # seconds: inf = no limit
        return "a finite number"
    if key == "sft.num_processes":  # as the launcher reads it: "auto" in any case, or a count
        try:
            n = process_count(v)
        except ValueError:
            n = 0
        return None if n is None or n >= 1 else ">= 1 or auto"
    if key in COUNTS and v < 1:
        return "a count, >= 1"
    for k, lo, hi, hi_ok in RANGES:
        if k == key and not (lo <= v and (v <= hi if hi_ok else v < hi)):
            return f"in [{lo}, {hi}{']' if hi_ok else ')'}"
    if key in POSITIVE and v <= 0:
        return "> 0"
    if key in NOT_NEGATIVE and v < 0:
        return ">= 0"
    return None


def out_of_bounds(cfg, respond_engine=None, judge_engine=None) -> list[str]:
    """Why each setting of ``cfg`` outside its range is refused ("key: must be ..., got v");
    ``respond_engine`` (the responder's EngineConfig) is checked as ``respond.engine.*``, and
    the keys ``eval.judge_engine`` sets, of ``judge_engine`` (the judge's), as
    ``eval.judge_engine.*``; then the few rules between keys or over a list's items."""
    keys = dict.fromkeys((*COUNTS, *(r[0] for r in RANGES), *POSITIVE, *NOT_NEGATIVE))
    bad = []
    for key in keys:
        shown_values = [(key, operator.attrgetter(key)(cfg))]
        field = key[len("engine."):] if key.startswith("engine.") else None
        if respond_engine is not None and field:
            shown_values.append((f"respond.engine.{field}", getattr(respond_engine, field)))
        if judge_engine is not None and field in cfg.eval.judge_engine:
            shown_values.append((f"eval.judge_engine.{field}", getattr(judge_engine, field)))
        for shown, v in shown_values:
            why = None if v is None or isinstance(v, bool) else _why(key, v)
            if why:
                bad.append(f"{shown}: must be {why}, got {v!r}")
    if cfg.retrieve.keep > cfg.retrieve.top_n:
        bad.append(f"retrieve.keep: must be at most retrieve.top_n ({cfg.retrieve.top_n}), got {cfg.retrieve.keep}")
    bad += owned_trainer_args(cfg.sft.trainer_args)
    cap = cfg.retriever.max_prompts_per_guideline
    if cap != "auto" and (not isinstance(cap, int) or cap < 0):
        bad.append(f"retriever.max_prompts_per_guideline: must be >= 0 or auto, got {cap!r}")
    odd = [r for r in cfg.sft.keep_finish_reasons if r not in FINISH_REASONS]
    if odd:  # a misspelt reason ("lenght") would drop every answer it meant to keep
        bad.append(f"sft.keep_finish_reasons: each must be one of {list(FINISH_REASONS)}, got {odd!r}")
    ks = cfg.retriever.recall_at
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks) or len(set(ks)) < len(ks):
        # (a count listed twice added its hits twice: recall@1 of 1.0 for 0.5)
        bad.append(f"retriever.recall_at: must be a list of distinct counts, each >= 1, got {ks!r}")
    return bad
