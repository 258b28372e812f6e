"""A careless or hostile user against the judge, the data files and the commands: every case
gets one clear line (or the right behaviour), never a traceback, a hang or a silent wrong number.
Real HTTP servers, real signals, real stores; the store's own defects are in test_store*.py."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, run_cli
from judge_server import JudgeServer
from test_judge import qa_doc, scripted, write_samples

from hallulens_capture.errors import CaptureConfigError, ModelFilesError
from hallulens_capture.keys import record_key
from hallulens_capture.session import CapturedSample, CaptureSession, SampleRequest
from hallulens_capture.spec import CaptureSpec
from hallulens_capture.store import open_store
from hallulens_tasks.judging.judge import Judge, JudgeItem
from hallulens_tasks.judging.offline import judge_run
from hallulens_tasks.judging.settings import JudgeSettings
from hallulens_tasks.judging.verdicts import parse_label
from hallulens_tasks.llm.server import MAX_REPLY_BYTES
from hallulens_tasks.llm.spec import LLMError, LLMSpec
from hallulens_tasks.prompt_sets import PromptSetError, dataset, read_prompt_set
from hallulens_tasks.runs.legacy import export_legacy
from hallulens_tasks.runs.samples import SamplesError, read_samples

STAMP = "2026-01-02T03-04-05.000006"


def judge_env(server: JudgeServer, cache: Path, **extra: str) -> dict[str, str]:
    return {
        "HALLULENS_JUDGE": "openai:scripted-judge",
        "HALLULENS_JUDGE_BASE_URL": server.base_url,
        "HALLULENS_JUDGE_CACHE": str(cache),
        "HALLULENS_JUDGE_PARSE_RETRIES": "0",
        **extra,
    }


def correctness_items(n: int) -> list[JudgeItem]:
    return [
        JudgeItem(
            "judge_correctness.jinja",
            {"prompt": f"Q{i}", "generation": f"[RIGHT] {i}", "answer": "a"},
            parse_label,
            ("CORRECT", "INCORRECT", "UNVERIFIABLE"),
        )
        for i in range(n)
    ]


def settings(url: str, cache: Path | None, **kw) -> JudgeSettings:
    return JudgeSettings(LLMSpec("openai", "m"), base_url=url, cache_path=cache, **kw)


# --- 1. Ctrl-C -------------------------------------------------------------------------------


def test_ctrl_c_stops_a_judge_pass_at_once_and_keeps_what_arrived(tmp_path):
    docs = [qa_doc(i, 0) for i in range(20)]
    samples = write_samples(tmp_path / "run", "precise_wikiqa", docs, ["[RIGHT] yes"] * 20)
    cache = tmp_path / "cache.sqlite"
    with JudgeServer(scripted, delay_s=1.0) as server:
        env = {**os.environ, **judge_env(server, cache, HALLULENS_JUDGE_CONCURRENCY="4")}
        # a child inherits an ignored SIGINT (as under `cmd &` in a script) and Python then
        # never raises KeyboardInterrupt: give it the default, as a terminal's Ctrl-C finds it
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            process = subprocess.Popen(
                [str(BIN / "hallulens"), "judge", str(samples)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        finally:
            signal.signal(signal.SIGINT, previous)
        deadline = time.monotonic() + 60
        while server.good < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        sent = server.requests
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=15)  # a pass of 40 x 1 s at 4 would take 10 s
        after = server.requests
    assert process.returncode == 130
    lines = [line for line in err.splitlines() if line.startswith("hallulens")]
    assert "Traceback" not in err and len(lines) == 1
    assert "interrupted" in lines[0] and "run the same command again to resume" in lines[0]
    assert after <= sent + 4  # nothing queued was sent after Ctrl-C (at most the 4 in flight)
    with sqlite3.connect(cache) as db:
        cached = db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    assert 4 <= cached < 40
    with JudgeServer(scripted, port=server.port) as again:  # resume: only what is missing
        result = run_cli("hallulens", "judge", str(samples), env=judge_env(again, cache))
        assert result.returncode == 0, result.stderr[-2000:]
        assert again.requests == 40 - cached


# --- 2. line separators inside JSON strings ------------------------------------------------


def test_line_separators_inside_strings_do_not_split_rows(tmp_path, monkeypatch):
    odd = "two\u2028lines\u2029and\u0085more"
    rows = [{**qa_doc(i, 0), "prompt": f"Question {i} {odd}?"} for i in range(3)]
    path = tmp_path / "precise_wikiqa" / "prompts.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert [r["prompt"] for r in read_prompt_set("precise_wikiqa", path)] == [
        r["prompt"] for r in rows
    ]
    samples = tmp_path / "run" / f"samples_precise_wikiqa_{STAMP}.jsonl"
    samples.parent.mkdir()
    lines = [
        {"doc_id": i, "doc": r, "resps": [[f"[RIGHT] {odd}"]], "filtered_resps": ["x"]}
        for i, r in enumerate(rows)
    ]
    samples.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    assert len(read_samples(samples).rows) == 3
    with JudgeServer(scripted) as server:
        for name, value in judge_env(server, tmp_path / "c.sqlite").items():
            monkeypatch.setenv(name, value)
        run = judge_run([samples], tmp_path / "judged")
    assert run.results["results"]["precise_wikiqa"]["correct_rate,judge"] == 1.0
    [written] = export_legacy([tmp_path / "judged" / samples.name], tmp_path / "out", "m")
    generation = (written / "generation.jsonl").read_text().split("\n")
    assert len([x for x in generation if x]) == 3 and odd in generation[0]


# --- 3. a mixed run's harness task is skipped by `label` -----------------------------------


def stored_run(tmp_path: Path, task: str, prompts: list[str]) -> Path:
    """A store written by the real writer with one record per prompt of `task`."""
    path = tmp_path / "acts.lmdb"
    spec = CaptureSpec.from_model_args(str(path), capture_tokens="prompt", capture_topk=0)
    session = CaptureSession(spec, [0, 1], "m", backend="test")
    for doc_id, prompt in enumerate(prompts):
        acts = np.full((2, 3, 8), doc_id, dtype=np.float16)
        sample = CapturedSample([1, 2, 3], [4], np.arange(3, dtype=np.int32), acts)
        session.write(record_key(prompt), SampleRequest(prompt, {}, task, doc_id), "r", sample)
    session.close()
    return path


def test_label_skips_the_samples_of_harness_tasks_run_beside_ours(tmp_path, monkeypatch):
    docs = [qa_doc(i, 0) for i in range(3)]
    run = tmp_path / "run"
    samples = write_samples(run, "precise_wikiqa", docs, ["[RIGHT] a"] * 3)
    gsm = run / f"samples_gsm8k_{STAMP}.jsonl"
    gsm.write_text(json.dumps({"doc_id": 0, "doc": {"question": "1+1"}, "resps": [["2"]]}) + "\n")
    store = stored_run(tmp_path, "precise_wikiqa", [d["prompt"] for d in docs])
    with JudgeServer(scripted) as server:
        for name, value in judge_env(server, tmp_path / "c.sqlite").items():
            monkeypatch.setenv(name, value)
        judge_run([samples, gsm], run / "judged")
    judged = run / "judged"
    assert not (judged / gsm.name).exists()
    result = run_cli("hallulens", "activations", "label", "--samples", str(judged), str(gsm),
                     "--store", str(store))  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["labelled"] == 3 and summary["correct"] == 3
    assert summary["skipped_tasks"] == ["gsm8k"] and "gsm8k" in result.stderr
    with open_store(store) as records:
        assert {v["label"] for v in records.labels().values()} == {"correct"}


# --- 5. contradictory pipeline flags -------------------------------------------------------


def test_pipeline_refuses_model_args_that_contradict_its_flags(tmp_path):
    for model_args, flag in (
        ("activations=elsewhere.lmdb", "--lmdb_path"),
        ("pretrained=x", "--model"),
    ):
        result = run_cli(
            "hallulens", "pipeline", "precise_wikiqa", "--do_inference", "--do_eval",
            "--model_args", model_args, "--lmdb_path", str(tmp_path / "acts.lmdb"),
        )  # fmt: skip
        assert result.returncode == 1
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("hallulens: error: --model_args") and flag in line
    assert not (tmp_path / "acts.lmdb").exists()


# --- 6. misspelled capture options fail before any model loads ----------------------------


@pytest.mark.parametrize(
    ("backend", "misspelled", "meant"),
    [
        ("gguf", {"capture_layer": 5, "capture_dtyp": "float32"}, "capture_layers"),
        ("hf", {"capture_dtyp": "float32"}, "capture_dtype"),
        ("hf", {"activation": "x.lmdb"}, "activations"),
        ("gguf", {"capture_everything": "yes"}, None),
    ],
)
def test_misspelled_capture_options_fail_before_the_model_loads(
    tmp_path, backend, misspelled, meant
):
    if backend == "gguf":
        from hallulens_models.gguf_lm import HalluLensGGUFLM as Model
    else:
        from hallulens_models.hf_lm import HalluLensHFLM as Model
    store = tmp_path / "acts.lmdb"
    with pytest.raises(CaptureConfigError, match="unknown capture option") as error:
        Model(pretrained="/nowhere/at/all", activations=str(store), **misspelled)
    assert (f"did you mean {meant}?" in str(error.value)) == (meant is not None)
    assert not store.exists()


# --- 8. the judge cache knows its server; unreadable cached replies can be asked again -----


def test_cached_replies_of_one_server_are_not_replayed_for_another(tmp_path):
    cache = tmp_path / "cache.sqlite"
    with JudgeServer(lambda prompt: "I cannot say.") as junk:
        first = Judge(settings(junk.base_url, cache, parse_retries=0)).run(correctness_items(6))
    assert all(j.verdict is None for j in first)
    with JudgeServer(scripted) as good:
        second = Judge(settings(good.base_url, cache, parse_retries=0)).run(correctness_items(6))
        assert good.requests == 6  # asked, not replayed from the junk server's replies
    assert all(j.verdict == "correct" for j in second)


def test_unreadable_cached_replies_are_asked_again_when_wanted(tmp_path):
    cache = tmp_path / "cache.sqlite"
    answers = {"text": "I cannot say."}
    with JudgeServer(lambda prompt: answers["text"]) as server:
        Judge(settings(server.base_url, cache, parse_retries=0)).run(correctness_items(5))
        answers["text"] = "CORRECT"
        replay = Judge(settings(server.base_url, cache, parse_retries=0))
        assert all(j.verdict is None for j in replay.run(correctness_items(5)))
        assert server.requests == 5 and replay.stats.cache_hits == 5
        again = Judge(settings(server.base_url, cache, parse_retries=0, reask_unparseable=True))
        assert all(j.verdict == "correct" for j in again.run(correctness_items(5)))
        assert server.requests == 10 and again.stats.refreshed == 5
    kept = Judge(settings(server.base_url, cache, parse_retries=0)).run(correctness_items(5))
    assert all(j.verdict == "correct" for j in kept)  # the new replies replaced the old


# --- 9. judge replies have a size limit -----------------------------------------------------


def test_huge_judge_replies_are_not_kept_and_count_as_unparseable(tmp_path):
    huge = "CORRECT " * ((30 << 20) // 8)  # 30 MB
    cache = tmp_path / "cache.sqlite"
    with JudgeServer(lambda p: huge if "Q1" in p or "Q3" in p else "CORRECT") as server:
        judged = Judge(settings(server.base_url, cache, parse_retries=1)).run(correctness_items(5))
        assert server.requests == 5 + 2  # each huge reply asked once more, then given up
    verdicts = [j.verdict for j in judged]
    assert verdicts == ["correct", None, "correct", None, "correct"]
    assert all(len(judged[i].raw) < 200 and "not kept" in judged[i].raw for i in (1, 3))
    assert cache.stat().st_size < 4 * MAX_REPLY_BYTES


# --- 11, 12. prompt-set field types and empty subtasks --------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"answer": None}, '"answer" must be a string, not null'),
        ({"answer": 42}, '"answer" must be a string, not 42'),
        ({"h_score_cat": True}, '"h_score_cat" must be an integer, not true'),
        ({"title": ["a"]}, '"title" must be a string'),
    ],
)
def test_prompt_set_field_types_are_checked(tmp_path, change, message):
    path = tmp_path / "prompts.jsonl"
    rows = [qa_doc(0, 0), {**qa_doc(1, 0), **change}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PromptSetError, match=f"^{path}:2: " + message.replace("[", r"\[")):
        read_prompt_set("precise_wikiqa", path)


def test_mixed_types_in_an_extra_field_and_empty_subtasks_are_one_line(tmp_path):
    root = tmp_path / "data"
    (root / "precise_wikiqa").mkdir(parents=True)
    rows = [{**qa_doc(0, 0), "extra": 1}, {**qa_doc(1, 0), "extra": "one"}]
    (root / "precise_wikiqa" / "prompts.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    with pytest.raises(PromptSetError, match="a field holds values of different types"):
        dataset("precise_wikiqa", hallulens_data_dir=str(root))
    (root / "nonsense_mixed_entities").mkdir()
    medicine = {"prompt": "What is quenoxil?", "name": "quenoxil", "type": "medicine"}
    (root / "nonsense_mixed_entities" / "prompts.jsonl").write_text(json.dumps(medicine) + "\n")
    with pytest.raises(PromptSetError) as error:
        dataset("nonsense_mixed_entities", {"type": "animal"}, hallulens_data_dir=str(root))
    assert "no rows with type=animal" in str(error.value)
    assert "--tasks nonsense_mixed_entities_medicine" in str(error.value)


# --- 13. malformed judge settings -----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HALLULENS_JUDGE_BASE_URL": "http://127.0.0.1:99999/v1"}, "Port out of range"),
        ({"HALLULENS_JUDGE_BASE_URL": "http://127.0.0.1:abc/v1"}, "is not a valid URL"),
        ({"HALLULENS_JUDGE_BASE_URL": "http://[::1/v1"}, "is not a valid URL"),
        ({"HALLULENS_JUDGE_BASE_URL": "ftp://host/v1"}, "is not an http(s) URL"),
        ({"OPENAI_BASE_URL": "http://[::1"}, "$OPENAI_BASE_URL"),
        ({"HALLULENS_JUDGE_CONCURRENCY": "inf"}, "CONCURRENCY='inf' must be a finite number"),
        ({"HALLULENS_JUDGE_RETRIES": "nan"}, "RETRIES='nan' must be a finite number"),
        ({"HALLULENS_JUDGE_TIMEOUT": "inf"}, "TIMEOUT='inf' must be a finite number"),
        ({"HALLULENS_JUDGE_TIMEOUT": "nan"}, "TIMEOUT='nan' must be a finite number"),
        ({"HALLULENS_JUDGE_MAX_TOKENS": "inf"}, "MAX_TOKENS='inf' must be a finite number"),
        ({"HALLULENS_JUDGE_MAX_TOKENS": "2.5"}, "MAX_TOKENS='2.5' is not an integer"),
        ({"HALLULENS_JUDGE_REASK_UNPARSEABLE": "maybe"}, "use 1 or 0"),
    ],
)
def test_malformed_judge_settings_are_one_line(monkeypatch, env, message):
    monkeypatch.setenv("HALLULENS_JUDGE", "openai:m")
    monkeypatch.delenv("HALLULENS_JUDGE_BASE_URL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LLMError) as error:
        JudgeSettings.from_env("x")
    assert message in str(error.value) and "\n" not in str(error.value)


# --- 14. smaller tracebacks ----------------------------------------------------------------


def test_samples_without_prompt_or_generation_name_file_and_line(tmp_path):
    doc = qa_doc(0, 0)
    path = write_samples(tmp_path, "precise_wikiqa", [doc, doc], ["a", "b"])
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    del row["doc"]["prompt"]
    path.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(SamplesError, match=f"^{path}:2: doc: missing field\\(s\\) prompt"):
        read_samples(path)
    row = json.loads(lines[1])
    del row["resps"]
    path.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(SamplesError, match=f'^{path}:2: no generation in "resps"'):
        read_samples(path)
    result = run_cli("hallulens", "judge", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f'hallulens: error: {path}:2: no generation in "resps"'


def test_hf_model_directory_without_weights_is_one_line(tmp_path, smollm2_dir):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text((smollm2_dir / "config.json").read_text())
    from hallulens_models.hf_lm import HalluLensHFLM

    with pytest.raises(ModelFilesError, match="no weight files in"):
        HalluLensHFLM(pretrained=str(tmp_path / "model"))


@pytest.mark.slow
def test_misspelled_option_and_empty_subtask_through_lm_eval(tmp_path):
    store = tmp_path / "acts.lmdb"
    result = run_cli(
        "lm_eval", "--model", "hallulens-gguf",
        "--model_args", f"pretrained=smollm2,activations={store},capture_layer=5",
        "--tasks", "hallulens_demo",
    )  # fmt: skip
    assert result.returncode != 0 and not store.exists()
    assert result.stderr.strip().splitlines()[-1] == (
        "lm-eval-hallulens: error: unknown capture option capture_layer=5; did you mean "
        "capture_layers? (capture options: activations, capture_layers, capture_tokens, "
        "capture_dtype, map_size_gb, capture_shard, capture_topk)"
    )
    (tmp_path / "data" / "nonsense_mixed_entities").mkdir(parents=True)
    medicine = {"prompt": "What is quenoxil?", "name": "quenoxil", "type": "medicine"}
    (tmp_path / "data" / "nonsense_mixed_entities" / "prompts.jsonl").write_text(
        json.dumps(medicine) + "\n"
    )
    result = run_cli(
        "lm_eval", "--model", "dummy", "--tasks", "nonsense_mixed_entities",
        env={"HALLULENS_DATA_DIR": str(tmp_path / "data")},
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lm-eval-hallulens: error: the nonsense_mixed_entities prompt set")
    assert "--tasks nonsense_mixed_entities_medicine" in last
