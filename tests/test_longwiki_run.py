"""LongWiki through the stock `lm_eval` CLI on the embedded SmolLM2 with capture (llama.cpp, the
quickest engine on a CPU; `test_hallulens_run` runs LongWiki on transformers), judged by a
scripted OpenAI-compatible judge on 127.0.0.1 against the shipped sample Wikipedia; then token
labels on the real records, the seed's files, and `hallulens pipeline longwiki`.

The judge's rules, which the hand computations below apply to the logged answers: every answer
is knowledgeable; each sentence's one claim is the sentence itself; a claim is supported when
its length in characters is even.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
from conftest import run_cli, step_names
from judge_server import JudgeServer

from hallulens_capture import open_store
from hallulens_tasks.runs.token_labels import TOKEN_CLASSES, row_labels, token_labels

pytestmark = pytest.mark.slow

LIMIT = 3
NEW_TOKENS = 64


def claim_of(sentence: str) -> str:
    return " ".join(sentence.split())


def supported(claim: str) -> bool:
    return len(claim) % 2 == 0


def scripted(prompt: str) -> str:
    if "is_knowledgeable" in prompt:
        return '{"is_knowledgeable": true}'
    if "Sentence to focus on" in prompt:
        return f"- {claim_of(re.findall(r'<SOS>(.*?)<EOS>', prompt, re.S)[-1])}"
    claim = prompt.rsplit("Claim: ", 1)[1].split("\n", 1)[0]
    return json.dumps({"is_supported": supported(claim)})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("longwiki")
    store = root / "acts.lmdb"
    with JudgeServer(scripted) as server:
        env = {
            "HALLULENS_JUDGE": "openai:scripted-judge",
            "HALLULENS_JUDGE_BASE_URL": server.base_url,
            "HALLULENS_JUDGE_CACHE": str(root / "judge.sqlite"),
            # no FActScore DB in this source cache: the sample Wikipedia is used
            "HALLULENS_SOURCE_CACHE": str(root / "sources"),
        }
        done = run_cli(
            "lm_eval",
            "--model",
            "hallulens-gguf",
            "--model_args",
            f"pretrained=smollm2,activations={store}",
            "--tasks",
            "longwiki",
            "--limit",
            str(LIMIT),
            "--apply_chat_template",
            "--gen_kwargs",
            f"max_gen_toks={NEW_TOKENS}",
            "--batch_size",
            str(LIMIT),
            "--output_path",
            str(root / "out"),
            "--log_samples",
            env=env,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        yield {"root": root, "store": store, "env": env, "stderr": done.stderr, "server": server}


def samples_file(root: Path) -> Path:
    [path] = [p for p in root.rglob("samples_longwiki_*.jsonl") if p.parent.name != "judged"]
    return path


def rows_of(root: Path) -> list[dict]:
    return [json.loads(line) for line in samples_file(root).read_text().splitlines()]


def test_results_json_has_every_metric_as_computed_by_hand(run):
    assert "SAMPLE Wikipedia" in run["stderr"] and "SAMPLE set" in run["stderr"]
    [path] = [p for p in (run["root"] / "out").rglob("results_*.json")]
    results = json.loads(path.read_text())
    row = results["results"]["longwiki"]
    rows = rows_of(run["root"])
    assert len(rows) == LIMIT
    per_answer: dict[str, list[float]] = {"precision": [], "recall_at_k": [], "f1_at_k": []}
    claims_per_answer = []
    for sample in rows:
        answer = sample["resps"][0][0]
        outcome = json.loads(sample["filtered_resps"][0])
        assert outcome["judge"] == "openai:scripted-judge" and outcome["k"] == 32
        claims = []
        for sentence in outcome["sentences"]:
            assert answer[slice(*sentence["span"])] == sentence["text"]
            for claim in sentence["claims"]:
                assert claim["claim"] == claim_of(sentence["text"])
                assert claim["supported"] is supported(claim["claim"])
                # the topic and pages the question names
                assert claim["evidence"] and all(
                    e["title"] == sample["doc"]["title"] or e["title"] in sample["doc"]["prompt"]
                    for e in claim["evidence"]
                )
                claims.append(claim["claim"])
        assert claims, "SmolLM2 answered with sentences"
        unique = list(dict.fromkeys(claims))
        assert unique == claims  # no sentence repeated here, so none dropped
        hits = sum(map(supported, claims))
        precision, recall = hits / len(claims), min(hits / 32, 1.0)
        f1 = 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)
        per_answer["precision"].append(precision)
        per_answer["recall_at_k"].append(recall)
        per_answer["f1_at_k"].append(f1)
        claims_per_answer.append(len(claims))
        expected_label = "correct" if hits == len(claims) else "hallucinated"
        assert outcome["label"] == expected_label
    for name, values in per_answer.items():
        assert row[f"{name},judge"] == pytest.approx(statistics.fmean(values)), name
        assert row[f"{name}_stderr,judge"] == pytest.approx(
            statistics.stdev(values) / len(values) ** 0.5
        )
    assert row["refusal_rate,judge"] == 0.0 and row["judge_unparseable,judge"] == 0.0
    assert row["med_n_claims,judge"] == statistics.median(claims_per_answer)
    bins = [r["doc"]["h_score_cat"] for r in rows]
    for b in set(bins):
        mine = [v for v, c in zip(per_answer["precision"], bins, strict=True) if c == b]
        assert row[f"precision_cat{b},judge"] == pytest.approx(statistics.fmean(mine))


def test_token_labels_on_real_records_decode_to_their_sentences(run, smollm2_dir):
    from transformers import AutoTokenizer

    samples = samples_file(run["root"])
    labelled = run_cli(
        "hallulens", "activations", "label", "--samples", str(samples), "--store", str(run["store"])
    )
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    summary = json.loads(labelled.stdout)
    assert summary["labelled"] == summary["token_labelled"] == LIMIT
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    unsupported_seen = 0
    with open_store(run["store"]) as store:
        labels = store.labels()
        for sample in rows_of(run["root"]):
            outcome = json.loads(sample["filtered_resps"][0])
            entry = labels[sample["prompt_hash"]]
            assert entry["label"] == outcome["label"]
            record = store[sample["prompt_hash"]]
            ids = [int(i) for i in record.generated_token_ids]
            codes = token_labels(entry)
            assert len(codes) == len(ids) == entry["tokens"]["generated"]
            runs = {r[3]: r for r in entry["tokens"]["runs"]}
            for index, sentence in enumerate(outcome["sentences"]):
                if not sentence["claims"]:
                    continue
                first, end, kind, _ = runs[index]
                verdict = sentence["claims"][0]["supported"]
                assert kind == ("supported" if verdict else "unsupported")
                text = tokenizer.decode(ids[first:end], skip_special_tokens=True)
                assert sentence["text"] in text  # every token of the sentence is in the run
                inner = tokenizer.decode(ids[first + 1 : end - 1], skip_special_tokens=True)
                assert inner.strip() in sentence["text"]  # and only boundary tokens stick out
                if not verdict:
                    unsupported_seen += 1
                    inside = codes[first + 1 : end - 1]
                    assert (inside == TOKEN_CLASSES.index("unsupported")).all()
            covered = {t for first, end, _, _ in runs.values() for t in range(first, end)}
            outside = [t for t in range(len(ids)) if t not in covered]
            assert (codes[outside] == 0).all()  # tokens of no sentence carry no claim
            rows = row_labels(record, entry)  # row j of a generated capture is token j
            assert len(rows) == len(ids) - 1 and (rows == codes[:-1]).all()
    assert unsupported_seen, "the scripted verifier rejects claims of odd length"


def test_legacy_files_hold_the_results_numbers(run):
    out = run["root"] / "legacy"
    done = run_cli(
        "hallulens", "export-legacy", "--samples", str(samples_file(run["root"])), "--out", str(out)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [model_dir] = (out / "longwiki").iterdir()
    [path] = [p for p in (run["root"] / "out").rglob("results_*.json")]
    row = json.loads(path.read_text())["results"]["longwiki"]
    results = json.loads((model_dir / "eval_results.json").read_text())
    for name in ("precision", "recall_at_k", "f1_at_k", "refusal_rate", "med_n_claims"):
        assert results[name] == pytest.approx(row[f"{name},judge"])
    details = json.loads((model_dir / "eval_details.json").read_text())
    assert details["k"] == 32 and details["evalauted_model"] == "smollm2"
    header = (model_dir / "output.csv").read_text().splitlines()[0]
    assert header.split(",")[:5] == ["prompt", "is_supported", "claim", "sentence", "title"]


def test_pipeline_runs_every_longwiki_stage(run, tmp_path):
    data = tmp_path / "data" / "longwiki"
    data.mkdir(parents=True)
    shipped = Path(__file__).parents[1] / "hallulens_tasks" / "data" / "longwiki" / "prompts.jsonl"
    data.joinpath("prompts.jsonl").write_text("".join(shipped.read_text().splitlines(True)[:2]))
    args = ["pipeline", "longwiki", "--do_inference", "--do_eval", "--tested_model", "smollm2"]
    args += ["--data_dir", str(tmp_path / "data"), "--lmdb_path", str(tmp_path / "acts.lmdb")]
    args += ["--eval_results_path", str(tmp_path / "output"), "--max_tokens", "32"]
    args += ["--inf_batch_size", "2", "--k", "4", "--inference_method", "gguf"]
    done = run_cli("hallulens", *args, env=run["env"])
    assert done.returncode == 0, done.stderr[-4000:]
    assert step_names(done.stderr) == [
        "lm_eval",
        "judge",
        "activations",
        "export-legacy",
    ]
    model_dir = tmp_path / "output" / "longwiki" / "smollm2"
    assert json.loads((model_dir / "eval_details.json").read_text())["k"] == 4
    with open_store(tmp_path / "acts.lmdb") as store:
        labels = store.labels()
        assert len(labels) == 2 and all("tokens" in entry for entry in labels.values())
