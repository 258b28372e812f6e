"""The judge pass: every item of a task through the LLM client, unreadable replies re-asked.

A family's `Scoring.judge` decides what is asked: one batch of items (most families), or
several stages, each one batch (LongWiki: abstention, claims, verification), all through the
same client and cache, so a re-run asks nothing and an interrupted pass resumes.

Replies that do not parse are asked again (a bounded number of times, only where the backend
can answer differently) and otherwise stay unparseable: the caller counts them, nothing turns
them into a verdict, and no other item's verdict moves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from hallulens_tasks.judging.settings import JudgeSettings
from hallulens_tasks.judging.verdicts import parse_flag
from hallulens_tasks.llm.client import LLMClient, Prompt

if TYPE_CHECKING:
    from hallulens_tasks.judging.scoring import Scoring

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeItem:
    template: str  # e.g. "judge_abstention.jinja"
    values: dict[str, Any]
    parse: Callable[[str], Any]  # raw reply -> verdict, or None when unparseable
    choices: tuple[str, ...]  # the replies the prompt asks for (used by constrained judging)


@dataclass
class Judgement:
    raw: str
    verdict: Any  # None: unparseable after every attempt
    attempts: int


def _unreadable(parsers: Sequence[Callable[[str], Any]], index: int, text: str) -> bool:
    return parsers[index](text) is None


class Judge(LLMClient):
    """The LLM client of a judge: items in, verdicts out."""

    settings: JudgeSettings

    def __init__(self, settings: JudgeSettings):
        super().__init__(settings, label="Judging")
        self.unparseable = 0

    def run(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        results: list[Judgement | None] = [None] * len(items)
        todo = list(range(len(items)))
        # Greedy local engines give the same text again; only a server is worth re-asking.
        varies = self.settings.spec.backend == "openai"
        for attempt in range(1 + (self.settings.parse_retries if varies else 0)):
            if not todo:
                break
            parsers = [items[i].parse for i in todo]
            replies = self.ask(
                [Prompt(items[i].template, items[i].values) for i in todo],
                self.settings.sampling,
                attempt=attempt,
                choices=[items[i].choices if self.settings.constrained else None for i in todo],
                stale=(partial(_unreadable, parsers) if self.settings.reask_unparseable else None),
            )
            retry = []
            for i, raw in zip(todo, replies, strict=True):
                verdict = items[i].parse(raw)
                results[i] = Judgement(raw, verdict, attempt + 1)
                if verdict is None:
                    retry.append(i)
            todo = retry
        self.unparseable += len(todo)
        return results  # type: ignore[return-value]


def flag_item(template: str, values: dict, key: str) -> JudgeItem:
    """A judge asked for `{"<key>": true|false}`."""
    choices = (f'{{"{key}": true}}', f'{{"{key}": false}}')
    return JudgeItem(template, values, partial(parse_flag, key=key), choices)


def judged_entry(judgement: Judgement) -> dict:
    """A judgement as the samples file keeps it: raw text next to the parsed verdict."""
    return {"raw": judgement.raw, "verdict": judgement.verdict, "attempts": judgement.attempts}


def template_versions(roles: dict[str, str], judge: Judge) -> dict[str, str]:
    """`role -> template@version` of the templates a judge pass used."""
    return {role: f"{name}@{judge.stats.templates[name]}" for role, name in roles.items()}


def judge_task(scoring: Scoring, docs: Sequence[dict], responses: Sequence[str]) -> list[dict]:
    """One batched judge pass over a whole task (all of its stages): one outcome (a JSON-able
    dict) per doc."""
    judge = Judge(JudgeSettings.from_env(scoring.default_judge))
    try:
        outcomes = scoring.judge(judge, list(docs), list(responses))
    finally:
        judge.close()
    stats = judge.stats
    log.info(
        "judge %s on %s: %d judge prompts, %d from cache, %d asked, %d unparseable",
        judge.name,
        scoring.name,
        stats.items,
        stats.cache_hits,
        stats.requests,
        judge.unparseable,
    )
    for outcome in outcomes:
        outcome["judge"] = judge.name
    return outcomes
