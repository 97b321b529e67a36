"""Eval judging: the harmfulness and pairwise judgments, sharded and resumable.

Each judge output is sharded (``eval.shard_rows`` judgments per shard); ranks split the
shards (i % W == rank) and skip committed ones whose fingerprint matches, so a rerun after a
crash or a config change redoes only what changed.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pyarrow as pa

from guidealign.eval.inputs import usable, wait_s


def judge_shards(stage_dir: Path, items: list, judge_fp: str, key, judge_fn, rank: int,
                  world_size: int, shard_rows: int, progress: bool) -> dict:
    """Judge ``items`` in shards of ``shard_rows``; skip shards already committed with the
    same fingerprint. ``judge_fn(items) -> columns dict``."""
    from tqdm import tqdm

    from guidealign.shards import fingerprint, is_done, my_shards, write_manifest, write_shard
    from guidealign.shards.layout import marker_path, quarantine_path, shard_indices, shard_path

    items = sorted(items, key=key)
    chunks = [items[i:i + shard_rows] for i in range(0, len(items), shard_rows)] or [[]]
    write_manifest(stage_dir, stage=stage_dir.name, num_shards=len(chunks), fingerprint=judge_fp)
    if rank == 0:  # a previous run with more items may have left more shards
        for i in shard_indices(stage_dir):
            if i >= len(chunks):
                for p in (marker_path(stage_dir, i), shard_path(stage_dir, i),
                          quarantine_path(stage_dir, i)):
                    p.unlink(missing_ok=True)
    done = skipped = 0
    for j in tqdm(my_shards(len(chunks), rank, world_size), desc=stage_dir.name, unit="shard",
                  disable=not progress):
        chunk = chunks[j]
        fp = fingerprint(judge_fp, [dataclasses.asdict(it) for it in chunk])
        if is_done(stage_dir, j, fp):
            skipped += 1
            continue
        t0 = time.perf_counter()
        cols = judge_fn(chunk) if chunk else None
        table = pa.table(cols) if cols else pa.table({"id": pa.array([], pa.string())})
        write_shard(stage_dir, j, table, fp, seconds=time.perf_counter() - t0)
        done += 1
    return {"shards": len(chunks), "written": done, "skipped": skipped}


def judge_fp(cfg, kind: str) -> str:
    """What a judgment depends on: a change re-judges, an aggregation option does not."""
    from guidealign.shards import fingerprint

    e = cfg.eval
    if kind == "harm" and e.harm_judge == "classifier":
        return fingerprint("eval-harm-classifier-v1", e.classifier_model, e.classifier_template,
                           e.classifier_harmful_labels, e.classifier_max_length)
    from guidealign.eval.judges import HARM_TEMPLATE, JUDGE_SYSTEM, PAIRWISE_TEMPLATE

    # the wording actually sent (a change of the built-in wording re-judges too)
    template = (e.pairwise_template or PAIRWISE_TEMPLATE) if kind == "pairwise" \
        else (e.harm_template or HARM_TEMPLATE)
    return fingerprint(f"eval-{kind}-llm-v2", e.judge_model, e.judge_chat_template, e.judge_sampling,
                       e.max_response_tokens, template, e.judge_system or JUDGE_SYSTEM,
                       cfg.engine.seed, cfg.engine.max_model_len, cfg.engine.dtype)


def read_judgments(stage_dir: Path, cfg, world_size: int) -> list[dict]:
    """Every judgment row of a judge stage, once all ranks have committed their shards."""
    from guidealign.shards import iter_tables, wait_complete

    wait_complete(stage_dir, timeout=wait_s(cfg, world_size))
    rows = []
    for t in iter_tables(stage_dir):
        if t.num_rows:
            rows.extend(t.to_pylist())
    return rows


def run_judges(cfg, judges: list[str], sub: Path, bench: dict, resp: dict, engines, rank: int,
               world_size: int, progress: bool) -> tuple[dict, int | None]:
    """Run the configured judges over this rank's shards; returns (per-judge shard counts,
    number of pairs judged or None)."""
    ecfg = cfg.eval
    judged, pairs = {}, None
    if "harmfulness" in judges:
        from guidealign.eval.judges import HarmClassifier, HarmItem, judge_harm_llm

        items = [HarmItem(id=i, category=b["category"], prompt=b["prompt"], condition=c,
                          response=resp[c][i]["response"])
                 for i, b in bench.items() for c in ("guided", "unguided") if usable(resp[c].get(i))]
        if ecfg.harm_judge == "classifier":
            holder = {}

            def fn(chunk):
                if "clf" not in holder:
                    holder["clf"] = HarmClassifier(ecfg)
                return holder["clf"].judge(chunk)
        else:
            def fn(chunk):
                return judge_harm_llm(engines.judge(), chunk, ecfg, seed=cfg.engine.seed)
        judged["harm"] = judge_shards(sub / "judge_harm", items, judge_fp(cfg, "harm"),
                                      lambda it: (it.id, it.condition), fn, rank, world_size,
                                      ecfg.shard_rows, progress)
    if "pairwise" in judges:
        from guidealign.eval.judges import PairItem, judge_pairwise

        items = [PairItem(id=i, category=b["category"], prompt=b["prompt"],
                          guided=resp["guided"][i]["response"], unguided=resp["unguided"][i]["response"])
                 for i, b in bench.items()
                 if usable(resp["guided"].get(i)) and usable(resp["unguided"].get(i))]
        pairs = len(items)
        judged["pairwise"] = judge_shards(
            sub / "judge_pairwise", items, judge_fp(cfg, "pairwise"), lambda it: it.id,
            lambda chunk: judge_pairwise(engines.judge(), chunk, ecfg, seed=cfg.engine.seed),
            rank, world_size, ecfg.shard_rows, progress)
    return judged, pairs
