"""Scoring rules: what each HalluLens family asks its judge, how verdicts become one label per
item, and the one rule that turns labels into rates.

Every output comes from here: the harness's per-item metrics (whose means the harness reports),
`hallulens judge`, group rows and the seed's `eval_results.json`. The rule: each item gets one
label (`correct`, `hallucinated`, `refused`, `unparseable`); an item whose label cannot be told
(any judge reply unreadable) counts only in `judge_unparseable` and is left out of every rate;
each rate is the mean of its per-item values over the items it is defined over (a share, for
0/1 values; LongWiki's precision, recall@K and F1@K are per-answer values in [0, 1]), so a
group's rate is the pooled mean over its members' items (`med_n_claims` is a median). A
refused item is never correct, so HalluLens' Correct = (1 - refusal) x (1 - hallu) holds
exactly (upstream's code counts a refusal the correctness judge calls CORRECT as correct; its
paper and README do not).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hallulens_tasks.judging import longwiki
from hallulens_tasks.judging.judge import (
    Judge,
    JudgeItem,
    Judgement,
    flag_item,
    judged_entry,
    template_versions,
)
from hallulens_tasks.judging.verdicts import LABELS as LABEL_CHOICES
from hallulens_tasks.judging.verdicts import parse_label
from hallulens_tasks.judging.wikipedia import WikiDBError
from hallulens_tasks.task_table import family_of_task

log = logging.getLogger(__name__)

LLAMA_70B = "meta-llama/Llama-3.1-70B-Instruct"
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA_405B_FP8 = "meta-llama/Llama-3.1-405B-Instruct-FP8"
MEDIANS = frozenset({"med_n_claims"})  # metrics reported as the median of their item values


@dataclass(frozen=True)
class Rate:
    """A mean over the `n` items it is defined over: their values sum to `hits`, their squares
    to `squares` (for 0/1 values, a share with squares == hits)."""

    hits: float
    n: int
    squares: float

    @property
    def value(self) -> float:
        return self.hits / self.n

    @property
    def stderr(self) -> float | str:
        """The harness's standard error of a mean: the sample standard deviation / sqrt(n)
        (for 0/1 items, sqrt(p (1 - p) / (n - 1)))."""
        if self.n < 2:
            return "N/A"
        variance = (self.squares - self.n * self.value**2) / (self.n - 1)
        return math.sqrt(max(variance, 0.0) / self.n)

    def __add__(self, other: Rate) -> Rate:
        return Rate(self.hits + other.hits, self.n + other.n, self.squares + other.squares)


@dataclass(frozen=True)
class Median:
    """The median of item values (the mean of the middle two for an even count, as pandas);
    no standard error, as the harness gives none for a median it does not bootstrap."""

    values: tuple[float, ...]

    @property
    def value(self) -> float:
        return statistics.median(self.values)

    @property
    def stderr(self) -> str:
        return "N/A"

    def __add__(self, other: Median) -> Median:
        return Median(self.values + other.values)


Statistic = Rate | Median


def pooled_rates(items: Iterable[Mapping[str, float]]) -> dict[str, Statistic]:
    """The one rule: each metric over the items that have it (`Scoring.metrics` leaves a rate
    out where it is not defined, as the harness's mean does)."""
    rates: dict[str, Statistic] = {}
    for metrics in items:
        for name, value in metrics.items():
            item = Median((value,)) if name in MEDIANS else Rate(value, 1, value * value)
            rates[name] = rates[name] + item if name in rates else item
    return rates


def median(values: Sequence[float]) -> float:
    """The harness aggregation of MEDIANS (YAML `aggregation: !function utils.median`)."""
    return Median(tuple(values)).value


def _per_bin(doc: dict, rates: dict[str, float]) -> dict[str, float]:
    """The rates again within the item's popularity bin (`h_score_cat`), as `<rate>_cat<bin>`."""
    if not isinstance(doc.get("h_score_cat"), int):
        return {}
    return {f"{name}_cat{doc['h_score_cat']}": v for name, v in rates.items()}


class Scoring:
    """The rules of one family (task_table): how its answers are judged, and their metrics."""

    name: str  # the family
    default_judge: str

    def judge(self, judge: Judge, docs: list[dict], responses: list[str]) -> list[dict]:
        """One outcome per doc (label, raw judge text and verdicts): all docs at once."""
        raise NotImplementedError

    def metrics(self, doc: dict, outcome: dict) -> dict[str, float]:
        """Per-item values of the rates, only those defined for the item's label."""
        raise NotImplementedError

    def preflight(self, docs: list[dict]) -> None:
        """Warn, when the task is loaded, about what judging `docs` will lack (the model has
        not generated yet, and a `--predict_only` run may not judge at all)."""


class OnePassScoring(Scoring):
    """A family whose judge prompts per answer are known up front: one judge batch."""

    def items(self, doc: dict, response: str) -> dict[str, JudgeItem]:
        raise NotImplementedError

    def outcome(self, doc: dict, judged: dict[str, Judgement]) -> dict:
        raise NotImplementedError

    def judge(self, judge: Judge, docs: list[dict], responses: list[str]) -> list[dict]:
        per_doc = [self.items(doc, response) for doc, response in zip(docs, responses, strict=True)]
        flat = [(d, role, item) for d, roles in enumerate(per_doc) for role, item in roles.items()]
        judged = judge.run([item for _, _, item in flat])
        by_doc: list[dict[str, Judgement]] = [{} for _ in docs]
        for (d, role, _), judgement in zip(flat, judged, strict=True):
            by_doc[d][role] = judgement
        outcomes = []
        for doc, roles, judged_doc in zip(docs, per_doc, by_doc, strict=True):
            outcome = self.outcome(doc, judged_doc)
            outcome["judge_templates"] = template_versions(
                {role: item.template for role, item in roles.items()}, judge
            )
            outcomes.append(outcome)
        return outcomes


class PreciseWikiQAScoring(OnePassScoring):
    """Abstention judge and correctness judge on every answer, as upstream: both verdicts stay in
    the samples; a refusal is `refused` whatever the correctness judge said."""

    name = "precise_wikiqa"
    default_judge = LLAMA_70B

    def items(self, doc: dict, response: str) -> dict[str, JudgeItem]:
        values = {"prompt": doc["prompt"], "generation": response}
        return {
            "abstention": flag_item("judge_abstention.jinja", values, "is_abstaining"),
            "correctness": JudgeItem(
                "judge_correctness.jinja",
                {**values, "answer": doc["answer"]},
                parse_label,
                tuple(label.upper() for label in LABEL_CHOICES),
            ),
        }

    def outcome(self, doc: dict, judged: dict[str, Judgement]) -> dict:
        abstaining = judged["abstention"].verdict
        label = judged["correctness"].verdict
        if abstaining is None or label is None:
            verdict = "unparseable"
        elif abstaining:
            verdict = "refused"
        else:
            verdict = "correct" if label == "correct" else "hallucinated"
        return {
            "label": verdict,
            "judgements": {role: judged_entry(j) for role, j in judged.items()},
        }

    def metrics(self, doc: dict, outcome: dict) -> dict[str, float]:
        label = outcome["label"]
        if label == "unparseable":
            return {"judge_unparseable": 1.0}
        rates = {
            "refusal_rate": float(label == "refused"),
            "correct_rate": float(label == "correct"),
        }
        if label != "refused":
            rates["hallu_rate"] = float(label == "hallucinated")
        return {"judge_unparseable": 0.0, **rates, **_per_bin(doc, rates)}


class EntityScoring(OnePassScoring):
    """NonExistentRefusal: does the model treat a made-up entity as real?"""

    def belief_prompt(self, doc: dict, response: str) -> tuple[str, dict]:
        """(template, values) of the judge prompt asking whether the model believes the entity."""
        raise NotImplementedError

    def items(self, doc: dict, response: str) -> dict[str, JudgeItem]:
        return {"belief": flag_item(*self.belief_prompt(doc, response), "does_believe")}

    def outcome(self, doc: dict, judged: dict[str, Judgement]) -> dict:
        believes = judged["belief"].verdict
        verdict = "unparseable" if believes is None else "hallucinated" if believes else "refused"
        return {"label": verdict, "judgements": {"belief": judged_entry(judged["belief"])}}

    def metrics(self, doc: dict, outcome: dict) -> dict[str, float]:
        if outcome["label"] == "unparseable":
            return {"judge_unparseable": 1.0}
        refused = outcome["label"] == "refused"
        return {
            "judge_unparseable": 0.0,
            "refusal_rate": float(refused),
            "false_acceptance_rate": float(not refused),
        }


class MixedEntitiesScoring(EntityScoring):
    name = "nonsense_mixed_entities"
    default_judge = LLAMA_8B

    def belief_prompt(self, doc: dict, response: str) -> tuple[str, dict]:
        values = {"prompt": doc["prompt"], "generation": response, "name": doc["name"]}
        if doc["type"] == "medicine":
            return "judge_entity_medicine.jinja", values
        return "judge_entity_species.jinja", {**values, "kind": doc["type"]}


class GeneratedEntitiesScoring(EntityScoring):
    name = "nonsense_generated_entities"
    default_judge = LLAMA_70B

    def belief_prompt(self, doc: dict, response: str) -> tuple[str, dict]:
        values = {"generation": response, "name": doc["name"], "type": doc["type"]}
        return "judge_entity_generated.jinja", {**values, "place": doc.get("place") or ""}


class LongWikiScoring(Scoring):
    """LongWiki: claims of each answer verified against Wikipedia (stages in `longwiki.py`).
    Precision, recall@K and F1@K are per-answer values over the answers not refused;
    `refusal_rate` counts answers judged not knowledgeable or without claims."""

    name = "longwiki"
    default_judge = LLAMA_405B_FP8  # upstream's abstention judge, claim extractor and verifier

    def judge(self, judge: Judge, docs: list[dict], responses: list[str]) -> list[dict]:
        outcomes = longwiki.judge_answers(judge, docs, responses)
        used = {role: t for role, t in longwiki.ROLES.items() if t in judge.stats.templates}
        for outcome in outcomes:
            outcome["judge_templates"] = template_versions(used, judge)
        return outcomes

    def preflight(self, docs: list[dict]) -> None:
        try:
            longwiki.open_wiki(docs).close()
        except WikiDBError as exc:
            log.warning(
                "!!! %s. Judging this run will stop with this error after the model has "
                "answered: fix it first, or run with --predict_only and judge later with "
                "`hallulens judge --wiki_db PATH`. !!!",
                exc,
            )

    def metrics(self, doc: dict, outcome: dict) -> dict[str, float]:
        label = outcome["label"]
        if label == "unparseable":
            return {"judge_unparseable": 1.0}
        if label == "refused":
            rates = {"refusal_rate": 1.0}
            return {"judge_unparseable": 0.0, **rates, **_per_bin(doc, rates)}
        scores = longwiki.answer_scores(outcome)
        rates = {"refusal_rate": 0.0, **{k: v for k, v in scores.items() if k != "n_claims"}}
        return {
            "judge_unparseable": 0.0,
            **rates,
            "med_n_claims": scores["n_claims"],
            **_per_bin(doc, rates),
        }


SCORINGS: dict[str, Scoring] = {
    s.name: s
    for s in (
        PreciseWikiQAScoring(),
        LongWikiScoring(),
        MixedEntitiesScoring(),
        GeneratedEntitiesScoring(),
    )
}


def scoring_for_task(task: str) -> Scoring | None:
    """The rules of a harness task's family (`nonsense_mixed_entities_plant` -> mixed entities);
    None for a task without a judge."""
    family = family_of_task(task)
    return None if family is None else SCORINGS.get(family.name)
