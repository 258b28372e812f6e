"""Logprob baselines: per-record uncertainty scores from the optional per-token tensors.

Records captured with `capture_topk` > 0 carry `generated_logprobs` and `generated_entropy` ([G]
float32, one value per generated token, of the raw model logits). Each baseline is oriented like
a detector score, higher = less sure: minus the mean token logprob, minus the minimum token
logprob, the mean token entropy.
Records without the tensors have no baseline; nothing is made up for them.
"""

from __future__ import annotations

import numpy as np

from hallulens_capture.errors import RecordFormatError
from hallulens_capture.record import GENERATED_ENTROPY as ENTROPY
from hallulens_capture.record import GENERATED_LOGPROBS as LOGPROBS
from hallulens_capture.record import Record

BASELINES = ("neg_mean_logprob", "neg_min_logprob", "mean_entropy")


def _per_token(record: Record, name: str) -> np.ndarray | None:
    values = record.tensor(name)
    if values is None:
        return None
    n = len(record.generated_token_ids)
    if values.shape != (n,) or n == 0 or not np.all(np.isfinite(values)):
        raise RecordFormatError(
            record.key,
            f"{name} has shape {list(values.shape)} (finite values needed, one per generated "
            f"token: [{n}])",
        )
    return values.astype(np.float64)


def token_scores(record: Record) -> dict[str, float]:
    """The baselines this record has tensors for (an empty dict when it has none)."""
    scores = {}
    logprobs = _per_token(record, LOGPROBS)
    if logprobs is not None:
        scores["neg_mean_logprob"] = -float(logprobs.mean())
        scores["neg_min_logprob"] = -float(logprobs.min())
    entropy = _per_token(record, ENTROPY)
    if entropy is not None:
        scores["mean_entropy"] = float(entropy.mean())
    return scores
