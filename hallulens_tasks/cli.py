"""The `hallulens` command. Each subcommand is registered by the module that holds its logic;
this root only lists the registrations and owns the command groups."""

from __future__ import annotations

import argparse
import logging
import sys

from hallulens_analysis import cli as analysis_cli
from hallulens_analysis import probe_cli
from hallulens_capture import cli as store_cli
from hallulens_capture.errors import HalluLensError, Interrupted
from hallulens_models import cli as models_cli
from hallulens_tasks.generation import cli as generate_cli
from hallulens_tasks.judging import offline
from hallulens_tasks.runs import labels, legacy, pipeline


def _group(commands: argparse._SubParsersAction, name: str, help_text: str):
    parser = commands.add_parser(name, help=help_text)
    return parser.add_subparsers(dest="action", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hallulens", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    activations = _group(commands, "activations", "inspect and label an activation store")
    store_cli.register(activations)  # ls, show, stats, verify, merge
    labels.register(activations)  # label
    analysis_cli.register(activations)  # export, audit
    models_cli.register(_group(commands, "models", "embedded model files"))  # path
    generate_cli.register(commands)  # generate
    pipeline.register(commands)  # pipeline
    offline.register(commands)  # judge
    legacy.register(commands)  # export-legacy
    probe_cli.register(commands)  # probe
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hallulens_tasks").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as exc:
        print(f"hallulens: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("hallulens: interrupted", file=sys.stderr)
        return 130
    except HalluLensError as exc:
        print(f"hallulens: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `hallulens activations ls ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
