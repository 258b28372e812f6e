"""HalluLens tasks through the stock `lm_eval` CLI on SmolLM2, judged by SmolLM2.

One captured run of group `hallulens` with the in-harness judge (gguf, constrained replies),
then the two-pass workflow on the same generations (`--predict_only`, then `hallulens judge`),
the label join into the activation store and the seed's legacy files.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import pytest
from conftest import run_cli

from hallulens_capture import open_store
from hallulens_tasks import task_configs

pytestmark = pytest.mark.slow

LEAVES = task_configs.leaf_tasks("hallulens")
GROUPS = ("hallulens", "nonsense_mixed_entities", "nonsense_generated_entities")
LIMIT = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hallulens")
    env = {
        "HALLULENS_JUDGE": "gguf:smollm2",
        "HALLULENS_JUDGE_CONSTRAINED": "1",
        "HALLULENS_JUDGE_CACHE": str(root / "judge-cache.sqlite"),
        "HALLULENS_JUDGE_MAX_TOKENS": "96",  # LongWiki's claim lists are free text, not constrained
    }
    store = root / "acts.lmdb"

    def lm_eval(out: Path, *extra: str):
        result = run_cli(
            "lm_eval",
            "--model",
            "hallulens-hf",
            "--model_args",
            f"pretrained=smollm2,dtype=float32,activations={store}",
            "--tasks",
            "hallulens",
            "--limit",
            str(LIMIT),
            "--apply_chat_template",
            "--gen_kwargs",
            "max_gen_toks=24",
            "--batch_size",
            "4",
            "--output_path",
            str(out),
            "--log_samples",
            *extra,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    first = lm_eval(root / "run1")
    second = lm_eval(root / "run2", "--predict_only")
    return {"root": root, "store": store, "env": env, "first": first, "second": second}


def results_of(out: Path) -> dict:
    [path] = [p for p in out.rglob("results_*.json") if p.parent.name != "judged"]
    return json.loads(path.read_text())


def samples_of(out: Path, task: str) -> list[dict]:
    [path] = [p for p in out.rglob(f"samples_{task}_*.jsonl") if p.parent.name != "judged"]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_task_metric_with_stderr_and_groups(run):
    assert "SAMPLE set shipped with lm-eval-hallulens" in run["first"].stderr  # said loudly
    results = results_of(run["root"] / "run1")
    sizes = {}
    for task in LEAVES:
        rows = samples_of(run["root"] / "run1", task)
        assert len(rows) == LIMIT
        entry = results["results"][task]
        per_metric: dict[str, list[float]] = {}
        for row in rows:
            outcome = json.loads(row["filtered_resps"][0])
            for judged in outcome["judgements"].values():  # constrained: always readable
                assert judged["raw"] and judged["verdict"] is not None
            for name in row["metrics"]:
                per_metric.setdefault(name, []).append(row[name])
        for name, values in per_metric.items():
            if name == "med_n_claims":  # a median, without a stderr
                assert entry[f"{name},judge"] == statistics.median(values)
                continue
            assert entry[f"{name},judge"] == pytest.approx(statistics.fmean(values))
            stderr = entry[f"{name}_stderr,judge"]
            if len(values) < 2:  # e.g. a LongWiki rate over the one answer not refused
                assert stderr == "N/A"
                continue
            assert stderr == pytest.approx(statistics.stdev(values) / len(values) ** 0.5)
        sizes[task] = entry
        if task == "longwiki":  # claim lists are free text, which a 135M judge may garble
            assert "judge_unparseable" in per_metric
            continue
        labels = {json.loads(row["filtered_resps"][0])["label"] for row in rows}
        assert labels <= {"hallucinated", "correct", "refused"}
        expected = {"judge_unparseable", "refusal_rate"}
        expected |= {"correct_rate"} if task == "precise_wikiqa" else {"false_acceptance_rate"}
        assert expected <= set(per_metric)
        assert entry["judge_unparseable,judge"] == 0.0
    for group in GROUPS:
        entry = results["groups"][group]
        leaves = [
            t for t in task_configs.leaf_tasks(group) if "false_acceptance_rate,judge" in sizes[t]
        ]
        expected = statistics.fmean(sizes[t]["false_acceptance_rate,judge"] for t in leaves)
        assert entry["false_acceptance_rate,judge"] == pytest.approx(expected)  # equal sizes
        assert "false_acceptance_rate_stderr,judge" in entry
    assert "correct_rate,judge" in results["groups"]["hallulens"]


def test_samples_join_the_store_by_prompt_hash(run):
    with open_store(run["store"]) as store:
        assert len(store) == LIMIT * len(LEAVES)
        for task in LEAVES:
            for row in samples_of(run["root"] / "run1", task):
                prompt = row["arguments"]["gen_args_0"]["arg_0"]
                assert row["prompt_hash"] == hashlib.sha256(prompt.encode()).hexdigest()
                record = store[row["prompt_hash"]]
                assert (record.task, record.doc_id) == (task, row["doc_id"])
                assert record.response == row["resps"][0][0]


def test_two_pass_judging_matches_in_harness_judging(run):
    out = run["root"] / "run2"
    assert "resuming" in run["second"].stderr  # generations come from the store
    for task in LEAVES:
        for row in samples_of(out, task):  # predict_only: no judge ran
            assert row["filtered_resps"][0] == row["resps"][0][0]
    [samples_dir] = {p.parent for p in out.rglob("samples_*.jsonl")}
    judged = run_cli("hallulens", "judge", str(samples_dir), env=run["env"])
    assert judged.returncode == 0, judged.stderr[-3000:]
    assert "0 asked" in judged.stderr  # every judge reply came from the cache
    [path] = (samples_dir / "judged").glob("results_*.json")
    posthoc = json.loads(path.read_text())
    inline = results_of(run["root"] / "run1")
    for name in [*LEAVES, *GROUPS]:
        metrics = {k: v for k, v in inline["results"][name].items() if "," in k}
        assert metrics == pytest.approx({k: posthoc["results"][name][k] for k in metrics})
    assert set(posthoc["groups"]) == set(GROUPS)


def test_label_join_and_legacy_export(run):
    samples_dir = next((run["root"] / "run1").rglob("samples_*.jsonl")).parent
    labelled = run_cli(
        "hallulens",
        "activations",
        "label",
        "--samples",
        str(samples_dir),
        "--store",
        str(run["store"]),
    )
    assert labelled.returncode == 0, labelled.stderr
    summary = json.loads(labelled.stdout)
    assert summary["labelled"] == LIMIT * len(LEAVES) and summary["unmatched"] == 0
    with open_store(run["store"]) as store:
        labels = store.labels()
        for task in LEAVES:
            for row in samples_of(run["root"] / "run1", task):
                assert (
                    labels[row["prompt_hash"]]["label"]
                    == json.loads(row["filtered_resps"][0])["label"]
                )
                assert labels[row["prompt_hash"]]["task"] == task

    out = run["root"] / "output"
    exported = run_cli(
        "hallulens", "export-legacy", "--samples", str(samples_dir), "--out", str(out)
    )
    assert exported.returncode == 0, exported.stderr
    for family, n in [
        ("precise_wikiqa", LIMIT),
        ("nonsense_mixed_entities", 4 * LIMIT),
        ("nonsense_generated_entities", 3 * LIMIT),
    ]:
        [model_dir] = (out / family).iterdir()
        lines = [json.loads(x) for x in (model_dir / "generation.jsonl").read_text().splitlines()]
        assert len(lines) == n
        assert {"prompt", "generation", "model", "timestamp"} <= set(lines[0])
        assert lines[0]["model"] == model_dir.name
        raw = (model_dir / "raw_eval_res.jsonl").read_text().splitlines()
        assert len(raw) == n and all(json.loads(x)["eval_res"] for x in raw)
        results = json.loads((model_dir / "eval_results.json").read_text())
        key = "halu_test_res" if family == "precise_wikiqa" else "refusal_eval_raw"
        assert len(results[key]) == n and results["model"] == model_dir.name


def test_hf_judge_backend_keeps_raw_text(run, tmp_path):
    [samples] = [
        p
        for p in (run["root"] / "run2").rglob("samples_precise_wikiqa_*.jsonl")
        if p.parent.name != "judged"
    ]
    env = {
        "HALLULENS_JUDGE": "hf:smollm2",
        "HALLULENS_JUDGE_MAX_TOKENS": "16",
        "HALLULENS_JUDGE_CACHE": str(tmp_path / "cache.sqlite"),
    }
    judged = run_cli("hallulens", "judge", str(samples), "--output_path", str(tmp_path), env=env)
    assert judged.returncode == 0, judged.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / samples.name).read_text().splitlines()]
    outcomes = [json.loads(r["filtered_resps"][0]) for r in rows]
    for outcome in outcomes:
        assert outcome["judge"] == "hf:smollm2"
        assert all(j["raw"].strip() for j in outcome["judgements"].values())
    [results] = tmp_path.glob("results_*.json")
    entry = json.loads(results.read_text())["results"]["precise_wikiqa"]
    unparseable = sum(o["label"] == "unparseable" for o in outcomes) / len(outcomes)
    assert entry["judge_unparseable,judge"] == pytest.approx(unparseable)
