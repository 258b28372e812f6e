"""AUROC and average precision on weighted samples, vectorised over bootstrap replicates.

A bootstrap replicate draws questions with replacement (a cluster bootstrap: the samples of one
question are not independent), and weighs each sample by how often its question was drawn. Both
metrics are computed exactly on the weighted samples, ties counted as sklearn counts them, so a
replicate costs a few passes over sorted arrays instead of a refit or a resort.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK = 100  # replicates per vectorised pass


def _tie_groups(scores: np.ndarray, y: np.ndarray, weights: np.ndarray, descending: bool):
    """Positive and negative weight per distinct score, in score order: [..., n_distinct]."""
    order = np.argsort(-scores if descending else scores, kind="mergesort")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    w = weights[..., order]
    pos = np.add.reduceat(w * y[order], starts, axis=-1)
    neg = np.add.reduceat(w * (1 - y[order]), starts, axis=-1)
    return pos, neg


def auroc(scores: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Area under the ROC curve (ties count one half) per row of `weights` ([N] or [B, N])."""
    weights = np.ones(len(y)) if weights is None else weights
    pos, neg = _tie_groups(scores, y, weights, descending=False)
    below = np.cumsum(neg, axis=-1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(-1) / (pos.sum(-1) * neg.sum(-1))


def average_precision(
    scores: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Average precision, sum over thresholds of (recall step) x precision, per row of weights."""
    weights = np.ones(len(y)) if weights is None else weights
    pos, neg = _tie_groups(scores, y, weights, descending=True)
    tp, fp = np.cumsum(pos, axis=-1), np.cumsum(neg, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        return (pos / tp[..., -1:] * precision).sum(-1)


def replicate_weights(groups: np.ndarray, replicates: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks [b, N] of cluster-bootstrap weights; the same seed gives the same replicates, so
    every layer and baseline of one report is scored on the same resamples."""
    _, inverse = np.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    rng = np.random.default_rng(seed)
    for first in range(0, replicates, CHUNK):
        size = min(CHUNK, replicates - first)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=size)
        yield counts[:, inverse].astype(np.float64)


def scored(
    scores: np.ndarray, y: np.ndarray, groups: np.ndarray, replicates: int, seed: int
) -> dict[str, object]:
    """AUROC and AUPRC with percentile 95 % intervals of the cluster bootstrap."""
    aurocs, aps = [], []
    for weights in replicate_weights(groups, replicates, seed):
        aurocs.append(auroc(scores, y, weights))
        aps.append(average_precision(scores, y, weights))
    result: dict[str, object] = {
        "auroc": float(auroc(scores, y)),
        "auprc": float(average_precision(scores, y)),
    }
    for name, values in (("auroc", aurocs), ("auprc", aps)):
        if replicates:
            finite = np.concatenate(values)
            finite = finite[np.isfinite(finite)]  # a resample may hold one class only
            result[f"{name}_ci"] = [float(v) for v in np.percentile(finite, [2.5, 97.5])]
    return result
