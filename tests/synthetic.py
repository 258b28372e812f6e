"""Synthetic activation stores, written by the real writer (`ActivationStore.put` of
`encode_record` bytes) and labelled with `put_labels`, for the analysis tests."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from hallulens_capture import record_key
from hallulens_capture.positions import token_positions
from hallulens_capture.record import CAPTURE_DTYPE_LABELS, RECORD_FORMAT, encode_record
from hallulens_capture.store import ActivationStore


@dataclass
class Sample:
    """One generation: `acts` [layers, token rows, hidden] in the storage dtype, rows of the
    positions `scope` holds for `n_prompt` prompt and `n_generated` generated tokens."""

    prompt: str
    acts: np.ndarray
    n_prompt: int
    n_generated: int
    scope: str = "all"
    layer_ids: list[int] | None = None
    dtype: str = "float16"
    task: str = "synthetic_task"
    doc_id: int = 0
    response: str = "a response"
    label: str | None = None
    answer: str | None = None
    generated_token_ids: list[int] | None = None
    gen_kwargs: str = '{"max_gen_toks": 64}'
    optional: dict = field(default_factory=dict)


def rows_for(scope: str, n_prompt: int, n_generated: int) -> int:
    return len(token_positions(scope, n_prompt, n_generated))


def write_store(path, samples: list[Sample]) -> list[str]:
    """Write every sample (repeated prompts get `-n` keys) and their labels; returns the keys."""
    seen: Counter[str] = Counter()
    keys, labels = [], {}
    with ActivationStore(path, writable=True, map_size_gb=1 / 64) as store:
        for s in samples:
            key = record_key(s.prompt, seen[s.prompt])
            seen[s.prompt] += 1
            generated = s.generated_token_ids or list(range(100, 100 + s.n_generated))
            index = {
                "layer_ids": s.layer_ids if s.layer_ids is not None else range(s.acts.shape[0]),
                "token_positions": token_positions(s.scope, s.n_prompt, s.n_generated),
                "prompt_token_ids": list(range(1, 1 + s.n_prompt)),
                "generated_token_ids": generated,
            }
            meta = {
                "prompt": s.prompt,
                "response": s.response,
                "model": "synthetic",
                "timestamp": "2026-01-02T03:04:05.006+00:00",
                "backend": "test",
                "task": s.task,
                "doc_id": str(s.doc_id),
                "capture_tokens": s.scope,
                "dtype": s.dtype,
                "gen_kwargs": s.gen_kwargs,
                "format": RECORD_FORMAT,
            }
            label = CAPTURE_DTYPE_LABELS[s.dtype]
            store.put(key, encode_record(s.acts, label, index, meta, optional=s.optional))
            keys.append(key)
            if s.label is not None:
                labels[key] = {"label": s.label, "task": s.task, "doc_id": s.doc_id}
                if s.answer is not None:
                    labels[key]["answer"] = s.answer
        if labels:
            store.put_labels(labels)
    return keys
