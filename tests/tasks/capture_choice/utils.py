"""Loader for the capture_choice test task (data written for these tests)."""

import json
from pathlib import Path

import datasets


def load(**_metadata):
    rows = [
        json.loads(line)
        for line in Path(__file__).with_name("capture_choice.jsonl").read_text().splitlines()
    ]
    return {"test": datasets.Dataset.from_list(rows)}
