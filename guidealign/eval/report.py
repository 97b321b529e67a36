"""The evaluation report: ``report.md`` and ``results.json`` beside the charts
(eval/charts.py), and the run description at its top (benchmark, responses, judges, notes).
"""
from __future__ import annotations

import json
from pathlib import Path

from guidealign.shards.write import write_json_atomic, write_text_atomic
from guidealign.eval.charts import PAPER_HARMLESS, PAPER_HHH_NET, fmt, harm_chart, pairwise_chart

# Above this share of unparsed verdicts the report warns that its numbers are unreliable.
UNPARSED_WARN = 0.2


def _num(x):
    return f"{x:g}" if isinstance(x, float) else str(x)


def _harm_md(harm: dict, labels) -> list[str]:
    conds = [c for c in ("guided", "unguided") if c in harm]
    lab = {"guided": labels[0], "unguided": labels[1]}
    out = ["## Harmfulness (% harmless)", ""]
    head = "| risk area | " + " | ".join(f"{lab[c]}: % harmless (harmless/judged, unparsed)" for c in conds)
    out += [head + " |", "|---" * (1 + len(conds)) + "|"]
    cats = sorted({k for c in conds for k in harm[c]["by_category"]})
    for g in cats + ["**Overall**"]:
        cells = []
        for c in conds:
            d = harm[c]["overall"] if g == "**Overall**" else harm[c]["by_category"].get(g)
            cells.append("n/a" if not d else
                         f"{fmt(d['pct_harmless'])} ({d['harmless']}/{d['judged']}, {d['unparsed']})")
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    out += ["", "Unparsed verdicts (the judge's output named neither label) are left out of the "
            "percentage and counted in the last number of each cell.", ""]
    for c in conds:
        o = harm[c]["overall"]
        if o["n"] and o["unparsed"] / o["n"] > UNPARSED_WARN:
            out += [f"**Warning:** {100 * o['unparsed'] / o['n']:.0f}% of the {lab[c]} verdicts could not "
                    "be parsed: the judge does not follow the verdict format, so these numbers are not "
                    "reliable.", ""]
    out += ["The paper's figures (Do-Not-Answer, overall % harmless, response-only harmfulness "
            "classifier):", "", "| model | without guidelines | with guidelines |", "|---|---|---|"]
    out += [f"| {m} | {fmt(a)} | {fmt(b)} |" for m, a, b in PAPER_HARMLESS]
    return out + [""]


def _pairwise_md(pw: dict, labels, benchmark: str) -> list[str]:
    out = [f"## Pairwise: {labels[0]} vs {labels[1]}", "",
           f"Each question judged in both answer orders; orders combined with the "
           f"`{pw['rule']}` rule; unparsed verdicts: `{pw['unparsed_policy']}` "
           f"({'kept in the total' if pw['unparsed_policy'] == 'tie' else 'left out of the total'}).",
           "", "| subset | n | win | tie | lose | unparsed | total | net win rate |",
           "|---|---|---|---|---|---|---|---|"]
    for g, d in list(pw["by_category"].items()) + [("**Overall**", pw["overall"])]:
        out.append(f"| {g} | {d['n']} | {_num(d['win'])} | {_num(d['tie'])} | {_num(d['lose'])} | "
                   f"{_num(d['unparsed'])} | {_num(d['total'])} | "
                   f"{fmt(None if d['net_win_rate'] is None else 100 * d['net_win_rate'], 1, '%')} |")
    o = pw["overall"]
    if o["n"] and o["unparsed"] / o["n"] > UNPARSED_WARN:
        out += ["", f"**Warning:** {100 * o['unparsed'] / o['n']:.0f}% of the verdicts could not be parsed: "
                "the judge does not follow the verdict format, so these numbers are not reliable."]
    out += ["", "Per answer order (position-bias check; the verdict is about positions A/B):", "",
            "| order | judgments | A | B | tie | unparsed | % A among parsed |", "|---|---|---|---|---|---|---|"]
    for o, d in pw["orders"].items():
        out.append(f"| {o} | {d['n']} | {d['A']} | {d['B']} | {d['tie']} | {d['unparsed']} | "
                   f"{fmt(d['pct_position_A'])} |")
    ag = pw["order_agreement"]
    out += ["", f"The two orders agreed (from the {labels[0]} side) on {ag['agree']} of "
            f"{ag['both_parsed']} questions where both were parsed ({fmt(ag['pct'], 1, '%')}).", ""]
    if benchmark == "hhh":
        out += ["The paper's figures (HHH, overall net win rate):", "", "| comparison | net win rate |",
                "|---|---|"]
        out += [f"| {n} | {v:+.1f}% |" for n, v in PAPER_HHH_NET]
    elif benchmark == "vicuna":  # (other benchmarks: the paper has no figure to compare with)
        out += ["The paper's Vicuna-Bench figures are not among those listed with this harness (its HHH "
                "and Do-Not-Answer figures only), so none are shown here."]
    return out + [""]


# the charts a report may hold: key in the returned files -> file name
CHARTS = {"harm_chart": "harmless_by_category.png", "pairwise_chart": "net_win_rate.png"}


def write_report(out_dir: str | Path, *, title: str, meta: dict, harm: dict | None,
                 pairwise: dict | None, benchmark: str, risk_id: dict | None = None) -> dict:
    """Write report.md, results.json and the charts into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = (meta.get("label_guided", "guided"), meta.get("label_unguided", "unguided"))
    files = {}
    lines = [f"# Evaluation: {title}", ""]
    for k, v in meta.items():
        if k == "notes":
            continue
        if isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()):
            lines.append(f"- {k}:")
            lines += [f"  - {kk}: " + ", ".join(f"{a}={b}" for a, b in vv.items()) for kk, vv in v.items()]
        elif isinstance(v, dict):
            lines.append(f"- {k}: " + ", ".join(f"{a}={b}" for a, b in v.items()))
        elif isinstance(v, list):
            lines.append(f"- {k}: " + ", ".join(map(str, v)))
        else:
            lines.append(f"- {k}: {v}")
    lines += [""] + [f"> {n}" for n in meta.get("notes", [])] + [""]
    if harm:
        files["harm_chart"] = str(harm_chart(harm, out / CHARTS["harm_chart"], labels, title))
        lines += _harm_md(harm, labels) + ["![% harmless per risk area](harmless_by_category.png)", ""]
    if pairwise:
        paper = benchmark == "hhh"
        files["pairwise_chart"] = str(pairwise_chart(pairwise, out / CHARTS["pairwise_chart"], labels, title,
                                                     paper))
        lines += _pairwise_md(pairwise, labels, benchmark) + ["![net win rate per subset](net_win_rate.png)", ""]
    for chart in (CHARTS.keys() - files.keys()):  # a chart of an earlier run's judges: not this report's
        (out / CHARTS[chart]).unlink(missing_ok=True)
    if risk_id:
        from guidealign.eval.risk_id import risk_lines

        lines += risk_lines(risk_id)
    md = out / "report.md"
    write_text_atomic(md, "\n".join(lines))
    files["markdown"] = str(md)
    res = out / "results.json"
    write_json_atomic(res, json.dumps({"title": title, "meta": meta, "harmfulness": harm,
                                       "pairwise": pairwise, "risk_identification": risk_id},
                                      indent=1, default=str))
    files["results"] = str(res)
    return files


def run_meta(cfg, st, bench_path, ingested: dict, coverage: dict, models: dict) -> dict:
    """The run description at the top of the report: benchmark, responses, judges, notes."""
    import dataclasses

    ecfg = cfg.eval
    harm_judge = (f"classifier {ecfg.classifier_model} (harmful labels "
                  f"{list(ecfg.classifier_harmful_labels)})" if ecfg.harm_judge == "classifier"
                  else f"LLM {ecfg.judge_model}")
    notes = []
    if ecfg.judge_model.startswith("embedded:") and ("pairwise" in st.judges or ecfg.harm_judge == "llm"):
        notes.append("The judge is the embedded SmolLM2-135M-Instruct, far too small to judge: "
                     "this run checks the mechanics only, its numbers measure nothing.")
    for c in ("guided", "unguided"):
        cv = coverage[c]
        if cv["missing"] or cv["errors"] or cv["unmatched"]:
            notes.append(f"{c} responses: {cv['missing']} benchmark prompt(s) without a response, "
                         f"{cv['errors']} failed response(s), {cv['unmatched']} response(s) matching no "
                         f"benchmark prompt; these are not judged.")
        if cv["empty"]:
            notes.append(f"{c} responses: {cv['empty']} empty response(s), judged as they are.")
        if cv.get("duplicates"):
            # a directory joining several runs or models: say what was left out
            notes.append(f"{c} responses: {cv['duplicates']} more row(s) for a question already "
                         f"answered in {cv['dir']}; one answer per question is judged (the first that "
                         f"did not fail), these rows are not.")
    if ingested.get("duplicates") or ingested.get("quarantined"):
        dup = (f"{ingested.get('duplicates')} repeated prompt(s) answered and judged once"
               + (", counted once per benchmark row (eval.count_duplicates)" if ecfg.count_duplicates
                  else ", counted once (eval.count_duplicates = false)"))
        notes.append(f"ingest: {dup}; {ingested.get('quarantined')} row(s) quarantined "
                     f"(see prompts/ quarantine).")
    return {
        "benchmark": st.benchmark, "file": str(bench_path),
        "category field": st.category_field or "(none)",
        "prompts": (f"{ingested.get('prompts')} distinct" + (
            f" (from {ingested['rows_in']} rows)" if ingested.get("rows_in") is not None else "")),
        "label_guided": ecfg.label_guided, "label_unguided": ecfg.label_unguided,
        "responses": {c: {"dir": coverage[c]["dir"], "matched": coverage[c]["matched"],
                          "models": models[c]} for c in models},
        "judges": st.judges,
        "harmfulness judge": harm_judge if "harmfulness" in st.judges else "-",
        "pairwise judge": f"LLM {ecfg.judge_model}, both answer orders" if "pairwise" in st.judges else "-",
        "judge sampling": dataclasses.asdict(ecfg.judge_sampling),
        "system message (both runs)": repr(ecfg.system_prompt) if ecfg.system_prompt
        else "respond.guided_system / respond.unguided_system as configured",
        "notes": notes,
    }
