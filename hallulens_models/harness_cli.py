"""Our logs and errors on the `lm_eval` command line look like the harness's own."""

from __future__ import annotations

import logging
import sys

from hallulens_capture.errors import HalluLensError


def join_harness_cli() -> None:
    """Make our logs and errors look like the harness's own when run from the `lm_eval` CLI.

    Our loggers use the handlers and level lm-eval set up (LMEVAL_LOG_LEVEL applies), and our
    own errors, when nothing catches them, print as one line instead of a traceback.
    """
    harness = logging.getLogger("lm_eval")
    if harness.handlers:
        for name in ("hallulens_capture", "hallulens_models", "hallulens_tasks"):
            ours = logging.getLogger(name)
            ours.setLevel(harness.level)
            for handler in harness.handlers:
                if handler not in ours.handlers:
                    ours.addHandler(handler)
            ours.propagate = False
    previous = sys.excepthook
    if getattr(previous, "_hallulens", False):
        return

    def hook(kind, value, tb):
        if isinstance(value, HalluLensError):
            print(f"lm-eval-hallulens: error: {value}", file=sys.stderr)
        else:
            previous(kind, value, tb)

    hook._hallulens = True  # type: ignore[attr-defined]
    sys.excepthook = hook
