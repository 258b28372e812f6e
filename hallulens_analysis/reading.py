"""From a store to arrays: the reductions of each record, streamed in bounded batches.

Each record is read once per pass: one copy of the selected layers over the token span every
reduction together needs (a view of LMDB's memory map is sliced, not the whole record read),
then each reduction computed from it in float32. `stream` holds one batch at a time, sized to a
memory budget; `collect` keeps everything (for data that fits in memory; larger data goes
through an export and `np.load(..., mmap_mode="r")`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hallulens_analysis.errors import SelectionError
from hallulens_analysis.plan import Item, Plan, build_plan
from hallulens_analysis.selection import Selection
from hallulens_capture.record import Record
from hallulens_capture.store import ActivationStore

BUDGET_BYTES = 256 << 20  # float32 features held per batch


@dataclass
class Batch:
    """Rows `start .. start + n` of a plan: per reduction slug, features [n, layers, (N,) hidden]
    (float32) and, for windows, masks [n, N] (True where a state is)."""

    start: int
    features: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + len(next(iter(self.features.values()))))


def reduce_record(record: Record, item: Item, plan: Plan) -> tuple[dict, dict]:
    """Every reduction of one record: slug -> [layers, (N,) hidden] float32, plus window masks."""
    spans = {r: r.offsets(item.n_generated, item.answer) for r in plan.selection.reductions}
    lo = min(a for a, _ in spans.values())
    hi = max(b for _, b in spans.values())
    row_of_p = item.n_prompt - item.first_position  # token row of position P
    block = record.slice(layers=plan.layer_ids, tokens=slice(row_of_p + lo, row_of_p + hi))
    features, masks = {}, {}
    for reduction, (a, b) in spans.items():
        part = block[:, a - lo : b - lo]
        if reduction.window:
            out = np.zeros(plan.shape(reduction), dtype=np.float32)
            out[:, : b - a] = part
            masks[reduction.slug] = np.arange(reduction.window) < b - a
        elif reduction.name in ("mean", "answer"):
            out = part.mean(axis=1, dtype=np.float32)
        else:
            out = part[:, 0].astype(np.float32)
        features[reduction.slug] = out
    return features, masks


def batch_rows(plan: Plan, budget_bytes: int = BUDGET_BYTES) -> int:
    """Records per batch so that one batch of float32 features fits `budget_bytes`."""
    per_row = sum(4 * int(np.prod(plan.shape(r))) for r in plan.selection.reductions)
    return max(1, budget_bytes // per_row)


def stream(
    store: ActivationStore,
    plan: Plan,
    *,
    start: int = 0,
    budget_bytes: int = BUDGET_BYTES,
    progress: bool = False,
) -> Iterator[Batch]:
    """Batches of the plan's rows from `start` on, in order."""
    from tqdm.auto import tqdm

    size = batch_rows(plan, budget_bytes)
    windows = [r for r in plan.selection.reductions if r.window]
    bar = tqdm(
        total=len(plan.items),
        initial=start,
        unit="rec",
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        for first in range(start, len(plan.items), size):
            items = plan.items[first : first + size]
            features = {
                r.slug: np.empty((len(items), *plan.shape(r)), np.float32)
                for r in plan.selection.reductions
            }
            masks = {r.slug: np.empty((len(items), r.window), bool) for r in windows}
            for i, item in enumerate(items):
                values, flags = reduce_record(store[item.key], item, plan)
                for slug, value in values.items():
                    features[slug][i] = value
                for slug, flag in flags.items():
                    masks[slug][i] = flag
                bar.update()
            yield Batch(first, features, masks)


@dataclass
class Arrays:
    """A whole selection in memory: `features[slug]` is [N, layers, (N_window,) hidden]."""

    plan: Plan
    features: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]

    @property
    def X(self) -> np.ndarray:
        """The features of the only reduction selected."""
        if len(self.features) != 1:
            raise SelectionError(
                f"several reductions selected: use .features[name] ({', '.join(self.features)})"
            )
        return next(iter(self.features.values()))

    @property
    def y(self) -> np.ndarray:
        return np.array([i.y for i in self.plan.items], dtype=np.int8)

    @property
    def keys(self) -> list[str]:
        return [i.key for i in self.plan.items]

    @property
    def groups(self) -> np.ndarray:
        return self.plan.groups()

    @property
    def lengths(self) -> np.ndarray:
        """Generated tokens per record (G)."""
        return np.array([i.n_generated for i in self.plan.items], dtype=np.int32)

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.array([i.n_prompt for i in self.plan.items], dtype=np.int32)


def collect(
    store: ActivationStore,
    selection: Selection,
    *,
    tokenizer: object = None,
    require_target: bool = False,
) -> Arrays:
    """Plan and read a whole selection into memory."""
    plan = build_plan(store, selection, tokenizer=tokenizer, require_target=require_target)
    n = len(plan.items)
    features = {
        r.slug: np.empty((n, *plan.shape(r)), np.float32) for r in plan.selection.reductions
    }
    masks = {r.slug: np.empty((n, r.window), bool) for r in plan.selection.reductions if r.window}
    for batch in stream(store, plan):
        for slug, values in batch.features.items():
            features[slug][batch.rows] = values
        for slug, values in batch.masks.items():
            masks[slug][batch.rows] = values
    return Arrays(plan, features, masks)
