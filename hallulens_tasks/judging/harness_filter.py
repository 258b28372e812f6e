"""The harness side of judging: a Filter that judges a whole task in one batch, lazily.

`JudgeFilter.apply` gets every response of the task at once but only wraps them; the batched
judge pass runs when the first metric needs a verdict. Under `--predict_only` the harness never
asks for metrics, so no judge runs and the samples file keeps the plain responses, ready for
`hallulens judge` once the tested model has left the GPU. After judging, each sample's
`filtered_resps` is the outcome as JSON: label, raw judge text and parsed verdict per judge.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from lm_eval.api.filter import Filter

from hallulens_tasks.judging.group_rows import TASK_RATES
from hallulens_tasks.judging.judge import judge_task
from hallulens_tasks.judging.scoring import SCORINGS, Scoring, pooled_rates
from hallulens_tasks.task_table import FAMILIES, harness_task


class _TaskBatch:
    def __init__(self, scoring: Scoring, responses: list[str], docs: list[dict]):
        self.scoring = scoring
        self.responses = responses
        self.docs = docs
        self.outcomes: list[dict] | None = None

    def outcome(self, i: int) -> dict:
        if self.outcomes is None:
            self.outcomes = judge_task(self.scoring, self.docs, self.responses)
            items = map(self.scoring.metrics, self.docs, self.outcomes)
            task = harness_task(FAMILIES[self.scoring.name], self.docs[0])
            TASK_RATES[task] = (len(self.docs), pooled_rates(items))
        return self.outcomes[i]


class PendingVerdict:
    """One sample's verdict; judging the whole task the first time any verdict is read."""

    def __init__(self, batch: _TaskBatch, index: int):
        self._batch = batch
        self._index = index

    @property
    def scoring(self) -> Scoring:
        return self._batch.scoring

    def outcome(self) -> dict:
        return self._batch.outcome(self._index)

    def __str__(self) -> str:  # what the harness writes into the samples file
        if self._batch.outcomes is None:
            return self._batch.responses[self._index]
        return json.dumps(self.outcome(), ensure_ascii=False)

    def __reduce__(self):  # gathered across ranks as its text
        return (str, (str(self),))


class JudgeFilter(Filter):
    """YAML: `filter: [{function: !function utils.JudgeFilter, family: precise_wikiqa}]`."""

    def __init__(self, family: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if family not in SCORINGS:
            raise ValueError(f"unknown HalluLens family {family!r}: one of {', '.join(SCORINGS)}")
        self.scoring = SCORINGS[family]

    def apply(self, resps: Sequence[Sequence[str]], docs: Sequence[dict]) -> list[PendingVerdict]:
        batch = _TaskBatch(self.scoring, [r[0] if r else "" for r in resps], list(docs))
        return [PendingVerdict(batch, i) for i in range(len(batch.docs))]


def process_results(doc: dict, results: list[PendingVerdict]) -> dict[str, float]:
    verdict = results[0]
    return verdict.scoring.metrics(doc, verdict.outcome())
