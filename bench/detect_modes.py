"""Detect's two modes side by side: rationale (the paper) and score (one forward pass).

    python bench/detect_modes.py                       # 64 held-out prompts per class
    python bench/detect_modes.py --short               # 16 per class (./run.sh bench)
    python bench/detect_modes.py --dtype float32       # the demo's dtype (bfloat16 by default)
    python bench/detect_modes.py --write-threshold configs/detect-threshold.json
    python bench/detect_modes.py --short --block-size 128   # vLLM's own CPU block size
    python bench/detect_modes.py --short --no-align         # shared prefix not padded to a block
    python bench/detect_modes.py --score-only 3 --set engine.max_num_batched_tokens=1024  # engine knobs

Labelled prompts from ../shared/benchmarks (skipped cleanly when absent): Do-Not-Answer as
risky; Vicuna-Bench and the HHH prompts as not risky, except HHH's "harmless" subset, whose
prompts are harmful requests. Each class is shuffled with --seed and split: the first
--calib prompts calibrate the score threshold (the one that maximizes recall - FPR), the
next --per-class are held out. On the held-out prompts, in one process on one engine:
score mode, then rationale mode (same few-shot prompt, same engine; before each, the
prefix cache is reset and the few-shot prefix put back in it by one untimed warm-up
prompt). It prints prompts/s of both and their ratio (the goal: >= 10), and recall on
risky and false-positive rate on benign for each (a rationale without a verdict counts as
risky, as guidelines.unknown_verdict does by default), plus the score mode's recall at the
rationale mode's false-positive rate (its threshold taken from the calibration split: the one
whose FPR there is at most the rationale mode's held-out FPR; the in-sample figure, with the
threshold chosen on the held-out scores, is printed beside it as such). Last, each mode's
work per prompt: prompt tokens computed (those not found in the prefix cache; the few-shot
prefix is) and output tokens decoded, with the time per computed token: on a machine where a decoded token costs about
what a prompt token does (a CPU), the speedup is about (prompt + decoded) / prompt tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def load_labelled(root: Path) -> tuple[list[str], list[str]]:
    def rows(name):
        with open(root / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    risky = [r["prompt"] for r in rows("do_not_answer.jsonl")]
    benign = [r["prompt"] for r in rows("vicuna.jsonl")]
    benign += [r["prompt"] for r in rows("hhh.jsonl") if r.get("subset") != "harmless"]
    return risky, benign


def split(items: list[str], seed: int, calib: int, held: int) -> tuple[list[str], list[str]]:
    items = sorted(set(items))
    random.Random(seed).shuffle(items)
    if calib + held > len(items):
        held = max(0, len(items) - calib)
    return items[:calib], items[calib:calib + held]


def calibrate(scores_risky: list[float], scores_benign: list[float]) -> float:
    """The threshold that maximizes recall - FPR (ties: the one nearest 0.5). recall - FPR
    is compared exactly, as tp * n_benign - fp * n_risky: in floats two equal values can
    differ in the last bit and decide the tie instead of the distance to 0.5."""
    cands = sorted(set(scores_risky) | set(scores_benign) | {0.5})
    nr, nb = max(len(scores_risky), 1), max(len(scores_benign), 1)
    best = None
    for t in cands:
        tp = sum(s >= t for s in scores_risky)
        fp = sum(s >= t for s in scores_benign)
        key = (tp * nb - fp * nr, -abs(t - 0.5))
        if best is None or key > best[0]:
            best = (key, t)
    return float(best[1])


def rates(pred_risky: list[bool], pred_benign: list[bool]) -> dict:
    return {"recall": sum(pred_risky) / max(len(pred_risky), 1),
            "fpr": sum(pred_benign) / max(len(pred_benign), 1)}


def recall_at_fpr(scores_risky, scores_benign, fpr: float) -> tuple[float, float]:
    """Score mode's best recall with a false-positive rate at most ``fpr`` (and that FPR)."""
    best = (0.0, 0.0)
    for t in sorted(set(scores_risky) | set(scores_benign)):
        f = sum(s >= t for s in scores_benign) / max(len(scores_benign), 1)
        if f <= fpr + 1e-12:
            r = sum(s >= t for s in scores_risky) / max(len(scores_risky), 1)
            best = max(best, (r, f))
    return best


def threshold_at_fpr(scores_risky, scores_benign, fpr: float) -> float:
    """The threshold with the best recall on these (calibration) scores whose false-positive
    rate is at most ``fpr``: the lowest score that keeps the FPR within it (above every score
    when none does)."""
    import math

    everything = sorted(set(scores_risky) | set(scores_benign))
    n = max(len(scores_benign), 1)
    for t in everything:
        if sum(s >= t for s in scores_benign) / n <= fpr + 1e-12:
            return t
    return math.nextafter(everything[-1], math.inf) if everything else 0.5


def threshold_record(threshold: float, cfg, llm, fingerprint: dict, seed: int, n_cal: tuple[int, int]) -> dict:
    """What --write-threshold writes: the threshold, the prompt it was calibrated on (detect's
    score_fingerprint: detect refuses the file for another prompt) and the model and dtype the
    engine ran (as it resolved "auto"; detect warns for others)."""
    from guidealign.gen.outputs import dtype_name
    from guidealign.gen.scoring import engine_dtype

    return {"threshold": threshold, "seed": seed, "calibration_prompts": {"risky": n_cal[0], "benign": n_cal[1]},
            "model": cfg.engine.model, "dtype": engine_dtype(llm) or dtype_name(cfg.engine.dtype),
            "prompt": fingerprint, "rule": "maximizes recall - false-positive rate on the calibration split"}


def cpu_matrix_flags() -> list[str]:
    """The CPU's bf16 matrix/vector instructions (Linux): with AMX a prompt token (a GEMM over
    many tokens) costs a fraction of what it does without, a decoded token much less so, so the
    bf16 speedup between the modes depends on the CPU; printed with the figures."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f"))


# (config key, flag) of the engine and sampling flags: each overrides --config only when given;
# without --config, the bench's own defaults (BENCH_DEFAULTS) stand in for the flags not given
ENGINE_FLAGS = [("engine.model", "model"), ("engine.dtype", "dtype"), ("engine.max_model_len", "max_model_len"),
                ("engine.max_num_seqs", "max_num_seqs"), ("engine.cpu_kvcache_gib", "kv_gib"),
                ("detect.sampling.temperature", "temperature"), ("detect.sampling.max_tokens", "max_tokens")]
BENCH_DEFAULTS = {"model": "embedded:smollm2-135m-instruct", "dtype": "bfloat16", "max_model_len": 8192,
                  "max_num_seqs": 128, "kv_gib": 2, "temperature": 0.0, "max_tokens": 160}


def with_bench_defaults(args):
    """``args`` with the bench's defaults for the engine and sampling flags not given, when no
    --config is (with one, the config's own values stand)."""
    if args.config is None:
        for attr, value in BENCH_DEFAULTS.items():
            if getattr(args, attr) is None:
                setattr(args, attr, value)
    return args


def make_cfg(args, mode: str):
    """The config both modes run: --config (its engine and detect settings: a threshold written
    with --write-threshold is calibrated on them), the flags given and --set over it. The
    threshold is the bench's own (calibrated here): a threshold_file the config names (maybe the
    one --write-threshold is about to write) is not read."""
    from guidealign.config import load_config

    given = [(key, getattr(args, attr)) for key, attr in ENGINE_FLAGS]
    cfg = load_config(args.config, [f"detect.mode={mode}"] + [f"{k}={v}" for k, v in given if v is not None]
                      + ([f"detect.max_exemplars={args.max_exemplars}"] if args.max_exemplars is not None else [])
      + ([f"engine.block_size={args.block_size}"] if args.block_size else [])
      + (["detect.align_prefix=false"] if args.no_align else []) + list(args.set))
    cfg.detect.threshold_file = None
    return cfg


def run_mode(cfg, llm, prompts: list[str], keep: dict | None = None) -> tuple[list[dict], float, dict]:
    """Rows, seconds and stats of one mode over ``prompts`` (``keep``: gets the shard function
    under "fn")."""
    import pyarrow as pa

    from guidealign.gen.detect import make_shard_fn

    fn = make_shard_fn(cfg, llm)
    if keep is not None:
        keep["fn"] = fn
    table = pa.table({"id": [f"p{i}" for i in range(len(prompts))], "prompt": prompts})
    # the few-shot prefix is computed once per engine in a run: put it in the cache first
    # (one untimed pass on another prompt), so both modes are timed on the per-prompt work
    llm.reset_prefix_cache()
    fn(pa.table({"id": ["warm"], "prompt": ["Warm-up input."]}), 0)
    t0 = time.perf_counter()
    out, _, stats = fn(table, 0)
    return out.to_pylist(), time.perf_counter() - t0, stats


def work(stats: dict, n: int, seconds: float) -> dict:
    """The model's work per prompt: prompt tokens computed (not found in the prefix cache) and
    output tokens decoded (the first output token comes out of the prompt's forward pass: no
    step of its own), and the seconds per computed token (prompt and decoded together)."""
    computed = stats["prefix_cache_queries"] - stats["prefix_cache_hits"]
    decoded = max(stats["output_tokens"] - n, 0)
    total = computed + decoded
    return {"prompt_tokens_computed": computed / n, "tokens_decoded": decoded / n,
            "ms_per_token": 1000 * seconds / total if total else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmarks", type=Path, default=BENCHMARKS)
    ap.add_argument("--per-class", type=int, default=64, help="held-out prompts per class")
    ap.add_argument("--calib", type=int, default=64, help="calibration prompts per class")
    ap.add_argument("--short", action="store_true", help="16 held-out and 32 calibration prompts per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=None, help="base config (default: built-in defaults)")
    flag = "; with --config: the config's unless given"
    ap.add_argument("--model", default=None, help=f"engine.model (default: {BENCH_DEFAULTS['model']}{flag})")
    ap.add_argument("--dtype", default=None,
                    help="both modes' dtype: bfloat16 (the GPU recipe's, and the engine's 'auto' for the "
                         f"embedded model) or float32 (the demo's: token for token with transformers){flag}")
    ap.add_argument("--max-model-len", type=int, default=None, help=f"default: 8192{flag}")
    ap.add_argument("--max-num-seqs", type=int, default=None, help=f"default: 128{flag}")
    ap.add_argument("--max-exemplars", type=int, default=None)
    ap.add_argument("--kv-gib", type=int, default=None, help=f"engine.cpu_kvcache_gib (default: 2{flag})")
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV block size (engine.block_size; default: the engine's, 32 on the CPU)")
    ap.add_argument("--no-align", action="store_true",
                    help="detect.align_prefix=false: the shared prefix not padded to the KV block")
    ap.add_argument("--temperature", type=float, default=None, help=f"rationale mode (default: 0, greedy{flag})")
    ap.add_argument("--max-tokens", type=int, default=None, help=f"rationale mode (default: 160, the demo recipe's{flag})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for both modes, e.g. engine.max_num_batched_tokens=1024 (repeatable)")
    ap.add_argument("--score-only", type=int, default=0, metavar="N",
                    help="time score mode alone, N passes over the held-out prompts (no calibration, no rationale mode)")
    ap.add_argument("--write-threshold", help="write the calibrated threshold here (detect.threshold_file), with "
                    "the model, dtype and score prompt it was calibrated on (detect refuses it for another prompt)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.short:
        args.per_class, args.calib = 16, 32
    with_bench_defaults(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.benchmarks / "do_not_answer.jsonl").exists():
        print(f"detect modes: SKIPPED ({args.benchmarks} has no benchmark prompts)")
        if args.json:
            Path(args.json).write_text(json.dumps({"skipped": f"no benchmarks at {args.benchmarks}"}))
        return

    risky, benign = load_labelled(args.benchmarks)
    r_cal, r_held = split(risky, args.seed, args.calib, args.per_class)
    b_cal, b_held = split(benign, args.seed + 1, args.calib, args.per_class)

    from guidealign.gen.engine import build_llm, cache_block_size

    score_cfg, rat_cfg = make_cfg(args, "score"), make_cfg(args, "rationale")
    llm = build_llm(score_cfg.engine)
    if args.score_only:
        held = r_held + b_held
        rates_ = []
        for _ in range(args.score_only):
            _, sec, stats = run_mode(score_cfg, llm, held)
            rates_.append(len(held) / sec)
        w = work(stats, len(held), sec)
        from guidealign.gen.outputs import dtype_name
        from guidealign.gen.scoring import engine_dtype

        dtype = engine_dtype(llm) or dtype_name(score_cfg.engine.dtype)
        print(f"detect score mode alone: {len(held)} held-out prompts, dtype {dtype}, "
              f"overrides {args.set or 'none'}: " + " ".join(f"{r:.2f}" for r in rates_) +
              f" prompts/s in {args.score_only} passes; {w['prompt_tokens_computed']:.0f} prompt tokens "
              f"computed a prompt, {w['ms_per_token']:.1f} ms each (last pass)")
        return

    # 1. calibrate the threshold on the calibration split (score mode)
    kept: dict = {}
    cal_rows, _, _ = run_mode(score_cfg, llm, r_cal + b_cal, keep=kept)
    cal_scores = [r["risk_score"] for r in cal_rows]
    cal_r = [s for s in cal_scores[:len(r_cal)] if s is not None]
    cal_b = [s for s in cal_scores[len(r_cal):] if s is not None]
    threshold = calibrate(cal_r, cal_b)
    record = threshold_record(threshold, score_cfg, llm, kept["fn"].score_fingerprint, args.seed,
                              (len(r_cal), len(b_cal)))
    if args.write_threshold:
        Path(args.write_threshold).write_text(json.dumps(record, indent=1) + "\n")

    # 2. both modes on the held-out prompts
    held = r_held + b_held
    n_r = len(r_held)
    s_rows, s_sec, s_stats = run_mode(score_cfg, llm, held)
    r_rows, r_sec, r_stats = run_mode(rat_cfg, llm, held)
    scores = [r["risk_score"] for r in s_rows]
    s_pred = [s is not None and s >= threshold for s in scores]
    r_pred = [r["risky"] is not False for r in r_rows]  # no verdict -> safety (the default)
    res = {
        "prompts": len(held), "risky": n_r, "benign": len(held) - n_r, "seed": args.seed,
        "threshold": threshold, "max_tokens": rat_cfg.detect.sampling.max_tokens,
        "temperature": rat_cfg.detect.sampling.temperature,
        "model": record["model"], "dtype": record["dtype"], "cpu_flags": cpu_matrix_flags(),
        "score": {"seconds": s_sec, "prompts_per_s": len(held) / s_sec,
                  **rates(s_pred[:n_r], s_pred[n_r:]), **work(s_stats, len(held), s_sec)},
        "rationale": {"seconds": r_sec, "prompts_per_s": len(held) / r_sec,
                      "output_tokens": sum(r["output_tokens"] for r in r_rows),
                      "unparsed": sum(r["risky"] is None for r in r_rows),
                      **rates(r_pred[:n_r], r_pred[n_r:]), **work(r_stats, len(held), r_sec)},
    }
    res["speedup"] = res["score"]["prompts_per_s"] / res["rationale"]["prompts_per_s"]
    sr = [s for s in scores[:n_r] if s is not None]
    sb = [s for s in scores[n_r:] if s is not None]
    # score mode at the rationale mode's FPR, held out as the other figures: the threshold comes
    # from the calibration split (the one whose calibration FPR is at most the rationale mode's
    # held-out FPR), then recall and FPR are measured on the held-out prompts
    t_fpr = threshold_at_fpr(cal_r, cal_b, res["rationale"]["fpr"])
    at = rates([s >= t_fpr for s in sr], [s >= t_fpr for s in sb])
    rec, fpr = at["recall"], at["fpr"]
    res["score_at_rationale_fpr"] = {"recall": rec, "fpr": fpr, "threshold": t_fpr,
                                     "threshold_from": "calibration split"}
    # the same, with the threshold chosen on the held-out scores themselves (in-sample: an
    # upper bound, not a held-out figure)
    rec_in, fpr_in = recall_at_fpr(sr, sb, res["rationale"]["fpr"])
    res["score_at_rationale_fpr_in_sample"] = {"recall": rec_in, "fpr": fpr_in}

    print(f"detect modes: {len(held)} held-out prompts ({n_r} Do-Not-Answer risky, {len(held) - n_r} "
          f"Vicuna/HHH benign), seed {args.seed}, model {res['model']}, dtype {res['dtype']}; rationale T={rat_cfg.detect.sampling.temperature} "
          f"max_tokens={rat_cfg.detect.sampling.max_tokens}; KV block {cache_block_size(llm) or '?'}; CPU "
          f"{' '.join(res['cpu_flags']) or 'without AVX-512/AMX'}")
    print(f"  threshold (calibrated on {len(r_cal)}+{len(b_cal)} other prompts): {threshold:.4f}")
    for m in ("score", "rationale"):
        r = res[m]
        extra = f", {r['unparsed']} without a verdict" if m == "rationale" else ""
        print(f"  {m:<9} {r['prompts_per_s']:8.2f} prompts/s  recall {r['recall']:.3f}  "
              f"FPR {r['fpr']:.3f}  ({r['seconds']:.1f} s{extra})")
    print(f"  speedup score/rationale: {res['speedup']:.1f}x (goal >= 10)")
    for m in ("score", "rationale"):
        r = res[m]
        ms = f"{r['ms_per_token']:.1f}" if r["ms_per_token"] is not None else "?"
        print(f"  {m:<9} work per prompt: {r['prompt_tokens_computed']:.0f} prompt tokens computed, "
              f"{r['tokens_decoded']:.0f} decoded; {ms} ms per computed token")
    print(f"  score mode at the rationale mode's FPR ({res['rationale']['fpr']:.3f}), threshold "
          f"{t_fpr:.4f} from the calibration split: held-out recall {rec:.3f} (FPR {fpr:.3f}); "
          f"in-sample (threshold chosen on these held-out scores): recall {rec_in:.3f} (FPR {fpr_in:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
