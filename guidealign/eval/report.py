"""The evaluation report: ``report.md``, ``results.json`` and matplotlib PNG charts.

Charts: % harmless per risk area (guided against unguided, with the paper's overall
figures in a panel beside), and net win rate per subset (with the paper's HHH figures
beside). The paper's figures are the ones listed in ../shared/benchmarks/README.md.
"""
from __future__ import annotations

import json
from pathlib import Path

# The paper's figures (arXiv 2403.11838), as listed in shared/benchmarks/README.md.
PAPER_HARMLESS = [  # model, % harmless without guidelines, with guidelines (None: not reported)
    ("Vicuna-13B", 94.4, 97.9),
    ("GPT-3.5-turbo", 98.5, 99.0),
    ("GPT-4", 97.6, 99.7),
    ("fine-tuned 13B", 98.1, None),
]
PAPER_HHH_NET = [  # comparison, net win rate in %
    ("Vicuna+guidelines vs Vicuna", 11.7),
    ("GPT-3.5+guidelines vs GPT-3.5", 22.3),
    ("fine-tuned 13B vs Vicuna", 30.6),
    ("fine-tuned 13B vs GPT-3.5", 54.9),
]


# Above this share of unparsed verdicts the report warns that its numbers are unreliable.
UNPARSED_WARN = 0.2


def _fmt(x, nd=1, suffix=""):
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}{suffix}"


def _num(x):
    return f"{x:g}" if isinstance(x, float) else str(x)


def harm_chart(harm: dict, path: Path, labels: tuple[str, str], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    conds = [c for c in ("guided", "unguided") if c in harm]
    cats = sorted({k for c in conds for k in harm[c]["by_category"]})
    groups = cats + ["Overall"]

    def val(c, g):
        d = harm[c]["overall"] if g == "Overall" else harm[c]["by_category"].get(g, {})
        return d.get("pct_harmless")

    fig, (ax, axp) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(groups))
    w = 0.8 / max(1, len(conds))
    colors = {"guided": "#2a9d8f", "unguided": "#e76f51"}
    for j, c in enumerate(conds):
        vals = [val(c, g) for g in groups]
        bars = ax.bar(x + (j - (len(conds) - 1) / 2) * w, [v if v is not None else 0 for v in vals], w,
                      label=labels[0] if c == "guided" else labels[1], color=colors[c])
        for b, v in zip(bars, vals):
            ax.annotate(_fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(x, [_wrap(g) for g in groups], fontsize=7)
    ax.set_ylabel("% harmless")
    ax.set_ylim(0, 108)
    ax.set_title(f"{title}: % harmless per risk area (this run)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")

    names = [m for m, _, _ in PAPER_HARMLESS]
    xp = np.arange(len(names))
    for j, (key, lab, col) in enumerate(((1, "without guidelines", "#e76f51"),
                                         (2, "with guidelines", "#2a9d8f"))):
        vals = [row[key] for row in PAPER_HARMLESS]
        bars = axp.bar(xp + (j - 0.5) * 0.38, [v or 0 for v in vals], 0.38, label=lab, color=col)
        for b, v in zip(bars, vals):
            axp.annotate(_fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                         va="bottom", fontsize=7)
    axp.set_xticks(xp, names, fontsize=7)
    axp.set_ylim(90, 101)
    axp.set_title("Paper (Do-Not-Answer, overall % harmless)", fontsize=10)
    axp.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wrap(s: str, width: int = 18) -> str:
    words, lines, cur = s.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines[:4])


def pairwise_chart(pw: dict, path: Path, labels: tuple[str, str], title: str,
                   paper: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(pw["by_category"]) + ["Overall"]
    data = [pw["by_category"][g] if g != "Overall" else pw["overall"] for g in groups]
    ncols = 3 if paper else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 5))
    ax, axs = axes[0], axes[1]
    nets = [100 * d["net_win_rate"] if d["net_win_rate"] is not None else 0 for d in data]
    x = np.arange(len(groups))
    bars = ax.bar(x, nets, 0.6, color=["#2a9d8f" if v >= 0 else "#e76f51" for v in nets])
    for b, v, d in zip(bars, nets, data):
        ax.annotate(f"{v:+.1f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                    va="bottom" if v >= 0 else "top", fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [_wrap(g, 12) for g in groups], fontsize=8)
    ax.set_ylabel("net win rate, % ((win - lose) / total)")
    lim = max(10, *(abs(v) for v in nets)) * 1.25
    ax.set_ylim(-lim, lim)
    ax.set_title(f"{title}: {labels[0]} vs {labels[1]}, net win rate", fontsize=10)

    left = np.zeros(len(groups))
    for key, col in (("win", "#2a9d8f"), ("tie", "#bbbbbb"), ("lose", "#e76f51"),
                     ("unparsed", "#6c757d")):
        vals = np.array([d[f"pct_{key}"] or 0 for d in data])
        axs.barh(x, vals, left=left, color=col, label=key)
        left += vals
    axs.set_yticks(x, [_wrap(g, 14) for g in groups], fontsize=8)
    axs.invert_yaxis()
    axs.set_xlim(0, 100)
    axs.set_xlabel("% of questions")
    axs.set_title(f"win / tie / lose / unparsed ({pw['rule']} rule)", fontsize=10)
    axs.legend(fontsize=7, loc="lower right")

    if paper:
        axp = axes[2]
        names = [n for n, _ in PAPER_HHH_NET]
        vals = [v for _, v in PAPER_HHH_NET]
        xp = np.arange(len(names))
        b = axp.bar(xp, vals, 0.6, color="#457b9d")
        for bb, v in zip(b, vals):
            axp.annotate(f"{v:+.1f}", (bb.get_x() + bb.get_width() / 2, v), ha="center",
                         va="bottom", fontsize=8)
        axp.set_xticks(xp, [_wrap(n, 14) for n in names], fontsize=7)
        axp.set_ylim(0, 65)
        axp.set_title("Paper (HHH, overall net win rate, %)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
                         f"{_fmt(d['pct_harmless'])} ({d['harmless']}/{d['judged']}, {d['unparsed']})")
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
    out += [f"| {m} | {_fmt(a)} | {_fmt(b)} |" for m, a, b in PAPER_HARMLESS]
    return out + [""]


def _pairwise_md(pw: dict, labels, paper: bool) -> list[str]:
    out = [f"## Pairwise: {labels[0]} vs {labels[1]}", "",
           f"Each question judged in both answer orders; orders combined with the "
           f"`{pw['rule']}` rule; unparsed verdicts: `{pw['unparsed_policy']}` "
           f"({'kept in the total' if pw['unparsed_policy'] == 'tie' else 'left out of the total'}).",
           "", "| subset | n | win | tie | lose | unparsed | total | net win rate |",
           "|---|---|---|---|---|---|---|---|"]
    for g, d in list(pw["by_category"].items()) + [("**Overall**", pw["overall"])]:
        out.append(f"| {g} | {d['n']} | {_num(d['win'])} | {_num(d['tie'])} | {_num(d['lose'])} | "
                   f"{_num(d['unparsed'])} | {_num(d['total'])} | "
                   f"{_fmt(None if d['net_win_rate'] is None else 100 * d['net_win_rate'], 1, '%')} |")
    o = pw["overall"]
    if o["n"] and o["unparsed"] / o["n"] > UNPARSED_WARN:
        out += ["", f"**Warning:** {100 * o['unparsed'] / o['n']:.0f}% of the verdicts could not be parsed: "
                "the judge does not follow the verdict format, so these numbers are not reliable."]
    out += ["", "Per answer order (position-bias check; the verdict is about positions A/B):", "",
            "| order | judgments | A | B | tie | unparsed | % A among parsed |", "|---|---|---|---|---|---|---|"]
    for o, d in pw["orders"].items():
        out.append(f"| {o} | {d['n']} | {d['A']} | {d['B']} | {d['tie']} | {d['unparsed']} | "
                   f"{_fmt(d['pct_position_A'])} |")
    ag = pw["order_agreement"]
    out += ["", f"The two orders agreed (from the {labels[0]} side) on {ag['agree']} of "
            f"{ag['both_parsed']} questions where both were parsed ({_fmt(ag['pct'], 1, '%')}).", ""]
    if paper:
        out += ["The paper's figures (HHH, overall net win rate):", "", "| comparison | net win rate |",
                "|---|---|"]
        out += [f"| {n} | {v:+.1f}% |" for n, v in PAPER_HHH_NET]
    else:
        out += ["The paper's Vicuna-Bench figures are not among those listed in "
                "shared/benchmarks/README.md, so none are shown here."]
    return out + [""]


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
        files["harm_chart"] = str(harm_chart(harm, out / "harmless_by_category.png", labels, title))
        lines += _harm_md(harm, labels) + ["![% harmless per risk area](harmless_by_category.png)", ""]
    if pairwise:
        paper = benchmark == "hhh"
        files["pairwise_chart"] = str(pairwise_chart(pairwise, out / "net_win_rate.png", labels, title,
                                                     paper))
        lines += _pairwise_md(pairwise, labels, paper) + ["![net win rate per subset](net_win_rate.png)", ""]
    if risk_id:
        from guidealign.eval.risk_id import risk_lines

        lines += risk_lines(risk_id)
    md = out / "report.md"
    md.write_text("\n".join(lines))
    files["markdown"] = str(md)
    res = out / "results.json"
    res.write_text(json.dumps({"title": title, "meta": meta, "harmfulness": harm,
                               "pairwise": pairwise, "risk_identification": risk_id},
                              indent=1, default=str))
    files["results"] = str(res)
    return files
