"""`hallulens probe SOURCE --out DIR`: per-layer probes over a store or an npy export."""

from __future__ import annotations

import argparse

from hallulens_analysis.cli import add_selection_args, selection_from
from hallulens_analysis.probe import ProbeSettings, features, run_probe


def _cell(entry: dict, name: str) -> str:
    ci = entry.get(f"{name}_ci")
    return f"{entry[name]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{entry[name]:.3f}"


def format_report(report: dict) -> str:
    """The report as a terminal table: one row per layer, AUROC and AUPRC per reduction."""
    reductions = list(dict.fromkeys(r["reduction"] for r in report["results"]))
    layers = list(dict.fromkeys(r["layer"] for r in report["results"]))
    by = {(r["reduction"], r["layer"]): r for r in report["results"]}
    header = ["layer"] + [f"{r} {m}" for r in reductions for m in ("AUROC", "AUPRC")]
    rows = [
        [str(layer)] + [_cell(by[(r, layer)], m) for r in reductions for m in ("auroc", "auprc")]
        for layer in layers
    ]
    rows += [
        [f"baseline {b['name']}", _cell(b, "auroc"), _cell(b, "auprc")] for b in report["baselines"]
    ]
    widths = [
        max(len(row[i]) for row in [header, *rows] if i < len(row)) for i in range(len(header))
    ]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in [header, *rows]
    ]
    counts = report["counts"]
    best = report["best"]
    lines += [
        f"{counts['samples']} samples ({counts['positive']} positive, {counts['negative']} "
        f"negative), {counts['questions']} questions; prevalence {counts['prevalence']:.3f} "
        f"(AUPRC of chance); {report['settings']['folds']} {report['settings']['split']} folds",
        f"best: {best['reduction']} at layer {best['layer']}, AUROC {best['auroc']:.3f} "
        f"[{best['auroc_ci'][0]:.3f}, {best['auroc_ci'][1]:.3f}]"
        if best.get("auroc_ci")
        else f"best: {best['reduction']} at layer {best['layer']}, AUROC {best['auroc']:.3f}",
    ]
    if report["baselines_note"]:
        lines.append(report["baselines_note"])
    return "\n".join(lines)


def cmd_probe(args: argparse.Namespace) -> int:
    selection = selection_from(args)
    settings = ProbeSettings(
        folds=args.folds,
        seed=args.seed,
        split=args.split,
        C=args.C,
        max_iter=args.max_iter,
        bootstrap=args.bootstrap,
        memory_gb=args.memory_gb,
        threads=args.threads,
    )
    export = features(
        args.source, selection, args.out, tokenizer=args.tokenizer, progress=not args.quiet
    )
    report = run_probe(export, selection, settings, args.out)
    print(format_report(report))
    files = ", ".join(f"{args.out}/{name}" for name in ("report.json", *report["files"].values()))
    print(f"written: {files}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """`hallulens probe`."""
    p = commands.add_parser(
        "probe", help="logistic-regression probes per layer, grouped K-fold AUROC/AUPRC"
    )
    p.add_argument("source", help="activation store, or npy export directory")
    p.add_argument("--out", required=True, help="directory for report.json, scores.csv, the plot")
    add_selection_args(p)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split",
        choices=("group", "random"),
        default="group",
        help="group: a question's samples on one side (random leaks; for comparison)",
    )
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength")
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=1000, help="replicates for the 95%% intervals")
    p.add_argument("--memory-gb", type=float, default=1.0, help="features held at once")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per fit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_probe)
