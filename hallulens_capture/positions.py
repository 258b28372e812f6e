"""Which token positions a record holds, and which generated tokens belong to the response.

A generation of G tokens after a P-token prompt feeds P + G - 1 tokens through the model: the
last generated token is never fed back, so it has no hidden state (on every engine). Position t
holds the residual stream computed for input token t of prompt + generated tokens. The state at
position P - 1 + j is the one that produced generated token j, so the `response` scope
(P - 1 .. P + G - 2) holds one state per generated token, aligned with `generated_token_ids`.
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
    if scope == "response":  # the states that produced the generated tokens, one per token
        return np.arange(n_prompt - 1, n_prompt - 1 + n_generated, dtype=np.int32)
    if scope == "all":
        return np.arange(end, dtype=np.int32)
    raise ValueError(f"unknown token scope {scope!r}")


def _holds_stop(text: str, stop: Sequence[str]) -> bool:
    return any(s in text for s in stop if s)


def ends_response(
    tokens: Sequence[int],
    eos_ids: Collection[int],
    stop: Sequence[str],
    decode: Callable[[Sequence[int]], str],
) -> bool:
    """Whether the response is complete with its last token (see `response_length`); an engine
    that decodes token by token asks this after each one."""
    if not tokens:
        return False
    return tokens[-1] in eos_ids or (any(stop) and _holds_stop(decode(tokens), stop))


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
    if not any(stop) or not _holds_stop(decode(tokens[:end]), stop):
        return end
    lo, hi = 1, end  # smallest k whose text holds a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if _holds_stop(decode(tokens[:mid]), stop):
            hi = mid
        else:
            lo = mid + 1
    return lo
