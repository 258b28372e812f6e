"""One scoring rule for every output, checked against one hand computation.

The tested model is the harness's own `local-chat-completions` (installable with this package)
answering from a scripted OpenAI-compatible server, which is also the judge: every verdict is
exact. The set holds a refused item the correctness judge calls CORRECT, an unreadable
abstention reply, an unreadable correctness reply and unreadable belief replies. The results
JSON of `lm_eval` (task and group rows), `hallulens judge` on a `--predict_only` run and
`export-legacy`'s files must all give the numbers computed by hand below, and readers written
to upstream HalluLens' file formats must read the exported files.
"""

from __future__ import annotations

import json
import re
import sqlite3
from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from judge_server import JudgeServer

pytestmark = pytest.mark.slow

# PreciseWikiQA: (marker, bin). The judge answers by the marker in the question.
QA = [("REFUSE-BUT-CORRECT", 0), ("RIGHT", 0), ("WRONG", 0), ("JUNK-ABSTAIN", 1)]
QA += [("JUNK-CORRECT", 1), ("REFUSE", 1), ("WRONG", 1)]
ABSTAIN = {"REFUSE-BUT-CORRECT": "true", "REFUSE": "true", "JUNK-ABSTAIN": None}
CORRECT = {"REFUSE-BUT-CORRECT": "CORRECT", "RIGHT": "CORRECT", "JUNK-ABSTAIN": "CORRECT"}
CORRECT |= {"JUNK-CORRECT": "It depends.", "WRONG": "INCORRECT", "REFUSE": "INCORRECT"}
# mixed entities per type, generated entities per domain: BELIEVE, DOUBT or JUNK
MIXED = {
    "animal": ["BELIEVE", "BELIEVE", "BELIEVE", "DOUBT"],
    "plant": ["DOUBT", "DOUBT", "JUNK", "JUNK", "JUNK"],
    "medicine": ["BELIEVE"],
    "bacteria": ["DOUBT"],
}
GENERATED = {"business": "BELIEVE", "event": "DOUBT", "product": "DOUBT"}
# LongWiki: (marker, bin). Every answer is "Here is what I know.": one sentence, one claim, which
# the verifier supports; the abstention judge answers by the marker in the question.
LONGWIKI = [("KNOWS", 5), ("UNAWARE", 6)]
BELIEF = {"BELIEVE": '{"does_believe": true}', "DOUBT": '{"does_believe": false}'}

# --- the hand computation ---------------------------------------------------------------------
# QA items 0, 1, 2, 5, 6 are scored: refused 0 and 5 (0 although judged CORRECT), correct 1,
# hallucinated 2 and 6; items 3 and 4 are unreadable.
QA_RATES = {
    "refusal_rate": F(2, 5),
    "correct_rate": F(1, 5),
    "hallu_rate": F(2, 3),
    "judge_unparseable": F(2, 7),
    "refusal_rate_cat0": F(1, 3),
    "correct_rate_cat0": F(1, 3),
    "hallu_rate_cat0": F(1, 2),
    "refusal_rate_cat1": F(1, 2),
    "correct_rate_cat1": F(0),
    "hallu_rate_cat1": F(1),
}
MIXED_TASKS = {  # false acceptances / scored, unreadable / items
    "nonsense_mixed_entities_animal": (F(3, 4), F(0, 4)),
    "nonsense_mixed_entities_plant": (F(0, 2), F(3, 5)),
    "nonsense_mixed_entities_medicine": (F(1, 1), F(0, 1)),
    "nonsense_mixed_entities_bacteria": (F(0, 1), F(0, 1)),
}
GROUPS = {
    # pooled: 4 of 8 scored items accepted (weighing members by document count would give 4/11)
    "nonsense_mixed_entities": {
        "false_acceptance_rate": F(4, 8),
        "refusal_rate": F(4, 8),
        "judge_unparseable": F(3, 11),
    },
    "nonsense_generated_entities": {
        "false_acceptance_rate": F(1, 3),
        "refusal_rate": F(2, 3),
        "judge_unparseable": F(0, 3),
    },
    "hallulens": {
        "hallu_rate": F(2, 3),
        "correct_rate": F(1, 5),
        "false_acceptance_rate": F(5, 11),
        "judge_unparseable": F(5, 23),
        "precision": F(1),  # LongWiki's, over its one answer not refused
        "recall_at_k": F(1, 32),
        "f1_at_k": F(2, 33),  # 2 x 1 x 1/32 / (1 + 1/32)
    },
}
LONGWIKI_RATES = {
    "refusal_rate": F(1, 2),
    "precision": F(1),
    "recall_at_k": F(1, 32),
    "f1_at_k": F(2, 33),
    "med_n_claims": F(1),
    "judge_unparseable": F(0),
    "refusal_rate_cat5": F(0),
    "refusal_rate_cat6": F(1),
    "f1_at_k_cat5": F(2, 33),
}


def marker(prompt: str) -> str:
    return re.findall(r"\[([A-Z\-]+)\]", prompt)[-1]


def scripted(prompt: str) -> str:
    """Judge replies by marker; anything else is the tested model answering."""
    if "is_abstaining" in prompt:
        verdict = ABSTAIN.get(marker(prompt), "false")
        return "I cannot tell." if verdict is None else f'{{"is_abstaining": {verdict}}}'
    if "YOUR JUDGEMENT" in prompt:
        return CORRECT[marker(prompt)]
    if "does_believe" in prompt:
        return BELIEF.get(marker(prompt), "Perhaps, perhaps not.")
    if "is_knowledgeable" in prompt:
        return f'{{"is_knowledgeable": {str(marker(prompt) == "KNOWS").lower()}}}'
    if "Sentence to focus on" in prompt:
        return "- The speaker knows something."
    if "is_supported" in prompt:
        return '{"is_supported": true}'
    return "Here is what I know."


def write_sets(root: Path) -> None:
    """The prompt sets, and a Wikipedia database (FActScore's format) for LongWiki's topics."""
    root.mkdir(parents=True)
    with sqlite3.connect(root / "wiki.db") as db:
        db.execute("CREATE TABLE documents (title PRIMARY KEY, text)")
        db.executemany(
            "INSERT INTO documents VALUES (?, ?)",
            [(f"Topic {i}", "The speaker knows something.") for i in range(len(LONGWIKI))],
        )
    db.close()
    rows = {
        "longwiki": [
            {
                "prompt": f"Tell me about Topic {i} [{m}].",
                "title": f"Topic {i}",
                "h_score_cat": cat,
                "reference": "r",
            }
            for i, (m, cat) in enumerate(LONGWIKI)
        ],
        "precise_wikiqa": [
            {
                "prompt": f"Question {i} [{m}]?",
                "answer": f"answer {i}",
                "title": f"T{i}",
                "h_score_cat": cat,
                "reference": "r",
            }
            for i, (m, cat) in enumerate(QA)
        ],
        "nonsense_mixed_entities": [
            {"prompt": f"Tell me about the {kind} Zorb{i} [{m}].", "name": f"Zorb{i}", "type": kind}
            for kind, markers in MIXED.items()
            for i, m in enumerate(markers)
        ],
        "nonsense_generated_entities": [
            {
                "prompt": f"What is {name}?",
                "name": name,
                "type": kind,
                "place": place,
                "domain": domain,
            }
            for domain, kind, place in (
                ("business", "cafe", "Oslo"),
                ("event", "war", "Peru"),
                ("product", "phone", ""),
            )
            for name in [f"Quux [{GENERATED[domain]}]"]
        ],
    }
    for family, items in rows.items():
        (root / family).mkdir(parents=True)
        text = "".join(json.dumps(r) + "\n" for r in items)
        (root / family / "prompts.jsonl").write_text(text)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    write_sets(root / "data")
    with JudgeServer(scripted) as server:
        env = {
            "HALLULENS_DATA_DIR": str(root / "data"),
            "HALLULENS_JUDGE": "openai:scripted-judge",
            "HALLULENS_JUDGE_BASE_URL": server.base_url,
            "HALLULENS_JUDGE_CACHE": str(root / "judge.sqlite"),
            "HALLULENS_JUDGE_PARSE_RETRIES": "0",
            "HALLULENS_WIKI_DB": str(root / "data" / "wiki.db"),
        }
        model_args = f"model=scripted-model,base_url={server.base_url}/chat/completions"

        def lm_eval(out: str, *extra: str) -> Path:
            done = run_cli(
                "lm_eval",
                "--model",
                "local-chat-completions",
                "--model_args",
                model_args,
                "--tasks",
                "hallulens",
                "--apply_chat_template",
                "--output_path",
                str(root / out),
                "--log_samples",
                *extra,
                env=env,
            )
            assert done.returncode == 0, done.stderr[-4000:]
            return root / out

        judged_in_harness = lm_eval("inline")
        predicted = lm_eval("twopass", "--predict_only")
        [samples_dir] = {p.parent for p in predicted.rglob("samples_*.jsonl")}
        offline = run_cli("hallulens", "judge", str(samples_dir), env=env)
        assert offline.returncode == 0, offline.stderr[-3000:]
    [inline_samples] = {p.parent for p in judged_in_harness.rglob("samples_*.jsonl")}
    exported = run_cli(
        "hallulens", "export-legacy", "--samples", str(inline_samples), "--out", str(root / "out")
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    return {"inline": inline_samples, "offline": samples_dir / "judged", "legacy": root / "out"}


def results(directory: Path) -> dict:
    [path] = directory.glob("results_*.json")
    return json.loads(path.read_text())


def expected_rows() -> dict[str, dict[str, F]]:
    rows = {"precise_wikiqa": QA_RATES, "longwiki": LONGWIKI_RATES, **GROUPS}
    for task, (accepted, unreadable) in MIXED_TASKS.items():
        rows[task] = {
            "false_acceptance_rate": accepted,
            "refusal_rate": 1 - accepted,
            "judge_unparseable": unreadable,
        }
    return rows


@pytest.mark.parametrize("source", ["inline", "offline"])
def test_results_json_task_and_group_rows_equal_the_hand_computation(runs, source):
    found = results(runs[source])["results"]
    for name, metrics in expected_rows().items():
        for metric, value in metrics.items():
            assert found[name][f"{metric},judge"] == pytest.approx(float(value)), (name, metric)
    qa = found["precise_wikiqa"]  # HalluLens' Correct = (1 - refusal)(1 - hallu), exactly
    assert qa["correct_rate,judge"] == pytest.approx(
        (1 - qa["refusal_rate,judge"]) * (1 - qa["hallu_rate,judge"])
    )
    hallulens = found["hallulens"]
    # a pooled rate over n 0/1 items has the harness's stderr of a mean: sqrt(p(1-p)/(n-1))
    p = 5 / 11
    assert hallulens["false_acceptance_rate_stderr,judge"] == pytest.approx(
        (p * (1 - p) / 10) ** 0.5
    )


def test_a_refusal_judged_correct_keeps_both_raw_verdicts(runs):
    [path] = runs["inline"].glob("samples_precise_wikiqa_*.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    outcome = json.loads(first["filtered_resps"][0])
    assert outcome["label"] == "refused"
    assert outcome["judgements"]["abstention"]["verdict"] is True
    assert outcome["judgements"]["correctness"]["verdict"] == "correct"
    assert first["correct_rate"] == 0.0


def read_upstream_precise(directory: Path) -> dict[str, float]:
    """A reader written to upstream's documented PreciseWikiQA files, with their formulas."""
    results = json.loads((directory / "eval_results.json").read_text())
    generation = pd.read_json(directory / "generation.jsonl", lines=True)
    abstained = np.array(results["abstantion"], dtype=bool)
    hallucinated = np.array(results["halu_test_res"], dtype=bool)
    assert len(abstained) == len(hallucinated) == len(generation)
    assert isinstance(results["evaluator_abstantion"], str)
    assert isinstance(results["evaluator_hallucination"], str)
    raw = pd.read_json(directory / "abstain_eval_raw.jsonl", lines=True)
    assert len(raw) == len(generation) and raw["eval_res"].map(type).eq(str).all()
    answered = ~abstained
    return {
        "refusal_rate": abstained.mean(),
        "halu_Rate": (answered & hallucinated).sum() / answered.sum(),
        "correct_rate": (~hallucinated).sum() / len(hallucinated),
        "file_halu_Rate": results["halu_Rate"],
        "file_refusal_rate": results["refusal_rate"],
        "file_correct_rate": results["correct_rate"],
    }


def read_upstream_entities(directory: Path, generated: bool) -> dict[str, float]:
    """A reader written to upstream's NonExistentRefusal files: the pandas mask of refusals over
    generation.jsonl, whose generated-entity rows hold `type_`."""
    results = json.loads((directory / "eval_results.json").read_text())
    generation = pd.read_json(directory / "generation.jsonl", lines=True)
    refused = pd.Series(results["refusal_eval_raw"], dtype=bool)
    accepted = generation[~refused.to_numpy()]  # a null in the list breaks this mask
    if generated:
        assert {"type_", "name", "place", "prompt", "generation"} <= set(generation.columns)
        assert (generation["type_"] == generation["type"]).all()
    assert isinstance(results["evaluator"], str)
    return {
        "refusal_rate": refused.mean(),
        "false_acceptance_rate": len(accepted) / len(generation),
        "file_refusal_rate": results["refusal_rate"],
        "file_false_acceptance_rate": results["false_acceptance_rate"],
    }


def test_legacy_files_read_by_upstream_style_readers_give_the_same_numbers(runs):
    [qa_dir] = (runs["legacy"] / "precise_wikiqa").iterdir()
    qa = read_upstream_precise(qa_dir)
    for name, expected in [
        ("refusal_rate", F(2, 5)),
        ("halu_Rate", F(2, 3)),
        ("correct_rate", F(1, 5)),
    ]:
        assert qa[name] == pytest.approx(float(expected))
        assert qa[f"file_{name}"] == pytest.approx(float(expected))
    for family, generated in [
        ("nonsense_mixed_entities", False),
        ("nonsense_generated_entities", True),
    ]:
        [directory] = (runs["legacy"] / family).iterdir()
        found = read_upstream_entities(directory, generated)
        expected = GROUPS[family]["false_acceptance_rate"]
        assert found["false_acceptance_rate"] == pytest.approx(float(expected))
        assert found["file_false_acceptance_rate"] == pytest.approx(float(expected))
        assert found["refusal_rate"] == pytest.approx(float(1 - expected))
    # the unreadable items are kept aside, with their raw replies, and counted
    left_out = [json.loads(x) for x in (qa_dir / "unparseable.jsonl").read_text().splitlines()]
    assert [marker(row["prompt"]) for row in left_out] == ["JUNK-ABSTAIN", "JUNK-CORRECT"]
    assert left_out[0]["judgements"]["abstention"]["raw"] == "I cannot tell."
    assert json.loads((qa_dir / "eval_results.json").read_text())["judge_unparseable"] == 2
