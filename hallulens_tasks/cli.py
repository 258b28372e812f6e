"""The `hallulens` command: one entry point, subcommands contributed by each package."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hallulens_capture import cli as activations_cli
from hallulens_capture.errors import HalluLensError
from hallulens_models import cli as models_cli
from hallulens_tasks import pipeline
from hallulens_tasks.generation import cli as generate_cli


def cmd_judge(args: argparse.Namespace) -> int:
    from lm_eval.utils import make_table

    from hallulens_tasks.posthoc import judge_run
    from hallulens_tasks.samples import expand

    results = judge_run(expand(args.samples), Path(args.output_path) if args.output_path else None)
    print(make_table(results))
    if results["groups"]:
        print(make_table(results, "groups"))
    print(f"judged samples and {results['_path']} written")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from hallulens_tasks.labels import label_store
    from hallulens_tasks.samples import expand

    summary = label_store(expand(args.samples), args.store)
    print(json.dumps(summary))
    if summary["unmatched"]:
        print(
            f"{summary['unmatched']} judged samples have no record in {args.store} "
            "(run without capture, or another store)",
            file=sys.stderr,
        )
    return 0


def cmd_export_legacy(args: argparse.Namespace) -> int:
    from hallulens_tasks.legacy import export_legacy
    from hallulens_tasks.samples import expand

    for path in export_legacy(expand(args.samples), Path(args.out), args.model):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hallulens", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    activations = activations_cli.register(subparsers)
    p = activations.add_parser("label", help="write judge verdicts of a run into the store")
    p.add_argument("--samples", nargs="+", required=True, help="judged samples files or dirs")
    p.add_argument("--store", required=True, help="activation store of the same run")
    p.set_defaults(func=cmd_label)
    models_cli.register(subparsers)
    generate_cli.register(subparsers)
    pipeline.register(subparsers)
    p = subparsers.add_parser(
        "judge", help="judge HalluLens samples of a --predict_only --log_samples run"
    )
    p.add_argument("samples", nargs="+", help="samples_*.jsonl files, or their directory")
    p.add_argument("--output_path", help="where judged samples go (default: <dir>/judged)")
    p.set_defaults(func=cmd_judge)
    p = subparsers.add_parser("export-legacy", help="write the seed's output/{task}/{model} files")
    p.add_argument("--samples", nargs="+", required=True, help="judged samples files or dirs")
    p.add_argument("--out", default="output", help="output root (default: output)")
    p.add_argument("--model", help="model name for the directory (default: from the run)")
    p.set_defaults(func=cmd_export_legacy)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hallulens_tasks").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HalluLensError as exc:
        print(f"hallulens: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `hallulens activations ls ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
