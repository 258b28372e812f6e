"""Prompt sets: the data-dir contract, the shipped samples, and one-line errors for bad files."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import run_cli

from hallulens_tasks.prompt_sets import (
    PromptSetError,
    dataset,
    load_prompt_set,
    read_prompt_set,
)
from hallulens_tasks.task_table import FAMILIES, shipped_prompt_set


@pytest.mark.parametrize(
    "task", ["precise_wikiqa", "longwiki", "nonsense_mixed_entities", "nonsense_generated_entities"]
)
def test_shipped_sample_sets_are_valid(task, caplog):
    with caplog.at_level(logging.WARNING):
        rows = load_prompt_set(task)
    assert rows and all(set(FAMILIES[task].fields) <= set(r) for r in rows)
    assert "SAMPLE set" in caplog.text  # loud: these are not HalluLens numbers
    manifest = json.loads((shipped_prompt_set(task).parent / "manifest.json").read_text())
    assert manifest["N"] == len(rows)


def write(tmp_path, task: str, lines: list[str]):
    path = tmp_path / task / "prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_QA = json.dumps(
    {"prompt": "Q?", "answer": "A", "title": "T", "h_score_cat": 3, "reference": "R", "extra": 1}
)


@pytest.mark.parametrize(
    ("task", "line", "message"),
    [
        ("precise_wikiqa", "{not json", ":2: not valid JSON"),
        ("precise_wikiqa", '{"prompt": "Q?"}', ":2: missing field(s) answer, title, h_score_cat"),
        ("precise_wikiqa", GOOD_QA.replace("3", '"3"'), ':2: "h_score_cat" must be an integer'),
        ("precise_wikiqa", GOOD_QA.replace('"Q?"', '""'), ':2: "prompt" must be a non-empty'),
        ("precise_wikiqa", "[1, 2]", ":2: expected a JSON object, got list"),
        (
            "nonsense_mixed_entities",
            '{"prompt": "p", "name": "n", "type": "fungus"}',
            ":2: type 'fungus' is not one of medicine",
        ),
        (
            "nonsense_generated_entities",
            '{"prompt": "p", "name": "n", "type": "spaceship", "place": "Mars"}',
            ":2: cannot tell the domain",
        ),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, task, line, message):
    first = (
        GOOD_QA
        if task == "precise_wikiqa"
        else json.dumps(
            {"prompt": "p", "name": "n", "type": "animal", "place": "", "domain": "business"}
        )
    )
    path = write(tmp_path, task, [first, line])
    with pytest.raises(PromptSetError) as err:
        read_prompt_set(task, path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_data_dir_set_extra_fields_and_domains(tmp_path, monkeypatch):
    monkeypatch.setenv("HALLULENS_DATA_DIR", str(tmp_path))
    with pytest.raises(PromptSetError, match=r"does not exist .* generate precise_wikiqa"):
        load_prompt_set("precise_wikiqa")
    write(tmp_path, "precise_wikiqa", [GOOD_QA])
    assert load_prompt_set("precise_wikiqa")[0]["extra"] == 1  # extra fields are kept
    rows = [
        {"prompt": "p1", "name": "a", "type": "museum", "place": "Rome"},
        {"prompt": "p2", "name": "b", "type": "pandemic", "place": "Peru"},
        {"prompt": "p3", "name": "c", "type": "watch", "place": ""},
    ]
    write(tmp_path, "nonsense_generated_entities", [json.dumps(r) for r in rows])
    split = dataset("nonsense_generated_entities", where={"domain": "event"})["test"]
    assert split["name"] == ["b"]
    assert [r["domain"] for r in load_prompt_set("nonsense_generated_entities")] == [
        "business",
        "event",
        "product",
    ]


@pytest.mark.slow
def test_bad_set_through_lm_eval_is_one_line(tmp_path):
    write(tmp_path, "precise_wikiqa", [GOOD_QA, "{oops"])
    result = run_cli(
        "lm_eval",
        "--model",
        "dummy",
        "--tasks",
        "precise_wikiqa",
        env={"HALLULENS_DATA_DIR": str(tmp_path)},
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"lm-eval-hallulens: error: {tmp_path / 'precise_wikiqa' / 'prompts.jsonl'}:2: "
        "not valid JSON (Expecting property name enclosed in double quotes)"
    )
    assert "Traceback" not in result.stderr
