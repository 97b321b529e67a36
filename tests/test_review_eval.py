"""Review of guidealign/eval: defects reproduced on pure functions (no engine, no network)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from guidealign.eval.verdicts import parse_pairwise


# --- 1. a verdict line naming both assistants as equal is a tie, never Assistant A ---------

@pytest.mark.parametrize("text,want", [
    ("Verdict: A and B are equally good.", "tie"),
    ("Final verdict: Assistant A and Assistant B are equally good", "tie"),
    ("Verdict: A and B are tied", "tie"),
    ("Verdict: a and b are equal", "tie"),
    ("Reasoning.\nVerdict: A and B are about equally helpful.", "tie"),
    # no claim of equality: not a verdict for A either
    ("Verdict: A and B", None),
    ("Verdict: A = B", None),
    ("Verdict: A & B", None),
    # single labels still parse as before
    ("Verdict: A", "A"),
    ("Verdict: A, because B is vague and short.", "A"),
    ("Verdict: B is better than A", "B"),
    ("Verdict: A tie", "tie"),
])
def test_verdict_line_with_both_assistants_is_not_read_as_a(text, want):
    assert parse_pairwise(text)[0] == want


def test_equal_verdicts_do_not_turn_a_win_and_tie_into_a_win_and_loss():
    """Guided wins in one order and the judge calls the other order equal: net +0.5, not 0."""
    from guidealign.eval.aggregate import aggregate_pairwise
    from guidealign.eval.judges import outcome_for_guided

    outs = {"guided_first": "Verdict: A", "unguided_first": "Verdict: A and B are equally good."}
    rows = [{"id": "q", "category": None, "order": o, "verdict": parse_pairwise(t)[0],
             "outcome": outcome_for_guided(o, parse_pairwise(t)[0])} for o, t in outs.items()]
    o = aggregate_pairwise(rows)["overall"]
    assert (o["win"], o["tie"], o["lose"]) == (0.5, 0.5, 0.0)
    assert o["net_win_rate"] == pytest.approx(0.5)


# --- 2. the judge fingerprint follows the chat template the judge actually renders with -----

def test_judge_fingerprint_follows_the_responders_template_when_the_judge_reuses_its_engine():
    """judge_model == the responder's model and eval.judge_chat_template unset: the judge runs on
    the responder's engine, i.e. with engine.chat_template (Vicuna v1.5 / Llama-2 base need one).
    Changing that template changes every judge prompt, so it must re-judge."""
    from guidealign.config import load_config
    from guidealign.eval.generate import judge_is_responder
    from guidealign.eval.judging import judge_fp

    def cfg(tpl):
        over = ["engine.model=lmsys/vicuna-13b-v1.5", "eval.judge_model=lmsys/vicuna-13b-v1.5",
                "eval.harm_judge=llm"]
        return load_config(None, over + ([f"engine.chat_template={tpl}"] if tpl else []))

    vicuna, llama = cfg("vicuna_v1.1"), cfg("llama-2")
    assert judge_is_responder(vicuna) and judge_is_responder(llama)
    for kind in ("pairwise", "harm"):
        assert judge_fp(vicuna, kind) != judge_fp(llama, kind), kind
        # a judge with its own configured template is unaffected by the responder's
        own_v = load_config(None, ["engine.model=lmsys/vicuna-13b-v1.5", "eval.judge_model=other/judge",
                                   "eval.judge_chat_template=chatml", "eval.harm_judge=llm",
                                   "engine.chat_template=vicuna_v1.1"])
        own_l = load_config(None, ["engine.model=lmsys/vicuna-13b-v1.5", "eval.judge_model=other/judge",
                                   "eval.judge_chat_template=chatml", "eval.harm_judge=llm",
                                   "engine.chat_template=llama-2"])
        assert judge_fp(own_v, kind) == judge_fp(own_l, kind), kind


def test_editing_a_judge_template_file_re_judges(tmp_path):
    """eval.judge_chat_template as a .jinja path: the fingerprint held the path, so an edited
    template (every judge prompt rendered anew) kept the judgments made with the old one."""
    from guidealign.config import load_config
    from guidealign.eval.judging import judge_fp

    tpl = tmp_path / "judge.jinja"
    tpl.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    cfg = load_config(None, ["eval.judge_model=other/judge", f"eval.judge_chat_template={tpl}",
                             "eval.harm_judge=llm"])
    before = {k: judge_fp(cfg, k) for k in ("pairwise", "harm")}
    tpl.write_text("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}")
    assert all(judge_fp(cfg, k) != before[k] for k in before)
    tpl.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert {k: judge_fp(cfg, k) for k in before} == before


# --- 3. risk identification reads the kinds of the library it is told to -------------------

def _ids_shard(d: Path, gids: list[str]):
    from guidealign.shards import write_manifest, write_shard

    write_manifest(d, stage="t", num_shards=1, fingerprint="t")
    write_shard(d, 0, pa.table({"id": ["q1"], "prompt": ["p"], "guideline_ids": [gids]}), "t")


def test_risk_identification_ignores_a_library_link_left_for_another_run(tmp_path, monkeypatch):
    """An earlier eval (retrieve_from = old run) left sub/library -> old/library. A later eval
    with precomputed guided responses (their guideline_ids) and retrieve_from = new run must
    take the kinds from the new run's library, not the stale link."""
    import guidealign.eval.risk_id as rid

    old, new = tmp_path / "old", tmp_path / "new"
    for run in (old, new):
        (run / "library").mkdir(parents=True)
    sub = tmp_path / "wd" / "eval" / "do-not-answer"
    sub.mkdir(parents=True)
    (sub / "library").symlink_to(old / "library", target_is_directory=True)
    guided = tmp_path / "guided"
    _ids_shard(guided, ["g1"])
    kinds = {(old / "library").resolve(): {"g1": "quality"}, (new / "library").resolve(): {"g1": "safety"}}
    monkeypatch.setattr(rid, "library_kinds", lambda wd: kinds.get((Path(wd) / "library").resolve()))
    cfg = SimpleNamespace(eval=SimpleNamespace(guided_responses=str(guided), retrieve_from=str(new),
                                               risk_identification="on", risk_top_k=3))
    r = rid.run_risk_identification(cfg, "do-not-answer", tmp_path / "wd", sub, guided,
                                    {"q1": {"category": "c"}}, {})
    assert r["overall"]["hits"] == 1 and r["unknown_guideline_ids"] == 0


def test_a_second_rank_waits_for_the_ingest_of_this_benchmark_file_not_an_earlier_one(tmp_path):
    """A rank other than 0 waited for any complete ingest under eval's folder: after the
    benchmark file was rewritten, it took the earlier file's prompts at once, answered and
    planned those, and rank 0's plan never matched. It now waits for the manifest of this very
    file and settings."""
    import json
    import os

    import pytest

    from guidealign.config import load_config
    from guidealign.eval.inputs import ingest_benchmark, load_benchmark

    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"Old question {i}?"}) + "\n" for i in range(3)))
    sub = tmp_path / "sub"
    cfg = load_config(None, ["executor.wait_timeout_s=0.3"])
    ingest_benchmark(cfg, sub, bench, rank=0, world_size=2, progress=False)
    assert ingest_benchmark(cfg, sub, bench, rank=1, world_size=2, progress=False)["prompts"] == 3
    bench.write_text("".join(json.dumps({"prompt": f"New question {i}?"}) + "\n" for i in range(3)))
    os.utime(bench, (1, 1))  # another file to ingest (ingest tells files by size and mtime in seconds)
    with pytest.raises(RuntimeError, match="incomplete"):
        ingest_benchmark(cfg, sub, bench, rank=1, world_size=2, progress=False)
    ingest_benchmark(cfg, sub, bench, rank=0, world_size=2, progress=False)
    ingest_benchmark(cfg, sub, bench, rank=1, world_size=2, progress=False)
    assert sorted(r["prompt"] for r in load_benchmark(sub, "category").values())[0].startswith("New")


def test_eval_without_the_runs_retrieval_names_the_run_and_the_ways_out(tmp_path):
    """With no index in the run, eval said `RUN/eval/<name>/index is not complete`: its own
    link, which no stage builds. It now names the run's missing artifacts and what to do."""
    from click.testing import CliRunner

    from guidealign.cli import cli

    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"prompt": "How do I bake bread?"}\n{"prompt": "Name a colour."}\n')
    run = tmp_path / "run1"
    run.mkdir()
    r = CliRunner().invoke(cli, ["eval", str(bench), "-w", str(run), "--no-progress"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"{run}'s library, index, retriever" in r.output and "not built there" in r.output
    assert "eval.retrieve_from" in r.output and "--guided-responses" in r.output
