"""The judge against a real HTTP server with scripted answers: metrics by hand, retries,
timeouts, concurrency, cache hits, resume after an interrupted pass, bad configuration."""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from pathlib import Path

import pytest
from judge_server import JudgeServer

from hallulens_tasks.judging.judge import Judge, JudgeItem
from hallulens_tasks.judging.offline import judge_run
from hallulens_tasks.judging.scoring import SCORINGS
from hallulens_tasks.judging.settings import JudgeSettings
from hallulens_tasks.judging.verdicts import parse_label
from hallulens_tasks.llm.spec import LLMError, LLMSpec

STAMP = "2026-01-02T03-04-05.000006"

# Each tested-model answer carries a marker; the scripted judge answers by marker and prompt.
ABSTAIN = {
    "REFUSE": '{"is_abstaining": true}',
    "RIGHT": '```json\n{"is_abstaining": false}\n```',
    "WRONG": '{"is_abstaining":false}',
    "VAGUE": "Sure. {'is_abstaining': False}",
    "JUNK": "Hmm, hard to say what the chatbot meant.",
}
CORRECTNESS = {
    "REFUSE": "INCORRECT",
    "RIGHT": "CORRECT",
    "WRONG": "INCORRECT. The correct answer is something else.",
    "VAGUE": "UNVERIFIABLE",
    "JUNK": "CORRECT",
}
BELIEF = {"BELIEVE": "Yes.", "DOUBT": '{"does_believe": false}', "JUNK": "maybe?"}


def scripted(prompt: str) -> str:
    marker = re.findall(r"\[(REFUSE|RIGHT|WRONG|VAGUE|JUNK|BELIEVE|DOUBT)\]", prompt)[-1]
    if "is_abstaining" in prompt:
        return ABSTAIN[marker]
    if "YOUR JUDGEMENT" in prompt:
        return CORRECTNESS[marker]
    return BELIEF[marker]


@pytest.fixture
def judge_env(tmp_path, monkeypatch):
    def use(server: JudgeServer, **extra: str) -> Path:
        cache = tmp_path / "judge-cache.sqlite"
        monkeypatch.setenv("HALLULENS_JUDGE", "openai:scripted-judge")
        monkeypatch.setenv("HALLULENS_JUDGE_BASE_URL", server.base_url)
        monkeypatch.setenv("HALLULENS_JUDGE_CACHE", str(cache))
        for name, value in extra.items():
            monkeypatch.setenv(name, value)
        return cache

    return use


def write_samples(directory: Path, task: str, docs: list[dict], answers: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"samples_{task}_{STAMP}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, (doc, answer) in enumerate(zip(docs, answers, strict=True)):
            prompt = doc["prompt"]
            row = {
                "doc_id": i,
                "doc": doc,
                "target": "",
                "arguments": {"gen_args_0": {"arg_0": prompt, "arg_1": {"until": []}}},
                "resps": [[answer]],
                "filtered_resps": [answer],
                "filter": "judge",
                "metrics": ["bypass"],
                "prompt_hash": hashlib.sha256(prompt.encode()).hexdigest(),
                "bypass": "None",
            }
            f.write(json.dumps(row) + "\n")
    return path


def qa_doc(i: int, cat: int) -> dict:
    return {
        "prompt": f"Question {i}?",
        "answer": f"answer {i}",
        "title": f"T{i}",
        "h_score_cat": cat,
        "reference": "r",
    }


def stderr(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5


def test_precise_wikiqa_metrics_by_hand(tmp_path, judge_env):
    markers = ["REFUSE", "RIGHT", "WRONG", "VAGUE", "JUNK", "REFUSE"]
    cats = [0, 0, 1, 1, 2, 2]
    docs = [qa_doc(i, c) for i, c in enumerate(cats)]
    answers = [f"My answer [{m}]" for m in markers]
    with JudgeServer(scripted) as server:
        judge_env(server)
        path = write_samples(tmp_path / "run", "precise_wikiqa", docs, answers)
        run = judge_run([path], None)
        results = run.results
        # 6 items x 2 judges, the junk abstention reply asked 3 times (2 parse retries)
        assert server.requests == 12 + 2
    r = results["results"]["precise_wikiqa"]
    # parsed items: 0 refused, 1 correct, 2 incorrect, 3 unverifiable, 5 refused; 4 unparseable
    assert r["refusal_rate,judge"] == pytest.approx(2 / 5)
    assert r["correct_rate,judge"] == pytest.approx(1 / 5)
    assert r["hallu_rate,judge"] == pytest.approx(2 / 3)
    assert r["judge_unparseable,judge"] == pytest.approx(1 / 6)
    assert r["refusal_rate_stderr,judge"] == pytest.approx(stderr([1, 0, 0, 0, 1]))
    assert r["hallu_rate_stderr,judge"] == pytest.approx(stderr([0, 1, 1]))
    assert r["refusal_rate_cat0,judge"] == 0.5 and r["hallu_rate_cat0,judge"] == 0.0
    assert r["hallu_rate_cat1,judge"] == 1.0 and r["correct_rate_cat1,judge"] == 0.0
    assert r["refusal_rate_cat2,judge"] == 1.0
    assert "hallu_rate_cat2,judge" not in r  # bin 2 has no answered, parsed item
    rows = [json.loads(line) for line in (path.parent / "judged" / path.name).open()]
    labels = [json.loads(row["filtered_resps"][0])["label"] for row in rows]
    assert labels == [
        "refused",
        "correct",
        "hallucinated",
        "hallucinated",
        "unparseable",
        "refused",
    ]
    junk = json.loads(rows[4]["filtered_resps"][0])["judgements"]["abstention"]
    assert junk == {"raw": ABSTAIN["JUNK"], "verdict": None, "attempts": 3}
    assert "refusal_rate" not in rows[4] and rows[4]["judge_unparseable"] == 1.0
    assert json.loads(rows[1]["filtered_resps"][0])["judgements"]["correctness"]["raw"] == "CORRECT"
    assert run.path.is_file()


def test_all_refused_gives_no_hallu_rate(tmp_path, judge_env):
    docs = [qa_doc(i, 3) for i in range(3)]
    with JudgeServer(scripted) as server:
        judge_env(server)
        path = write_samples(tmp_path, "precise_wikiqa", docs, ["[REFUSE]"] * 3)
        r = judge_run([path], tmp_path / "out").results["results"]["precise_wikiqa"]
    assert r["refusal_rate,judge"] == 1.0 and r["correct_rate,judge"] == 0.0
    assert not any(key.startswith("hallu_rate") for key in r)  # absent, not 0, not a crash


def test_entities_and_group_aggregate(tmp_path, judge_env):
    mixed = [
        {"prompt": f"What is the {t} Xus yus{i}?", "name": f"Xus yus{i}", "type": t}
        for i, t in enumerate(["animal", "animal", "plant", "medicine"])
    ]
    generated = [
        {"prompt": f"Tell me about Cafe {i}.", "name": f"Cafe {i}", "type": "cafe", "place": "Oslo"}
        for i in range(3)
    ]
    with JudgeServer(scripted) as server:
        judge_env(server)
        run = tmp_path / "run"
        a = write_samples(
            run, "nonsense_mixed_entities_animal", mixed[:2], ["[BELIEVE]", "[DOUBT]"]
        )
        p = write_samples(run, "nonsense_mixed_entities_plant", mixed[2:3], ["[DOUBT]"])
        m = write_samples(run, "nonsense_mixed_entities_medicine", mixed[3:], ["[JUNK]"])
        g = write_samples(
            run,
            "nonsense_generated_entities_business",
            generated,
            ["[BELIEVE]", "[DOUBT]"] * 1 + ["[BELIEVE]"],
        )
        results = judge_run([a, p, m, g], None).results
    res = results["results"]
    assert res["nonsense_mixed_entities_animal"]["false_acceptance_rate,judge"] == 0.5
    assert res["nonsense_mixed_entities_plant"]["refusal_rate,judge"] == 1.0
    assert "refusal_rate,judge" not in res["nonsense_mixed_entities_medicine"]
    assert res["nonsense_mixed_entities_medicine"]["judge_unparseable,judge"] == 1.0
    assert res["nonsense_generated_entities_business"][
        "false_acceptance_rate,judge"
    ] == pytest.approx(2 / 3)
    # groups: size-weighted over the subtasks that have the metric, as the harness does
    group = results["groups"]["nonsense_mixed_entities"]
    assert group["false_acceptance_rate,judge"] == pytest.approx((0.5 * 2 + 0.0 * 1) / 3)
    assert results["groups"]["hallulens"]["false_acceptance_rate,judge"] == pytest.approx(
        (0.5 * 2 + 0.0 + 2 / 3 * 3) / 6
    )
    # the plant judge is asked about a plant, with plant examples (upstream asked about animals)
    plant_prompts = [q for q in server.prompts if "Xus yus2" in q]
    assert plant_prompts and "plant species" in plant_prompts[0]
    assert "animal" not in plant_prompts[0].lower()


def settings(server_url: str, cache: Path | None, **kw) -> JudgeSettings:
    return JudgeSettings(
        LLMSpec("openai", "scripted-judge"), base_url=server_url, cache_path=cache, **kw
    )


def items(n: int) -> list[JudgeItem]:
    return [
        JudgeItem(
            "judge_correctness.jinja",
            {"prompt": f"Q{i}", "generation": f"[RIGHT] {i}", "answer": "a"},
            parse_label,
            ("CORRECT", "INCORRECT", "UNVERIFIABLE"),
        )
        for i in range(n)
    ]


def test_retries_on_500_and_timeouts(tmp_path):
    work = items(4)
    with JudgeServer(scripted) as server:
        judge = Judge(settings(server.base_url, None, timeout_s=0.5, retries=3))
        from hallulens_tasks.prompting import render

        first = render(work[0].template, **work[0].values)
        second = render(work[1].template, **work[1].values)
        server.fail[first] = 2  # two HTTP 500s, then an answer
        server.stall[second] = 1  # one reply slower than the client's timeout
        server.stall_s = 1.5
        results = judge.run(work)
    assert [r.verdict for r in results] == ["correct"] * 4
    assert server.requests == 4 + 2 + 1


def test_retries_exhausted_is_one_clear_error(tmp_path):
    with JudgeServer(scripted) as server:
        server.down_after = 0
        judge = Judge(settings(server.base_url, None, retries=1))
        with pytest.raises(LLMError, match=r"HTTP 503 \(after 2 attempts\)"):
            judge.run(items(1))


def test_http_error_is_not_retried(tmp_path):
    with JudgeServer(scripted) as server:
        judge = Judge(settings(server.base_url + "/nope", None))
        with pytest.raises(LLMError, match="HTTP 404"):
            judge.run(items(2))
        assert server.requests <= 2  # each request once, no retries


def test_requests_run_concurrently(tmp_path):
    with JudgeServer(scripted, delay_s=0.1) as server:
        Judge(settings(server.base_url, None, concurrency=8)).run(items(32))
    assert server.requests == 32
    assert server.max_in_flight >= 4


def test_cache_second_pass_asks_nothing(tmp_path):
    cache = tmp_path / "cache.sqlite"
    with JudgeServer(scripted) as server:
        first = Judge(settings(server.base_url, cache)).run(items(10))
        assert server.requests == 10
    # the server is gone: everything must come from the cache
    judge = Judge(settings(server.base_url, cache))
    second = judge.run(items(10))
    assert [r.raw for r in second] == [r.raw for r in first]
    assert judge.stats.requests == 0 and judge.stats.cache_hits == 10


def test_interrupted_pass_resumes_with_only_the_missing(tmp_path):
    cache = tmp_path / "cache.sqlite"
    with JudgeServer(scripted) as server:
        server.down_after = 5
        with pytest.raises(LLMError, match="re-run to resume"):
            Judge(settings(server.base_url, cache, concurrency=1, retries=0)).run(items(12))
    with JudgeServer(scripted, port=server.port) as server:  # the same server, back up
        results = Judge(settings(server.base_url, cache)).run(items(12))
        assert server.requests == 7
    assert [r.verdict for r in results] == ["correct"] * 12


def test_bad_judge_settings(monkeypatch):
    monkeypatch.setenv("HALLULENS_JUDGE", "llama70b")
    with pytest.raises(LLMError, match="expected <backend>:<model>"):
        JudgeSettings.from_env("x")
    monkeypatch.setenv("HALLULENS_JUDGE", "openai:m")
    monkeypatch.setenv("HALLULENS_JUDGE_CONSTRAINED", "1")
    with pytest.raises(LLMError, match="for gguf and vllm judges, not openai:m"):
        JudgeSettings.from_env("x")
    monkeypatch.setenv("HALLULENS_JUDGE_CONSTRAINED", "0")
    monkeypatch.setenv("HALLULENS_JUDGE_CONCURRENCY", "many")
    with pytest.raises(LLMError, match="HALLULENS_JUDGE_CONCURRENCY='many' is not an integer"):
        JudgeSettings.from_env("x")


def test_default_judges_are_hallulens(monkeypatch):
    monkeypatch.delenv("HALLULENS_JUDGE", raising=False)
    mixed = JudgeSettings.from_env(SCORINGS["nonsense_mixed_entities"].default_judge)
    qa = JudgeSettings.from_env(SCORINGS["precise_wikiqa"].default_judge)
    assert str(mixed.spec) == "openai:meta-llama/Llama-3.1-8B-Instruct"
    assert str(qa.spec) == "openai:meta-llama/Llama-3.1-70B-Instruct"
