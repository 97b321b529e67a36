"""Review s49 of guidealign/eval: the judge's own chat template (fingerprint, early check), the
run marker of judges that did not run, matching precomputed responses by the benchmark's own
id, verdict lines that find their label wanting, and `check` refusing what eval refuses.
No engine: scripted judges and a stand-in classifier."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def _tokenizer_copy(dst: Path, template: bool = True) -> Path:
    """The embedded SmolLM2's tokenizer files (no weights) in ``dst``; without a chat template
    when ``template`` is false (a base model's tokenizer)."""
    from guidealign.core.models import prepare_generator

    src = prepare_generator()
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja"):
            shutil.copy(f, dst / f.name)
    if not template:
        (dst / "chat_template.jinja").unlink(missing_ok=True)
        (dst / "chat_template.json").unlink(missing_ok=True)
        tc = json.loads((dst / "tokenizer_config.json").read_text())
        tc.pop("chat_template", None)
        (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    return dst


def _edit_own_template(d: Path) -> None:
    p = d / "chat_template.jinja"
    assert p.is_file()  # the copy keeps its template there
    p.write_text(p.read_text().replace("<|im_start|>system", "<|im_start|>system\nBe strict."))


def _write_bench(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _responses(d: Path, ids, prompts, texts, finish="stop") -> Path:
    from guidealign.shards import write_manifest, write_shard

    write_manifest(d, stage="respond", num_shards=1, fingerprint="t")
    write_shard(d, 0, pa.table({"id": pa.array(ids, pa.string()), "prompt": prompts,
                                "response": texts, "finish_reason": [finish] * len(texts)}), "t")
    return d


class _Out:
    def __init__(self, text):
        self.outputs = [SimpleNamespace(text=text, finish_reason="stop", token_ids=[0])]
        self.prompt_token_ids = [0]


class _Judge:
    """A scripted judge engine: the real SmolLM2 tokenizer, always ``Verdict: A``."""

    def __init__(self):
        from transformers import AutoTokenizer

        from guidealign.core.models import prepare_generator

        self.tok, self.asked = AutoTokenizer.from_pretrained(str(prepare_generator())), 0

    def get_tokenizer(self):
        return self.tok

    def generate(self, prompts, params, use_tqdm=False):
        self.asked += len(prompts)
        return [_Out("Verdict: A") for _ in prompts]


# --- 1. the judge model's own chat template counts in the judge's fingerprint ---------------

@pytest.mark.parametrize("reuses_responder", [False, True])
def test_editing_the_judge_models_own_template_re_judges(tmp_path, reuses_responder):
    """eval.judge_chat_template unset: the judge renders with its model's own template, so a
    changed one (an edited or replaced tokenizer template) must change the fingerprint, also
    when the judge reuses the responder's engine (the responder's model)."""
    from guidealign.config import Config
    from guidealign.eval.generate import judge_is_responder
    from guidealign.eval.judging import judge_fp

    m = _tokenizer_copy(tmp_path / "judge")
    cfg = Config()
    cfg.eval.judge_model = str(m)
    if reuses_responder:
        cfg.engine.model = str(m)
    assert judge_is_responder(cfg) is reuses_responder
    before = [judge_fp(cfg, k) for k in ("pairwise", "harm")]
    assert [judge_fp(cfg, k) for k in ("pairwise", "harm")] == before  # stable while unchanged
    _edit_own_template(m)
    after = [judge_fp(cfg, k) for k in ("pairwise", "harm")]
    assert after[0] != before[0] and after[1] != before[1]


def test_a_configured_judge_template_ignores_the_models_own(tmp_path):
    from guidealign.config import Config
    from guidealign.eval.judging import judge_fp

    m = _tokenizer_copy(tmp_path / "judge")
    cfg = Config()
    cfg.eval.judge_model, cfg.eval.judge_chat_template = str(m), "chatml"
    before = judge_fp(cfg, "pairwise")
    _edit_own_template(m)
    assert judge_fp(cfg, "pairwise") == before


# --- 2. a judge without a chat template fails before anything is answered -------------------

def test_a_judge_without_a_chat_template_fails_before_answering(tmp_path, monkeypatch):
    import guidealign.gen.engine as engine
    from guidealign.config import Config
    from guidealign.eval.run import run_eval
    from guidealign.eval.settings import EvalError

    def no_engine(*a, **k):
        raise AssertionError("no engine may be built before the judge's template is checked")

    monkeypatch.setattr(engine, "build_llm", no_engine)
    bare = _tokenizer_copy(tmp_path / "base-judge", template=False)
    bench = _write_bench(tmp_path / "hhh.jsonl", [{"id": 1, "prompt": "Q?", "subset": "a"}])
    cfg = Config()
    cfg.eval.judge_model = str(bare)
    cfg.eval.guided_responses = str(_responses(tmp_path / "g", [None], ["Q?"], ["x"]))
    cfg.eval.unguided_responses = str(_responses(tmp_path / "u", [None], ["Q?"], ["y"]))
    with pytest.raises(EvalError, match="eval.judge_chat_template"):
        run_eval(cfg, tmp_path / "wd", benchmark_file=bench, progress=False)
    assert not (tmp_path / "wd" / "eval" / "hhh" / "prompts").exists()  # nothing ingested or answered
    # a configured template makes it judge; a configured one that does not read fails as early
    from guidealign.eval.judging import check_judge_template

    cfg.eval.judge_chat_template = "chatml"
    check_judge_template(cfg)
    cfg.eval.judge_chat_template = str(tmp_path / "missing.jinja")
    with pytest.raises(EvalError, match="eval.judge_chat_template"):
        run_eval(cfg, tmp_path / "wd", benchmark_file=bench, progress=False)


# --- 3. the run marker counts the judges that ran only ---------------------------------------

class _FakeClassifier:
    """Stands in for the harm classifier: a refusal is harmless."""

    def __init__(self, ecfg):
        pass

    def judge(self, items):
        from guidealign.eval.judges import HARM_COLUMNS

        cols = {k: [] for k in HARM_COLUMNS}
        for it in items:
            verdict = "harmless" if "cannot" in it.response else "harmful"
            for k, v in (("id", it.id), ("category", it.category), ("prompt", it.prompt),
                         ("condition", it.condition), ("response", it.response), ("judge", "classifier"),
                         ("judge_prompt", it.response), ("raw", verdict), ("finish_reason", "stop"),
                         ("verdict", verdict), ("rule", "classifier"), ("score", 1.0)):
                cols[k].append(v)
        return cols


def test_a_classifier_only_eval_ignores_an_unused_judge_template(tmp_path, monkeypatch):
    """No LLM judge runs, so an unreadable eval.judge_chat_template must not fail the run at
    its end (the run marker fingerprinted every judge), first run or rerun."""
    import guidealign.eval.classifier as classifier
    from guidealign.config import Config
    from guidealign.eval.run import run_eval

    monkeypatch.setattr(classifier, "HarmClassifier", _FakeClassifier)
    rows = [{"id": i, "prompt": f"Question {i}?", "risk_area": "x"} for i in range(3)]
    bench = _write_bench(tmp_path / "do_not_answer.jsonl", rows)
    prompts = [r["prompt"] for r in rows]
    cfg = Config()
    for k, v in dict(harm_judge="classifier", judge_chat_template=str(tmp_path / "nowhere.jinja"),
                     risk_identification="off",
                     guided_responses=str(_responses(tmp_path / "g", [None] * 3, prompts, ["I cannot."] * 3)),
                     unguided_responses=str(_responses(tmp_path / "u", [None] * 3, prompts, ["Sure."] * 3))
                     ).items():
        setattr(cfg.eval, k, v)
    wd = tmp_path / "wd"
    for _ in range(2):
        rep = run_eval(cfg, wd, benchmark_file=bench, progress=False)
        assert rep.harm["guided"]["overall"]["pct_harmless"] == 100.0
        assert (wd / "eval" / "do-not-answer" / "_done.json").is_file()


# --- 4. precomputed responses match by the benchmark's own id; nothing matched is an error ---

def test_precomputed_responses_match_by_the_benchmarks_own_id(tmp_path):
    """Responses made elsewhere carry the benchmark's ids (Do-Not-Answer's numbers, HHH's
    'harmless-0') and a prompt as that responder formatted it: they match by the id."""
    from guidealign.config import Config
    from guidealign.eval.inputs import ingest_benchmark, load_benchmark, load_responses

    rows = [{"id": 1, "prompt": "One?", "c": "x"}, {"id": 2, "prompt": "Two?", "c": "x"},
            {"id": "harmless-0", "prompt": "Three?", "c": "y"},
            # two questions sharing an id: that id matches neither
            {"id": 7, "prompt": "Four?", "c": "y"}, {"id": 7, "prompt": "Five?", "c": "y"}]
    cfg = Config()
    sub = tmp_path / "sub"
    ingest_benchmark(cfg, sub, _write_bench(tmp_path / "b.jsonl", rows), 0, 1, False)
    bench = load_benchmark(sub, "c")
    key = {b["prompt"]: k for k, b in bench.items()}
    d = _responses(tmp_path / "r", ["1", "2", "harmless-0", "7"],
                   [f"USER: {p} ASSISTANT:" for p in ("One?", "Two?", "Three?", "Four?")],
                   ["a1", "a2", "a3", "a4"])
    got, cov = load_responses(d, bench, cfg, 1)
    assert {k: r["response"] for k, r in got.items()} == \
        {key["One?"]: "a1", key["Two?"]: "a2", key["Three?"]: "a3"}
    assert (cov["matched"], cov["unmatched"]) == (3, 1)


def _hhh(tmp_path, n=3):
    rows = [{"id": i, "prompt": f"Question {i}?", "subset": "a"} for i in range(n)]
    return rows, _write_bench(tmp_path / "hhh.jsonl", rows)


def test_responses_that_match_no_question_are_an_error(tmp_path):
    from guidealign.config import Config
    from guidealign.eval.run import run_eval
    from guidealign.eval.settings import EvalError

    rows, bench = _hhh(tmp_path)
    prompts = [r["prompt"] for r in rows]
    cfg = Config()
    cfg.eval.guided_responses = str(_responses(tmp_path / "g", [None] * 3, prompts, ["x"] * 3))
    cfg.eval.unguided_responses = str(_responses(tmp_path / "u", ["q9", "q8", "q7"],
                                                 ["Other?", "Else?", "More?"], ["y"] * 3))
    judge = _Judge()
    with pytest.raises(EvalError, match="unguided responses .* none of their 3 row"):
        run_eval(cfg, tmp_path / "wd", benchmark_file=bench, judge_llm=judge, progress=False)
    assert judge.asked == 0


def test_nothing_to_judge_is_an_error(tmp_path):
    """Every response failed (or the benchmark is empty): no report of 'win 0 tie 0 lose 0'."""
    from guidealign.config import Config
    from guidealign.eval.run import run_eval
    from guidealign.eval.settings import EvalError

    rows, bench = _hhh(tmp_path)
    prompts = [r["prompt"] for r in rows]
    cfg = Config()
    cfg.eval.guided_responses = str(_responses(tmp_path / "g", [None] * 3, prompts, ["x"] * 3))
    cfg.eval.unguided_responses = str(_responses(tmp_path / "u", [None] * 3, prompts, ["y"] * 3,
                                                 finish="error"))
    with pytest.raises(EvalError, match="nothing to judge"):
        run_eval(cfg, tmp_path / "wd", benchmark_file=bench, judge_llm=_Judge(), progress=False)
    (tmp_path / "e").mkdir()
    empty = _write_bench(tmp_path / "e" / "hhh.jsonl", [])
    with pytest.raises(EvalError, match="holds no question"):
        run_eval(cfg, tmp_path / "wd2", benchmark_file=empty, judge_llm=_Judge(), progress=False)


# --- 5. a verdict line that finds its label wanting is no verdict for it ---------------------

@pytest.mark.parametrize("text,want", [
    ("Verdict: A < B", None),
    ("Verdict: A <= B", None),
    ("Verdict: Assistant A provides less detail, so B", None),
    ("Verdict: A fails to answer", None),
    ("Verdict: A's answer lacks depth", None),
    ("Verdict: A falls short", None),
    ("Verdict: A doesn't answer the question", None),
    # a shortcoming of the other answer, after a reason or the other label, keeps the verdict
    ("Verdict: A because B lacks detail", "A"),
    ("Verdict: A, as B misses the point", "A"),
    ("Verdict: Assistant B, since Assistant A fails to answer", "B"),
    ("Verdict: B is better; A lacks detail", "B"),
    ("Verdict: A (B fails to answer)", "A"),
    ("Final verdict: [[A]] - less verbose", "A"),
    ("Verdict: A > B", "A"),
    ("Verdict: A is better than B", "A"),
    # the reason on the next line is not the label's own clause; a negation before a
    # shortcoming is praise; "<" only as a comparison with the other label
    ("Verdict: A\nThe other response fails to address the question.", "A"),
    ("Verdict: A\nThe second one does not answer at all.", "A"),
    ("Verdict: A never fails to answer", "A"),
    ("Verdict: A hallucinates less", "A"),
    ("Verdict: A hallucinates less than B", "A"),
    ("Verdict: A cannot be beaten", "A"),
    ("Verdict: A</s>", "A"),
    ("Verdict: A<br>B is vague.", "A"),
    ("Verdict: A ≤ B", None),
])
def test_a_verdict_line_that_finds_its_label_wanting_is_not_that_label(text, want):
    from guidealign.eval.verdicts import parse_pairwise

    assert parse_pairwise(text)[0] == want


# --- 6. check refuses what eval refuses ------------------------------------------------------

@pytest.mark.parametrize("over,why", [
    (["eval.benchmark=dna"], "unknown eval.benchmark 'dna'"),
    (["eval.judges=[harm]"], "unknown judge"),
    (["eval.benchmark=dna", "eval.judges=[harm]"], "unknown judge"),
    (["eval.pairwise_template=Which is better?"], "eval.pairwise_template"),
])
def test_check_fails_eval_settings_that_eval_refuses(tmp_path, over, why):
    from guidealign.check import failures, run_checks
    from guidealign.config import load_config
    from guidealign.eval.settings import EvalError, check_config, resolve_settings

    cfg = load_config(None, over)
    with pytest.raises(EvalError):  # what eval says at once
        check_config(cfg.eval)
        resolve_settings(cfg.eval, tmp_path / "bench.jsonl")
    bad = failures(run_checks(cfg, str(tmp_path), gpus=[], stages=["eval"]))
    assert [(r.check, r.item) for r in bad] == [("settings", "eval")] and why in bad[0].detail


def test_check_runs_the_eval_settings_row_for_eval_only(tmp_path):
    from guidealign.check import FAIL, OK, run_checks
    from guidealign.config import load_config

    assert [r.status for r in run_checks(load_config(None, []), str(tmp_path), gpus=[], stages=["eval"])
            if (r.check, r.item) == ("settings", "eval")] == [OK]
    bad = load_config(None, ["eval.benchmark=dna"])
    assert [r.status for r in run_checks(bad, str(tmp_path), gpus=[], stages=["eval"])
            if (r.check, r.item) == ("settings", "eval")] == [FAIL]
    assert not [r for r in run_checks(bad, str(tmp_path), gpus=[], stages=["inputs"])
                if (r.check, r.item) == ("settings", "eval")]


# --- 7. the docs count HHH's questions as the file holds them --------------------------------

def test_hhh_counts_in_the_docs_match_the_file():
    if not (BENCH / "hhh.jsonl").is_file():
        pytest.skip("../shared/benchmarks is absent")
    rows = [json.loads(x) for x in (BENCH / "hhh.jsonl").read_text().splitlines() if x.strip()]
    distinct = len({r["prompt"] for r in rows})
    assert (len(rows), distinct) == (103, 102)
    readme = (Path(__file__).resolve().parents[1] / "guidealign" / "eval" / "README.md").read_text()
    assert "asked once (103)" not in readme and "102 distinct questions" in readme
