"""Detector quality: recall on Do-Not-Answer, false-positive rate on Vicuna-Bench.

    python bench/detect_quality.py                                 # the built-in detect.yaml
    python bench/detect_quality.py --limit 120                     # a fixed, seeded sample
    git show HEAD:guidealign/gen/prompts/detect.yaml > /tmp/detect-old.yaml
    python bench/detect_quality.py --prompt-file /tmp/detect-old.yaml --prompt-file builtin --limit 120

Every prompt of Do-Not-Answer (939, all of them should be flagged) and of Vicuna-Bench (80,
ordinary requests, few of which need safety care) goes through the detect stage's own
prompt building, generation and parsing (``gen.detect.make_shard_fn``), with greedy decoding
(temperature 0) on a float32 engine, so the figures are deterministic. Several prompt files
run on one engine, one after the other, on the same prompts; one row per file is printed:

    recall      share of Do-Not-Answer prompts judged risky (verdict Yes)
    FP rate     share of Vicuna-Bench prompts judged risky
    unparsed    outputs with no verdict (counted as not flagged in both figures)

By the paper's wider notion of risk (any request whose good answer needs care) some
Vicuna-Bench prompts (health, money, sensitive topics) are rightly flagged: the FP rate is an
upper bound on false positives. The embedded 135M model is weak; the figures show the
direction of a prompt change, not the paper's detector accuracy. The benchmarks are read from
``../shared/benchmarks`` (``--bench-dir``); when absent the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def sample(rows: list[dict], limit: int, seed: int) -> list[dict]:
    """A fixed subset: the same ``limit`` rows for the same seed, in file order."""
    if not limit or limit >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def make_cfg(args, prompt_file: str | None):
    from guidealign.config import load_config

    sets = [f"engine.model={args.model}", "engine.dtype=float32",
            f"engine.max_model_len={args.max_model_len}", f"engine.max_num_seqs={args.max_num_seqs}",
            "detect.sampling.temperature=0", f"detect.sampling.max_tokens={args.max_tokens}"]
    if prompt_file:
        sets.append(f"detect.prompt_file={prompt_file}")
    return load_config(None, sets)


def detect(cfg, llm, rows: list[dict], tag: str) -> list[dict]:
    """The detect stage's per-shard function over ``rows``; returns its output rows."""
    import pyarrow as pa

    from guidealign.gen.detect import make_shard_fn

    fn = make_shard_fn(cfg, llm)
    table = pa.table({"id": [f"{tag}-{r['id']}" for r in rows], "prompt": [r["prompt"] for r in rows]})
    out, _, stats = fn(table, 0)
    res = out.to_pylist()
    for r, src in zip(res, rows):
        r["category"] = src.get("risk_area")
    return res, fn.prompts.n_exemplars, stats


def summarize(dna: list[dict], vic: list[dict]) -> dict:
    def share(rows, pred):
        return round(sum(1 for r in rows if pred(r)) / len(rows), 4) if rows else None

    by_area = {}
    for area in sorted({r["category"] for r in dna if r["category"]}):
        sub = [r for r in dna if r["category"] == area]
        by_area[area] = {"n": len(sub), "recall": share(sub, lambda r: r["risky"] is True)}
    return {
        "dna_n": len(dna), "recall": share(dna, lambda r: r["risky"] is True),
        "dna_unparsed": sum(r["risky"] is None for r in dna),
        "vicuna_n": len(vic), "fp_rate": share(vic, lambda r: r["risky"] is True),
        "vicuna_unparsed": sum(r["risky"] is None for r in vic),
        "truncated_outputs": sum(bool(r["truncated"]) for r in dna + vic),
        "parse_status": dict(Counter(r["parse_status"] for r in dna + vic)),
        "recall_by_risk_area": by_area,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-file", action="append", default=[],
                    help='detect prompt YAML; repeat to compare; "builtin" = guidealign/gen/prompts/detect.yaml '
                         "(the default)")
    ap.add_argument("--limit", type=int, default=0,
                    help="sample this many prompts of each benchmark (seeded; 0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    ap.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=400, help="detect output budget (paper: 400)")
    ap.add_argument("--json", type=Path, help="write the figures (and per-prompt verdicts) here")
    args = ap.parse_args(argv)

    dna_f, vic_f = args.bench_dir / "do_not_answer.jsonl", args.bench_dir / "vicuna.jsonl"
    if not (dna_f.exists() and vic_f.exists()):
        print(f"skipped: {dna_f} or {vic_f} not present (the shared benchmarks are not shipped)")
        return 0
    dna = sample(load_jsonl(dna_f), args.limit, args.seed)
    vic = sample(load_jsonl(vic_f), args.limit, args.seed)
    files = args.prompt_file or ["builtin"]

    from guidealign.gen.engine import build_llm

    llm = build_llm(make_cfg(args, None).engine)
    results = {}
    for f in files:
        cfg = make_cfg(args, None if f == "builtin" else str(Path(f).resolve()))
        t0 = time.perf_counter()
        d, n_ex, _ = detect(cfg, llm, dna, "dna")
        v, _, _ = detect(cfg, llm, vic, "vicuna")
        s = summarize(d, v)
        s.update(exemplars_used=n_ex, seconds=round(time.perf_counter() - t0, 1))
        results[f] = {"summary": s, "verdicts": {r["id"]: {"risky": r["risky"], "raw": r["raw"]}
                                                 for r in d + v}}

    print(f"\ndetect quality: {args.model}, float32, temperature 0, max_tokens {args.max_tokens}; "
          f"Do-Not-Answer {len(dna)} prompts, Vicuna-Bench {len(vic)}"
          + (f" (seeded sample, --limit {args.limit} --seed {args.seed})" if args.limit else ""))
    head = f"{'prompt file':<40}{'exemplars':>10}{'recall':>9}{'FP rate':>9}{'unparsed':>10}{'seconds':>9}"
    print(head)
    print("-" * len(head))
    for f, r in results.items():
        s = r["summary"]
        print(f"{Path(f).name if f != 'builtin' else 'builtin detect.yaml':<40}{s['exemplars_used']:>10}"
              f"{100 * s['recall']:>8.1f}%{100 * s['fp_rate']:>8.1f}%"
              f"{s['dna_unparsed'] + s['vicuna_unparsed']:>10}{s['seconds']:>9}")
    for f, r in results.items():
        areas = ", ".join(f"{a}: {100 * x['recall']:.0f}% of {x['n']}"
                          for a, x in r["summary"]["recall_by_risk_area"].items())
        print(f"  {Path(f).name if f != 'builtin' else 'builtin'} recall by risk area: {areas}")
    if len(results) == 2:
        (fa, a), (fb, b) = results.items()
        print(f"change ({Path(fb).name} vs {Path(fa).name}): recall "
              f"{100 * (b['summary']['recall'] - a['summary']['recall']):+.1f} points, FP rate "
              f"{100 * (b['summary']['fp_rate'] - a['summary']['fp_rate']):+.1f} points")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
