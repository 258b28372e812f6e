"""Store keys: the seed's `sha256(prompt)`, plus a suffix for repeated samples of one prompt.

The prompt is the exact string the model was given (after any chat template). The first sample
of a prompt in a run is stored under the bare hex digest; further samples of the same prompt in
the same run (harness `repeats`, or one prompt in several tasks) get `-1`, `-2`, ... in the
order the harness hands the requests over, which is deterministic for a given task list.
"""

from __future__ import annotations

import hashlib


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def record_key(prompt: str, occurrence: int = 0) -> str:
    """Key of the `occurrence`-th sample (0-based) of `prompt` in one run."""
    digest = prompt_hash(prompt)
    return digest if occurrence == 0 else f"{digest}-{occurrence}"


def shown_key(key: str) -> str:
    """`key` as messages print it: itself when printable, else the repr of its bytes (a key that
    is not UTF-8 arrives with surrogates, which cannot be printed; an empty one would vanish)."""
    return key if key.isprintable() and key else ascii(key.encode("utf-8", "surrogateescape"))
