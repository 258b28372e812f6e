"""`hallulens models path NAME --format hf|gguf`: where the embedded model's files are."""

from __future__ import annotations

import argparse

from hallulens_capture.errors import ModelFilesError
from hallulens_models.embedded import SMOLLM2, smollm2_gguf, smollm2_hf


def cmd_path(args: argparse.Namespace) -> int:
    if args.name != SMOLLM2:
        raise ModelFilesError(f"unknown embedded model {args.name!r}; known: {SMOLLM2}")
    print(smollm2_gguf() if args.format == "gguf" else smollm2_hf())
    return 0


def register(models: argparse._SubParsersAction) -> None:
    """`hallulens models path`."""
    p = models.add_parser("path", help="print the local path of an embedded model")
    p.add_argument("name", help=f"embedded model name ({SMOLLM2})")
    p.add_argument(
        "--format",
        choices=("hf", "gguf"),
        default="hf",
        help="hf: dequantized HF directory (converted once); gguf: the GGUF file",
    )
    p.set_defaults(func=cmd_path)
