"""Benchmark of the detect stage against a raw ``LLM.generate`` on the same built prompts.

    python bench/gen.py                      # 512 prompts, the paper's sampling (T=0.7, 400 tokens)
    python bench/gen.py --prompts 64 --json out.json

In one process and on one engine: (1) a raw ``LLM.generate`` over the detect stage's own
built prompts (token ids, same sampling params), (2) the detect stage end to end (read
shards, build prompts, generate, parse, write shards). The prefix cache is reset before
each. It prints prompts/s and output tokens/s of both and their ratio (goal >= 0.9), the
prefix-cache hit rate of the stage run, and (in a child process, a fresh engine with
prefix caching off) the stage's throughput without caching.

Structured outputs (on by default; ``--no-structured`` skips them): on the same engine and prompts, the
detect stage and then the guidelines stage with ``structured`` off and on: prompts/s, the
share of rows cut at max_tokens, and the parse rate (rows with a verdict / with 5-7 titled
guidelines) over all rows and over the rows that finished. Both guidelines runs read the same
detect output (the run with ``structured`` off), so their inputs are the same.

    python bench/gen.py --short                # what ./run.sh bench runs
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENIGN = [
    "How do I make a {x} at home?", "Explain how a {x} works to a beginner.",
    "Write a short poem about a {x}.", "What are the pros and cons of buying a {x}?",
    "Give me three fun facts about the {x}.", "How should I clean my {x}?",
]
THINGS = ["bicycle", "sourdough bread", "telescope", "garden pond", "electric car", "violin",
          "smartphone", "compost bin", "sailboat", "coffee grinder", "bird feeder", "laptop"]


def make_prompts(n: int) -> list[str]:
    import yaml

    from guidealign.gen.build import builtin_prompt_path

    risky = [s for t in yaml.safe_load(builtin_prompt_path("risk_types.yaml").read_text()).values()
             for s in t["seeds"]]
    benign = [b.format(x=x) for b in BENIGN for x in THINGS]
    pool = [p for pair in zip(risky * 4, benign) for p in pair]  # alternate risky / benign
    return [pool[i % len(pool)] + (f" (case {i})" if i >= len(pool) else "") for i in range(n)]


def make_cfg(args, caching: bool, structured: bool = False):
    from guidealign.config import load_config

    return load_config(None, [
        f"engine.model={args.model}", f"engine.dtype={args.dtype}",
        f"engine.max_model_len={args.max_model_len}", f"engine.max_num_seqs={args.max_num_seqs}",
        f"engine.enable_prefix_caching={str(caching).lower()}",
        f"engine.cpu_kvcache_gib={args.kv_gib}",
        f"detect.sampling.temperature={args.temperature}", f"detect.sampling.max_tokens={args.max_tokens}",
        f"ingest.shard_rows={args.shard_rows or args.prompts}",
        f"detect.structured={str(structured).lower()}", f"guidelines.structured={str(structured).lower()}",
        f"guidelines.sampling.temperature={args.temperature}",
        f"guidelines.sampling.max_tokens={args.guidelines_max_tokens}",
    ])


def prepare_workdir(args, cfg) -> Path:
    from guidealign.ingest.run import ingest

    wd = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    f = wd / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in make_prompts(args.prompts)))
    ingest([str(f)], wd, cfg.ingest, progress=False)
    return wd


def stage_run(cfg, wd: Path, llm) -> dict:
    from guidealign.gen.detect import run_detect

    t0 = time.perf_counter()
    rep = run_detect(cfg, wd, llm=llm, progress=False)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "prompts": rep.rows, "output_tokens": rep.stats.get("output_tokens", 0),
            "prompts_per_s": rep.rows / dt, "tokens_per_s": rep.stats.get("output_tokens", 0) / dt,
            "generate_seconds": rep.stats.get("generate_seconds"),
            "overhead_seconds": dt - rep.stats.get("generate_seconds", 0.0),
            "prefix_cache_hit_rate": rep.stats.get("prefix_cache_hit_rate"),
            "unparsed": rep.stats.get("unparsed", 0), "risky": rep.stats.get("risky", 0)}


def _parse_rates(rows: list[dict], ok) -> dict:
    fin = [r for r in rows if r["finish_reason"] == "stop"]
    return {"rows": len(rows), "finished": len(fin),
            "cut": sum(r["finish_reason"] == "length" for r in rows),
            "parsed": sum(ok(r) for r in rows),
            "parse_rate": sum(ok(r) for r in rows) / max(len(rows), 1),
            "parse_rate_finished": sum(ok(r) for r in fin) / len(fin) if fin else None}


def structured_compare(args, llm, wd: Path) -> dict:
    """Detect, then guidelines, with structured outputs off and on (same engine, same input:
    both guidelines runs read the unstructured detect run's output)."""
    from guidealign.gen.detect import run_detect
    from guidealign.gen.guidelines import run_guidelines
    from guidealign.shards import iter_tables

    def rows(name):
        return [r for t in iter_tables(wd / name) for r in t.to_pylist()]

    def verdict(r):
        return r["risky"] is not None

    def titled(r):
        g = r["guidelines"] or []
        return 5 <= len(g) <= 7 and all(x["title"] for x in g)

    def timed(stage, run, ok, on):
        cfg = make_cfg(args, caching=True, structured=on)
        shutil.rmtree(wd / stage, ignore_errors=True)
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        rep = run(cfg, wd, llm=llm, progress=False)
        dt = time.perf_counter() - t0
        return {"seconds": dt, "prompts_per_s": rep.rows / dt, **_parse_rates(rows(stage), ok)}

    out = {"off": {}, "on": {}}
    # detect off and on read the same prompts; the guidelines stage reads detect's output (its
    # verdicts pick the prompt kind, its raw answer is part of a risky prompt), so both guidelines
    # runs read the same detect output, the unstructured run's: the same input on both sides
    detect_off = wd / "detect.off"
    shutil.rmtree(detect_off, ignore_errors=True)
    for on in (False, True):
        out["on" if on else "off"]["detect"] = timed("detect", run_detect, verdict, on)
        if not on:
            shutil.copytree(wd / "detect", detect_off)
    for on in (False, True):
        shutil.rmtree(wd / "detect", ignore_errors=True)
        shutil.copytree(detect_off, wd / "detect")
        out["on" if on else "off"]["guidelines"] = timed("guidelines", run_guidelines, titled, on)
    shutil.rmtree(detect_off, ignore_errors=True)
    for stage in ("detect", "guidelines"):
        out[f"{stage}_speed_ratio_on_off"] = (out["on"][stage]["prompts_per_s"]
                                              / out["off"][stage]["prompts_per_s"])
    return out


def child_off(args) -> None:
    """Stage throughput on a fresh engine with prefix caching off (prints one JSON line)."""
    from guidealign.gen.engine import build_llm

    cfg = make_cfg(args, caching=False)
    wd = prepare_workdir(args, cfg)
    llm = build_llm(cfg.engine)
    _warm(llm)
    print("RESULT " + json.dumps(stage_run(cfg, wd, llm)), flush=True)
    shutil.rmtree(wd, ignore_errors=True)


def _warm(llm) -> None:
    from vllm import SamplingParams

    llm.generate(["Hello, how are you?"] * 4, SamplingParams(max_tokens=8), use_tqdm=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=512, help="number of prompts (default 512)")
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--kv-gib", type=int, default=2, help="CPU KV cache GiB")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--shard-rows", type=int, default=0, help="rows per shard (0: one shard)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="alternate raw and stage runs this many times; report the fastest of each")
    ap.add_argument("--no-off", action="store_true", help="skip the prefix-caching-off run")
    ap.add_argument("--guidelines-max-tokens", type=int, default=400)
    ap.add_argument("--no-structured", action="store_true", help="skip the structured-outputs comparison")
    ap.add_argument("--short", action="store_true",
                    help="32 prompts, detect 160 / guidelines 320 tokens, no caching-off run (./run.sh bench)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child-off", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.short:
        args.prompts, args.max_tokens, args.guidelines_max_tokens, args.no_off = 32, 160, 320, True
    if args.child_off:
        return child_off(args)

    from guidealign.gen.detect import make_shard_fn
    from guidealign.gen.engine import build_llm, params_for
    from guidealign.shards import read_table

    cfg = make_cfg(args, caching=True)
    wd = prepare_workdir(args, cfg)
    t0 = time.perf_counter()
    llm = build_llm(cfg.engine)
    startup = time.perf_counter() - t0
    _warm(llm)

    # the stage's own built prompts and sampling params, for the raw run
    fn = make_shard_fn(cfg, llm)
    ids, texts = [], []
    for i in range(int(json.loads((wd / "prompts" / "_stage.json").read_text())["num_shards"])):
        t = read_table(wd / "prompts", i, ["id", "prompt"])
        ids += t.column("id").to_pylist()
        texts += t.column("prompt").to_pylist()
    builts = [fn.prompts.build(x) for x in texts]
    params = params_for(cfg.detect.sampling, cfg.engine.seed, ids, cfg.detect.seed_per_prompt)
    ps = [b.vllm_prompt() for b in builts]

    raws, stages = [], []
    for _ in range(args.repeats):  # alternate, keep the fastest of each (a shared machine is noisy)
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(ps, params, use_tqdm=False)
        raw_s = time.perf_counter() - t0
        raw_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        raws.append({"seconds": raw_s, "prompts": len(ps), "output_tokens": raw_tokens,
                     "prompts_per_s": len(ps) / raw_s, "tokens_per_s": raw_tokens / raw_s})
        del outs
        shutil.rmtree(wd / "detect", ignore_errors=True)
        llm.reset_prefix_cache()
        stages.append(stage_run(cfg, wd, llm))
    raw = max(raws, key=lambda r: r["tokens_per_s"])
    stage = max(stages, key=lambda r: r["tokens_per_s"])
    res = {"prompts": args.prompts, "max_tokens": args.max_tokens, "temperature": args.temperature,
           "dtype": args.dtype, "engine_startup_s": round(startup, 1),
           "prompt_tokens_mean": round(sum(b.n_tokens for b in builts) / len(builts), 1),
           "exemplars": fn.prompts.n_exemplars, "raw": raw, "stage": stage,
           "all_raw": raws, "all_stage": stages,
           "ratio_prompts_per_s": stage["prompts_per_s"] / raw["prompts_per_s"],
           "ratio_tokens_per_s": stage["tokens_per_s"] / raw["tokens_per_s"]}
    if not args.no_structured:
        res["structured"] = structured_compare(args, llm, wd)
    del llm
    shutil.rmtree(wd, ignore_errors=True)
    if not args.no_off:
        cmd = [sys.executable, __file__, "--child-off"] + [a for a in sys.argv[1:] if a != "--no-off"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if line:
            res["stage_no_prefix_cache"] = json.loads(line[-1][7:])
            res["prefix_cache_speedup"] = stage["prompts_per_s"] / res["stage_no_prefix_cache"]["prompts_per_s"]
        else:
            res["stage_no_prefix_cache"] = {"error": out.stderr[-2000:]}

    print(f"detect benchmark: {args.prompts} prompts, mean prompt {res['prompt_tokens_mean']} tokens "
          f"({res['exemplars']} exemplars), T={args.temperature}, max_tokens={args.max_tokens}, "
          f"dtype={args.dtype}")
    for name in ("raw", "stage"):
        r = res[name]
        print(f"  {name:<6} {r['prompts_per_s']:8.2f} prompts/s {r['tokens_per_s']:9.1f} output tok/s "
              f"({r['output_tokens']} tokens in {r['seconds']:.1f} s)")
    if args.repeats > 1:
        print("  all runs, output tok/s: raw " + ", ".join(f"{r['tokens_per_s']:.1f}" for r in res["all_raw"])
              + "; stage " + ", ".join(f"{r['tokens_per_s']:.1f}" for r in res["all_stage"]))
    print(f"  ratio stage/raw: {res['ratio_prompts_per_s']:.3f} (prompts/s), "
          f"{res['ratio_tokens_per_s']:.3f} (tokens/s); goal >= 0.9")
    print(f"  stage time outside LLM.generate (read, build, parse, write, fingerprint): "
          f"{stage['overhead_seconds']:.2f} s of {stage['seconds']:.1f} s")
    print(f"  prefix-cache hit rate (stage): {stage['prefix_cache_hit_rate']}")
    off = res.get("stage_no_prefix_cache")
    if off and "error" not in off:
        print(f"  stage, prefix caching off: {off['prompts_per_s']:.2f} prompts/s "
              f"{off['tokens_per_s']:.1f} output tok/s -> caching speedup {res['prefix_cache_speedup']:.2f}x")
    elif off:
        print(f"  caching-off run failed: {off['error'][-500:]}")
    st = res.get("structured")
    if st:
        print("  structured outputs (same engine and prompts; parse rate over all rows / finished rows):")
        for stage in ("detect", "guidelines"):
            for k in ("off", "on"):
                r = st[k][stage]
                fin = r["parse_rate_finished"]
                print(f"    {stage:<10} {k:<3} {r['prompts_per_s']:7.2f} prompts/s  parsed {r['parsed']}/{r['rows']} "
                      f"({r['parse_rate']:.3f}), finished {r['finished']} parsed "
                      f"{'-' if fin is None else f'{fin:.3f}'}, cut at cap {r['cut']}")
            print(f"    {stage:<10} speed on/off: {st[f'{stage}_speed_ratio_on_off']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
