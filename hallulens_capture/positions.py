"""Which token positions a record holds, and which generated tokens belong to the response.

A generation of G tokens after a P-token prompt feeds P + G - 1 tokens through the model: the
last generated token is never fed back, so it has no hidden state (on every engine). Position t
holds the residual stream computed for input token t of prompt + generated tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np


def token_positions(scope: str, n_prompt: int, n_generated: int) -> np.ndarray:
    """Positions captured for `capture_tokens=scope`."""
    end = n_prompt + max(n_generated - 1, 0)
    if scope == "prompt":
        return np.arange(n_prompt, dtype=np.int32)
    if scope == "generated":
        return np.arange(n_prompt, end, dtype=np.int32)
    if scope == "all":
        return np.arange(end, dtype=np.int32)
    raise ValueError(f"unknown token scope {scope!r}")


def response_length(
    tokens: Sequence[int],
    eos_ids: Collection[int],
    stop: Sequence[str],
    decode: Callable[[Sequence[int]], str],
) -> int:
    """Number of generated tokens that make up the response.

    The response ends at the first end-of-sequence token (kept) or at the first token whose
    text completes a stop string (kept), whichever comes first. Tokens a batched engine keeps
    producing for a row after that are padding for this sample, so records do not depend on
    the batch a prompt ran in.
    """
    end = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
    stop = [s for s in stop if s]

    def stops_within(k: int) -> bool:
        text = decode(tokens[:k])
        return any(s in text for s in stop)

    if not stop or not stops_within(end):
        return end
    lo, hi = 1, end  # smallest k whose text holds a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if stops_within(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
