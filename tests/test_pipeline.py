"""`hallulens pipeline` with the seed's flags: generate → lm_eval (capture) → judge → seed files."""

from __future__ import annotations

import json
import os

import pytest
from conftest import printed_steps, run_cli, step_names
from generate_fixtures import scripted_precise, write_wiki_sources
from judge_server import JudgeServer

from hallulens_capture import hugepages, open_store


@pytest.mark.slow
def test_seed_flags_run_every_stage_on_the_embedded_model(tmp_path):
    sources = write_wiki_sources(tmp_path / "sources")
    data, output, store = tmp_path / "data", tmp_path / "output", tmp_path / "acts.lmdb"
    args = ["pipeline", "precise_wikiqa", "--do_generate_prompt", "--do_inference", "--do_eval"]
    args += ["--N", "4", "--seed", "3", "--tested_model", "smollm2"]
    args += ["--q_generator", "openai:scripted", "--wiki_src", str(sources["goodwiki"])]
    args += ["--source", f"wikirank={sources['wikirank']}", "--data_dir", str(data)]
    args += ["--eval_results_path", str(output), "--lmdb_path", str(store)]
    args += ["--max_inference_tokens", "24", "--inf_batch_size", "4"]
    with JudgeServer(scripted_precise) as generator:
        env = {
            "OPENAI_BASE_URL": generator.base_url,  # the question generator
            "HALLULENS_GENERATE_CACHE": str(tmp_path / "generate.sqlite"),
            "HALLULENS_JUDGE": "gguf:smollm2",
            "HALLULENS_JUDGE_CONSTRAINED": "1",
            "HALLULENS_JUDGE_CACHE": str(tmp_path / "judge.sqlite"),
        }
        result = run_cli("hallulens", *args, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert step_names(result.stderr) == [
        "generate",
        "lm_eval",
        "judge",
        "activations",
        "export-legacy",
    ]
    # the harness starts with malloc's huge pages on (large records), and the printed line
    # holds every setting the step needs to be rerun alone
    tunables = hugepages.with_huge_pages(os.environ.get(hugepages.ENV))
    settings = [setting for setting, _ in printed_steps(result.stderr)]
    assert settings[1]["GLIBC_TUNABLES"] == tunables and "glibc.malloc.hugetlb=" in tunables
    assert settings[1]["HALLULENS_DATA_DIR"] == str(data)

    prompts = [json.loads(x) for x in (data / "precise_wikiqa" / "prompts.jsonl").open()]
    assert len(prompts) == 4
    seed_dir = output / "precise_wikiqa" / "smollm2"
    generation = [json.loads(x) for x in (seed_dir / "generation.jsonl").open()]
    raw = [json.loads(x) for x in (seed_dir / "raw_eval_res.jsonl").open()]
    results = json.loads((seed_dir / "eval_results.json").read_text())
    assert sorted(g["prompt"] for g in generation) == sorted(p["prompt"] for p in prompts)
    assert len(raw) == 4 and results
    with open_store(store) as records:
        assert len(records) == 4
        assert sorted(records[k].response for k in records) == sorted(
            g["generation"] for g in generation
        )
        assert len(records.labels()) == 4


def test_nothing_to_do_and_missing_sets_are_one_line_errors(tmp_path):
    none = run_cli("hallulens", "pipeline", "precise_wikiqa")
    assert none.returncode == 1 and "nothing to do" in none.stderr.strip().splitlines()[-1]
    missing = run_cli(
        "hallulens", "pipeline", "precise_wikiqa", "--do_inference", "--data_dir", str(tmp_path)
    )
    last = missing.stderr.strip().splitlines()[-1]
    assert missing.returncode == 1 and "no prompt set" in last and "--do_generate_prompt" in last
    no_db = tmp_path / "enwiki-20230401.db"
    longwiki = run_cli("hallulens", "pipeline", "longwiki", "--do_eval", "--db_path", str(no_db))
    last = longwiki.stderr.strip().splitlines()[-1]
    assert longwiki.returncode == 1 and f"--db_path {no_db}: no such file" in last
