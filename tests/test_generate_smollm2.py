"""`hallulens generate precise_wikiqa` with a real generator: the embedded SmolLM2 via llama.cpp.

SmolLM2-135M rarely writes a question that passes upstream's answerability filter (one
candidate in three to ten on the short invented articles of generate_fixtures), so the run may
try ten articles in each of the two bins N=2 asks for. Sampling is seeded, so on one machine the
outcome is fixed, but llama.cpp's arithmetic differs between CPUs (AVX2 or AVX-512 kernels): with
three articles a bin, one machine found a question in both bins and another in neither. A second
run with the same cache asks the model nothing.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from conftest import run_cli
from generate_fixtures import source_args, title, write_small_wiki_sources

from hallulens_tasks.prompt_sets import load_prompt_set

pytestmark = pytest.mark.slow


def test_smollm2_writes_a_valid_precise_wikiqa_set(tmp_path):
    sources = write_small_wiki_sources(tmp_path / "sources")
    documents = {
        row["title"]: row["document"]
        for row in map(json.loads, sources["goodwiki"].read_text().splitlines())
    }
    out, cache = tmp_path / "out", tmp_path / "cache.sqlite"
    args = ["generate", "precise_wikiqa", "--N", "2", "--seed", "0", "--max-candidates", "10"]
    args += ["--generator", "gguf:smollm2", "--cache", str(cache), "--out", str(out)]
    args += source_args(sources)
    first = run_cli("hallulens", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    path = out / "precise_wikiqa" / "prompts.jsonl"
    rows = load_prompt_set("precise_wikiqa", out)  # what the task will read
    manifest = json.loads((out / "precise_wikiqa" / "manifest.json").read_text())
    assert manifest["generator"] == "gguf:smollm2"
    assert manifest["prompts_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    per_bin = manifest["generation"]["per_bin"]
    assert sum(b["quota"] for b in per_bin.values()) == 2
    assert sum(b["accepted"] for b in per_bin.values()) == len(rows) >= 1
    tried = sum(b["articles_tried"] for b in per_bin.values())
    assert sum(manifest["generation"]["rejected"].values()) == tried - len(rows)
    numbers = {title(i): i for i in range(100)}
    for row in rows:
        assert row["prompt"] == row["prompt"].strip() and row["prompt"]
        assert len(row["answer"].split()) <= 10 and "unanswerable" not in row["answer"].lower()
        assert row["reference"] == documents[row["title"]]  # short articles: one section
        assert row["h_score_cat"] == numbers[row["title"]] // 10
        assert per_bin[str(row["h_score_cat"])]["quota"] == 1
    # a question per article tried, an answer per question that passed its own filter
    calls = int(re.search(r"smollm2: (\d+) calls, 0 from the cache, \1 asked", first.stderr)[1])
    assert tried < calls <= 2 * tried

    again = run_cli("hallulens", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ", 0 asked" in again.stderr  # every reply from the cache: the model is not loaded
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest["prompts_sha256"]
