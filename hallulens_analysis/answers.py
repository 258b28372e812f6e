"""Where the gold answer sits in a response, in response tokens (the `answer` reduction).

The response's tokens are decoded one prefix at a time, so a character span of the decoded text
maps back to the tokens that spell it; the first case-insensitive occurrence counts (spaces in
the answer match any run of whitespace).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


def tokenizer_decode(tokenizer: object) -> Decode:
    """A decode function from a tokenizer object or a name/path transformers can load."""
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)  # type: ignore[attr-defined]


def answer_tokens(token_ids: Sequence[int], answer: str, decode: Decode) -> tuple[int, int] | None:
    """Response tokens [start, stop) that cover the gold answer's text, or None without one."""
    words = answer.split()
    if not words:
        return None
    match = re.search(r"\s+".join(map(re.escape, words)), decode(token_ids), re.IGNORECASE)
    if match is None:
        return None
    ends = [len(decode(token_ids[: i + 1])) for i in range(len(token_ids))]
    start = next(i for i, end in enumerate(ends) if end > match.start())
    stop = next(i for i, end in enumerate(ends) if end >= match.end()) + 1
    return start, stop
