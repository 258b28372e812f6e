"""The probe report as a picture: AUROC by layer, one line per reduction, with its 95 % band;
logprob baselines as horizontal lines with their bands; chance at 0.5."""

from __future__ import annotations

from pathlib import Path


def plot_auroc(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    reductions = dict.fromkeys(r["reduction"] for r in report["results"])
    for reduction in reductions:
        rows = [r for r in report["results"] if r["reduction"] == reduction]
        layers = [r["layer"] for r in rows]
        (line,) = ax.plot(layers, [r["auroc"] for r in rows], marker="o", ms=3, label=reduction)
        if rows[0].get("auroc_ci"):
            ax.fill_between(
                layers,
                [r["auroc_ci"][0] for r in rows],
                [r["auroc_ci"][1] for r in rows],
                color=line.get_color(),
                alpha=0.2,
            )
    for i, base in enumerate(report["baselines"]):
        color = f"C{len(reductions) + i}"
        ax.axhline(base["auroc"], color=color, ls="--", lw=1, label=f"baseline {base['name']}")
        if base.get("auroc_ci"):
            ax.axhspan(*base["auroc_ci"], color=color, alpha=0.08)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    counts = report["counts"]
    ax.set_title(
        f"{' / '.join(report['target']['positive'])} vs {' / '.join(report['target']['negative'])}"
        f": {counts['positive']} vs {counts['negative']} samples, {counts['questions']} questions",
        fontsize=9,
    )
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(f"AUROC, out of fold ({report['settings']['split']} split)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
