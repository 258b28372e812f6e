"""LongWiki judging against a scripted OpenAI-compatible judge and a fixture Wikipedia database
written here with plain sqlite3: metrics by hand, cache and resume, retrieval, bad input.

The judge answers by content: the abstention judge by the answer, the claim extractor by the
sentence between <SOS> and <EOS>, the verifier by the claim. Every number below is computed by
hand from those scripted replies.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import statistics
from fractions import Fraction as F
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from judge_server import JudgeServer

from hallulens_tasks.judging.claims import split_sentences
from hallulens_tasks.judging.offline import judge_run
from hallulens_tasks.judging.retrieval import PassageIndex, candidate_pages
from hallulens_tasks.judging.verdicts import parse_claims
from hallulens_tasks.judging.wikipedia import WikiDB, sample_db
from hallulens_tasks.llm.spec import LLMError
from hallulens_tasks.runs.legacy import export_legacy

STAMP = "2026-01-02T03-04-05.000006"
SEPARATOR = "####SPECIAL####SEPARATOR####"
PAGES = {
    "Quillmere Abbey": [
        "Quillmere Abbey was founded in 1132 by Cistercian monks from Rievaulx.",
        "The abbey church has a tower of red sandstone, rebuilt after a fire in 1540.",
        "Its library held forty manuscripts, which are now kept in the Bodleian Library.",
    ],
    "Bodleian Library": ["The Bodleian Library in Oxford opened to readers in 1602."],
    "Varnholt Bridge": [
        "Varnholt Bridge is a stone bridge over the river Sall, completed in 1788.",
        "It has five arches and was restored in 1954.",
    ],
    "Sallowmere Lighthouse": [
        "Sallowmere Lighthouse was first lit in 1851.",
        "Its keepers left when the light was automated in 1989.",
    ],
}
QUESTIONS = {
    "Quillmere Abbey": "What is the history of Quillmere Abbey and its manuscripts in the "
    "Bodleian Library?",
    "Varnholt Bridge": "How was Varnholt Bridge built and restored?",
    "Sallowmere Lighthouse": "What is the story of Sallowmere Lighthouse?",
}
# (topic, popularity bin, answer, abstention reply)
KNOWS, DOES_NOT, JUNK = '{"is_knowledgeable": true}', '{"is_knowledgeable": false}', "Hmm."
DOCS = [
    ("Quillmere Abbey", 5, "Quillmere Abbey was founded in 1132. Its tower is made of red "
     "sandstone. The abbey moved to Paris in 1900.", KNOWS),
    ("Varnholt Bridge", 5, "Varnholt Bridge crosses the river Sall. It has five arches. I "
     "think it is lovely.", KNOWS),
    ("Sallowmere Lighthouse", 6, "I do not know anything about this lighthouse.", DOES_NOT),
    ("Sallowmere Lighthouse", 6, "What a question! Lighthouses are nice.", KNOWS),
    ("Varnholt Bridge", 6, "It is a bridge of some kind.", JUNK),
    ("Quillmere Abbey", 6, "Quillmere Abbey has a bell. Zzyzx qwrtp.", KNOWS),
    ("Sallowmere Lighthouse", 6, "Sallowmere Lighthouse was first lit in 1851. Glorbix "
     "vantreel.", KNOWS),
    ("Varnholt Bridge", 5, "Varnholt Bridge is old. Something odd happened.", KNOWS),
    ("Varnholt Bridge", 6, "It has five arches and was restored in 1954.", KNOWS),
]  # fmt: skip
NONE = "No available facts."
CLAIMS = {  # focused sentence -> extraction reply
    "Quillmere Abbey was founded in 1132.": "- Quillmere Abbey was founded in 1132.\n"
    "- Quillmere Abbey was founded by Cistercian monks.",
    "Its tower is made of red sandstone.": "Facts:\n- The tower of Quillmere Abbey is made "
    "of red sandstone.",
    # the second fact repeats one of the first sentence: dropped
    "The abbey moved to Paris in 1900.": "- Quillmere Abbey moved to Paris in 1900.\n"
    "- Quillmere Abbey was founded in 1132.",
    "Varnholt Bridge crosses the river Sall.": "- Varnholt Bridge crosses the river Sall.",
    "It has five arches.": "* Varnholt Bridge has seven arches.",
    "I think it is lovely.": NONE,
    "What a question!": NONE,
    "Lighthouses are nice.": "No verifiable claim.",
    "Quillmere Abbey has a bell.": "- Quillmere Abbey has a bell.",
    "Zzyzx qwrtp.": "- Zzyzx qwrtp exists.",
    "Sallowmere Lighthouse was first lit in 1851.": "- Sallowmere Lighthouse was first lit "
    "in 1851.",
    "Glorbix vantreel.": "- Glorbix vantreel.",
    "Varnholt Bridge is old.": "- Varnholt Bridge is old.",
    "Something odd happened.": "Sure, I can help with that sentence.",  # unreadable
    "It has five arches and was restored in 1954.": "- Varnholt Bridge has five arches.\n"
    "- Varnholt Bridge was restored in 1954.",
}
YES, NO = '{"is_supported": true}', '{"is_supported":false}'
VERDICTS = {
    "Quillmere Abbey was founded in 1132.": YES,
    "Quillmere Abbey was founded by Cistercian monks.": YES,
    "The tower of Quillmere Abbey is made of red sandstone.": "```json\n" + YES + "\n```",
    "Quillmere Abbey moved to Paris in 1900.": NO,
    "Varnholt Bridge crosses the river Sall.": YES,
    "Varnholt Bridge has seven arches.": NO,
    "Quillmere Abbey has a bell.": "maybe",  # unreadable
    "Zzyzx qwrtp exists.": NO,
    "Sallowmere Lighthouse was first lit in 1851.": YES,
    "Glorbix vantreel.": NO,
    "Varnholt Bridge is old.": YES,
    "Varnholt Bridge has five arches.": YES,
    "Varnholt Bridge was restored in 1954.": YES,
}
K = 2
# --- the hand computation (K = 2) -------------------------------------------------------------
# docs 4 (abstention), 5 (verification) and 7 (extraction) are unreadable; 2 (not knowledgeable)
# and 3 (no claims) are refused; per answered doc (supported / claims):
#   0: 3/4, recall min(3/2, 1) = 1, F1 6/7;  1: 1/2, 1/2, 1/2;  6: 1/2, 1/2, 1/2;  8: 1, 1, 1
PER_ANSWER = {0: (F(3, 4), F(1), F(6, 7), 4), 1: (F(1, 2),) * 3 + (2,)}
PER_ANSWER |= {6: (F(1, 2),) * 3 + (2,), 8: (F(1), F(1), F(1), 2)}
EXPECTED = {
    "precision": F(11, 16),
    "recall_at_k": F(3, 4),
    "f1_at_k": F(5, 7),
    "refusal_rate": F(2, 6),
    "med_n_claims": F(2),
    "judge_unparseable": F(3, 9),
    "refusal_rate_cat5": F(0, 2),
    "precision_cat5": F(5, 8),
    "recall_at_k_cat5": F(3, 4),
    "f1_at_k_cat5": F(19, 28),
    "refusal_rate_cat6": F(2, 4),
    "precision_cat6": F(3, 4),
    "recall_at_k_cat6": F(3, 4),
    "f1_at_k_cat6": F(3, 4),
}
LABELS = ["hallucinated", "hallucinated", "refused", "refused", "unparseable", "unparseable"]
LABELS += ["hallucinated", "unparseable", "correct"]
# judge requests: 9 abstention + 15 sentences + 12 claims, and two re-asks of each unreadable reply
REQUESTS = 9 + 15 + 12 + 3 * 2


def scripted(prompt: str) -> str:
    if "is_knowledgeable" in prompt:
        answer = prompt.rsplit("Chatbot: ", 1)[1].rsplit("\nResult:", 1)[0]
        return next(reply for _, _, text, reply in DOCS if text == answer)
    if "Sentence to focus on" in prompt:
        return CLAIMS[re.findall(r"<SOS>(.*?)<EOS>", prompt)[-1]]
    return VERDICTS[prompt.rsplit("Claim: ", 1)[1].split("\n", 1)[0]]


def write_db(path: Path, pages: dict[str, list[str]]) -> Path:
    """FActScore's format, written here without the package's code."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE documents (title PRIMARY KEY, text)")
        db.executemany(
            "INSERT INTO documents VALUES (?, ?)",
            [(t, SEPARATOR.join(ps)) for t, ps in pages.items()],
        )
    db.close()
    return path


def write_samples(directory: Path, docs=DOCS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"samples_longwiki_{STAMP}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, (topic, cat, answer, _) in enumerate(docs):
            question = f"{QUESTIONS[topic]} (question {i})"  # upstream groups rows by question
            doc = {"prompt": question, "title": topic, "h_score_cat": cat, "reference": ""}
            row = {
                "doc_id": i,
                "doc": doc,
                "arguments": {"gen_args_0": {"arg_0": doc["prompt"], "arg_1": {"until": []}}},
                "resps": [[answer]],
                "filtered_resps": [answer],
                "prompt_hash": hashlib.sha256(doc["prompt"].encode()).hexdigest(),
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def wiki(tmp_path, monkeypatch) -> Path:
    path = write_db(tmp_path / "wiki.db", PAGES)
    monkeypatch.setenv("HALLULENS_WIKI_DB", str(path))
    monkeypatch.setenv("HALLULENS_LONGWIKI_K", str(K))
    monkeypatch.setenv("HALLULENS_JUDGE", "openai:scripted-judge")
    monkeypatch.setenv("HALLULENS_JUDGE_CACHE", str(tmp_path / "judge.sqlite"))
    return path


def judged_rows(path: Path) -> list[dict]:
    judged = path.parent / "judged" / path.name
    return [json.loads(line) for line in judged.read_text().splitlines()]


def test_metrics_labels_and_samples_equal_the_hand_computation(tmp_path, wiki, monkeypatch):
    samples = write_samples(tmp_path / "run")
    with JudgeServer(scripted) as server:
        monkeypatch.setenv("HALLULENS_JUDGE_BASE_URL", server.base_url)
        results = judge_run([samples], None).results
        assert server.requests == REQUESTS
        verification_prompts = [p for p in server.prompts if "is_supported" in p]
    row = results["results"]["longwiki"]
    for name, value in EXPECTED.items():
        assert row[f"{name},judge"] == pytest.approx(float(value)), name
    precisions = [float(v[0]) for v in PER_ANSWER.values()]
    assert row["precision_stderr,judge"] == pytest.approx(
        statistics.stdev(precisions) / len(precisions) ** 0.5
    )
    assert row["med_n_claims_stderr,judge"] == "N/A"
    # the group row of `hallulens` is LongWiki's own here
    assert results["groups"]["hallulens"]["f1_at_k,judge"] == pytest.approx(5 / 7)

    rows = judged_rows(samples)
    outcomes = [json.loads(r["filtered_resps"][0]) for r in rows]
    assert [o["label"] for o in outcomes] == LABELS
    for d, (precision, recall, f1, n) in PER_ANSWER.items():
        r = rows[d]
        assert (r["precision"], r["recall_at_k"], r["f1_at_k"], r["med_n_claims"]) == (
            pytest.approx(float(precision)),
            pytest.approx(float(recall)),
            pytest.approx(float(f1)),
            n,
        ), d
    first = outcomes[0]
    assert first["k"] == K
    answer = DOCS[0][2]
    for sentence in first["sentences"]:  # spans point into the answer
        assert answer[slice(*sentence["span"])] == sentence["text"]
    claims = [c for s in first["sentences"] for c in s["claims"]]
    assert [c["claim"] for c in claims] == [
        "Quillmere Abbey was founded in 1132.",
        "Quillmere Abbey was founded by Cistercian monks.",
        "The tower of Quillmere Abbey is made of red sandstone.",
        "Quillmere Abbey moved to Paris in 1900.",
    ]
    assert [c["supported"] for c in claims] == [True, True, True, False]
    assert first["sentences"][2]["extraction"]["raw"] == CLAIMS[DOCS[0][2].split(". ")[2]]
    # the founding claim's best passage is the one holding "founded" and "1132"
    assert claims[0]["evidence"][0] == {"title": "Quillmere Abbey", "passage": 0}
    assert {e["title"] for c in claims for e in c["evidence"]} <= {
        "Quillmere Abbey",
        "Bodleian Library",
    }
    # upstream's order in the verification prompt: the best passage last, next to the claim
    [prompt] = [p for p in verification_prompts if "Claim: Quillmere Abbey was founded in" in p]
    shown = re.findall(r"Text: (.*)", prompt)
    ranked = [PAGES[e["title"]][e["passage"]] for e in claims[0]["evidence"]]
    assert shown == ranked[::-1] and len(shown) == 4  # all passages of the two pages
    # unreadable replies are kept raw, never turned into verdicts
    assert outcomes[4]["judgements"]["abstention"] == {"raw": JUNK, "verdict": None, "attempts": 3}
    assert outcomes[7]["sentences"][1]["claims"] is None
    [bell] = outcomes[5]["sentences"][0]["claims"]
    assert (bell["supported"], bell["raw"], bell["attempts"]) == (None, "maybe", 3)
    # a claim sharing no word with its pages still gets the topic page's passages
    glorbix = outcomes[6]["sentences"][1]["claims"][0]
    assert {e["title"] for e in glorbix["evidence"]} == {"Sallowmere Lighthouse"}


def test_rerun_asks_nothing_and_legacy_files_give_the_same_numbers(tmp_path, wiki, monkeypatch):
    samples = write_samples(tmp_path / "run")
    with JudgeServer(scripted) as server:
        monkeypatch.setenv("HALLULENS_JUDGE_BASE_URL", server.base_url)
        judge_run([samples], None)
    with JudgeServer(scripted, port=server.port) as again:
        judge_run([samples], None)
        assert again.requests == 0
    [out] = export_legacy([samples.parent / "judged" / samples.name], tmp_path / "out", "m")
    # a reader written to upstream's output.csv, with upstream's formulas
    table = pd.read_csv(out / "output.csv")
    per_prompt = table.groupby("prompt")
    assert per_prompt.precision.first().mean() == pytest.approx(float(EXPECTED["precision"]))
    assert per_prompt.recall.first().mean() == pytest.approx(float(EXPECTED["recall_at_k"]))
    assert per_prompt.f1.first().mean() == pytest.approx(float(EXPECTED["f1_at_k"]))
    assert per_prompt.n_claims.first().median() == float(EXPECTED["med_n_claims"])
    assert (table["k"] == K).all()
    # one row per claim, and per sentence without claims, of the answered docs 0, 1, 6, 8
    assert len(table) == 4 + 3 + 2 + 2
    assert table["is_supported"].isna().sum() == 1  # "I think it is lovely."
    results = json.loads((out / "eval_results.json").read_text())
    for name in ("precision", "recall_at_k", "f1_at_k", "refusal_rate"):
        assert results[name] == pytest.approx(float(EXPECTED[name]))
    assert results["judge_unparseable"] == 3
    generation = pd.read_json(out / "generation.jsonl", lines=True)
    abstain = [json.loads(x) for x in (out / "output_abstain.jsonl").read_text().splitlines()]
    assert len(generation) == len(abstain) == 6  # the items with verdicts
    verification = (out / "output_verification_results.jsonl").read_text().splitlines()
    parsed = (out / "output_all_parsed_claims.jsonl").read_text().splitlines()
    assert len(verification) == len(parsed) == 10  # claims of the answered docs
    assert len((out / "unparseable.jsonl").read_text().splitlines()) == 3


def test_interrupted_pass_resumes_with_only_the_missing_calls(tmp_path, wiki, monkeypatch):
    samples = write_samples(tmp_path / "run")
    monkeypatch.setenv("HALLULENS_JUDGE_CONCURRENCY", "1")
    monkeypatch.setenv("HALLULENS_JUDGE_RETRIES", "0")
    with JudgeServer(scripted) as server:
        monkeypatch.setenv("HALLULENS_JUDGE_BASE_URL", server.base_url)
        server.down_after = 16  # abstention (9 + 2 re-asks) and 5 claim extractions
        with pytest.raises(LLMError, match="re-run to resume"):
            judge_run([samples], None)
    with JudgeServer(scripted, port=server.port) as again:
        results = judge_run([samples], None).results
        assert again.requests == REQUESTS - 16
    assert results["results"]["longwiki"]["f1_at_k,judge"] == pytest.approx(5 / 7)


def test_fts5_index_finds_the_passage_of_a_claims_words_and_is_built_once(tmp_path):
    db = WikiDB(write_db(tmp_path / "wiki.db", PAGES))
    index = PassageIndex(db)
    assert index.built and index.path == tmp_path / "wiki.db.bm25.sqlite"
    pages = candidate_pages(db, "Quillmere Abbey", QUESTIONS["Quillmere Abbey"])
    assert pages == ["Quillmere Abbey", "Bodleian Library"]
    for claim, best in [
        ("The abbey library held forty manuscripts.", ("Quillmere Abbey", 2)),
        ("The tower is of red sandstone.", ("Quillmere Abbey", 1)),
        ("It opened to readers in Oxford in 1602.", ("Bodleian Library", 0)),
    ]:
        [top] = index.rank(pages, [f"Quillmere Abbey {claim}"])
        assert (top[0].title, top[0].index) == best, claim
        assert top[0].text == PAGES[best[0]][best[1]]
    [bridge] = index.rank(["Varnholt Bridge"], ["Varnholt Bridge was restored in 1954"])
    assert [(p.title, p.index) for p in bridge] == [("Varnholt Bridge", 1), ("Varnholt Bridge", 0)]
    assert index.rank(["Bodleian Library"], ["zzyzx"]) == [[]]  # no shared term, no passage
    index.close()
    before = index.path.stat()
    again = PassageIndex(db)
    assert not again.built
    after = index.path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again.close()
    db.close()


@pytest.mark.parametrize(
    ("reply", "claims"),
    [
        ("- A was born in 1900.\n- A was a painter.", ["A was born in 1900.", "A was a painter."]),
        (
            "Facts:\n  * A lived in Oslo.  \n• A died in 1950.",
            ["A lived in Oslo.", "A died in 1950."],
        ),
        ("No available facts.", []),
        ("- No available facts", []),
        ("no verifiable claim", []),
        ("- A is tall.\n- No available facts.", ["A is tall."]),
        ("", None),
        ("The sentence says that A is tall.", None),
    ],
)
def test_claim_replies(reply, claims):
    assert parse_claims(reply) == claims


def test_sentences_keep_their_spans():
    text = "Dr. Ada Byron met Mr. Babbage in 1833.\n\nShe wrote notes. E.g. note G!  Done."
    sentences = split_sentences(text)
    assert [s.text for s in sentences] == [
        "Dr. Ada Byron met Mr. Babbage in 1833.",
        "She wrote notes.",
        "E.g. note G!",
        "Done.",
    ]
    assert all(text[s.start : s.end] == s.text for s in sentences)


def test_sample_wikipedia_holds_the_sample_sets_topics_in_factscores_format():
    shipped = Path(__file__).parents[1] / "hallulens_tasks" / "data" / "longwiki"
    pages = [json.loads(x) for x in (shipped / "wiki_pages.jsonl").read_text().splitlines()]
    questions = [json.loads(x) for x in (shipped / "prompts.jsonl").read_text().splitlines()]
    with sqlite3.connect(sample_db()) as db:
        stored = dict(db.execute("SELECT title, text FROM documents"))
    db.close()
    assert stored == {p["title"]: SEPARATOR.join(p["passages"]) for p in pages}
    for question in questions:
        assert question["title"] in stored
        assert question["reference"] in stored[question["title"]].split(SEPARATOR)


def _judge_cli(tmp_path: Path, db: str) -> tuple[int, list[str]]:
    samples = write_samples(tmp_path / "run")
    env = {"HALLULENS_WIKI_DB": db, "HALLULENS_JUDGE": "openai:x"}
    env["HALLULENS_JUDGE_BASE_URL"] = "http://127.0.0.1:9/v1"  # never reached
    done = run_cli("hallulens", "judge", str(samples), env=env)
    return done.returncode, done.stderr.strip().splitlines()


def test_bad_databases_are_one_line_errors(tmp_path):
    missing = tmp_path / "enwiki-20230401.db"
    code, lines = _judge_cli(tmp_path, str(missing))
    assert code == 1 and len(lines) == 1, lines
    for part in (str(missing), "HALLULENS_WIKI_DB", "1mekls6OGOKLmt7gYtHs0WGf5oTamTNat"):
        assert part in lines[0]
    (tmp_path / "text.db").write_text("not a database at all " * 100)
    code, lines = _judge_cli(tmp_path, str(tmp_path / "text.db"))
    assert code == 1 and "not a readable SQLite Wikipedia database" in lines[-1], lines
    with sqlite3.connect(tmp_path / "other.db") as other:
        other.execute("CREATE TABLE pages (name)")
    other.close()
    code, lines = _judge_cli(tmp_path, str(tmp_path / "other.db"))
    assert code == 1 and "not a FActScore-format Wikipedia database" in lines[-1], lines
    partial = write_db(tmp_path / "partial.db", {"Varnholt Bridge": PAGES["Varnholt Bridge"]})
    code, lines = _judge_cli(tmp_path, str(partial))
    assert code == 1 and "2 LongWiki topic(s) are not pages of" in lines[-1], lines
    assert not any("Traceback" in line for line in lines)
