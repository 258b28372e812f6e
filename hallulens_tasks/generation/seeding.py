"""Seeded draws that do not depend on the interpreter: every random choice of step 0 comes from
`seeded_rng(stream names...)`. A string seed is hashed with SHA-512 by `random.Random`, never
with `hash()`, so a set is the same under any PYTHONHASHSEED and on any machine."""

from __future__ import annotations

import random


def seeded_rng(*parts: object) -> random.Random:
    """A generator for the stream named by `parts` (e.g. ("hallulens", task, seed, "quotas"))."""
    return random.Random(":".join(map(str, parts)))
