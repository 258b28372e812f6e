"""Linear probes per layer and token reduction, scored out of fold with grouped splits.

For each (reduction, layer): standardise, then L2 logistic regression (scikit-learn), fitted on
K - 1 folds and scored on the held-out fold, so every sample gets one out-of-fold score. Folds
keep all samples of one question on one side (`StratifiedGroupKFold`, seeded) unless a random
split is asked for (to measure leakage). AUROC and AUPRC are computed on the pooled out-of-fold
scores with cluster-bootstrap 95 % intervals; the same folds and resamples serve every layer, so
scores of different layers and of the logprob baselines are paired (DeLong tests, ensembles).
"""

from __future__ import annotations

import csv
import json
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hallulens_analysis.baselines import BASELINES
from hallulens_analysis.errors import ProbeError, SelectionError
from hallulens_analysis.metrics import auroc, scored
from hallulens_analysis.npy_export import NpyExport, export_npy
from hallulens_analysis.plan import build_plan
from hallulens_analysis.selection import Selection
from hallulens_capture.store import open_store


@dataclass(frozen=True)
class ProbeSettings:
    folds: int = 5
    seed: int = 0
    split: str = "group"  # or "random": leaks questions across folds, for comparison only
    C: float = 1.0  # inverse L2 strength of the logistic regression
    max_iter: int = 1000
    bootstrap: int = 1000
    memory_gb: float = 1.0  # float32 feature matrices held at once
    # BLAS threads per fit: lbfgs on these sizes is dominated by thread wake-ups; on a busy
    # 2-core machine 2 threads made a fit 4-70x slower than 1
    threads: int = 1

    def __post_init__(self) -> None:
        if self.split not in ("group", "random"):
            raise ProbeError(f"split {self.split!r}: expected group or random")
        if not self.C > 0:
            raise ProbeError(f"C={self.C}: must be positive")
        for name, least in _LEAST.items():
            if getattr(self, name) < least:
                raise ProbeError(f"{name}={getattr(self, name)}: must be at least {least}")


_LEAST = {"folds": 2, "max_iter": 1, "bootstrap": 0, "memory_gb": 0.001, "threads": 1}


def _check_reductions(selection: Selection) -> None:
    windows = [r.name for r in selection.reductions if r.window]
    if windows:
        raise SelectionError(
            f"the probe fits one vector per layer: {windows[0]} is for exports (use mean, first, "
            "last, second-last, last-prompt or answer)"
        )


def features(
    source: str | Path,
    selection: Selection,
    out_dir: str | Path,
    *,
    tokenizer: object = None,
    progress: bool = False,
) -> NpyExport:
    """The npy export a probe reads: `source` when it is one; for a store, its export of this
    selection under `out_dir/features-<plan digest>` (made once, resumed if killed, reused)."""
    _check_reductions(selection)
    source = Path(source)
    if (source / "manifest.json").exists():
        return NpyExport(source)
    with open_store(source) as store:
        plan = build_plan(store, selection, tokenizer=tokenizer, require_target=True)
        name = f"features-{plan.digest()[:12]}"
        return NpyExport(export_npy(store, plan, Path(out_dir) / name, progress=progress))


def fold_ids(y: np.ndarray, groups: np.ndarray, settings: ProbeSettings) -> np.ndarray:
    """The fold of each sample; every training side must hold both classes."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    questions = len(np.unique(groups))
    if settings.split == "group" and questions < settings.folds:
        raise ProbeError(f"{questions} questions cannot fill {settings.folds} grouped folds")
    if settings.split == "group":
        splitter = StratifiedGroupKFold(settings.folds, shuffle=True, random_state=settings.seed)
    else:
        splitter = StratifiedKFold(settings.folds, shuffle=True, random_state=settings.seed)
    folds = np.empty(len(y), dtype=np.int64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class" notes
            for k, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
                folds[test] = k
    except ValueError as exc:
        raise ProbeError(
            f"cannot split {len(y)} samples into {settings.folds} folds: {exc}"
        ) from None
    for k in range(settings.folds):
        if len(np.unique(y[folds != k])) < 2:
            raise ProbeError(
                f"fold {k} leaves one class only for training: use fewer --folds or more data"
            )
    return folds


def out_of_fold(
    X: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    settings: ProbeSettings,
) -> tuple[np.ndarray, bool]:
    """Held-out decision scores (log-odds of the positive class) and whether every fit converged."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=settings.C, max_iter=settings.max_iter, warm_start=True),
    )
    scores = np.empty(len(y), dtype=np.float64)
    with (
        threadpool_limits(settings.threads, user_api="blas"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always", ConvergenceWarning)
        for k in np.unique(folds):
            held = folds == k
            model.fit(X[~held], y[~held])  # warm start: the previous fold's weights
            scores[held] = model.decision_function(X[held])
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return scores, converged


def _selected_rows(export: NpyExport, selection: Selection) -> np.ndarray:
    rows = [
        r["row"]
        for r in export.index
        if selection.wants_task(r["task"])
        and selection.wants_label(r["label"])
        and selection.target.y(r["label"]) >= 0
    ]
    if not rows:
        raise SelectionError(f"no row of {export.path} matches {json.dumps(selection.as_dict())}")
    selection.target.check_classes([export.index[r]["label"] for r in rows])
    return np.array(rows, dtype=np.int64)


def run_probe(
    export: NpyExport, selection: Selection, settings: ProbeSettings, out_dir: str | Path
) -> dict:
    """Probe every selected (reduction, layer) of `export`; writes `report.json`, `scores.csv`
    and `auroc_by_layer.png` under `out_dir` and returns the report."""
    began = time.perf_counter()
    _check_reductions(selection)
    missing = [r.name for r in selection.reductions if r.name not in export.reductions]
    if missing:
        raise SelectionError(
            f"reduction {missing[0]} is not in {export.path} "
            f"(it holds {', '.join(export.reductions)})"
        )
    rows = _selected_rows(export, selection)
    index = [export.index[r] for r in rows]
    y = np.array([selection.target.y(r["label"]) for r in index], dtype=np.int64)
    groups = np.array([r["group"] for r in index], dtype=np.int64)
    layers = selection.layer_ids(export.layer_ids)
    slots = [export.layer_ids.index(layer) for layer in layers]
    folds = fold_ids(y, groups, settings)
    per_layer = 4 * len(rows) * export.manifest["hidden"]
    step = max(1, int(settings.memory_gb * (1 << 30)) // per_layer)
    results, columns = [], {}
    for reduction in selection.reductions:
        for first in range(0, len(slots), step):
            block = export.read_layers(reduction.slug, slots[first : first + step], rows)
            for j, layer in enumerate(layers[first : first + step]):
                scores, converged = out_of_fold(block[:, j], y, folds, settings)
                fold_aurocs = [  # None where a held-out fold holds one class only
                    _finite(auroc(scores[folds == k], y[folds == k])) for k in range(settings.folds)
                ]
                columns[f"{reduction.name}@{layer}"] = scores
                results.append(
                    {
                        "reduction": reduction.name,
                        "layer": layer,
                        **scored(scores, y, groups, settings.bootstrap, settings.seed),
                        "fold_auroc": fold_aurocs,
                        "converged": converged,
                    }
                )
            del block
    baselines, note = _baselines(index, y, groups, settings)
    for entry in baselines:
        columns[f"baseline:{entry['name']}"] = entry.pop("scores")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_scores(out / "scores.csv", index, y, folds, columns)
    best = max(results, key=lambda r: r["auroc"])
    report = {
        "source": str(export.path),
        "selection": selection.as_dict(),
        "target": {"positive": selection.target.positive, "negative": selection.target.negative},
        "counts": {
            "samples": len(rows),
            "positive": int(y.sum()),
            "negative": int(len(y) - y.sum()),
            "questions": len(np.unique(groups)),
            "prevalence": float(y.mean()),
            "labels": _counts(r["label"] or "none" for r in index),
            "tasks": _counts(r["task"] for r in index),
            "excluded_from_export": export.manifest.get("excluded", {}),
        },
        "settings": {
            **asdict(settings),
            "model": "StandardScaler + LogisticRegression(L2)",
            "score": "decision_function (log-odds of the positive class), out of fold",
            "interval": "cluster bootstrap over questions, percentile 95 %",
        },
        "models": sorted({r["model"] for r in index}),
        "results": results,
        "best": {k: best[k] for k in ("reduction", "layer", "auroc", "auroc_ci") if k in best},
        "baselines": baselines,
        "baselines_note": note,
        "files": {"scores": "scores.csv", "plot": "auroc_by_layer.png"},
        "seconds": round(time.perf_counter() - began, 2),
    }
    from hallulens_analysis.plots import plot_auroc

    plot_auroc(report, out / "auroc_by_layer.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _counts(values) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


def _baselines(index: list[dict], y, groups, settings: ProbeSettings) -> tuple[list[dict], str]:
    """Logprob baselines every selected record has tensors for, scored like the probes."""
    names = [b for b in BASELINES if all(b in r["scores"] for r in index)]
    entries = []
    for name in names:
        scores = np.array([r["scores"][name] for r in index], dtype=np.float64)
        entries.append(
            {
                "name": name,
                **scored(scores, y, groups, settings.bootstrap, settings.seed),
                "scores": scores,
            }
        )
    having = sum(bool(r["scores"]) for r in index)
    note = (
        ""
        if names
        else (
            f"{having} of {len(index)} records carry token logprobs (generated_logprobs, "
            "generated_entropy): no baseline"
        )
    )
    return entries, note


def _write_scores(path: Path, index: list[dict], y, folds, columns: dict[str, np.ndarray]) -> None:
    """Out-of-fold scores, one row per sample: higher means more likely the positive class."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "group", "task", "label", "y", "fold", *columns])
        for i, row in enumerate(index):
            values = [f"{columns[c][i]:.7g}" for c in columns]
            writer.writerow(
                [row["key"], row["group"], row["task"], row["label"], y[i], folds[i], *values]
            )
