"""LongWiki claim extraction: an answer cut into sentences, each sentence asked for its facts.

As upstream (VeriScore's procedure): sentences come from a rule-based splitter (upstream used
segtok; here pysbd, which also breaks at line ends and needs no data download), are stripped,
and those shorter than 5 characters are skipped. The judge sees the sentence marked
`<SOS>…<EOS>` between up to three sentences before it and one after it, and answers with one
fact per `- ` line. Facts are de-duplicated per answer by exact text (the first occurrence
keeps it). Each sentence keeps its character span in the answer, so verdicts can be mapped back
to the answer's tokens (`runs/token_labels.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from hallulens_tasks.judging.judge import JudgeItem
from hallulens_tasks.judging.verdicts import parse_claims

TEMPLATE = "judge_longwiki_claims.jinja"
MIN_SENTENCE_CHARS = 5  # upstream skips shorter sentences
CONTEXT_BEFORE = 3  # sentences of context before the focused one
CONTEXT_AFTER = 1  # and after it
SOS, EOS = "<SOS>", "<EOS>"


@dataclass(frozen=True)
class Sentence:
    text: str  # stripped
    start: int  # answer[start:end] == text
    end: int


@cache
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(answer: str) -> list[Sentence]:
    """The sentences of `answer`, stripped, with their spans in `answer`."""
    sentences: list[Sentence] = []
    cursor = 0
    for segment in _segmenter().segment(answer):
        text = segment.strip()
        start = answer.find(text, cursor) if text else -1
        if start < 0:  # pysbd (clean=False) returns pieces of the text; nothing to place
            continue
        sentences.append(Sentence(text, start, start + len(text)))
        cursor = start + len(text)
    return sentences


def focused(sentences: list[Sentence], i: int) -> tuple[str, str]:
    """(snippet, marked sentence) for sentence i: its neighbours as context, itself marked."""
    texts = [s.text for s in sentences]
    marked = f"{SOS}{texts[i]}{EOS}"
    before = " ".join(texts[max(0, i - CONTEXT_BEFORE) : i])
    after = " ".join(texts[i + 1 : i + 1 + CONTEXT_AFTER])
    return f"{before} {marked} {after}".strip(), marked


def extraction_items(sentences: list[Sentence]) -> dict[int, JudgeItem]:
    """Sentence index -> the judge item asking for its facts (short sentences are skipped)."""
    items = {}
    for i, sentence in enumerate(sentences):
        if len(sentence.text) < MIN_SENTENCE_CHARS:
            continue
        snippet, marked = focused(sentences, i)
        # free text: no fixed replies to constrain a judge to
        items[i] = JudgeItem(TEMPLATE, {"snippet": snippet, "sentence": marked}, parse_claims, ())
    return items


def unique_claims(per_sentence: list[list[str]]) -> list[list[str]]:
    """Each sentence's facts without those the answer stated before (exact text)."""
    seen: set[str] = set()
    out = []
    for claims in per_sentence:
        kept = [c for c in dict.fromkeys(claims) if c not in seen]
        seen.update(kept)
        out.append(kept)
    return out
