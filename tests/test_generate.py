"""`hallulens generate`: prompt sets built end to end against a scripted OpenAI-compatible server.

The server (tests/judge_server.py) replies to each generator prompt from the invented article's
kind (tests/generate_fixtures.py), so which items pass the filters, how many land in each
popularity bin and what the file holds are known exactly. Also: determinism (fresh caches,
other PYTHONHASHSEED), a re-run from the cache asking nothing, resume after a kill, the
GeneratedEntities round robin, MixedEntities wiring and one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, run_cli
from generate_fixtures import (
    KINDS,
    N_ARTICLES,
    UNRANKED,
    document,
    scripted_longwiki,
    scripted_precise,
    source_args,
    title,
    write_wiki_sources,
)
from judge_server import JudgeServer

from hallulens_tasks.cli import main
from hallulens_tasks.generation.generated_entities import (
    CITIES,
    COUNTRIES,
    PRODUCT_TYPES,
    parse_names,
    trim,
)
from hallulens_tasks.generation.mixed_entities import generate_mixed_entities
from hallulens_tasks.generation.sections import split_sections, split_sentences
from hallulens_tasks.generation.sources import load_itis, load_medicines
from hallulens_tasks.generation.wiki import LONGWIKI, PRECISE_WIKIQA
from hallulens_tasks.prompt_sets import load_prompt_set
from hallulens_tasks.task_table import DOMAIN_TYPES

FIXTURES = ROOT / "tests" / "fixtures" / "sources"
NUMBER = {title(i): i for i in range(N_ARTICLES)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_rows(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / task / "prompts.jsonl").open(encoding="utf-8")]


def manifest(out: Path, task: str) -> dict:
    return json.loads((out / task / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def wiki_sources(tmp_path_factory) -> dict[str, Path]:
    return write_wiki_sources(tmp_path_factory.mktemp("sources"))


def generate(task: str, server: JudgeServer, out: Path, cache: Path, *args: str) -> int:
    return main(
        [
            "generate",
            task,
            "--base-url",
            server.base_url,
            "--cache",
            str(cache),
            "--out",
            str(out),
            *args,
        ]
    )


def precise_args(sources: dict[str, Path], seed: int = 3) -> list[str]:
    return [
        "--N",
        "20",
        "--seed",
        str(seed),
        "--generator",
        "openai:scripted",
        *source_args(sources),
    ]


# --------------------------------------------------------------------------- pieces


def test_sentences_keep_initials_and_abbreviations():
    text = "It was built by J. R. Smith in Jan. 1900; it grew.\n## Trade\nThe U.S. Army came? Yes!"
    assert split_sentences(text) == [
        "It was built by J. R. Smith in Jan. 1900;",
        "it grew.",
        "## Trade",
        "The U.S. Army came?",
        "Yes!",
    ]


def test_sections_cut_at_headings_pack_and_merge():
    short = "A short article. It has two sentences."
    assert split_sections(short, 200, 500) == [short]
    doc = document(7)
    sections = split_sections(doc, 200, 500)
    # lead (short, kept first), History, Geography with the short References glued on
    assert [s.split("\n")[0][:12] for s in sections] == [
        "LEAD Helmsby",
        "## History",
        "## Geography",
    ]
    assert sections[2].endswith("Invented source two.")
    assert "\n\n" in sections[1]  # the article's own line breaks are kept
    # a heading-less part longer than the maximum is packed sentence by sentence
    long = " ".join(f"Sentence number {i} is here." for i in range(100))
    packed = split_sections(long, 20, 60)
    assert len(packed) > 5 and all(len(re.findall(r"\w+|[^\w\s]", p)) <= 60 for p in packed)
    assert " ".join(packed) == long


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (" Entry 12 ", None),
        ("Unanswerable.", "unanswerable"),  # upstream's case-sensitive check kept it
        ("unanswerable", "unanswerable"),
        ("Unfortunately the text does not say.", "unanswerable"),
        ("one two three four five six seven eight nine ten", None),
        ("one two three four five six seven eight nine ten eleven", "answer over 10 words"),
        ("   ", "empty answer"),
    ],
)
def test_precise_answer_filter(reply, problem):
    assert PRECISE_WIKIQA.answer_problem(reply) == problem


def test_question_and_longwiki_filters():
    assert PRECISE_WIKIQA.question_problem(" \n") == "empty question"
    assert PRECISE_WIKIQA.question_problem("Unfortunately, no.") == "no question"
    assert LONGWIKI.question_problem("[NO QUESTION]") == "no question"
    assert PRECISE_WIKIQA.question_problem("What is it?") is None
    assert LONGWIKI.answer_problem("One. Two. Three.") == "answer under 4 sentences"
    assert LONGWIKI.answer_problem("One. Two. Three. Four.") is None


@pytest.mark.parametrize(
    ("reply", "num", "names"),
    [
        ("Alder Cup, Brass Owl, Copper Jug", 3, ["Alder Cup", "Brass Owl", "Copper Jug"]),
        ("Here are three names: Alder Cup, Brass Owl, Copper Jug.", 3, None),
        ("Sure! Names:\n1. Alder Cup\n2. Brass Owl\n3. Copper Jug\n\nEnjoy!", 3, None),
        ('"Alder Cup", "Brass Owl", "Copper Jug"', 3, None),
        ("- **Alder Cup**\n- Brass Owl\n- Copper Jug\n- Alder Cup", 4, None),
        # a count mismatch keeps the names whole (upstream chopped their first/last letters)
        ("Alder Cup, Brass Owl", 3, ["Alder Cup", "Brass Owl"]),
        ("Alder Cup, this is a very long sentence and not a name at all really", 2, ["Alder Cup"]),
    ],
)
def test_parse_names(reply, num, names):
    assert parse_names(reply, num) == (names or ["Alder Cup", "Brass Owl", "Copper Jug"])


def test_trim_evens_out_and_always_ends():
    cells = {("a", ""): ["1", "2", "3", "4"], ("b", ""): ["5", "6"], ("c", ""): ["7"]}
    trim(cells, 4)  # the longest list loses its last name; on a tie the first list does
    assert cells == {("a", ""): ["1"], ("b", ""): ["5", "6"], ("c", ""): ["7"]}
    trim(cells, 0)  # upstream looped forever once every list was down to one name
    assert cells == {("a", ""): [], ("b", ""): [], ("c", ""): []}


# --------------------------------------------------------------------------- PreciseWikiQA


def test_precise_wikiqa_filters_bins_rows_and_cache(tmp_path, wiki_sources):
    out, cache = tmp_path / "out", tmp_path / "cache.sqlite"
    with JudgeServer(scripted_precise) as server:
        assert generate("precise_wikiqa", server, out, cache, *precise_args(wiki_sources)) == 0
        bodies = list(server.bodies)
        # a second run with the same cache asks nothing and writes the same bytes
        first = sha256(out / "precise_wikiqa" / "prompts.jsonl")
        assert generate("precise_wikiqa", server, out, cache, *precise_args(wiki_sources)) == 0
        assert server.requests == len(bodies)
    assert sha256(out / "precise_wikiqa" / "prompts.jsonl") == first

    rows = read_rows(out, "precise_wikiqa")
    # bin 0 has one good article (shortfall 1), bin 1 exactly two, the others four
    per_bin = {b: sum(r["h_score_cat"] == b for r in rows) for b in range(10)}
    assert per_bin == {0: 1, **{b: 2 for b in range(1, 10)}}
    assert len({r["title"] for r in rows}) == len(rows) == 19
    assert rows == sorted(rows, key=lambda r: r["h_score_cat"])
    for row in rows:
        i = NUMBER[row["title"]]
        assert KINDS[row["title"]] == "good"
        assert row["h_score_cat"] == i // 6 and row["h_score"] == float(i)
        assert row["prompt"] == f"What is recorded about {row['title']}?"
        assert row["answer"] == f"Entry {i:02d}"
        assert row["reference"] in document(i)
        # one of the sections before the last (the one holding the references)
        assert row["reference"].startswith(("LEAD", "## History"))
        assert (row["pageid"], row["revid"]) == (1000 + i, 5000 + i)
    assert next(r for r in rows if r["h_score_cat"] == 0)["title"] == title(0)
    assert {r["title"] for r in rows if r["h_score_cat"] == 1} == {title(6), title(7)}
    assert list(rows[0])[:5] == ["prompt", "answer", "title", "h_score_cat", "reference"]

    m = manifest(out, "precise_wikiqa")
    assert m["prompts_sha256"] == first and m["rows"] == 19 and m["N"] == 20 and m["seed"] == 3
    assert m["generator"] == "openai:scripted"
    assert m["generation"]["shortfall"] == 1
    assert m["generation"]["per_bin"]["0"] == {
        "quota": 2,
        "accepted": 1,
        "shortfall": 1,
        "articles_in_bin": 6,
        "articles_tried": 6,
        "max_articles": 6,  # all of them: fewer than 3 x 2 + 100
    }
    assert m["bins"]["counts"] == [6] * 10 and m["bins"]["missing"] == [UNRANKED]
    assert {s["source"]: s["sha256"] for s in m["sources"]}["goodwiki"] == sha256(
        wiki_sources["goodwiki"]
    )
    assert set(m["templates"]) == {
        "generate_precise_question.jinja",
        "generate_precise_answer.jinja",
    }
    assert load_prompt_set("precise_wikiqa", out) == rows  # what the task reads

    questions = [b for b in bodies if b["messages"][0]["content"].startswith("You are writing")]
    answers = [b for b in bodies if b not in questions]
    assert {b["temperature"] for b in questions} == {0.7}
    assert all(
        (b["top_p"], b["seed"], b["max_tokens"], b["model"]) == (0.9, 3, 512, "scripted")
        for b in questions
    )
    assert all(b["temperature"] == 0.0 and "seed" not in b for b in answers)
    asked = [re.search(r'about "(.+?)"', b["messages"][0]["content"]).group(1) for b in questions]
    assert UNRANKED not in asked and len(asked) == len(set(asked))
    assert {title(i) for i in range(6)} <= set(asked)  # bin 0 tried every article
    # blank and "Unfortunately" questions are not sent on to the answer step
    assert len(answers) == sum(KINDS[t] not in ("blank", "sorry") for t in asked)


def test_same_inputs_same_bytes_other_seed_other_set(tmp_path, wiki_sources):
    digests = {}
    with JudgeServer(scripted_precise) as server:
        for name, seed in (("a", 3), ("b", 3), ("c", 4)):
            out = tmp_path / name
            args = precise_args(wiki_sources, seed)
            assert generate("precise_wikiqa", server, out, tmp_path / f"{name}.sqlite", *args) == 0
            digests[name] = sha256(out / "precise_wikiqa" / "prompts.jsonl")
    assert digests["a"] == digests["b"] != digests["c"]


def test_longwiki_bins_exclusions_and_long_answers(tmp_path, wiki_sources):
    out = tmp_path / "out"
    exclude = tmp_path / "not_exist.txt"
    exclude.write_text(f"{title(30)}\n{title(31)}\n")  # two good articles of bin 5
    args = ["--N", "10", "--generator", "openai:scripted", "--exclude-titles", str(exclude)]
    with JudgeServer(scripted_longwiki) as server:
        code = generate(
            "longwiki", server, out, tmp_path / "c.sqlite", *args, *source_args(wiki_sources)
        )
        assert code == 0
    rows = read_rows(out, "longwiki")
    assert sorted(r["h_score_cat"] for r in rows) == [5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    titles = {r["title"] for r in rows}
    assert KINDS.keys() >= titles and {KINDS[t] for t in titles} == {"good"}
    assert title(30) not in titles and title(31) not in titles
    assert {r["title"] for r in rows if r["h_score_cat"] == 5} == {title(32), title(35)}
    assert all(len(split_sentences(r["answer"])) >= 4 for r in rows)
    assert not any("[NO QUESTION]" in r["prompt"] for r in rows)
    assert load_prompt_set("longwiki", out) == rows
    m = manifest(out, "longwiki")
    assert m["generation"]["bins_used"] == [5, 6, 7, 8, 9]
    assert m["generation"]["excluded_titles"] == 2
    assert {"source": "exclude_titles", "sha256": sha256(exclude)}.items() <= next(
        s for s in m["sources"] if s["source"] == "exclude_titles"
    ).items()
    assert m["generation"]["rejected"]["answer under 4 sentences"] >= 1


# --------------------------------------------------------------------------- resume after a kill


def test_resume_after_kill_gives_the_same_bytes(tmp_path, wiki_sources):
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    cache = tmp_path / "resumed.sqlite"
    with JudgeServer(scripted_precise) as server:
        args = precise_args(wiki_sources)
        assert generate("precise_wikiqa", server, clean, tmp_path / "clean.sqlite", *args) == 0
        total = server.requests
    command = [
        str(BIN / "hallulens"),
        "generate",
        "precise_wikiqa",
        *args,
        "--out",
        str(resumed),
        "--cache",
        str(cache),
        "--concurrency",
        "1",
    ]
    env = {**os.environ, "PYTHONHASHSEED": "1"}
    with JudgeServer(scripted_precise, delay_s=0.05) as server:
        port = server.port
        process = subprocess.Popen(
            [*command, "--base-url", server.base_url],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while server.good < 20 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert not (resumed / "precise_wikiqa" / "prompts.jsonl").exists()
    with sqlite3.connect(cache) as db:
        cached = db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    assert 15 <= cached < total  # about 20 replies arrived; the one in flight may be lost
    with JudgeServer(scripted_precise, port=port) as server:  # the same server, back up
        env["PYTHONHASHSEED"] = "2"
        result = subprocess.run(
            [*command, "--base-url", server.base_url], env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert server.requests == total - cached  # only what was missing
    assert sha256(resumed / "precise_wikiqa" / "prompts.jsonl") == sha256(
        clean / "precise_wikiqa" / "prompts.jsonl"
    )
    titles = [r["title"] for r in read_rows(resumed, "precise_wikiqa")]
    assert len(titles) == len(set(titles)) == 19


# --------------------------------------------------------------------------- GeneratedEntities


def scripted_names(prompt: str, body: dict) -> str:
    """Brainstormers list names made of their model name and the cell; mixers recombine."""
    model = body["model"]
    num = int(re.search(r"Reply with the (\d+) names", prompt).group(1))
    if prompt.startswith("Here are some"):
        given = re.search(r": (.+)\.\nCreate", prompt).group(1).split(", ")
        names = [f"{model} mix {given[k % len(given)]} {k}" for k in range(num)]
        return "\n".join(f"{k + 1}. {name}" for k, name in enumerate(names))  # a numbered list
    cell = re.search(r"new (?:brand of )?(.+?)(?: in (.+?))? and need", prompt)
    cell = cell or re.search(r"plot turns on an? (.+?) that never happened", prompt)
    place = re.search(r"set in (.+?), and its plot", prompt)
    what = " ".join(filter(None, [*cell.groups(), place.group(1) if place else None]))
    return "Here are the names: " + ", ".join(f"{model} {what} {k}" for k in range(num))


def exists_if_ends_in_1(candidates: list[dict]) -> list[bool]:
    """An existence check for the test: names ending in " 1" "exist"."""
    return [c["name"].endswith(" 1") for c in candidates]


def test_generated_entities_round_robin(tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["--N", "6", "--domain-n", "product=4", "--seed", "5"]
    for model in ("g1", "g2", "g3"):
        args += ["--generator", f"openai:{model}"]
    with JudgeServer(scripted_names, pass_body=True) as server:
        code = generate("nonsense_generated_entities", server, out, tmp_path / "c.sqlite", *args)
        assert code == 0
        bodies = list(server.bodies)
        port = server.port
    rows = read_rows(out, "nonsense_generated_entities")
    assert load_prompt_set("nonsense_generated_entities", out) == rows
    counts: dict[tuple, int] = {}
    for row in rows:
        counts[row["sequence"], row["domain"]] = counts.get((row["sequence"], row["domain"]), 0) + 1
        assert row["name"] in row["prompt"] and row["type"] in row["prompt"]
        assert row["generator"] == f"openai:g{row['sequence'] + 1}"
        assert row["name"].startswith(f"g{row['sequence'] + 1} mix ")  # the mixer's names
        if row["domain"] == "product":
            assert row["place"] == "" and row["type"] in PRODUCT_TYPES
        else:
            assert row["type"] in DOMAIN_TYPES[row["domain"]]
            levels = CITIES if row["domain"] == "business" else COUNTRIES
            assert any(row["place"] in level for level in levels.values())
            assert f" in {row['place']}" in row["prompt"]
    assert counts == {
        (s, d): n for s in range(3) for d, n in (("business", 6), ("event", 6), ("product", 4))
    }
    brainstorm = [b for b in bodies if not b["messages"][0]["content"].startswith("Here are some")]
    mixes = [b for b in bodies if b not in brainstorm]
    # each generator brainstorms each prompt once, shared by the sequences
    per_model = {
        m: [b["messages"][0]["content"] for b in brainstorm if b["model"] == m]
        for m in ("g1", "g2", "g3")
    }
    assert len(set(map(len, per_model.values()))) == 1
    assert all(len(set(p)) == len(p) for p in per_model.values())
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 1000 for b in bodies)
    # sequence i mixes with generator i the names of generators i-2 and i-1
    for b in mixes:
        given = re.search(r": (.+)\.\nCreate", b["messages"][0]["content"]).group(1)
        sources = {name.split(" ")[0] for name in given.split(", ")}
        others = {"g1", "g2", "g3"} - {b["model"]}
        assert sources == others
    m = manifest(out, "nonsense_generated_entities")
    assert m["generator"] == ["openai:g1", "openai:g2", "openai:g3"]
    assert m["plans"]["product"]["N"] == 4 and len(m["plans"]["product"]["types"]) == 2
    assert m["generation"]["existence_check"] is None

    # the pluggable existence check drops the names it says exist
    checked = tmp_path / "checked"
    args += ["--existence-check", "test_generate:exists_if_ends_in_1"]
    with JudgeServer(scripted_names, pass_body=True, port=port) as server:  # the same server
        code = generate(
            "nonsense_generated_entities", server, checked, tmp_path / "c.sqlite", *args
        )
        assert code == 0
        assert server.requests == 0  # every call came from the cache
    checked_rows = read_rows(checked, "nonsense_generated_entities")
    assert checked_rows and not any(r["name"].endswith(" 1") for r in checked_rows)
    dropped = manifest(checked, "nonsense_generated_entities")["generation"]["sequences"]
    assert all(s["existing_dropped"] > 0 for s in dropped)


def test_generated_entities_do_not_depend_on_hash_seed(tmp_path):
    digests = []
    with JudgeServer(scripted_names, pass_body=True) as server:
        for hash_seed in ("1", "2"):
            out = tmp_path / hash_seed
            result = run_cli(
                "hallulens",
                "generate",
                "nonsense_generated_entities",
                "--N",
                "5",
                "--generator",
                "openai:g1",
                "--generator",
                "openai:g2",
                "--base-url",
                server.base_url,
                "--cache",
                str(tmp_path / f"{hash_seed}.sqlite"),
                "--out",
                str(out),
                env={"PYTHONHASHSEED": hash_seed},
            )
            assert result.returncode == 0, result.stderr
            digests.append(sha256(out / "nonsense_generated_entities" / "prompts.jsonl"))
    assert digests[0] == digests[1]


# --------------------------------------------------------------------------- MixedEntities


def test_mixed_entities_wiring(tmp_path):
    out = tmp_path / "out"
    sources = ["--source", f"medicines={FIXTURES / 'medicine_dataset.csv'}"]
    sources += ["--source", f"itis={FIXTURES / 'itis'}"]
    assert (
        main(
            [
                "generate",
                "nonsense_mixed_entities",
                "--N",
                "3",
                "--seed",
                "5",
                "--out",
                str(out),
                *sources,
            ]
        )
        == 0
    )
    rows = read_rows(out, "nonsense_mixed_entities")
    medicines = load_medicines(FIXTURES / "medicine_dataset.csv")
    itis = load_itis(FIXTURES / "itis")
    assert rows == generate_mixed_entities(3, 5, medicines=medicines, itis=itis)
    assert load_prompt_set("nonsense_mixed_entities", out) == rows
    m = manifest(out, "nonsense_mixed_entities")
    assert m["generation"]["counts"] == {"medicine": 3, "animal": 3, "plant": 3, "bacteria": 3}
    assert {s["source"] for s in m["sources"]} == {"medicines", "itis"}
    animals = tmp_path / "animals"
    assert (
        main(
            [
                "generate",
                "nonsense_mixed_entities",
                "--N",
                "3",
                "--seed",
                "5",
                "--exp",
                "nonsense_animal",
                "--out",
                str(animals),
                *sources,
            ]
        )
        == 0
    )
    assert {r["type"] for r in read_rows(animals, "nonsense_mixed_entities")} == {"animal"}


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["precise_wikiqa", "--generator", "llama70b"], {}, "--generator='llama70b': expected"),
        (
            ["precise_wikiqa", "--generator", "openai:m", "--source", "wiki=x"],
            {},
            "unknown source 'wiki'",
        ),
        (
            ["precise_wikiqa", "--generator", "openai:m", "--source", "goodwiki=/nope.jsonl"],
            {},
            "--source goodwiki=/nope.jsonl: no such file",
        ),
        (["precise_wikiqa", "--generator", "openai:m", "--N", "0"], {}, "--N must be at least 1"),
        (
            ["nonsense_mixed_entities", "--exp", "nonsense_fungi"],
            {},
            "unknown MixedEntities selection",
        ),
        (
            ["nonsense_generated_entities", "--generator", "openai:m", "--domains", "shops"],
            {},
            "unknown domain(s) shops",
        ),
        (
            ["nonsense_generated_entities", "--generator", "openai:m", "--name-num", "product=x"],
            {},
            "--name-num 'product=x': expected DOMAIN=COUNT",
        ),
        (
            [
                "nonsense_generated_entities",
                "--generator",
                "openai:m",
                "--existence-check",
                "nomodule:f",
            ],
            {},
            "cannot import it",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, env, message):
    result = run_cli("hallulens", "generate", *args, "--out", str(tmp_path), env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hallulens: error: "), result.stderr
    assert message in lines[0]


def test_missing_sources_without_network_are_one_line(tmp_path, wiki_sources):
    offline = {
        "HALLULENS_SOURCE_CACHE": str(tmp_path / "cache"),
        "HTTPS_PROXY": "http://127.0.0.1:9",  # nothing listens: every download fails at once
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    common = ["generate", "precise_wikiqa", "--generator", "openai:m", "--out", str(tmp_path)]
    result = run_cli(
        "hallulens", *common, "--source", f"goodwiki={wiki_sources['goodwiki']}", env=offline
    )
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert re.match(r"hallulens: error: cannot download wikirank from https://wikirank", line)
    assert "--source wikirank=PATH" in line
    result = run_cli("hallulens", *common, env=offline)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "euirim/goodwiki" in lines[0] and "--source goodwiki=PATH" in lines[0]
    )
    assert not (tmp_path / "precise_wikiqa").exists()
