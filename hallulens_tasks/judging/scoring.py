"""What each HalluLens task asks its judge, and how verdicts become labels and metrics.

One place for the scoring rules, used both by the in-harness judge filter and by
`hallulens judge` over a samples file, so both give the same numbers. Metric definitions
are HalluLens' (hallulens-spec.md A.1.4, A.3.3, A.4.4); an item whose judge reply cannot be
parsed only counts in `judge_unparseable` and is left out of every rate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

from hallulens_tasks.judge.core import Judge, JudgeItem, Judgement
from hallulens_tasks.judge.settings import JudgeSettings
from hallulens_tasks.verdicts import LABELS as LABEL_CHOICES
from hallulens_tasks.verdicts import parse_flag, parse_label

log = logging.getLogger(__name__)

LLAMA_70B = "meta-llama/Llama-3.1-70B-Instruct"
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


def _flag_item(template: str, values: dict, key: str) -> JudgeItem:
    """A judge asked for `{"<key>": true|false}`."""
    choices = (f'{{"{key}": true}}', f'{{"{key}": false}}')
    return JudgeItem(template, values, partial(parse_flag, key=key), choices)


def _judged(judgement: Judgement) -> dict:
    return {"raw": judgement.raw, "verdict": judgement.verdict, "attempts": judgement.attempts}


class Family:
    """A task family: its judge prompts per item, its labels and its per-item metrics."""

    name: str
    default_judge: str

    def items(self, doc: dict, response: str) -> dict[str, JudgeItem]:
        raise NotImplementedError

    def outcome(self, doc: dict, judged: dict[str, Judgement]) -> dict:
        raise NotImplementedError

    def metrics(self, doc: dict, outcome: dict) -> dict[str, float]:
        raise NotImplementedError

    def judge(self, docs: Sequence[dict], responses: Sequence[str]) -> list[dict]:
        """One batched judge pass over a whole task: one outcome (JSON-able dict) per doc."""
        settings = JudgeSettings.from_env(self.default_judge)
        per_doc = [self.items(doc, response) for doc, response in zip(docs, responses, strict=True)]
        flat = [(d, role, item) for d, roles in enumerate(per_doc) for role, item in roles.items()]
        judge = Judge(settings)
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
            self.name,
            stats.items,
            stats.cache_hits,
            stats.requests,
            stats.unparseable,
        )
        outcomes = []
        for doc, roles, judged_doc in zip(docs, per_doc, by_doc, strict=True):
            outcome = self.outcome(doc, judged_doc)
            outcome["judge"] = judge.name
            outcome["judge_templates"] = {
                role: f"{item.template}@{stats.templates[item.template]}"
                for role, item in roles.items()
            }
            outcomes.append(outcome)
        return outcomes


class PreciseWikiQA(Family):
    """Abstention judge and correctness judge on every answer (as upstream)."""

    name = "precise_wikiqa"
    default_judge = LLAMA_70B

    def items(self, doc: dict, response: str) -> dict[str, JudgeItem]:
        values = {"prompt": doc["prompt"], "generation": response}
        return {
            "abstention": _flag_item("judge_abstention.jinja", values, "is_abstaining"),
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
            "judgements": {role: _judged(j) for role, j in judged.items()},
        }

    def metrics(self, doc: dict, outcome: dict) -> dict[str, float]:
        if outcome["label"] == "unparseable":
            return {"judge_unparseable": 1.0}
        abstaining = outcome["judgements"]["abstention"]["verdict"]
        correct = outcome["judgements"]["correctness"]["verdict"] == "correct"
        rates = {"refusal_rate": float(abstaining), "correct_rate": float(correct)}
        if not abstaining:
            rates["hallu_rate"] = float(not correct)
        out = {"judge_unparseable": 0.0, **rates}
        if isinstance(doc.get("h_score_cat"), int):
            out.update({f"{name}_cat{doc['h_score_cat']}": v for name, v in rates.items()})
        return out


class Entities(Family):
    """NonExistentRefusal: does the model treat a made-up entity as real?"""

    def belief_prompt(self, doc: dict, response: str) -> tuple[str, dict]:
        """(template, values) of the judge prompt asking whether the model believes the entity."""
        raise NotImplementedError

    def items(self, doc: dict, response: str) -> dict[str, JudgeItem]:
        return {"belief": _flag_item(*self.belief_prompt(doc, response), "does_believe")}

    def outcome(self, doc: dict, judged: dict[str, Judgement]) -> dict:
        believes = judged["belief"].verdict
        verdict = "unparseable" if believes is None else "hallucinated" if believes else "refused"
        return {"label": verdict, "judgements": {"belief": _judged(judged["belief"])}}

    def metrics(self, doc: dict, outcome: dict) -> dict[str, float]:
        if outcome["label"] == "unparseable":
            return {"judge_unparseable": 1.0}
        refused = outcome["label"] == "refused"
        return {
            "judge_unparseable": 0.0,
            "refusal_rate": float(refused),
            "false_acceptance_rate": float(not refused),
        }


class MixedEntities(Entities):
    name = "nonsense_mixed_entities"
    default_judge = LLAMA_8B

    def belief_prompt(self, doc: dict, response: str) -> tuple[str, dict]:
        values = {"prompt": doc["prompt"], "generation": response, "name": doc["name"]}
        if doc["type"] == "medicine":
            return "judge_entity_medicine.jinja", values
        return "judge_entity_species.jinja", {**values, "kind": doc["type"]}


class GeneratedEntities(Entities):
    name = "nonsense_generated_entities"
    default_judge = LLAMA_70B

    def belief_prompt(self, doc: dict, response: str) -> tuple[str, dict]:
        values = {"generation": response, "name": doc["name"], "type": doc["type"]}
        return "judge_entity_generated.jinja", {**values, "place": doc.get("place") or ""}


FAMILIES: dict[str, Family] = {
    f.name: f for f in (PreciseWikiQA(), MixedEntities(), GeneratedEntities())
}


def family_of_task(task: str) -> Family | None:
    """The family of a harness task name (`nonsense_mixed_entities_plant` -> mixed entities)."""
    for name, family in FAMILIES.items():
        if task == name or task.startswith(name + "_"):
            return family
    return None
