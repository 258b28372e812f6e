"""The `hallulens` command: one entry point, subcommands contributed by each package."""

from __future__ import annotations

import argparse
import logging
import sys

from hallulens_capture import cli as activations_cli
from hallulens_capture.errors import HalluLensError
from hallulens_models import cli as models_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hallulens", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    activations_cli.register(subparsers)
    models_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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
