"""`hallulens activations export|audit`, and the selection flags every analysis command shares."""

from __future__ import annotations

import argparse
import json
import sys

from hallulens_analysis.audit import audit
from hallulens_analysis.errors import SelectionError
from hallulens_analysis.plan import build_plan
from hallulens_analysis.selection import TARGETS, Selection
from hallulens_capture.store import open_store

FORMATS = ("npy", "hf", "legacy")


def add_selection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("selection")
    group.add_argument("--layers", default="all", help="capture syntax: all | 14-29 | 0,8,16 | -1")
    group.add_argument(
        "--reduce",
        nargs="+",
        metavar="R",
        help="last-prompt first last second-last mean window:N answer (default: mean)",
    )
    group.add_argument("--task", nargs="+", default=[], help="task names or shell patterns")
    group.add_argument(
        "--label", nargs="+", default=[], help="keep these labels (none = not labelled)"
    )
    group.add_argument(
        "--target",
        default="hallucination",
        help=f"POSITIVE:NEGATIVE labels or {', '.join(f'{k} ({v})' for k, v in TARGETS.items())}",
    )
    group.add_argument("--tokenizer", help="tokenizer name or path (for the answer reduction)")


def selection_from(args: argparse.Namespace) -> Selection:
    return Selection.parse(args.layers, args.reduce or ["mean"], args.task, args.label, args.target)


def cmd_export(args: argparse.Namespace) -> int:
    from hallulens_analysis.hf_export import export_hf
    from hallulens_analysis.legacy_export import export_legacy
    from hallulens_analysis.npy_export import export_npy

    if args.format == "legacy" and args.reduce:
        raise SelectionError("legacy exports hold whole token sequences: --reduce does not apply")
    selection = selection_from(args)
    with open_store(args.store) as store:
        plan = build_plan(store, selection, tokenizer=args.tokenizer)
        progress = not args.quiet
        if args.format == "legacy":
            out = export_legacy(store, plan, args.out, progress=progress)
        elif args.format == "hf":
            out = export_hf(store, plan, args.out, dtype=args.dtype, progress=progress)
        else:
            out = export_npy(store, plan, args.out, dtype=args.dtype, progress=progress)
    labels = plan.label_counts()
    print(
        json.dumps(
            {
                "out": str(out),
                "format": args.format,
                "rows": len(plan.items),
                "layers": list(plan.layer_ids),
                "labels": labels,
                "left_out": plan.excluded,
            }
        )
    )
    if labels.get("none"):
        print(
            f"hallulens: {labels['none']} exported records have no label (label '', y -1): "
            "run `hallulens activations label` first, or --label to leave them out",
            file=sys.stderr,
        )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    with open_store(args.store) as store:
        found = audit(store, max_gen_toks=args.max_gen_toks, rows=not args.headers_only)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print(format_audit(found))
    return 0 if found["ok"] else 1


def format_audit(found: dict) -> str:
    lines = [
        f"store   : {found['store']}",
        f"records : {found['records']}, labels {found['labels']}",
    ]
    for section in ("problems", "notes"):
        lines.append(f"{section}:")
        for name, value in found[section].items():
            if isinstance(value, dict):
                count = value["count"]
                extra = f" e.g. {', '.join(value['examples'])}" if value.get("examples") else ""
                extra = extra or (f" ({value['records']} records)" if "records" in value else "")
                lines.append(f"  {name:<30} {count}{extra if count else ''}")
            else:
                lines.append(f"  {name:<30} {value}")
    for name in ("generated_tokens", "prompt_tokens"):
        d = found[name]
        if d:
            lines.append(
                f"{name:<17}: min {d['min']}, p10 {d['p10']:.0f}, median {d['median']:.0f}, "
                f"p90 {d['p90']:.0f}, max {d['max']}, mean {d['mean']:.1f}"
            )
    lines.append("labels by task:")
    for task, counts in found["labels_by_task"].items():
        lines.append(f"  {task:<40} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines.append("ok" if found["ok"] else "PROBLEMS found (exit 1)")
    return "\n".join(lines)


def register(activations: argparse._SubParsersAction) -> None:
    """`hallulens activations export|audit`."""
    p = activations.add_parser("export", help="export a selection as npy, hf or legacy")
    p.add_argument("store")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--out", required=True, help="directory to write (npy resumes a killed run)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_selection_args(p)
    p.set_defaults(func=cmd_export)
    p = activations.add_parser("audit", help="records vs labels, cut responses, bad rows, lengths")
    p.add_argument("store")
    p.add_argument("--max-gen-toks", type=int, help="limit to test (default: each record's own)")
    p.add_argument("--headers-only", action="store_true", help="skip the row scan")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)
