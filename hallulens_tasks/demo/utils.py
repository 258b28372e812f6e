"""Functions the demo task's YAML names with `!function utils.<name>`."""

from __future__ import annotations

from pathlib import Path

import datasets

from hallulens_capture.errors import HalluLensError
from hallulens_tasks.jsonl import read_jsonl
from hallulens_tasks.prompting import render

DATA = Path(__file__).with_name("demo_questions.jsonl")


def load_demo(**_metadata) -> dict[str, datasets.Dataset]:
    """The eight shipped questions (lm-eval passes model_args and --metadata; unused here)."""
    rows = [row for _, row in read_jsonl(DATA, HalluLensError)]
    return {"test": datasets.Dataset.from_list(rows)}


def doc_to_text(doc: dict) -> str:
    return render("demo_question.jinja", question=doc["question"])


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """1.0 when the answer names any accepted answer (case-insensitive)."""
    text = results[0].lower()
    return {"answer_mentioned": float(any(a.lower() in text for a in doc["answers"]))}
