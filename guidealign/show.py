"""``guidealign show``: a few examples of prompt -> risk verdict -> guidelines -> response.

Reads one shard of each stage (shard i of every per-prompt stage holds the same prompts, when
they read the same prompt set), so it costs the same on a run of any size. Responses to
another set than detect's (``inputs_sft``: the paper's fine-tuning prompts) show no verdict.
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
    if i not in done:
        shown = ", ".join(map(str, done[:10])) + (" ..." if len(done) > 10 else "")
        raise RuntimeError(f"{w / stage}: shard {i} is not committed (committed: {shown})")
    resp = read_table(w / stage, i).to_pylist()
    det = _by_id(w / "detect", i, ["risky", "rationale"])
    out = []
    for r in resp[:n]:
        d = det.get(r["id"])
        out.append({"id": r["id"], "prompt": r["prompt"], "detected": d is not None,
                    "risky": (d or {}).get("risky"), "rationale": (d or {}).get("rationale"),
                    "guidelines": r.get("guideline_texts") or [],
                    "response": r.get("response"), "finish_reason": r.get("finish_reason")})
    return out


def render(rows: list[dict], width: int = 100, max_chars: int = 600) -> str:
    def clip(s):
        s = (s or "").strip().replace("\n", " ")
        return s if len(s) <= max_chars else s[:max_chars] + " [...]"

    parts = []
    for r in rows:
        if r.get("detected", True):
            verdict = {True: "risky", False: "not risky", None: "unparsed"}[r["risky"]]
            det = f"- detect: {verdict}. {clip(r['rationale'])[:300]}"
        else:  # responses for another prompt set than detect's (inputs_sft), or detect not run
            det = "- detect: not run on this prompt (detect/ does not hold it)"
        lines = [f"### {r['prompt']}", det,
                 "- retrieved guidelines:"]
        lines += [f"  {k}. {g}" for k, g in enumerate(r["guidelines"], 1)] or ["  (none)"]
        lines.append(f"- response ({r['finish_reason']}):")
        lines += ["  " + ln for ln in textwrap.wrap(clip(r["response"]), width)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
