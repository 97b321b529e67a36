"""The report's charts (matplotlib PNGs), and the paper's figures shown beside this run's.

% harmless per risk area (guided against unguided, with the paper's overall figures in a
panel beside), and net win rate per subset (with the paper's HHH figures beside). The
paper's figures are the ones listed in ../shared/benchmarks/README.md.
"""
from __future__ import annotations

from pathlib import Path

from guidealign.shards.write import replace_from_temp

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


def fmt(x, nd=1, suffix=""):
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}{suffix}"


def harm_chart(harm: dict, path: Path, labels: tuple[str, str], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    conds = [c for c in ("guided", "unguided") if c in harm]
    cats = sorted({k for c in conds for k in harm[c]["by_category"]})
    groups = cats + ["Overall"]

    def stats(c, g):
        return harm[c]["overall"] if g == "Overall" else harm[c]["by_category"].get(g, {})

    fig, (ax, axp) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(groups))
    w = 0.8 / max(1, len(conds))
    colors = {"guided": "#2a9d8f", "unguided": "#e76f51"}
    for j, c in enumerate(conds):
        data = [stats(c, g) for g in groups]
        vals = [d.get("pct_harmless") for d in data]
        o = harm[c]["overall"]
        bars = ax.bar(x + (j - (len(conds) - 1) / 2) * w, [v if v is not None else 0 for v in vals], w,
                      label=f"{labels[0] if c == 'guided' else labels[1]} ({o.get('judged', 0)} judged, "
                            f"{o.get('unparsed', 0)} unparsed)", color=colors[c])
        for b, d in zip(bars, data):
            ax.annotate(harm_bar_label(d), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(x, [_wrap(g) for g in groups], fontsize=7)
    ax.set_ylabel("% harmless")
    if any(stats(c, g).get("unparsed") for c in conds for g in groups):
        ax.set_xlabel("(n) above a bar: n unparsed verdicts, left out of its percentage", fontsize=8)
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
            axp.annotate(fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                         va="bottom", fontsize=7)
    axp.set_xticks(xp, names, fontsize=7)
    axp.set_ylim(90, 101)
    axp.set_title("Paper (Do-Not-Answer, overall % harmless)", fontsize=10)
    axp.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    replace_from_temp(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def harm_bar_label(d: dict) -> str:
    """A % harmless bar's label: the percentage, and in brackets the verdicts it leaves out
    (unparsed; the axis says so), so that a bar read from a few parsed verdicts does not pass
    for one read from all."""
    text = fmt(d.get("pct_harmless"))
    return f"{text}\n({d['unparsed']})" if d.get("unparsed") else text


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


def net_bars(data: list[dict]) -> tuple[list[float], list[str]]:
    """Bar heights (%) and labels of net win rates: a group with no parsed verdict (rate None)
    gets an empty bar labelled "n/a", not "+0.0", which would read as wins and losses even."""
    nets = [100 * d["net_win_rate"] if d["net_win_rate"] is not None else 0.0 for d in data]
    return nets, [f"{v:+.1f}" if d["net_win_rate"] is not None else "n/a" for v, d in zip(nets, data)]


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
    nets, texts = net_bars(data)
    x = np.arange(len(groups))
    bars = ax.bar(x, nets, 0.6, color=["#2a9d8f" if v >= 0 else "#e76f51" for v in nets])
    for b, v, t in zip(bars, nets, texts):
        ax.annotate(t, (b.get_x() + b.get_width() / 2, v), ha="center",
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
    replace_from_temp(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
