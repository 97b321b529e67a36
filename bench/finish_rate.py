"""How many respond answers finish under their cap, for several decoding settings, on the
retrieved guidelines of finished runs (one engine for all settings).

    python bench/finish_rate.py -w runs/demo -w /tmp/other-demo-run \\
        --setting 768,1.12,0 --setting 768,1.1,0.3 --setting 768,1.05,0.5

Each ``--setting`` is ``max_tokens,repetition_penalty,frequency_penalty``; every other respond
key comes from ``--config`` (default: configs/demo.yaml). For each setting it runs the respond
stage's own function over the ``retrieve/`` shards of every workdir (greedy as the config says)
and prints the answers that stopped by themselves per workdir and in all, and the share of
generated tokens in those answers (what SFT keeps with ``keep_finish_reasons: [stop]``). Needs
runs that got through ``retrieve`` (e.g. two ``./run.sh demo`` runs, whose sampled upstream
stages give different guidelines); ``./run.sh bench`` skips it for that reason.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-w", "--workdir", action="append", required=True, help="a run with retrieve/ shards")
    ap.add_argument("--setting", action="append", required=True, help="max_tokens,repetition,frequency")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from guidealign.config import load_config
    from guidealign.gen.engine import build_llm
    from guidealign.gen.respond import make_respond_fn

    cfg = load_config(args.config, [])
    parts = []
    for w in args.workdir:
        files = sorted(glob.glob(f"{w}/retrieve/shard-*.parquet"))
        if not files:
            sys.exit(f"finish_rate: no retrieve/ shards in {w}")
        parts.append((w, pa.concat_tables([pq.read_table(f) for f in files])))
    table = pa.concat_tables([t for _, t in parts])
    llm = build_llm(cfg.engine)
    results = []
    for setting in args.setting:
        mt, rp, fp = setting.split(",")
        c = copy.deepcopy(cfg)
        s = c.respond.sampling
        s.max_tokens, s.repetition_penalty, s.frequency_penalty = int(mt), float(rp), float(fp)
        respond = make_respond_fn(c, llm, guided=True, model_name="bench")
        t0 = time.perf_counter()
        out, _, _ = respond(table, 0)
        seconds = time.perf_counter() - t0
        rows = out.to_pylist()
        done = [r["finish_reason"] == "stop" for r in rows]
        kept = sum(r["output_tokens"] for r, d in zip(rows, done) if d)
        total = sum(r["output_tokens"] for r in rows) or 1
        per, at = [], 0
        for w, t in parts:
            per.append({"workdir": w, "finished": sum(done[at:at + t.num_rows]), "prompts": t.num_rows})
            at += t.num_rows
        res = {"max_tokens": int(mt), "repetition_penalty": float(rp), "frequency_penalty": float(fp),
               "finished": sum(done), "prompts": len(rows), "tokens_kept": kept / total,
               "seconds": round(seconds, 1), "per_workdir": per}
        results.append(res)
        print(f"max_tokens {mt}, repetition {rp}, frequency {fp}: "
              + ", ".join(f"{p['finished']}/{p['prompts']}" for p in per)
              + f" -> {sum(done)}/{len(rows)} finish ({sum(done) / max(len(rows), 1):.1%}), "
              f"{kept / total:.1%} of generated tokens kept, {seconds:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
