"""Sections of a Wikipedia article for question generation, and a sentence splitter.

Upstream (`qa_utils.split_doc`) cut an article into sections of MIN_LEN..MAX_LEN tokens of the
*question generator's* HF tokenizer: on markdown headings first, then by packing sentences; a
chunk shorter than MIN_LEN was glued onto the one before. Here the same procedure runs on a
tokenizer-free count (`approx_tokens`: words and punctuation marks), so the sections, and with
them the whole prompt set, do not depend on which generator wrote the questions and no
tokenizer has to be downloaded. On English prose the count is within about 15% of a Llama-3
token count. Sections are spans of the article text, so its own line breaks are kept (upstream
re-joined sentences with spaces).
"""

from __future__ import annotations

import itertools
import re

TOKEN_COUNT = "approx: words and punctuation marks, regex \\w+|[^\\w\\s]"

_TOKEN = re.compile(r"\w+|[^\w\s]")
# a sentence ends at . ! ? ; followed by white space, or at a line break (as upstream's splitter)
_BOUNDARY = re.compile(r"(?<=[.!?;])[ \t]+|[ \t]*\n\s*")
_LAST_WORD = re.compile(r"([^\s(\[\"']*)\.$")
# words after which a period does not end a sentence (upstream protected a similar list)
# fmt: off
_ABBREVIATIONS = frozenset({
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "no",
    "nos", "op", "dr", "st", "mr", "mrs", "ms", "prof", "gen", "col", "capt", "lt", "sgt", "rev",
    "fr", "jr", "sr", "vs", "etc", "al", "approx", "ca", "inc", "ltd", "co", "corp", "mt", "ft",
    "fig", "vol", "pp", "ed",
})
# fmt: on
_DOTTED = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # U.S, e.g, i.e (the final period is cut off)
_HEADING = re.compile(r"^#{2,}[ \t]", re.MULTILINE)


def approx_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def _abbreviated(head: str) -> bool:
    match = _LAST_WORD.search(head)
    if not match:
        return False
    word = match.group(1)
    return (
        (len(word) == 1 and word.isalpha())  # an initial: J. R. R. Tolkien
        or word.lower() in _ABBREVIATIONS
        or bool(_DOTTED.fullmatch(word))
    )


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) offsets of the sentences of text[start:end], white space trimmed."""
    end = len(text) if end is None else end
    spans: list[tuple[int, int]] = []
    begin = start
    for match in _BOUNDARY.finditer(text, start, end):
        if "\n" not in match.group() and _abbreviated(text[begin : match.start()]):
            continue
        if text[begin : match.start()].strip():
            spans.append((begin, match.start()))
        begin = match.end()
    if text[begin:end].strip():
        spans.append((begin, len(text[:end].rstrip())))
    return spans


def split_sentences(text: str) -> list[str]:
    return [text[a:b].strip() for a, b in sentence_spans(text)]


def _pack(text: str, start: int, end: int, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive sentences of text[start:end] packed into spans of at most max_tokens.

    A single sentence longer than max_tokens is a span of its own.
    """
    chunks: list[tuple[int, int]] = []
    first = last = None
    size = 0
    for a, b in sentence_spans(text, start, end):
        tokens = approx_tokens(text[a:b])
        if first is not None and size + tokens > max_tokens:
            chunks.append((first, last))
            first, size = None, 0
        if first is None:
            first = a
        last, size = b, size + tokens
    if first is not None:
        chunks.append((first, last))
    return chunks


def split_sections(document: str, min_tokens: int, max_tokens: int) -> list[str]:
    """Sections of at most about max_tokens, each (but the first) at least min_tokens.

    An article of at most max_tokens is one section. Otherwise it is cut before every heading
    of level 2 or more, parts longer than max_tokens are packed sentence by sentence, and a
    piece shorter than min_tokens joins the piece before it (so the last one may exceed
    max_tokens a little, as upstream).
    """
    if approx_tokens(document) <= max_tokens:
        return [document.strip()] if document.strip() else []
    cuts = [0, *(m.start() for m in _HEADING.finditer(document) if m.start() > 0), len(document)]
    pieces: list[tuple[int, int]] = []
    for start, end in itertools.pairwise(cuts):
        if approx_tokens(document[start:end]) <= max_tokens:
            if document[start:end].strip():
                pieces.append((start, end))
        else:
            pieces += _pack(document, start, end, max_tokens)
    merged: list[tuple[int, int]] = []
    for start, end in pieces:
        if merged and approx_tokens(document[start:end]) < min_tokens:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return [document[a:b].strip() for a, b in merged]


def candidate_sections(document: str, min_tokens: int, max_tokens: int) -> list[str]:
    """The sections a question may come from: the last is dropped when there are more than two
    ("the last section usually is the reference list", upstream)."""
    sections = split_sections(document, min_tokens, max_tokens)
    return sections[:-1] if len(sections) > 2 else sections
