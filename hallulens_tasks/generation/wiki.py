"""PreciseWikiQA and LongWiki prompt sets: questions written by an LLM from GoodWiki sections.

Upstream's procedure: GoodWiki articles are binned by the
WikiRank popularity of their title; per bin, articles are shuffled, one section of each
(MIN..MAX tokens, not the last) is chosen at random, the generator writes a question about it
(temperature 0.7, top_p 0.9) and then, at temperature 0, either answers it from the section or
says "unanswerable"; items failing the answerability filter are dropped, and each bin keeps
the first items that pass, in article order, up to its quota.

Differences, all for a reproducible set that never crashes on a shortfall:
- Every random choice (article order per bin, section per article, which bins get the
  remainder of N) comes from a `random.Random` seeded with a string made of the seed, the task
  and what is drawn, so it depends neither on PYTHONHASHSEED nor on the generator's replies.
  Sampled generator calls carry the seed too, and every call is cached.
- Over-generation instead of a fixed buffer and an assert: a bin asks for questions in waves
  sized by what it still lacks (1 + overgenerate times), up to `max_candidates` articles; a
  bin that still comes up short is reported in the manifest (upstream LongWiki asserted, and
  PreciseWikiQA silently came up short). Since waves take the shuffled articles in order, the
  set is the same whatever the wave sizes.
- N is split exactly: N // bins per bin and the remainder to bins drawn with the seed
  (upstream dropped the remainder; for N < 10 it made 10 items).
- Titles missing from WikiRank are in no bin (upstream put them in bin 0); bin
  edges are the deciles of the source's own scores (see `popularity_bins`).
- Sections come from a tokenizer-free splitter (see `sections`).
- The filter is case-insensitive ("Unanswerable." is dropped; upstream kept it), drops empty
  replies, questions starting "Unfortunately" and LongWiki's "[NO QUESTION]" sentinel, and
  stores question and answer stripped (Llama chat templates strip the user turn anyway).
- LongWiki's not-exist list (titles missing from the FActScore DB) is not shipped; pass it as
  `exclude` (`--exclude-titles FILE`).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from hallulens_tasks.generation.errors import GenerationError
from hallulens_tasks.generation.llm import Generator, Sampling
from hallulens_tasks.generation.sections import (
    TOKEN_COUNT,
    candidate_sections,
    split_sentences,
)
from hallulens_tasks.generation.seeding import seeded_rng
from hallulens_tasks.generation.sources import (
    GoodWiki,
    PopularityBins,
    WikiRank,
    normalize_title,
    popularity_bins,
)

log = logging.getLogger(__name__)

N_BINS = 10
ARTICLE_FIELDS = ("pageid", "revid", "description", "categories")  # kept from GoodWiki


@dataclass(frozen=True)
class WikiTask:
    name: str
    bins: tuple[int, ...]  # h_score_cat values used (0 = least popular)
    min_tokens: int
    max_tokens: int
    question_template: str
    answer_template: str
    buffer: int  # upstream's extra candidate articles per bin
    longform: bool

    def question_problem(self, reply: str) -> str | None:
        """Why a generated question is unusable, or None."""
        question = reply.strip()
        if not question:
            return "empty question"
        if question.lower().startswith("unfortunately"):
            return "no question"
        if self.longform and "[no question]" in question.lower():
            return "no question"
        return None

    def answer_problem(self, reply: str) -> str | None:
        """Why an item fails the answerability filter, or None (upstream: justify_answerability)."""
        answer = reply.strip()
        lowered = answer.lower()
        if not answer:
            return "empty answer"
        if "unanswerable" in lowered or lowered.startswith("unfortunately"):
            return "unanswerable"
        if self.longform and len(split_sentences(answer)) < 4:
            return "answer under 4 sentences"
        if not self.longform and len(answer.split()) > 10:
            return "answer over 10 words"
        return None


PRECISE_WIKIQA = WikiTask(
    "precise_wikiqa",
    bins=tuple(range(N_BINS)),
    min_tokens=200,
    max_tokens=500,
    question_template="generate_precise_question.jinja",
    answer_template="generate_precise_answer.jinja",
    buffer=100,
    longform=False,
)
LONGWIKI = WikiTask(
    "longwiki",
    bins=tuple(range(5, N_BINS)),  # the 5 most popular deciles
    min_tokens=500,
    max_tokens=750,
    question_template="generate_longwiki_question.jinja",
    answer_template="generate_longwiki_answer.jinja",
    buffer=5,
    longform=True,
)
WIKI_TASKS = {task.name: task for task in (PRECISE_WIKIQA, LONGWIKI)}


def question_sampling(seed: int) -> Sampling:
    return Sampling(temperature=0.7, max_tokens=512, top_p=0.9, seed=seed)


ANSWER_SAMPLING = Sampling(temperature=0.0, max_tokens=512)


def _rng(seed: int, task: str, *what: object) -> random.Random:
    return seeded_rng("hallulens", task, seed, *what)


def bin_quotas(n: int, bins: tuple[int, ...], seed: int, task: str) -> dict[int, int]:
    """N // len(bins) per bin, plus one for N % len(bins) bins drawn with the seed."""
    extra = set(_rng(seed, task, "quotas").sample(bins, n % len(bins)))
    return {b: n // len(bins) + (b in extra) for b in bins}


@dataclass
class _Candidate:
    bin: int
    title: str
    article: dict
    section: str | None
    question: str = ""
    answer: str = ""  # set only when the item passed every filter


@dataclass
class WikiSet:
    rows: list[dict]
    bins: PopularityBins
    report: dict = field(default_factory=dict)


def build_wiki_set(
    task: WikiTask,
    goodwiki: GoodWiki,
    wikirank: WikiRank,
    n: int,
    seed: int,
    generator: Generator,
    *,
    overgenerate: float = 0.2,
    max_candidates: int | None = None,
    exclude: Iterable[str] = (),
) -> WikiSet:
    """The rows of a `task` set of `n` questions; see the module docstring for the procedure.

    `max_candidates` caps the articles tried per bin (default 3 x quota + upstream's buffer);
    `exclude` lists titles never used (LongWiki: upstream's not-exist list).
    """
    if n < 1:
        raise GenerationError(f"--N must be at least 1 (got {n})")
    if overgenerate < 0:
        raise GenerationError(f"--overgenerate must be at least 0 (got {overgenerate:g})")
    if max_candidates is not None and max_candidates < 1:
        raise GenerationError(f"--max-candidates must be at least 1 (got {max_candidates})")
    articles: dict[str, dict] = {}
    for article in goodwiki.articles:
        articles.setdefault(article["title"], article)
    bins = popularity_bins(list(articles), wikirank.scores, N_BINS)
    excluded = {normalize_title(t) for t in exclude}
    pools: dict[int, list[str]] = {b: [] for b in task.bins}
    for title in sorted(bins.h_score_cat):
        cat = bins.h_score_cat[title]
        if cat in pools and normalize_title(title) not in excluded:
            pools[cat].append(title)
    for b, pool in pools.items():
        _rng(seed, task.name, "articles", b).shuffle(pool)
    quotas = bin_quotas(n, task.bins, seed, task.name)
    caps = {
        b: min(len(pools[b]), max_candidates or 3 * quotas[b] + task.buffer) if quotas[b] else 0
        for b in task.bins
    }
    accepted: dict[int, list[dict]] = {b: [] for b in task.bins}
    tried = dict.fromkeys(task.bins, 0)
    rejected: Counter[str] = Counter()
    while True:
        wave: list[_Candidate] = []
        for b in task.bins:
            missing = quotas[b] - len(accepted[b])
            if missing <= 0 or tried[b] >= caps[b]:
                continue
            size = math.ceil(missing * (1 + overgenerate))
            for title in pools[b][tried[b] : min(caps[b], tried[b] + size)]:
                sections = candidate_sections(
                    articles[title]["document"], task.min_tokens, task.max_tokens
                )
                rng = _rng(seed, task.name, "section", title)
                section = rng.choice(sections) if sections else None
                wave.append(_Candidate(b, title, articles[title], section))
            tried[b] = min(caps[b], tried[b] + size)
        if not wave:
            break
        _ask(task, wave, seed, generator, rejected)
        for candidate in wave:
            if candidate.answer and len(accepted[candidate.bin]) < quotas[candidate.bin]:
                accepted[candidate.bin].append(_row(candidate, bins))
    rows = [row for b in task.bins for row in accepted[b]]
    per_bin = {
        str(b): {
            "quota": quotas[b],
            "accepted": len(accepted[b]),
            "shortfall": quotas[b] - len(accepted[b]),
            "articles_in_bin": len(pools[b]),
            "articles_tried": tried[b],
            "max_articles": caps[b],
        }
        for b in task.bins
    }
    for b, entry in per_bin.items():
        if entry["shortfall"]:
            log.warning(
                "%s bin %s: %d of %d questions after trying %d of its %d articles",
                task.name,
                b,
                entry["accepted"],
                entry["quota"],
                entry["articles_tried"],
                entry["articles_in_bin"],
            )
    report = {
        "bins_used": list(task.bins),
        "per_bin": per_bin,
        "shortfall": sum(e["shortfall"] for e in per_bin.values()),
        "rejected": dict(sorted(rejected.items())),
        "excluded_titles": len(excluded),
        "overgenerate": overgenerate,
        "max_candidates_per_bin": max_candidates,
        "sections": {
            "min_tokens": task.min_tokens,
            "max_tokens": task.max_tokens,
            "token_count": TOKEN_COUNT,
        },
        "sampling": {
            "question": question_sampling(seed).as_dict(),
            "answer": ANSWER_SAMPLING.as_dict(),
        },
    }
    return WikiSet(rows, bins, report)


def _ask(
    task: WikiTask, wave: list[_Candidate], seed: int, generator: Generator, rejected: Counter
) -> None:
    """Question, then answer, for every candidate of the wave (two batches); a candidate that
    passes gets its answer, failures are counted in `rejected`."""
    with_text = [c for c in wave if c.section is not None]
    if len(with_text) < len(wave):
        rejected["no text"] += len(wave) - len(with_text)
    replies = generator.ask(
        task.question_template,
        [{"title": c.title, "reference": c.section} for c in with_text],
        question_sampling(seed),
    )
    asked = []
    for candidate, reply in zip(with_text, replies, strict=True):
        problem = task.question_problem(reply)
        if problem:
            rejected[problem] += 1
        else:
            candidate.question = reply.strip()
            asked.append(candidate)
    answers = generator.ask(
        task.answer_template,
        [{"reference": c.section, "question": c.question} for c in asked],
        ANSWER_SAMPLING,
    )
    for candidate, reply in zip(asked, answers, strict=True):
        problem = task.answer_problem(reply)
        if problem:
            rejected[problem] += 1
        else:
            candidate.answer = reply.strip()


def _row(candidate: _Candidate, bins: PopularityBins) -> dict:
    article = candidate.article
    row = {
        "prompt": candidate.question,
        "answer": candidate.answer,
        "title": candidate.title,
        "h_score_cat": candidate.bin,
        "h_score": bins.h_score[candidate.title],
        "reference": candidate.section,
    }
    row.update({key: article[key] for key in ARTICLE_FIELDS if article.get(key) is not None})
    return row
