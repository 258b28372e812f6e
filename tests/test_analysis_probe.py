"""`hallulens probe` on synthetic stores written by the real writer: a planted direction is
found where it is and nowhere else, a grouped split does not reward memorised questions, and
every reported number agrees with scikit-learn on the written out-of-fold scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from sklearn.metrics import average_precision_score, roc_auc_score
from synthetic import Sample, rows_for, write_store

from hallulens_analysis import ProbeSettings, Selection, features, run_probe
from hallulens_analysis.errors import ProbeError

P, G = 4, 5  # prompt and generated tokens of every synthetic record


def planted(path: Path, questions: int = 120, per_question: int = 2, layer: int = 3, seed: int = 0):
    """5 layers of noise; at `layer` the response states move by +-1.5 along one direction."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(32)
    direction /= np.linalg.norm(direction)
    samples = []
    for q in range(questions):
        label = ["correct", "hallucinated"][q % 2]
        for _ in range(per_question):
            acts = rng.standard_normal((5, rows_for("all", P, G), 32)).astype(np.float32)
            acts[layer, P:] += (1.5 if label == "hallucinated" else -1.5) * direction
            samples.append(Sample(f"q{q}", acts.astype(np.float16), P, G, doc_id=q, label=label))
    write_store(path, samples)


def read_scores(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_planted_direction_found_at_its_layer_only(tmp_path):
    """The intervals are bootstrap intervals of fixed out-of-fold scores: they leave out the
    variance of refitting, so on pure noise they cover 0.5 less often than 95 % (about 89 % per
    interval measured at this size). The fixture is seeded: seed 1 is one where all do."""
    planted(tmp_path / "s", seed=1)
    out = tmp_path / "probe"
    done = run_cli(
        "hallulens", "probe", str(tmp_path / "s"), "--out", str(out), "--reduce", "mean", "last",
        "--bootstrap", "400", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "best: mean at layer 3" in done.stdout
    report = json.loads((out / "report.json").read_text())
    rows = read_scores(out / "scores.csv")
    y = np.array([int(r["y"]) for r in rows])
    assert report["counts"]["samples"] == len(rows) == 240 and y.sum() == 120
    assert report["counts"]["questions"] == 120
    folds: dict[str, set] = {}
    for r in rows:  # no question on both sides of a split
        folds.setdefault(r["group"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds.values())
    for entry in report["results"]:
        scores = np.array([float(r[f"{entry['reduction']}@{entry['layer']}"]) for r in rows])
        assert entry["auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-6)
        assert entry["auprc"] == pytest.approx(average_precision_score(y, scores), abs=1e-6)
        low, high = entry["auroc_ci"]
        if entry["layer"] == 3:
            assert entry["auroc"] >= 0.95
        else:
            assert low <= 0.5 <= high, entry
    assert report["baselines"] == [] and "0 of 240 records carry token logprobs" in done.stdout
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(out / "auroc_by_layer.png")
    assert image.shape[0] > 100 and image.std() > 0  # a drawn picture, not a blank one


def cluster_bootstrap(y, scores, groups, replicates, seed):
    """An independent percentile interval: resample questions, score with scikit-learn."""
    rng = np.random.default_rng(seed)
    unique = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in unique}
    values = []
    for _ in range(replicates):
        idx = np.concatenate([members[g] for g in rng.choice(unique, len(unique))])
        if len(np.unique(y[idx])) == 2:
            values.append(roc_auc_score(y[idx], scores[idx]))
    return np.percentile(values, [2.5, 97.5])


def test_leakage_random_split_scores_high_grouped_split_does_not(tmp_path):
    """Each question has its own vector and one label for all its samples: the label is a
    function of the question, never of the answer."""
    rng = np.random.default_rng(1)
    samples = []
    for q in range(60):
        label = ["correct", "hallucinated"][int(rng.integers(2))]
        center = 3 * rng.standard_normal(64)
        for _ in range(4):
            acts = center + 0.3 * rng.standard_normal((2, rows_for("all", P, G), 64))
            samples.append(Sample(f"q{q}", acts.astype(np.float16), P, G, doc_id=q, label=label))
    write_store(tmp_path / "s", samples)
    selection = Selection.parse("1")
    export = features(tmp_path / "s", selection, tmp_path / "cache")
    reports = {
        split: run_probe(
            export, selection, ProbeSettings(split=split, bootstrap=1000), tmp_path / split
        )
        for split in ("random", "group")
    }
    leaky, grouped = reports["random"]["results"][0], reports["group"]["results"][0]
    assert leaky["auroc"] > 0.9  # memorised questions
    assert grouped["auroc"] < 0.7 and grouped["auroc_ci"][0] <= 0.5 <= grouped["auroc_ci"][1]
    rows = read_scores(tmp_path / "group" / "scores.csv")
    y = np.array([int(r["y"]) for r in rows])
    groups = np.array([int(r["group"]) for r in rows])
    scores = np.array([float(r["mean@1"]) for r in rows])
    assert grouped["auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-6)
    low, high = cluster_bootstrap(y, scores, groups, 2000, seed=123)
    assert grouped["auroc_ci"][0] == pytest.approx(low, abs=0.03)
    assert grouped["auroc_ci"][1] == pytest.approx(high, abs=0.03)


def test_logprob_baselines_on_the_same_samples(tmp_path):
    rng = np.random.default_rng(2)
    samples, written = [], []
    for q in range(40):
        label = ["correct", "hallucinated"][q % 2]
        logprobs = (rng.normal(-1.5 if label == "hallucinated" else -1.0, 0.5, G)).astype(
            np.float32
        )
        entropy = rng.uniform(0, 2, G).astype(np.float32)
        acts = rng.standard_normal((2, rows_for("response", P, G), 8)).astype(np.float16)
        optional = {"generated_logprobs": logprobs, "generated_entropy": entropy}
        samples.append(
            Sample(f"q{q}", acts, P, G, scope="response", doc_id=q, label=label, optional=optional)
        )
        written.append(
            (int(label == "hallucinated"), -logprobs.mean(), -logprobs.min(), entropy.mean())
        )
    keys = write_store(tmp_path / "s", samples)
    by_key = dict(zip(keys, written, strict=True))
    out = tmp_path / "probe"
    done = run_cli(
        "hallulens", "probe", str(tmp_path / "s"), "--out", str(out), "--reduce", "last-prompt",
        "--bootstrap", "200", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    rows = read_scores(out / "scores.csv")
    y = np.array([by_key[r["key"]][0] for r in rows])
    for column, name in enumerate(("neg_mean_logprob", "neg_min_logprob", "mean_entropy"), start=1):
        by_hand = np.array([by_key[r["key"]][column] for r in rows])
        np.testing.assert_allclose([float(r[f"baseline:{name}"]) for r in rows], by_hand, rtol=1e-6)
        [entry] = [b for b in report["baselines"] if b["name"] == name]
        assert entry["auroc"] == pytest.approx(roc_auc_score(y, by_hand), abs=1e-6)
    assert "baseline neg_mean_logprob" in done.stdout


def test_probe_of_an_npy_export_equals_probe_of_the_store(tmp_path):
    planted(tmp_path / "s", questions=30)
    export = run_cli(
        "hallulens", "activations", "export", str(tmp_path / "s"), "--format", "npy",
        "--out", str(tmp_path / "npy"), "--layers", "2-4", "--reduce", "mean", "first", "--quiet",
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    settings = ProbeSettings(bootstrap=100)
    selection = Selection.parse("3-4", ["first"])
    from_store = run_probe(
        features(tmp_path / "s", selection, tmp_path / "c"), selection, settings, tmp_path / "a"
    )
    from_export = run_probe(
        features(tmp_path / "npy", selection, tmp_path / "c"), selection, settings, tmp_path / "b"
    )
    assert from_store["results"] == from_export["results"]
    assert (tmp_path / "a" / "scores.csv").read_text() == (
        tmp_path / "b" / "scores.csv"
    ).read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reduce", "median"], "unknown reduction 'median'"),
        (["--layers", "9"], "layer 9 is out of range for a store whose top layer is 4"),
        (["--reduce", "window:8"], "window:8 is for exports"),
        (["--target", "refused:correct"], "target refused:correct: no refused record"),
        (["--folds", "200"], "120 questions cannot fill 200 grouped folds"),
        (["--folds", "1"], "folds=1: must be at least 2"),
    ],
)
def test_bad_probe_selections_fail_with_one_line(tmp_path_factory, args, message):
    store = tmp_path_factory.getbasetemp() / "bad-selection-store"
    if not store.exists():
        planted(store)
    done = run_cli(
        "hallulens", "probe", str(store), "--out", str(store.parent / "x"), "--quiet", *args
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("hallulens: error: ") and message in line


def test_without_bootstrap_there_are_no_intervals(tmp_path):
    planted(tmp_path / "s", questions=20)
    selection = Selection.parse("3")
    export = features(tmp_path / "s", selection, tmp_path / "c")
    report = run_probe(export, selection, ProbeSettings(bootstrap=0), tmp_path / "p")
    assert "auroc_ci" not in report["results"][0] and "auroc_ci" not in report["best"]
    assert (tmp_path / "p" / "auroc_by_layer.png").exists()


def test_too_few_questions_is_a_probe_error(tmp_path):
    planted(tmp_path / "s", questions=4)
    selection = Selection.parse()
    export = features(tmp_path / "s", selection, tmp_path / "c")
    with pytest.raises(ProbeError, match="4 questions cannot fill 5 grouped folds"):
        run_probe(export, selection, ProbeSettings(), tmp_path / "p")
