"""LongWiki retrieval on synthetic FActScore-format databases of two sizes: our ranking (corpus
statistics kept with the index, candidate passages tokenized per question) vs. FTS5's own
bm25() over the same index restricted to the candidate pages' rows, which recounts each query
term over the whole index on every query; plus the one-time index build against a plain read of
the database."""

from __future__ import annotations

import random
import sqlite3
import sys
import tempfile
from pathlib import Path

from common import save, side_by_side, table, timed

from hallulens_tasks.judging.retrieval import TOKENIZER, PassageIndex
from hallulens_tasks.judging.wikipedia import WikiDB, write_db

PASSAGES_PER_PAGE = 8
WORDS_PER_PASSAGE = 60
CANDIDATES = 3  # the topic and two pages named in the question
QUESTIONS, CLAIMS_PER_QUESTION = 10, 10


def synthetic_pages(n_pages: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(20000)]
    weights = [1 / (i + 1) for i in range(len(vocabulary))]  # Zipf-like word frequencies
    return [
        (
            f"Page {p}",
            [
                " ".join(rng.choices(vocabulary, weights, k=WORDS_PER_PASSAGE))
                for _ in range(PASSAGES_PER_PAGE)
            ],
        )
        for p in range(n_pages)
    ]


def fts5_bm25(conn: sqlite3.Connection, pages: list[int], query: str) -> list[int]:
    """Top 5 rows of the candidate pages by FTS5's bm25() (rowid = page * 8 + passage)."""
    match = " OR ".join(f'"{w}"' for w in dict.fromkeys(query.lower().split()))
    hits = []
    for page in pages:
        first = page * PASSAGES_PER_PAGE
        hits += conn.execute(
            "SELECT bm25(p), rowid FROM p WHERE p MATCH ? AND rowid BETWEEN ? AND ? "
            "ORDER BY bm25(p) LIMIT 5",
            (match, first, first + PASSAGES_PER_PAGE - 1),
        ).fetchall()
    return [rowid for _, rowid in sorted(hits)[:5]]


def measure(n_pages: int, repeats: int, tmp: Path) -> list[list[object]]:
    pages = synthetic_pages(n_pages)
    path = tmp / f"wiki-{n_pages}.db"
    write_db(path, pages)
    db = WikiDB(path)
    scan = timed(lambda: [db.pages_after(r, 1000) for r in range(0, n_pages, 1000)])
    build = timed(lambda: PassageIndex(db).close())
    index = PassageIndex(db)
    plain = sqlite3.connect(tmp / f"plain-{n_pages}.sqlite")
    plain.execute(f"CREATE VIRTUAL TABLE p USING fts5(body, content='', tokenize='{TOKENIZER}')")
    plain.executemany(
        "INSERT INTO p (rowid, body) VALUES (?, ?)",
        (
            (p * PASSAGES_PER_PAGE + i, f"{title} {text}")
            for p, (title, texts) in enumerate(pages)
            for i, text in enumerate(texts)
        ),
    )
    plain.commit()
    rng = random.Random(1)
    questions = []
    for _ in range(QUESTIONS):
        chosen = rng.sample(range(n_pages), CANDIDATES)
        claims = [
            f"Page {chosen[0]} "
            + " ".join(pages[chosen[0]][1][rng.randrange(PASSAGES_PER_PAGE)].split()[:8])
            for _ in range(CLAIMS_PER_QUESTION)
        ]
        questions.append((chosen, claims))
    ours, theirs = side_by_side(
        lambda: [index.rank([f"Page {c}" for c in chosen], q) for chosen, q in questions],
        lambda: [fts5_bm25(plain, chosen, c) for chosen, q in questions for c in q],
        repeats,
    )
    index.close()
    plain.close()
    db.close()
    claims = QUESTIONS * CLAIMS_PER_QUESTION
    return [
        [f"{n_pages} pages: {claims} claims, top 5 of {CANDIDATES} pages", ours, theirs],
        [f"{n_pages} pages: reading the DB vs. building the index", scan, build],
    ]


def main() -> None:
    quick = "--quick" in sys.argv
    sizes = (1000, 4000) if quick else (2000, 20000)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for n in sizes for row in measure(n, 3 if quick else 5, Path(tmp))]
    rows = [[*row, row[2] / row[1]] for row in rows]
    print(table("LongWiki retrieval (seconds)", ["what", "a", "b", "b / a"], rows))
    save(
        "retrieval",
        {"rows": [dict(zip(["what", "a_s", "b_s", "ratio"], r, strict=True)) for r in rows]},
    )


if __name__ == "__main__":
    main()
