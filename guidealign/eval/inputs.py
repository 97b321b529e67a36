"""Eval inputs: the benchmark (ingested into the eval's own workdir), its row weights and
the response sets to compare, matched to the benchmark by id or by prompt."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from guidealign.eval.settings import EvalError

RESPONSE_COLUMNS = ("id", "prompt", "response")


def wait_s(cfg, world_size: int) -> float:
    from guidealign.config import wait_timeout

    return wait_timeout(cfg, world_size)


def ingest_benchmark(cfg, sub: Path, bench_path, rank: int, world_size: int, progress: bool) -> dict:
    from guidealign.ingest.run import ingest, wait_ingested
    from guidealign.ingest.readers import IngestError

    icfg = dataclasses.replace(cfg.ingest, inputs=[])
    if rank == 0:
        try:
            rep = ingest([str(bench_path)], sub, icfg, progress=progress)
        except IngestError as e:
            raise EvalError(f"benchmark {bench_path}: {e}") from e
        return {"rows_in": rep.rows_in, "prompts": rep.rows, "duplicates": rep.duplicates,
                "quarantined": rep.quarantined}
    # rank 0's ingest of this very file and settings, not a finished ingest of an earlier
    # benchmark file under the same name (this rank would answer and plan the old prompts)
    man = wait_ingested(sub / "prompts", [str(bench_path)], icfg, wait_s(cfg, world_size))
    return {"prompts": man.get("rows"), "duplicates": man.get("duplicates"),
            "quarantined": man.get("quarantined")}


def load_benchmark(sub: Path, category_field: str) -> dict[str, dict]:
    """id -> {prompt, category, bench_id} from the ingested prompts."""
    from guidealign.shards import iter_tables

    out = {}
    for t in iter_tables(sub / "prompts", columns=["id", "prompt", "metadata"]):
        for rid, prompt, meta in zip(*(t.column(c).to_pylist() for c in ("id", "prompt", "metadata"))):
            m = json.loads(meta or "{}")
            cat = None
            if category_field:
                v = m.get(category_field)
                cat = "(missing)" if v in (None, "") else str(v)
            out[rid] = {"prompt": prompt, "category": cat, "bench_id": m.get("id")}
    return out


def row_weights(bench_path, icfg, category_field: str = "") -> dict[str, int]:
    """How many rows of the benchmark file share each prompt id (ingest keeps one of them).
    A question repeated under several categories (``category_field``) counts, every copy,
    under the category of the row ingest kept: said in a warning."""
    import logging
    from collections import Counter

    from guidealign.ingest.run import check_prompt, prompt_hash, prompt_of
    from guidealign.ingest.readers import check_readable, expand_inputs, read_rows

    counts: Counter = Counter()
    cats: dict[str, set] = {}
    for path in expand_inputs([str(bench_path)]):
        for _, rec, err in read_rows(path, check_readable(path, icfg.encoding), icfg):
            if err is None and check_prompt(rec, icfg) is None:
                pid = prompt_hash(prompt_of(rec, icfg)).hex()
                counts[pid] += 1
                if category_field and isinstance(rec, dict):
                    v = rec.get(category_field)  # as load_benchmark reads it
                    cats.setdefault(pid, set()).add("(missing)" if v in (None, "") else str(v))
    mixed = sum(len(c) > 1 for c in cats.values())
    if mixed:
        logging.getLogger(__name__).warning(
            "eval: %d question(s) of %s appear under more than one %s; each counts, with all its "
            "copies, under the %s of the row kept (the report's per-%s rows do not match the file's)",
            mixed, bench_path, category_field, category_field, category_field)
    return dict(counts)


def load_responses(path: str | Path, bench: dict[str, dict], cfg, world_size: int) -> tuple[dict, dict]:
    """Responses of one system, keyed by benchmark id. A row is matched by its id (ingest's
    prompt-hash id), else by the hash of its prompt (ingest's id rule), else by its id as the
    benchmark file's own ``id`` (Do-Not-Answer's 1..939, HHH's ``harmless-0``; compared as
    text), so responses produced elsewhere line up, also with a prompt reformatted there.
    Returns (id -> {response, finish_reason, model}, coverage counts)."""
    from guidealign.shards import committed, iter_tables, read_manifest, wait_complete

    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"response directory {path} does not exist")
    if read_manifest(path) is not None:
        try:
            wait_complete(path, timeout=wait_s(cfg, world_size))
        except RuntimeError as e:  # incomplete: its shards are not all committed (yet)
            raise EvalError(f"response directory {path}: {e}") from e
    if not committed(path):
        raise EvalError(f"{path} holds no committed response shards")
    match = matcher(bench)
    out: dict[str, dict] = {}
    cov = {"rows": 0, "unmatched": 0, "duplicates": 0, "errors": 0, "empty": 0}
    for t in iter_tables(path):
        missing = [c for c in RESPONSE_COLUMNS if c not in t.column_names]
        if missing:
            raise EvalError(f"{path}: response shards lack column(s) {missing} "
                            f"(have {t.column_names})")
        cols = {c: t.column(c).to_pylist() for c in t.column_names
                if c in ("id", "prompt", "response", "finish_reason", "model")}
        for i in range(t.num_rows):
            cov["rows"] += 1
            rid = match(cols["id"][i], cols["prompt"][i])
            if rid is None:
                cov["unmatched"] += 1
                continue
            row = {"response": cols["response"][i],
                   "finish_reason": (cols.get("finish_reason") or [None] * t.num_rows)[i],
                   "model": (cols.get("model") or [None] * t.num_rows)[i]}
            if rid in out:
                cov["duplicates"] += 1
                # the first answer for an id is taken, unless it failed and this one did not
                # (a directory joining several runs: a retry's answer after the error row)
                if usable(out[rid]) or not usable(row):
                    continue
            out[rid] = row
    for r in out.values():
        if not usable(r):
            cov["errors"] += 1
        elif not r["response"].strip():
            cov["empty"] += 1
    cov["matched"] = len(out)
    cov["missing"] = len(bench) - len(out)
    return out, cov


def matcher(bench: dict[str, dict]):
    """(row id, prompt) -> the benchmark question's key, or None: the row's id when it is one
    (ingest's prompt-hash id), else the hash of its prompt (ingest's id rule), else its id as
    the benchmark file's own ``id`` (compared as text; an id that two kept questions share
    matches neither)."""
    from guidealign.core.ids import prompt_hash

    own: dict[str, str | None] = {}
    for k, b in bench.items():
        if b.get("bench_id") is not None:
            bid = str(b["bench_id"])
            own[bid] = None if bid in own else k

    def match(rid, prompt) -> str | None:
        if isinstance(rid, str) and rid in bench:
            return rid
        if prompt is not None and (h := prompt_hash(prompt).hex()) in bench:
            return h
        return own.get(str(rid)) if rid is not None else None
    return match


def usable(r: dict | None) -> bool:
    return r is not None and r["finish_reason"] != "error" and r["response"] is not None

