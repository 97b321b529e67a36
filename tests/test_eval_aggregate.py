"""Review fixes of eval aggregation, judgment plans and risk identification (pure functions,
made-up rows; no engine)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from guidealign.eval.aggregate import aggregate_harm, aggregate_pairwise


def _pair(qid, cat, o1, o2):
    return [{"id": qid, "category": cat, "order": "guided_first", "outcome": o1, "verdict": None},
            {"id": qid, "category": cat, "order": "unguided_first", "outcome": o2, "verdict": None}]


def test_questions_without_a_category_stay_in_the_category_table():
    rows = _pair("a", "x", "win", "win") + _pair("b", None, "lose", "lose") + _pair("c", "", "tie", "win")
    res = aggregate_pairwise(rows)
    cats = res["by_category"]
    assert set(cats) == {"x", "(missing)"}
    assert sum(c["n"] for c in cats.values()) == res["overall"]["n"] == 3
    for k in ("win", "tie", "lose", "unparsed"):
        assert sum(c[k] for c in cats.values()) == pytest.approx(res["overall"][k])
    assert cats["(missing)"]["net_win_rate"] == pytest.approx((0.5 - 1) / 2)
    # no category anywhere: no table, as before
    assert aggregate_pairwise(_pair("a", None, "win", "win"))["by_category"] == {}

    h = aggregate_harm([{"condition": "g", "category": "x", "verdict": "harmless"},
                        {"condition": "g", "category": None, "verdict": "harmful"},
                        {"condition": "u", "category": "", "verdict": "harmful"}])
    assert {k: v["n"] for k, v in h["g"]["by_category"].items()} == {"(missing)": 1, "x": 1}
    assert h["g"]["by_category"]["(missing)"]["pct_harmless"] == 0.0
    assert {k: v["n"] for k, v in h["u"]["by_category"].items()} == {"(missing)": 1}


def _resp(ok):
    return {"response": "r", "finish_reason": "stop" if ok else "error", "model": None}


def test_an_item_that_comes_or_goes_rejudges_its_own_shard_only():
    from guidealign.config import Config
    from guidealign.eval.judging import judge_plans

    cfg = Config()
    cfg.eval.shard_rows = 2
    bench = {f"q{i:02d}": {"prompt": f"p{i}", "category": None} for i in range(10)}

    def plans(failed):
        resp = {c: {i: _resp(not (c == "guided" and i == failed)) for i in bench}
                for c in ("guided", "unguided")}
        return judge_plans(cfg, ["harmfulness", "pairwise"], bench, resp, engines=None)

    before, after = plans("q01"), plans(None)  # q01's guided answer failed, then was fixed
    for kind, want in (("pairwise", [0]), ("harm", [1])):
        b, a = before[kind], after[kind]
        assert len(b.chunks) == len(a.chunks)
        assert [i for i, (x, y) in enumerate(zip(b.shard_fps, a.shard_fps)) if x != y] == want, kind
    # every item in exactly one shard, in key order, none lost
    assert [it.id for c in before["pairwise"].chunks for it in c] == sorted(set(bench) - {"q01"})
    assert sum(len(c) for c in after["harm"].chunks) == 20
    assert all(len(c) <= 2 for p in after.values() for c in p.chunks)


def _ids_shard(d: Path, gids: list[str]):
    from guidealign.shards import write_manifest, write_shard

    write_manifest(d, stage="t", num_shards=1, fingerprint="t")
    write_shard(d, 0, pa.table({"id": ["q1"], "prompt": ["p"], "guideline_ids": [gids]}), "t")


def test_risk_identification_reads_the_precomputed_guided_responses_ids(tmp_path):
    from guidealign.eval.risk_id import guided_retrieval

    sub = tmp_path / "wd" / "eval" / "do-not-answer"
    _ids_shard(sub / "retrieve", ["left-by-an-earlier-run"])
    guided = tmp_path / "guided"
    _ids_shard(guided, ["s1"])
    bench = {"q1": {"category": "c"}}
    cfg = SimpleNamespace(eval=SimpleNamespace(guided_responses=str(guided), retrieve_from=""))
    assert guided_retrieval(cfg, tmp_path / "wd", sub, guided, bench) == {"q1": ["s1"]}
    # precomputed without ids and no index to retrieve with: none, not the stale retrieve/
    plain = tmp_path / "plain"
    from guidealign.shards import write_manifest, write_shard

    write_manifest(plain, stage="t", num_shards=1, fingerprint="t")
    write_shard(plain, 0, pa.table({"id": ["q1"], "prompt": ["p"], "response": ["r"]}), "t")
    cfg.eval.guided_responses = str(plain)
    assert guided_retrieval(cfg, tmp_path / "wd", sub, plain, bench) is None
    # answered by eval itself: its own retrieve/
    cfg.eval.guided_responses = ""
    assert guided_retrieval(cfg, tmp_path / "wd", sub, guided, bench) == {"q1": ["left-by-an-earlier-run"]}


def test_unparsed_verdicts_are_left_out_of_the_total_by_default_as_in_the_paper():
    from guidealign.config import Config
    from guidealign.eval.aggregate import aggregate_pairwise

    # the paper's judging script counts guided wins, unguided wins and ties; a verdict it
    # cannot read is counted nowhere
    rows = [{"id": q, "category": None, "order": order, "outcome": o}
            for q, o1, o2 in (("a", "win", "win"), ("b", "lose", "tie"), ("c", "unparsed", "unparsed"))
            for order, o in (("guided_first", o1), ("unguided_first", o2))]
    assert Config().eval.unparsed == "exclude"
    o = aggregate_pairwise(rows, unparsed=Config().eval.unparsed)["overall"]
    assert (o["win"], o["tie"], o["lose"], o["unparsed"]) == (1.0, 0.5, 0.5, 1.0)
    assert o["net_win_rate"] == pytest.approx((1.0 - 0.5) / 2.0)


def test_the_harm_classifier_loads_after_the_responder_engine_is_stopped(monkeypatch):
    """The classifier judge (a longformer on the GPU) loaded beside the responder engine, which
    holds gpu_memory_utilization of the GPU: an out-of-memory on 40/48 GB GPUs. The responder
    built for the evaluation is stopped first (the LLM judge rebuilds one if it needs it)."""
    from guidealign.config import Config
    from guidealign.eval import classifier, generate
    from guidealign.eval.judging import judge_plans

    closed = []
    monkeypatch.setattr("guidealign.gen.engine.close_llm", lambda llm: closed.append(llm))
    engines = generate.Engines(Config())
    engines.llm, engines._built = "responder-engine", ["llm"]

    class Classifier:  # records what was still running when it loaded
        def __init__(self, ecfg):
            self.engine_up = engines.llm is not None

        def judge(self, chunk):
            return {"verdict": ["harmless"] * len(chunk), "engine_up": [self.engine_up] * len(chunk)}

    monkeypatch.setattr(classifier, "HarmClassifier", Classifier)
    cfg = Config()
    cfg.eval.harm_judge = "classifier"
    bench = {"q0": {"prompt": "p0", "category": None}}
    resp = {c: {"q0": _resp(True)} for c in ("guided", "unguided")}
    plan = judge_plans(cfg, ["harmfulness"], bench, resp, engines)["harm"]
    out = plan.judge(plan.chunks[0])
    assert out["engine_up"] == [False, False] and closed == ["responder-engine"]
    assert engines.llm is None and engines._built == []
