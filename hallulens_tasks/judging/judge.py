"""The judge pass: every item of a task through the LLM client, unreadable replies re-asked.

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


def judge_task(scoring: Scoring, docs: Sequence[dict], responses: Sequence[str]) -> list[dict]:
    """One batched judge pass over a whole task: one outcome (a JSON-able dict) per doc."""
    per_doc = [scoring.items(doc, response) for doc, response in zip(docs, responses, strict=True)]
    flat = [(d, role, item) for d, roles in enumerate(per_doc) for role, item in roles.items()]
    judge = Judge(JudgeSettings.from_env(scoring.default_judge))
    try:
        judged = judge.run([item for _, _, item in flat])
    finally:
        judge.close()
    by_doc: list[dict[str, Judgement]] = [{} for _ in docs]
    for (d, role, _), judgement in zip(flat, judged, strict=True):
        by_doc[d][role] = judgement
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
    outcomes = []
    for doc, roles, judged_doc in zip(docs, per_doc, by_doc, strict=True):
        outcome = scoring.outcome(doc, judged_doc)
        outcome["judge"] = judge.name
        outcome["judge_templates"] = {
            role: f"{item.template}@{stats.templates[item.template]}"
            for role, item in roles.items()
        }
        outcomes.append(outcome)
    return outcomes
