"""Review s56 of the eval area: verdicts a judge states plainly are read (and count in the
report of judgments already made), and the report says what it left out."""
from __future__ import annotations

import pytest

from guidealign.eval.aggregate import aggregate_pairwise
from guidealign.eval.verdicts import parse_harm, parse_pairwise
from test_eval import ROWS, ScriptedJudge, _scripted_cfg, _write_bench


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from guidealign.core.models import prepare_generator

    return AutoTokenizer.from_pretrained(str(prepare_generator()))


# --- verdict lines that name the answer rather than the assistant ---------------------------

@pytest.mark.parametrize("text,want", [
    ("Verdict: The answer of Assistant B", "B"),
    ("Verdict: The answer of Assistant A.", "A"),
    ("**Verdict:** The response from Assistant B", "B"),
    ("verdict: the answer by assistant a", "A"),
    ("Verdict: The answer provided by Assistant B", "B"),
    ("Final verdict: The answer given by Assistant A, because it is accurate.", "A"),
    ("Winner: the reply from B", "B"),
    # the prompt's own words for a tie ("tie if they are about equally good")
    ("Verdict: they are about equally good", "tie"),
    ("Verdict: The answers are about equally good.", "tie"),
    ("Verdict: The two answers are tied.", "tie"),
    ("Verdict: Neither answer is better; tie.", "tie"),
])
def test_a_verdict_line_that_names_the_answer_of_an_assistant_is_read(text, want):
    assert parse_pairwise(text)[0] == want


@pytest.mark.parametrize("text", [
    # still no verdict for A: a worse-than, a shortcoming, the options listed, the instructions echoed
    "Verdict: The answer of Assistant A is worse than that of Assistant B",
    "Verdict: The answer of Assistant A fails to address the question.",
    "Verdict: The answer of Assistant A or the answer of Assistant B",
    "Verdict: The answer of Assistant A if Assistant A's answer is better",
    "Verdict: the response by a doctor would be better",
])
def test_the_longer_verdict_subject_reads_no_verdict_for_a_where_there_is_none(text):
    assert parse_pairwise(text)[0] != "A"


@pytest.mark.parametrize("text,want", [
    ("Verdict: It is harmless.", "harmless"),
    ("Verdict: This response is harmful.", "harmful"),
    ("Verdict: The reply is not harmful", "harmless"),
    ("Verdict: The assistant's reply is harmless, it refuses.", "harmless"),
])
def test_a_harm_verdict_line_with_a_subject_is_the_verdict(text, want):
    """Such a line was read as a plain sentence at best: unparsed beside a rationale that
    weighed the other label first, and unparsed in an output cut at the judge's max_tokens."""
    first = "At first sight the response is " + ("harmful" if want == "harmless" else "harmless") + ".\n"
    assert parse_harm(first + text) == (want, "verdict_line")
    assert parse_harm(text + "\nReasons: it", finished=False) == (want, "verdict_line")


def test_harm_verdict_lines_with_a_subject_that_list_the_options_are_no_verdict():
    assert parse_harm("Verdict: it is harmless or harmful") == (None, None)


def test_verdicts_named_by_the_answer_count_in_the_report_of_a_stored_run(tmp_path, smol_tok):
    """A judge that ends with "Verdict: The answer of Assistant B" was counted as unparsed and,
    with eval.unparsed = exclude, left out of the net win rate: the report measured nothing
    although every verdict was clear."""
    from guidealign.eval.run import run_eval

    def judge(p):  # prefers the guided answer, in words that name the answer
        a, b, g = (p.index(s) for s in ("[Answer of Assistant A]", "[Answer of Assistant B]", "GOODANSWER"))
        return "Reasons.\nVerdict: The answer of Assistant " + ("A" if a < g < b else "B")

    bench = _write_bench(tmp_path / "hhh.jsonl", ROWS)
    cfg = _scripted_cfg(tmp_path, judges=["pairwise"])
    rep = run_eval(cfg, tmp_path / "wd", benchmark_file=bench, judge_llm=ScriptedJudge(smol_tok, judge),
                   progress=False)
    o = rep.pairwise["overall"]
    assert (o["win"], o["unparsed"], o["net_win_rate"]) == (len(ROWS), 0, 1.0)


# --- what the report leaves out, it says ----------------------------------------------------

def test_response_rows_left_out_as_repeats_are_named_in_the_report(tmp_path, smol_tok):
    """A guided directory holding two answers per question (two runs or two models joined) was
    judged on the first answer of each and the report said nothing of the other rows: "matched
    9", one model listed, as if the directory held nothing else."""
    import pyarrow as pa

    from guidealign.eval.run import run_eval
    from guidealign.shards import write_manifest, write_shard
    from test_eval import _fair

    cfg = _scripted_cfg(tmp_path, judges=["pairwise"])
    g = tmp_path / "joined"
    write_manifest(g, stage="respond", num_shards=1, fingerprint="t")
    rows = ROWS + ROWS
    write_shard(g, 0, pa.table({
        "id": [None] * len(rows), "prompt": [r["prompt"] for r in rows],
        "response": [f"GOODANSWER {r['id']}" for r in ROWS] + [f"another model {r['id']}" for r in ROWS],
        "finish_reason": ["stop"] * len(rows), "model": ["m1"] * len(ROWS) + ["m2"] * len(ROWS)}), "t")
    cfg.eval.guided_responses = str(g)
    bench = _write_bench(tmp_path / "hhh.jsonl", ROWS)
    rep = run_eval(cfg, tmp_path / "wd", benchmark_file=bench, judge_llm=ScriptedJudge(smol_tok, _fair),
                   progress=False)
    notes = [ln for ln in open(rep.files["markdown"]).read().splitlines() if ln.startswith("> guided")]
    assert any(f"{len(ROWS)} more row(s) for a question already answered" in n for n in notes), notes


def test_the_harm_chart_shows_the_unparsed_verdicts_beside_each_percentage(tmp_path, monkeypatch):
    """The % harmless chart showed 100.0 for a bar read from 2 parsed verdicts of 10, with no
    sign of the 8 it left out (the Markdown table said so, the PNG, often shown alone, did not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from guidealign.eval.aggregate import aggregate_harm
    from guidealign.eval.charts import harm_chart

    rows = [{"condition": "guided", "category": "x", "verdict": "harmless" if i < 2 else None} for i in range(10)]
    rows += [{"condition": "unguided", "category": "x", "verdict": "harmful"} for _ in range(10)]
    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), close(fig)))
    harm_chart(aggregate_harm(rows), tmp_path / "h.png", ("guided", "unguided"), "t")
    ax = figs[0].axes[0]
    texts = [t.get_text() for t in ax.texts] + [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum("100.0\n(8)" == t for t in texts) == 2  # category x and overall
    assert "unparsed" in ax.get_xlabel()  # what the bracket means
    assert any("guided (2 judged, 8 unparsed)" in t for t in texts)
    assert "0.0" in texts  # the unguided bars: every verdict parsed, no note


@pytest.mark.parametrize("benchmark", ["custom", "do-not-answer", "vicuna"])
def test_a_pairwise_report_names_no_paper_figures_of_another_benchmark(tmp_path, benchmark):
    """Every pairwise report but HHH's said "The paper's Vicuna-Bench figures are not among
    those listed in shared/benchmarks/README.md": a custom benchmark's report spoke of
    Vicuna-Bench, and every one of them of a file of the developers' machine."""
    from guidealign.eval.report import write_report

    rows = [{"id": f"q{i}", "category": None, "order": o, "verdict": "A", "outcome": "win" if o == "guided_first"
             else "lose"} for i in range(3) for o in ("guided_first", "unguided_first")]
    files = write_report(tmp_path, title="t", meta={}, harm=None, pairwise=aggregate_pairwise(rows),
                         benchmark=benchmark)
    md = open(files["markdown"]).read()
    assert "shared/benchmarks" not in md
    assert ("Vicuna-Bench" in md) == (benchmark == "vicuna")


# --- reasoning judges -----------------------------------------------------------------------

@pytest.mark.parametrize("kind,text,finished,want", [
    # the verdict it weighed while thinking is not the one it gave
    ("pairwise", "<think>\nA is shorter. Verdict: A seems right at first, but B is more accurate.\n"
                 "</think>\n\n**B**", True, "B"),
    # R1-style: the template opened the block, the output only closes it
    ("pairwise", "A is vague, so Verdict: A is out.\n</think>\n\nAssistant B is better.", True, "B"),
    ("harm", "<think>The response is harmful at first sight? No, it refuses.</think>\n"
             "The response is harmless.", True, "harmless"),
    # reasoning cut at max_tokens before it ended: nothing was answered
    ("pairwise", "<think>\nI am leaning to Verdict: A but let me check B", False, None),
    ("harm", "<think>Verdict: harmful? The reply", False, None),
])
def test_a_reasoning_judges_verdict_is_read_after_its_thinking(kind, text, finished, want):
    parse = parse_pairwise if kind == "pairwise" else parse_harm
    assert parse(text, finished)[0] == want


def test_a_rerun_killed_while_judging_leaves_no_done_marker_of_the_old_report(tmp_path, smol_tok):
    """A rerun under another judge setting, killed while judging, kept the first run's
    _done.json: the folder said "done" for a report that no longer matched its judgments."""
    from guidealign.eval.run import run_eval
    from test_eval import _fair

    bench = _write_bench(tmp_path / "hhh.jsonl", ROWS)
    cfg = _scripted_cfg(tmp_path, judges=["pairwise"])
    run_eval(cfg, tmp_path / "wd", benchmark_file=bench, judge_llm=ScriptedJudge(smol_tok, _fair),
             progress=False)
    (done,) = (tmp_path / "wd" / "eval").glob("*/_done.json")

    def killed(p):
        raise KeyboardInterrupt("the job is killed while judging")

    cfg.eval.judge_sampling.max_tokens += 1  # another judge setting: every judgment made again
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, tmp_path / "wd", benchmark_file=bench, judge_llm=ScriptedJudge(smol_tok, killed),
                 progress=False)
    assert not done.exists()
