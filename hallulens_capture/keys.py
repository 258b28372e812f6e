"""Store keys: the seed's `sha256(prompt)`, plus a suffix for repeated samples of one prompt.

The prompt is the exact string the model was given (after any chat template). The first sample
of a prompt in a run is stored under the bare hex digest; further samples of the same prompt in
the same run (harness `repeats`, or one prompt in several tasks) get `-1`, `-2`, ... in the
order the harness hands the requests over, which is deterministic for a given task list.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def digest_key(digest: str, occurrence: int = 0) -> str:
    """Key of the `occurrence`-th sample (0-based) of the prompt whose sha256 is `digest`."""
    return digest if occurrence == 0 else f"{digest}-{occurrence}"


def record_key(prompt: str, occurrence: int = 0) -> str:
    """Key of the `occurrence`-th sample (0-based) of `prompt` in one run."""
    return digest_key(prompt_hash(prompt), occurrence)


def shown_key(key: str) -> str:
    """`key` as messages print it: itself when printable, else the repr of its bytes (a key that
    is not UTF-8 arrives with surrogates, which cannot be printed; an empty one would vanish)."""
    return key if key.isprintable() and key else ascii(key.encode("utf-8", "surrogateescape"))


def occurrence_keys(prompts: Iterable[str]) -> list[str]:
    """Keys of a run's requests, in the order the harness hands them over."""
    seen: Counter[str] = Counter()
    keys = []
    for prompt in prompts:
        keys.append(record_key(prompt, seen[prompt]))
        seen[prompt] += 1
    return keys


def share_of(key: str, count: int) -> int:
    """Which of `count` jobs of a job array captures `key`: a hash of the key, so that every job
    agrees on it without talking to the others, and shares come out even."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % count
