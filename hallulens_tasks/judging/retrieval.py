"""Evidence for LongWiki claims: the passages of a claim's candidate pages, ranked by BM25.

Upstream ranks every passage of the candidate pages (the topic, and pages named in the
question, found by a NER model) by dense GTR-T5 embeddings. Here BM25 ranks them, with the term
statistics of the whole database: one SQLite FTS5 index of every passage (title + text, Porter
stemming) is built once and kept beside the database (in the cache when its folder is
read-only); the build commits page batches, so an interrupted build resumes, and several
processes share one build. A claim's evidence therefore depends only on the database, never on
what else was judged. FTS5's own bm25() recounts each query term's documents over the whole
index on every query, which grows with the database (benchmarks/bench_retrieval.py); so the
index gives the corpus statistics (document frequencies, kept in a table as they are first
needed; passage count; mean length), the candidate pages' passages are tokenized by the same
tokenizer in a small in-memory FTS5 table per question, and the BM25 sum (k1 = 1.2, b = 0.75, as
FTS5) is computed here.

Candidate pages: the topic plus every page whose exact title appears in the question as a
capitalised phrase (only the longest such phrases; the question's first word alone does not
count). The query is upstream's, topic + claim; the top 5 passages that share a term with it,
best first; equal scores go to the passage that comes first (topic page first, page order).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from hallulens_tasks.judging.wikipedia import WikiDB, WikiDBError, split_passages

log = logging.getLogger(__name__)

INDEX_FORMAT = "hallulens-bm25/2"
TOKENIZER = "porter unicode61 remove_diacritics 2"
K1, B = 1.2, 0.75  # BM25's usual constants, as FTS5's bm25()
TOP_K = 5
BATCH_PAGES = 2000  # pages per committed build step
MAX_TITLE_WORDS = 8
_WORD = re.compile(r"[^\W_](?:[\w'’.&-]*[^\W_])?")
_POSSESSIVE = re.compile(r"['’]s$")


@dataclass(frozen=True)
class Passage:
    title: str
    index: int  # position of the passage in its page
    text: str


def index_path(db_path: Path) -> Path:
    """`<db>.bm25.sqlite` beside the database, or in the cache if its folder is read-only."""
    folder = db_path.resolve().parent
    if os.access(folder, os.W_OK):
        return folder / f"{db_path.name}.bm25.sqlite"
    from hallulens_models.embedded import cache_dir

    digest = hashlib.sha256(str(db_path.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "wiki-index" / f"{db_path.name}-{digest}.bm25.sqlite"


class PassageIndex:
    """The BM25 index of a database's passages (built on first use) and its statistics."""

    def __init__(self, db: WikiDB, path: Path | None = None):
        self.db = db
        self.path = path or index_path(db.path)
        self.built = False  # whether this object added pages to the index
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=600)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._ensure()
            self._conn.execute(
                "CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, passages, row)"
            )
        except sqlite3.Error as exc:
            raise WikiDBError(f"BM25 index {self.path}: {exc} (delete it to rebuild)") from None

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, **values: object) -> None:
        self._conn.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in values.items()]
        )

    def _ensure(self) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        source = f"{self.db.path.resolve()}:{self.db.identity()}"
        if (self._meta("format"), self._meta("source")) != (INDEX_FORMAT, source):
            c.execute("DROP TABLE IF EXISTS passages")
            c.execute("DROP TABLE IF EXISTS df")
            c.execute("DELETE FROM meta")
            fts5 = f"fts5(body, content='', tokenize='{TOKENIZER}')"  # contentless: the DB has it
            c.execute(f"CREATE VIRTUAL TABLE passages USING {fts5}")
            c.execute("CREATE TABLE df (term TEXT PRIMARY KEY, n INTEGER)")  # counted when needed
            self._set_meta(format=INDEX_FORMAT, source=source, page=0, passage=1, complete=0)
        c.execute("COMMIT")
        if self._meta("complete") != "1":
            self._build()

    def _build(self) -> None:
        log.warning(
            "LongWiki: building the BM25 index of %s into %s (once; later runs reuse it)",
            self.db.path,
            self.path,
        )
        c = self._conn
        progress = tqdm(total=self.db.size(), desc="BM25 index (pages)")
        while True:
            c.execute("BEGIN IMMEDIATE")  # another process may have built this batch already
            if self._meta("complete") == "1":
                c.execute("COMMIT")
                break
            page, passage = int(self._meta("page") or 0), int(self._meta("passage") or 1)
            rows = self.db.pages_after(page, BATCH_PAGES)
            for _, title, text in rows:
                passages = split_passages(str(text or ""))
                c.executemany(
                    "INSERT INTO passages (rowid, body) VALUES (?, ?)",
                    ((passage + i, f"{title} {p}") for i, p in enumerate(passages)),
                )
                passage += len(passages)
            if rows:
                self._set_meta(page=rows[-1][0], passage=passage)
            else:  # done: the corpus size in tokens, for the mean passage length
                c.execute(
                    "CREATE VIRTUAL TABLE temp.all_terms USING fts5vocab(main, passages, row)"
                )
                tokens = c.execute("SELECT TOTAL(cnt) FROM temp.all_terms").fetchone()[0]
                c.execute("DROP TABLE temp.all_terms")
                self._set_meta(complete=1, tokens=int(tokens))
            c.execute("COMMIT")
            self.built = True
            progress.update(len(rows))
        progress.close()

    def _document_frequencies(self, terms: set[str]) -> dict[str, int]:
        """How many passages of the database hold each term (counted once, then kept)."""
        found = {}
        try:
            for term in sorted(terms):
                row = self._conn.execute("SELECT n FROM df WHERE term = ?", (term,)).fetchone()
                if row is None:
                    counted = self._conn.execute("SELECT doc FROM vocab WHERE term = ?", (term,))
                    row = counted.fetchone() or (0,)
                    self._conn.execute("INSERT OR REPLACE INTO df VALUES (?, ?)", (term, row[0]))
                found[term] = row[0]
        except sqlite3.Error as exc:
            raise WikiDBError(f"BM25 index {self.path}: {exc} (delete it to rebuild)") from None
        return found

    def rank(
        self, pages: Sequence[str], queries: Sequence[str], k: int = TOP_K
    ) -> list[list[Passage]]:
        """For each query, the `k` passages of `pages` that rank best, best first."""
        candidates = [
            Passage(title, i, text)
            for title in dict.fromkeys(pages)
            for i, text in enumerate(self.db.passages(title))
        ]
        passage_terms = _tokenized([f"{p.title} {p.text}" for p in candidates])
        query_terms = [set(terms) for terms in _tokenized(queries)]
        df = self._document_frequencies(set().union(*query_terms))
        n = int(self._meta("passage") or 1) - 1
        mean_length = int(self._meta("tokens") or 0) / max(n, 1)
        idf = {t: math.log(1 + (n - m + 0.5) / (m + 0.5)) for t, m in df.items()}
        out = []
        for terms in query_terms:
            scored = []
            for order, counts in enumerate(passage_terms):
                norm = K1 * (1 - B + B * counts.total() / mean_length) if mean_length else K1
                score = sum(
                    idf[t] * counts[t] * (K1 + 1) / (counts[t] + norm)
                    for t in terms & counts.keys()
                )
                if score > 0:
                    scored.append((-score, order))
            out.append([candidates[order] for _, order in sorted(scored)[:k]])
        return out

    def close(self) -> None:
        self._conn.close()


def _tokenized(texts: Sequence[str]) -> list[Counter[str]]:
    """Term counts of each text under the index's tokenizer (an in-memory FTS5 table)."""
    mem = sqlite3.connect(":memory:")
    try:
        mem.execute(f"CREATE VIRTUAL TABLE t USING fts5(body, tokenize='{TOKENIZER}')")
        mem.executemany("INSERT INTO t (rowid, body) VALUES (?, ?)", enumerate(texts))
        mem.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, instance)")
        counts: list[Counter[str]] = [Counter() for _ in texts]
        for term, doc in mem.execute("SELECT term, doc FROM v"):
            counts[doc][term] += 1
        return counts
    finally:
        mem.close()


def _named(word: str) -> bool:
    return word[0].isupper() or word[0].isdigit()


def candidate_pages(db: WikiDB, topic: str, question: str) -> list[str]:
    """The topic, then the pages named in the question (see the module docstring)."""
    words = list(_WORD.finditer(question))
    found: list[tuple[int, int, str]] = []
    for i, first in enumerate(words):
        if not _named(first.group()):
            continue
        for j in range(i, min(i + MAX_TITLE_WORDS, len(words))):
            last = words[j]
            if not _named(last.group()) or i == j == 0:
                continue
            phrase = question[first.start() : last.end()]
            for title in dict.fromkeys((phrase, _POSSESSIVE.sub("", phrase))):
                if title and db.has(title):
                    found.append((first.start(), first.start() + len(title), title))
    longest = [
        title
        for start, end, title in found
        if not any(s <= start and end <= e and (s, e) != (start, end) for s, e, _ in found)
    ]
    return list(dict.fromkeys([topic, *longest]))
