"""Summaries and integrity checks of a store (what `hallulens activations stats|verify` print)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hallulens_capture.errors import RecordFormatError
from hallulens_capture.keys import prompt_hash, shown_key
from hallulens_capture.positions import token_positions
from hallulens_capture.record import (
    CAPTURE_DTYPE_LABELS,
    GENERATED_ENTROPY,
    GENERATED_LOGPROBS,
    RECORD_FORMAT,
    TOKEN_STATS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    Record,
)
from hallulens_capture.store import ActivationStore

REQUIRED_METADATA = (
    "prompt",
    "response",
    "model",
    "timestamp",
    "backend",
    "capture_tokens",
    "dtype",
)
# what must be alike for records to be compared: StoreSummary counter per record_kind field
KIND_COUNTERS = {
    "model": "models",
    "backend": "backends",
    "dtype": "dtypes",
    "capture_tokens": "capture_tokens",
    "layers": "layers",
    "capture_topk": "capture_topk",
}


def layers_text(ids: Sequence[int]) -> str:
    """Layer ids as stats prints them: `0-30 (31)` for a range, else `0,8,16`."""
    ids = [int(i) for i in ids]
    if ids and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]} ({len(ids)})"
    return ",".join(map(str, ids))


def record_kind(record: Record) -> dict[str, str]:
    """The settings a record was made with; records of different kinds are not comparable."""
    return {
        "model": record.model,
        "backend": record.backend,
        "dtype": record.dtype,
        "capture_tokens": record.capture_tokens,
        "layers": layers_text(record.layer_ids),
        "capture_topk": str(record.capture_topk),  # 0 also for records from before the field
    }


@dataclass
class StoreSummary:
    records: int = 0
    record_bytes: int = 0
    tokens: int = 0
    token_counts: list[int] = field(default_factory=list)
    layers: Counter = field(default_factory=Counter)
    hidden_sizes: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)
    backends: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)
    capture_tokens: Counter = field(default_factory=Counter)
    capture_topk: Counter = field(default_factory=Counter)
    usage: dict = field(default_factory=dict)

    @property
    def mixed(self) -> dict[str, int]:
        """Kind fields with more than one value across the records (name -> count of values)."""
        counts = {name: len(getattr(self, name)) for name in KIND_COUNTERS.values()}
        return {name: n for name, n in counts.items() if n > 1}

    def as_dict(self) -> dict[str, object]:
        counts = self.token_counts or [0]
        return {
            "records": self.records,
            "record_bytes": self.record_bytes,
            "tokens": self.tokens,
            "tokens_per_record": {
                "min": min(counts),
                "mean": float(np.mean(counts)),
                "max": max(counts),
            },
            "layers": dict(self.layers),
            "hidden_sizes": dict(self.hidden_sizes),
            "models": dict(self.models),
            "tasks": dict(self.tasks),
            "backends": dict(self.backends),
            "dtypes": dict(self.dtypes),
            "capture_tokens": dict(self.capture_tokens),
            "capture_topk": dict(self.capture_topk),
            "mixed": self.mixed,
            **self.usage,
        }


def summarize(store: ActivationStore) -> StoreSummary:
    """Counts over every record, reading only the records' headers and index tensors."""
    summary = StoreSummary(usage=store.usage())
    for key in store:
        record = store[key]
        _, n_tokens, hidden = record.shape
        summary.records += 1
        summary.record_bytes += record.nbytes
        summary.tokens += n_tokens
        summary.token_counts.append(n_tokens)
        summary.hidden_sizes[hidden] += 1
        summary.tasks[record.task or "-"] += 1
        for name, value in record_kind(record).items():
            getattr(summary, KIND_COUNTERS[name])[value] += 1
    return summary


def check_record(record: Record, *, read_values: bool = True) -> list[str]:
    """Problems with one parsed record (empty when it is complete and consistent)."""
    problems = []
    meta = record.metadata
    missing = [f for f in REQUIRED_METADATA if f not in meta]
    if missing:
        problems.append(f"missing metadata {', '.join(missing)}")
    if meta.get("format") != RECORD_FORMAT:
        problems.append(f"format {meta.get('format')!r} is not {RECORD_FORMAT}")
    if record.key.split("-")[0] != prompt_hash(record.prompt):
        problems.append("key is not sha256 of the stored prompt")
    if not record.tiles_data():
        problems.append("tensors do not tile the data section (a gap, overlap or tail)")
    try:
        record.gen_kwargs  # noqa: B018 (parsing is the check)
    except RecordFormatError as exc:
        problems.append(exc.problem)
    n_tokens = record.shape[1]
    layer_ids = record.layer_ids
    if np.any(np.diff(layer_ids) <= 0) or np.any(layer_ids < 0):
        problems.append(f"layer_ids {layer_ids.tolist()} are not increasing ids >= 0")
    if CAPTURE_DTYPE_LABELS.get(record.dtype) != record.storage_dtype:
        problems.append(f"dtype {record.dtype!r} but data stored as {record.storage_dtype}")
    try:
        expected = token_positions(
            record.capture_tokens, len(record.prompt_token_ids), len(record.generated_token_ids)
        )
    except ValueError:
        problems.append(f"unknown capture_tokens {record.capture_tokens!r}")
    else:
        if not np.array_equal(record.token_positions, expected) or n_tokens != len(expected):
            problems.append(
                f"{n_tokens} token rows / positions do not match capture_tokens="
                f"{record.capture_tokens} for {len(record.prompt_token_ids)} prompt + "
                f"{len(record.generated_token_ids)} generated tokens"
            )
    problems += token_stat_problems(record, read_values=read_values)
    if read_values and record.checksum is not None:
        try:
            found = record.data_checksum()
        except ValueError as exc:
            problems.append(f"checksum {record.checksum!r}: {exc}")
        else:
            if found != record.checksum:
                problems.append(
                    f"stored bytes do not match the record's checksum {record.checksum} "
                    "(overwritten or damaged after writing)"
                )
    if read_values and not problems and not np.all(np.isfinite(record.all_layers_activations)):
        problems.append(
            "activations hold NaN or inf (float16 overflow? try capture_dtype=bfloat16)"
        )
    return problems


def token_stat_problems(record: Record, *, read_values: bool = True) -> list[str]:
    """Problems with a record's token statistics (none when it has none and claims none):
    shapes [G] / [G, k] aligned with generated_token_ids and, with `read_values`, values a
    distribution can have: finite logprobs <= 0, entropy >= 0, top-k sorted, distinct ids, and
    the generated token's logprob equal to its top-k entry where it is among them (else at most
    the k-th)."""
    meta_k = record.metadata.get("capture_topk")
    if meta_k is not None and not meta_k.isdigit():
        return [f"capture_topk {meta_k!r} is not a whole number"]
    k, n = record.capture_topk, len(record.generated_token_ids)
    present = {name: record.tensor(name) for name in TOKEN_STATS if record.tensor(name) is not None}
    if not present and not k:
        return []
    missing = [name for name in TOKEN_STATS if name not in present]
    if missing:
        return [f"token statistics incomplete (capture_topk={k}): no {', '.join(missing)}"]
    lp, entropy = present[GENERATED_LOGPROBS], present[GENERATED_ENTROPY]
    ids, top = present[TOPK_IDS], present[TOPK_LOGPROBS]
    wanted = {
        GENERATED_LOGPROBS: (lp, np.float32, (n,)),
        GENERATED_ENTROPY: (entropy, np.float32, (n,)),
        TOPK_IDS: (ids, np.int32, (n, k)),
        TOPK_LOGPROBS: (top, np.float32, (n, k)),
    }
    bad = [
        f"{name} is {value.dtype} {list(value.shape)}, expected {np.dtype(dtype)} {list(shape)}"
        for name, (value, dtype, shape) in wanted.items()
        if value.dtype != dtype or value.shape != shape
    ]
    if bad or not read_values:
        return bad
    problems = []
    if not (np.all(np.isfinite(lp)) and np.all(lp <= 0)):
        problems.append(f"{GENERATED_LOGPROBS} are not all finite and <= 0")
    if not (np.all(np.isfinite(entropy)) and np.all(entropy >= 0)):
        problems.append(f"{GENERATED_ENTROPY} is not all finite and >= 0")
    if np.any(np.isnan(top)) or np.any(top > 0) or np.any(np.diff(top, axis=1) > 0):
        problems.append(f"{TOPK_LOGPROBS} are not <= 0 and sorted, most likely first")
    ordered = np.sort(ids, axis=1)
    if np.any(ids < 0) or np.any(ordered[:, 1:] == ordered[:, :-1]):
        problems.append(f"{TOPK_IDS} are not distinct token ids")
    if problems or not k:
        return problems
    hit = ids == record.generated_token_ids[:, None]  # at most one per row: ids are distinct
    found = hit.any(axis=1)
    if not (np.array_equal(top[hit], lp[found]) and np.all(lp[~found] <= top[~found, -1])):
        problems.append(
            f"{GENERATED_LOGPROBS} disagree with {TOPK_LOGPROBS} (a generated token's logprob "
            "differs from its top-k entry, or exceeds the k-th)"
        )
    return problems


@dataclass
class Verification:
    """What `verify` found: the bad records (shown key -> problems) and how many were checked."""

    records: int = 0
    bad: dict[str, list[str]] = field(default_factory=dict)
    no_checksum: int = 0  # records written before checksums: their bytes had nothing to match


def verify(store: ActivationStore, *, read_values: bool = True) -> Verification:
    """Check every record, its checksum too when `read_values`."""
    result = Verification()
    for key in store:
        result.records += 1
        try:
            record = store[key]
            problems = check_record(record, read_values=read_values)
        except RecordFormatError as exc:
            problems = [exc.problem]
        else:
            result.no_checksum += record.checksum is None
        if problems:
            result.bad[shown_key(key)] = problems
    return result
