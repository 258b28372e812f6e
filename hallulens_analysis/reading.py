"""From a store to arrays: the reductions of each record, streamed in bounded batches.

Each record is read once per pass: one copy of the selected layers over the token span every
reduction together needs (a view of LMDB's memory map is sliced, not the whole record read),
then each reduction written straight into the batch (means accumulated in float32). `stream`
holds one batch at a time, in the dtype asked, sized to a memory budget; `collect` keeps
everything (for data that fits in memory; larger data goes through an export and
`np.load(..., mmap_mode="r")`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hallulens_analysis.errors import ExportError, SelectionError
from hallulens_analysis.plan import Item, Plan, build_plan
from hallulens_analysis.selection import Selection
from hallulens_capture.record import Record
from hallulens_capture.store import ActivationStore

BUDGET_BYTES = 256 << 20  # float32 features held per batch


@dataclass
class Batch:
    """Rows `start .. start + n` of a plan: per reduction slug, features [n, layers, (N,) hidden]
    and, for windows, masks [n, N] (True where a state is)."""

    start: int
    features: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + len(next(iter(self.features.values()))))


def _block(record: Record, layer_ids: tuple[int, ...], tokens: slice) -> np.ndarray:
    """The selected layers over `tokens`: a view of the memory map when they are stored next to
    each other (and not as bfloat16), else a copy; a view saves one copy of every byte."""
    if record.storage_dtype != "BF16":
        stored = record.layer_ids.tolist()
        rows = [stored.index(i) for i in layer_ids]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return record.all_layers_activations[rows[0] : rows[0] + len(rows), tokens]
    return record.slice(layers=layer_ids, tokens=tokens)


def reduce_into(
    record: Record, item: Item, plan: Plan, row: int, features: dict, masks: dict
) -> None:
    """Write every reduction of one record into `row` of `features` (arrays of any float dtype;
    means are accumulated in float32) and of the window `masks`."""
    spans = {r: r.offsets(item.n_generated, item.answer) for r in plan.selection.reductions}
    lo = min(a for a, _ in spans.values())
    hi = max(b for _, b in spans.values())
    row_of_p = item.n_prompt - item.first_position  # token row of position P
    block = _block(record, plan.layer_ids, slice(row_of_p + lo, row_of_p + hi))
    target = next(iter(features.values())).dtype
    if np.finfo(target).max < np.finfo(block.dtype).max and block.size:
        finite = np.abs(block[np.isfinite(block)])
        if finite.size and finite.max() > np.finfo(target).max:
            raise ExportError(
                f"record {record.key}: values up to {finite.max():.4g} do not fit "
                f"{target.name}: export with --dtype float32"
            )
    for reduction, (a, b) in spans.items():
        part = block[:, a - lo : b - lo]
        out = features[reduction.slug][row]
        if reduction.window:
            out[:, : b - a] = part
            out[:, b - a :] = 0
            masks[reduction.slug][row] = np.arange(reduction.window) < b - a
        elif reduction.name in ("mean", "answer"):
            out[...] = part.mean(axis=1, dtype=np.float32)
        else:
            out[...] = part[:, 0]


def batch_rows(plan: Plan, itemsize: int, budget_bytes: int = BUDGET_BYTES) -> int:
    """Records per batch so that one batch of features fits `budget_bytes`."""
    per_row = sum(itemsize * int(np.prod(plan.shape(r))) for r in plan.selection.reductions)
    return max(1, budget_bytes // per_row)


def stream(
    store: ActivationStore,
    plan: Plan,
    *,
    dtype: type = np.float32,
    start: int = 0,
    budget_bytes: int = BUDGET_BYTES,
    progress: bool = False,
) -> Iterator[Batch]:
    """Batches of the plan's rows from `start` on, in order, with features in `dtype` (values
    that do not fit it are an error). Every batch reuses the same arrays: copy what must
    outlive the iteration step."""
    from tqdm.auto import tqdm

    size = batch_rows(plan, np.dtype(dtype).itemsize, budget_bytes)
    windows = [r for r in plan.selection.reductions if r.window]
    rows = min(size, len(plan.items) - start)
    # one set of buffers for every batch: fresh pages cost more than the copies into them
    features = {r.slug: np.empty((rows, *plan.shape(r)), dtype) for r in plan.selection.reductions}
    masks = {r.slug: np.empty((rows, r.window), bool) for r in windows}
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
            batch = Batch(
                first,
                {slug: values[: len(items)] for slug, values in features.items()},
                {slug: values[: len(items)] for slug, values in masks.items()},
            )
            for i, item in enumerate(items):
                reduce_into(store[item.key], item, plan, i, batch.features, batch.masks)
                bar.update()
            yield batch


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
