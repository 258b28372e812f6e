"""Which records a selection takes and what each contributes, from headers and labels only.

Records come in store order (sorted keys), so a plan, and every export made from it, is the
same for the same store, labels and selection. Records left out are counted by reason, never
dropped silently; a selection the store cannot satisfy at all is an error naming the fix.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from hallulens_analysis.answers import answer_tokens, tokenizer_decode
from hallulens_analysis.baselines import token_scores
from hallulens_analysis.errors import SelectionError
from hallulens_analysis.selection import UNLABELLED, Reduction, Selection, compact
from hallulens_capture.record import Record
from hallulens_capture.store import ActivationStore


@dataclass(frozen=True)
class Item:
    """One selected record. `answer` is the gold answer's response-token span with a state."""

    key: str
    task: str
    doc_id: int | None
    label: str  # "" when not labelled
    y: int  # 1 / 0 against the target, -1 outside it
    model: str
    prompt: str
    response: str
    n_prompt: int
    n_generated: int
    first_position: int  # position of the record's first stored token row
    answer: tuple[int, int] | None
    scores: dict[str, float]  # logprob baselines the record has tensors for

    @property
    def group(self) -> str:
        """The question: the prompt's digest without the `-n` suffix of repeated samples."""
        return self.key.split("-")[0]


@dataclass
class Plan:
    selection: Selection
    items: list[Item]
    layer_ids: tuple[int, ...]
    hidden: int
    excluded: dict[str, int]  # reason -> records left out
    store_path: str

    def shape(self, reduction: Reduction) -> tuple[int, ...]:
        """Per-record shape of a reduction's array: [layers, (window,) hidden]."""
        if reduction.window:
            return (len(self.layer_ids), reduction.window, self.hidden)
        return (len(self.layer_ids), self.hidden)

    def groups(self) -> np.ndarray:
        """One integer id per question, numbered in order of first appearance."""
        ids: dict[str, int] = {}
        return np.array([ids.setdefault(i.group, len(ids)) for i in self.items], dtype=np.int64)

    def label_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(i.label or UNLABELLED for i in self.items).items()))

    def digest(self) -> str:
        """Fingerprint of everything an export of this plan holds (resume checks)."""
        payload = {
            "selection": self.selection.as_dict(),
            "layers": self.layer_ids,
            "hidden": self.hidden,
            "items": [asdict(i) for i in self.items],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_plan(
    store: ActivationStore,
    selection: Selection,
    *,
    tokenizer: object = None,
    require_target: bool = False,
) -> Plan:
    """Plan a selection over `store`. With `require_target`, only records inside the binary
    target are taken, and both classes must be present (a probe needs them)."""
    wants_answer = any(r.name == "answer" for r in selection.reductions)
    if wants_answer and tokenizer is None:
        raise SelectionError(
            "reduction answer needs the model's tokenizer to find the answer's tokens "
            "(tokenizer=...; CLI: --tokenizer NAME_OR_PATH)"
        )
    decode = tokenizer_decode(tokenizer) if wants_answer else None
    labels = store.labels()
    items: list[Item] = []
    excluded: Counter[str] = Counter()
    tasks_seen: Counter[str] = Counter()
    considered: list[str] = []  # labels of the records of the selected tasks and labels
    layer_ids: tuple[int, ...] = ()
    hidden = 0
    for key in store:
        record = store[key]
        entry = labels.get(key, {})
        task = record.task or entry.get("task") or ""
        tasks_seen[task or "-"] += 1
        if not selection.wants_task(task):
            continue
        label = entry.get("label", "")
        if not selection.wants_label(label):
            excluded[f"label {label or UNLABELLED} not selected"] += 1
            continue
        considered.append(label)
        y = selection.target.y(label)
        if require_target and y < 0:
            excluded[f"label {label or UNLABELLED} outside the target"] += 1
            continue
        if not layer_ids:
            layer_ids, hidden = selection.layer_ids(record.layer_ids.tolist()), record.shape[2]
        _check_layers(record, layer_ids, hidden)
        answer = None
        if wants_answer:
            answer, reason = _answer_span(record, entry.get("answer"), decode)  # type: ignore[arg-type]
            if reason:
                excluded[reason] += 1
                continue
        positions = record.token_positions
        first = int(positions[0]) if len(positions) else len(record.prompt_token_ids)
        short = _too_short(record, first, selection, answer)
        if short:
            excluded[short] += 1
            continue
        items.append(
            Item(
                key=key,
                task=task,
                doc_id=record.doc_id,
                label=label,
                y=y,
                model=record.model,
                prompt=record.prompt,
                response=record.response,
                n_prompt=len(record.prompt_token_ids),
                n_generated=len(record.generated_token_ids),
                first_position=first,
                answer=answer,
                scores=token_scores(record),
            )
        )
    if considered and require_target:
        selection.target.check_classes(considered)
    if not items:
        raise SelectionError(
            f"no record matches {json.dumps(selection.as_dict())} (store: {dict(tasks_seen)}; "
            f"left out: {dict(excluded) or 'none'})"
        )
    return Plan(selection, items, layer_ids, hidden, dict(sorted(excluded.items())), store.path)


def _check_layers(record: Record, layer_ids: tuple[int, ...], hidden: int) -> None:
    held = record.layer_ids.tolist()
    missing = [i for i in layer_ids if i not in held]
    if missing:
        raise SelectionError(
            f"record {record.key} holds layers {compact(held)}, not layer {missing[0]} "
            "(records of one store differ: select layers every record holds)"
        )
    if record.shape[2] != hidden:
        raise SelectionError(f"record {record.key} has hidden size {record.shape[2]}, not {hidden}")


def _answer_span(record: Record, gold: object, decode) -> tuple[tuple[int, int] | None, str]:
    """The gold answer's tokens that have a state, or the reason the record has none."""
    if not isinstance(gold, str) or not gold.strip():
        return None, "no gold answer (reduction answer)"
    span = answer_tokens(record.generated_token_ids.tolist(), gold, decode)
    if span is None:
        return None, "gold answer not in the response (reduction answer)"
    start, stop = span[0], min(span[1], len(record.generated_token_ids) - 1)
    if start >= stop:  # the answer is the last generated token, which is never fed back
        return None, "gold answer only in the last token, which has no state (reduction answer)"
    return (start, stop), ""


def _too_short(
    record: Record, first: int, selection: Selection, answer: tuple[int, int] | None
) -> str:
    """Check the record holds every position the reductions read (its rows start at position
    `first`); the reason when it is too short for one, an error when its scope lacks them."""
    n_prompt, n_generated = len(record.prompt_token_ids), len(record.generated_token_ids)
    end = first + record.shape[1]
    for reduction in selection.reductions:
        if n_generated < reduction.min_generated:
            return f"response too short for {reduction.name}"
        a, b = reduction.offsets(n_generated, answer)
        if b > a and not (first <= n_prompt + a and n_prompt + b <= end):
            raise SelectionError(
                f"reduction {reduction.name} reads positions {n_prompt + a}..{n_prompt + b - 1} "
                f"that record {record.key} (capture_tokens={record.capture_tokens}) does not "
                f"hold: capture with {reduction.scope_hint()}"
            )
    return ""
