"""``guidealign show``: a few examples of prompt -> risk verdict -> guidelines -> response.

Reads one shard of each stage (shard i of every per-prompt stage holds the same prompts),
so it costs the same on a run of any size.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from guidealign.shards import committed, read_table


def _by_id(dataset: Path, index: int, columns: list[str]) -> dict:
    if index not in committed(dataset):
        return {}
    t = read_table(dataset, index)
    cols = [c for c in columns if c in t.schema.names]
    return {r["id"]: r for r in t.select(["id", *cols]).to_pylist()}


def examples(workdir: str | Path, n: int = 3, shard: int | None = None,
             stage: str = "respond") -> list[dict]:
    w = Path(workdir)
    done = committed(w / stage)
    if not done:
        raise RuntimeError(f"{w / stage} has no committed shard yet")
    i = done[0] if shard is None else shard
    resp = read_table(w / stage, i).to_pylist()
    det = _by_id(w / "detect", i, ["risky", "rationale"])
    out = []
    for r in resp[:n]:
        d = det.get(r["id"], {})
        out.append({"id": r["id"], "prompt": r["prompt"], "risky": d.get("risky"),
                    "rationale": d.get("rationale"), "guidelines": r.get("guideline_texts") or [],
                    "response": r.get("response"), "finish_reason": r.get("finish_reason")})
    return out


def render(rows: list[dict], width: int = 100, max_chars: int = 600) -> str:
    def clip(s):
        s = (s or "").strip().replace("\n", " ")
        return s if len(s) <= max_chars else s[:max_chars] + " [...]"

    parts = []
    for r in rows:
        verdict = {True: "risky", False: "not risky", None: "unparsed"}[r["risky"]]
        lines = [f"### {r['prompt']}", f"- detect: {verdict}. {clip(r['rationale'])[:300]}",
                 "- retrieved guidelines:"]
        lines += [f"  {k}. {g}" for k, g in enumerate(r["guidelines"], 1)] or ["  (none)"]
        lines.append(f"- response ({r['finish_reason']}):")
        lines += ["  " + ln for ln in textwrap.wrap(clip(r["response"]), width)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
