"""Token-level labels: LongWiki's claim verdicts on the generated tokens of a record.

Each judged sentence has a class: `unsupported` when one of its claims is unsupported,
`unparseable` when one of its verdicts could not be read, `supported` when all of its claims
are supported; a sentence without claims has none. The sentence's characters in the response
are mapped to the generated tokens whose text overlaps them (token texts come from decoding
growing prefixes of `generated_token_ids` with the tested model's tokenizer, which must give
back the response exactly). The label entry stores this compactly as runs over generated-token
indices, `{"generated": G, "runs": [[first, end, class, sentence], ...]}` (end exclusive,
`sentence` indexing the sample's `sentences`); a token in no run carries no claim, and a token
in two runs (one straddling two sentences) takes the more severe class.

In a record, row t of the activations holds input token t, so the rows of generated token j
is at position n_prompt + j; `row_labels` gives each captured row its token's class.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from hallulens_capture.errors import HalluLensError

TOKEN_CLASSES = ("no_claim", "supported", "unparseable", "unsupported")  # by severity
PROMPT_ROW = -1  # row_labels of rows that hold prompt tokens


class TokenizerError(HalluLensError):
    """The tested model's tokenizer cannot be loaded."""


def sentence_class(sentence: Mapping) -> str | None:
    """The class of a judged sentence's tokens (None: no claim)."""
    claims = sentence.get("claims")
    if claims is None:
        return "unparseable"
    verdicts = [claim.get("supported") for claim in claims]
    if False in verdicts:
        return "unsupported"
    if None in verdicts:
        return "unparseable"
    return "supported" if verdicts else None


def token_ends(
    decode: Callable[[Sequence[int]], str], ids: Sequence[int], response: str
) -> list[int] | None:
    """Character end of each generated token in `response` (a token that completes a character
    another one began shares it); None when the tokens do not decode to `response`."""
    if decode(ids) != response:
        return None
    ends: list[int | None] = []
    for k in range(1, len(ids) + 1):
        prefix = decode(ids[:k])
        ends.append(len(prefix) if response.startswith(prefix) else None)
    resolved = len(response)
    for k in range(len(ends) - 1, -1, -1):  # a partial character's tokens reach its end
        resolved = ends[k] if ends[k] is not None else resolved
        ends[k] = resolved
    return ends  # type: ignore[return-value]


def token_runs(ends: Sequence[int], sentences: Sequence[Mapping]) -> list[list]:
    """[first, end, class, sentence] per judged sentence with claims, over token indices."""
    starts = [0, *ends[:-1]]
    runs = []
    for index, sentence in enumerate(sentences):
        kind = sentence_class(sentence)
        if kind is None:
            continue
        begin, stop = sentence["span"]
        first = bisect_right(ends, begin)  # first token ending after the sentence starts
        end = first
        while end < len(ends) and starts[end] < stop:
            end += 1
        if end > first:
            runs.append([first, end, kind, index])
    return runs


def token_labels(entry: Mapping) -> np.ndarray:
    """Per generated token, the index of its class in TOKEN_CLASSES, from a label entry of
    `store.labels()` (KeyError for an entry without token labels)."""
    tokens = entry["tokens"]
    codes = np.zeros(tokens["generated"], dtype=np.int8)
    for first, end, kind, _ in tokens["runs"]:
        np.maximum(codes[first:end], TOKEN_CLASSES.index(kind), out=codes[first:end])
    return codes


def row_labels(record, entry: Mapping) -> np.ndarray:
    """Per captured row of `record`, its token's class index (PROMPT_ROW for prompt tokens)."""
    positions = np.asarray(record.token_positions)
    generated = positions - len(record.prompt_token_ids)
    out = np.full(len(positions), PROMPT_ROW, dtype=np.int8)
    out[generated >= 0] = token_labels(entry)[generated[generated >= 0]]
    return out


def load_tokenizer(model: str, backend: str):
    """The tested model's tokenizer, from the record's `model` and `backend` (or a path)."""
    from transformers import AutoTokenizer

    from hallulens_models.embedded import SMOLLM2, resolve_pretrained

    try:
        if backend == "gguf" and model != SMOLLM2 and model.endswith(".gguf"):
            path = Path(model)
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(resolve_pretrained(model))
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(
            f"cannot load the tokenizer of {model!r} for token labels ({first[:200]}): "
            "give its directory with --tokenizer"
        ) from None


def token_entry(record, response: str, sentences: Sequence[Mapping], tokenizer) -> dict | None:
    """The `tokens` part of a label entry, or None when the record's tokens do not decode to
    the judged response."""
    ids = [int(i) for i in record.generated_token_ids]
    ends = token_ends(lambda part: tokenizer.decode(part, skip_special_tokens=True), ids, response)
    if ends is None:
        return None
    return {"generated": len(ids), "runs": token_runs(ends, sentences)}
