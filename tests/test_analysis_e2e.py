"""End to end on the embedded SmolLM2: stock `lm_eval` with capture on two HalluLens tasks,
a scripted judge server, label, audit, export and probe with its plot. The judge is a plain
rule (gold answer in the response = correct; refusal words = refusal / disbelief), so the labels
are deterministic; the probe numbers are whatever a 135M model gives, reported, not asserted."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from conftest import report, run_cli
from judge_server import JudgeServer
from sklearn.metrics import roc_auc_score

from hallulens_analysis.baselines import BASELINES
from hallulens_capture import open_store

pytestmark = pytest.mark.slow
TASKS = ("precise_wikiqa", "nonsense_mixed_entities_medicine")
REFUSAL = re.compile(
    r"(sorry|not sure|don't know|do not know|couldn't find|could not find|cannot|can't|unable|"
    r"not aware|no information|not familiar|does not exist|doesn't exist|fictional)",
    re.IGNORECASE,
)


def rule_judge(prompt: str) -> str:
    """Replies in the judge prompts' own output formats (abstention, correctness, belief)."""
    if "is_abstaining" in prompt:
        reply = prompt.rsplit("Chatbot:", 1)[1].rsplit("Result:", 1)[0]
        return json.dumps({"is_abstaining": bool(REFUSAL.search(reply))})
    if "YOUR JUDGEMENT" in prompt:
        response, rest = prompt.rsplit("\nResponse: ", 1)[1].split("\nCorrect Answer: ", 1)
        gold = rest.split("\n", 1)[0].strip()
        return "CORRECT" if gold.lower() in response.lower() else "INCORRECT"
    generation = prompt.rsplit("Generation: ", 1)[1].rsplit("\nAnswer:", 1)[0]
    return json.dumps({"does_believe": not REFUSAL.search(generation)})


def test_lm_eval_judge_label_export_probe(tmp_path, smollm2_dir):
    store, out = tmp_path / "acts.lmdb", tmp_path / "run"
    with JudgeServer(rule_judge) as judge:
        env = {
            "HALLULENS_JUDGE": "openai:rule-judge",
            "HALLULENS_JUDGE_BASE_URL": judge.base_url,
            "HALLULENS_JUDGE_CACHE": str(tmp_path / "judge.sqlite"),
        }
        run = run_cli(
            "lm_eval", "--model", "hallulens-hf",
            "--model_args",
            f"pretrained=smollm2,dtype=float32,activations={store},capture_tokens=response",
            "--tasks", ",".join(TASKS), "--apply_chat_template", "--gen_kwargs", "max_gen_toks=24",
            "--batch_size", "26", "--output_path", str(out), "--log_samples", env=env,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    [samples_dir] = {p.parent for p in out.rglob("samples_*.jsonl")}
    labelled = run_cli(
        "hallulens", "activations", "label", "--samples", str(samples_dir), "--store", str(store)
    )
    assert labelled.returncode == 0, labelled.stderr
    by_key = {}
    for path in samples_dir.glob("samples_*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            by_key[row["prompt_hash"]] = (json.loads(row["filtered_resps"][0])["label"], row["doc"])
    assert json.loads(labelled.stdout)["labelled"] == len(by_key) == 26

    audit = run_cli("hallulens", "activations", "audit", str(store), "--json")
    found = json.loads(audit.stdout)
    assert audit.returncode == 0 and found["records"] == 26
    assert found["notes"]["records_without_label"]["count"] == 0

    with open_store(store) as records:
        labels = records.labels()
        for key, (label, doc) in by_key.items():
            assert labels[key]["label"] == label and labels[key].get("answer") == doc.get("answer")
            assert records[key].capture_tokens == "response"

    export = tmp_path / "npy"
    done = run_cli(
        "hallulens", "activations", "export", str(store), "--format", "npy", "--out", str(export),
        "--task", "precise_wikiqa", "--reduce", "last-prompt", "mean", "answer",
        "--tokenizer", str(smollm2_dir), "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    index = [json.loads(x) for x in (export / "index.jsonl").read_text().splitlines()]
    last_prompt, mean = np.load(export / "last-prompt.npy"), np.load(export / "mean.npy")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    with open_store(store) as records:
        for row in index:
            record = records[row["key"]]
            raw = record.all_layers_activations  # response scope: row j = state before token j
            np.testing.assert_array_equal(last_prompt[row["row"]], raw[:, 0])
            want = raw[:, 1:].astype(np.float64).mean(axis=1).astype(np.float32).astype(np.float16)
            np.testing.assert_allclose(mean[row["row"]], want, rtol=2e-3, atol=2e-3)
            start, stop = row["answer"]
            spelled = tokenizer.decode(record.generated_token_ids[start:stop].tolist())
            assert by_key[row["key"]][1]["answer"].lower()[:3] in spelled.lower()
    matched = sum(label == "correct" for label, doc in by_key.values() if "answer" in doc)
    assert len(index) >= matched  # every correct answer holds its gold text

    probe = tmp_path / "probe"
    done = run_cli(
        "hallulens", "probe", str(store), "--out", str(probe), "--reduce", "last-prompt", "mean",
        "--task", "precise_wikiqa", "--folds", "3", "--bootstrap", "300", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads((probe / "report.json").read_text())
    wanted = [label for label, doc in by_key.values() if "answer" in doc]  # precise_wikiqa
    assert result["counts"]["positive"] == wanted.count("hallucinated")
    assert result["counts"]["negative"] == wanted.count("correct")
    with open(probe / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([int(r["y"]) for r in rows])
    for entry in result["results"]:
        scores = np.array([float(r[f"{entry['reduction']}@{entry['layer']}"]) for r in rows])
        assert entry["auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-6)
    assert (probe / "auroc_by_layer.png").stat().st_size > 10_000
    # the records carry token statistics (capture_topk's default): the logprob baselines are
    # scored on the same samples, each from its record's own generated-token logprobs
    assert {b["name"] for b in result["baselines"]} == set(BASELINES)
    with open_store(store) as records:
        minus_mean = [-records[r["key"]].generated_logprobs.astype(np.float64).mean() for r in rows]
    np.testing.assert_allclose(
        [float(r["baseline:neg_mean_logprob"]) for r in rows], minus_mean, rtol=1e-5
    )
    best = result["best"]
    counts = result["counts"]
    report(
        "e2e probe on SmolLM2, precise_wikiqa hallucinated vs correct",
        f"{counts['positive']} vs {counts['negative']}: best {best['reduction']} layer "
        f"{best['layer']} AUROC {best['auroc']:.3f} [{best['auroc_ci'][0]:.3f}, "
        f"{best['auroc_ci'][1]:.3f}]; baselines "
        + ", ".join(f"{b['name']} {b['auroc']:.3f}" for b in result["baselines"]),
    )
    print(done.stdout)
