"""Evidence for LongWiki claims: the passages of a claim's candidate pages, ranked by BM25.

Upstream ranks every passage of the candidate pages (the topic, and pages named in the
question, found by a NER model) by dense GTR-T5 embeddings. Here BM25 ranks them, through one
SQLite FTS5 index of every passage of the database (title + text, Porter stemming), built once
and kept beside the database (in the cache when its folder is read-only). The build commits page
batches, so an interrupted build resumes, and several processes share one build. Scores use the
whole database's term statistics: a claim's evidence does not depend on what else was judged.

Candidate pages: the topic plus every page whose exact title appears in the question as a
capitalised phrase (only the longest such phrases; the question's first word alone does not
count). The query is upstream's, topic + claim; the top 5 passages, best first; equal scores go
to the passage that comes first in the database.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from hallulens_tasks.judging.wikipedia import WikiDB, WikiDBError, split_passages

log = logging.getLogger(__name__)

INDEX_FORMAT = "hallulens-bm25/1"
TOP_K = 5
BATCH_PAGES = 2000  # pages per committed build step
MAX_TITLE_WORDS = 8
_TERM = re.compile(r"\w+")
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


def fts_query(text: str) -> str | None:
    """An FTS5 query matching any word of `text` (each quoted, so no word is an operator)."""
    terms = dict.fromkeys(t.lower() for t in _TERM.findall(text))
    return " OR ".join(f'"{t}"' for t in terms) or None


class PassageIndex:
    """The BM25 index of a database's passages; built on first use."""

    def __init__(self, db: WikiDB, path: Path | None = None):
        self.db = db
        self.path = path or index_path(db.path)
        self.built = False  # whether this object added pages to the index
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=600)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._ensure()
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
            c.execute("DROP TABLE IF EXISTS pages")
            c.execute("DROP TABLE IF EXISTS passages")
            c.execute("DELETE FROM meta")
            c.execute("CREATE TABLE pages (title TEXT PRIMARY KEY, first INTEGER, n INTEGER)")
            c.execute(
                "CREATE VIRTUAL TABLE passages USING fts5(body, content='', "
                "tokenize='porter unicode61 remove_diacritics 2')"
            )
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
                passages = split_passages(text)
                c.execute("INSERT INTO pages VALUES (?, ?, ?)", (title, passage, len(passages)))
                c.executemany(
                    "INSERT INTO passages (rowid, body) VALUES (?, ?)",
                    ((passage + i, f"{title} {p}") for i, p in enumerate(passages)),
                )
                passage += len(passages)
            if rows:
                self._set_meta(page=rows[-1][0], passage=passage)
            else:
                self._set_meta(complete=1)
            c.execute("COMMIT")
            self.built = True
            progress.update(len(rows))
        progress.close()

    def top(self, pages: Sequence[str], query: str, k: int = TOP_K) -> list[Passage]:
        """The `k` passages of `pages` that rank best for `query`, best first."""
        match = fts_query(query)
        if match is None:
            return []
        hits: list[tuple[float, int, str, int]] = []
        for title in dict.fromkeys(pages):
            row = self._conn.execute(
                "SELECT first, n FROM pages WHERE title = ?", (title,)
            ).fetchone()
            if row is None:
                continue
            first, n = row
            found = self._conn.execute(
                "SELECT bm25(passages), rowid FROM passages WHERE passages MATCH ? "
                "AND rowid BETWEEN ? AND ? ORDER BY bm25(passages), rowid LIMIT ?",
                (match, first, first + n - 1, k),
            ).fetchall()
            hits.extend((score, rowid, title, first) for score, rowid in found)
        hits.sort(key=lambda hit: hit[:2])
        return [
            Passage(title, rowid - first, self.db.passages(title)[rowid - first])
            for _, rowid, title, first in hits[:k]
        ]

    def close(self) -> None:
        self._conn.close()


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
