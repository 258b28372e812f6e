"""The Wikipedia that LongWiki verifies claims against: a database in FActScore's format.

One SQLite table `documents(title PRIMARY KEY, text)`; each text is the page's passages joined
by `####SPECIAL####SEPARATOR####`. Upstream uses FActScore's `enwiki-20230401.db`. Which file:
`$HALLULENS_WIKI_DB`, else `<source cache>/enwiki-20230401.db`; when neither exists and every
topic of the answers is a page of the small database shipped for the sample prompt set (pages of
this package's own writing, `data/longwiki/wiki_pages.jsonl`, written into the cache as a
FActScore-format file on first use), that one, with a loud warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Collection, Iterable, Iterator
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from urllib.parse import quote

from hallulens_capture.errors import HalluLensError

log = logging.getLogger(__name__)

SEPARATOR = "####SPECIAL####SEPARATOR####"
DB_NAME = "enwiki-20230401.db"
ENV_WIKI_DB = "HALLULENS_WIKI_DB"
WHERE_UPSTREAM_GETS_IT = (
    "upstream HalluLens downloads it with `python -m data.download_data --all` from FActScore's "
    "Google Drive (file id 1mekls6OGOKLmt7gYtHs0WGf5oTamTNat; FActScore lists it as 18 GB)"
)


class WikiDBError(HalluLensError):
    """The Wikipedia database is missing, unreadable, or lacks the pages the answers are about."""


def default_db_path() -> Path:
    from hallulens_tasks.generation.download import source_cache_dir

    return source_cache_dir() / DB_NAME


def write_db(path: Path, pages: Iterable[tuple[str, list[str]]]) -> None:
    """A FActScore-format database holding `pages` (title, passages), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.unlink(missing_ok=True)
    with sqlite3.connect(staging) as db:
        db.execute("CREATE TABLE documents (title PRIMARY KEY, text)")
        db.executemany(
            "INSERT INTO documents VALUES (?, ?)",
            ((title, SEPARATOR.join(passages)) for title, passages in pages),
        )
    db.close()
    os.replace(staging, path)


def sample_db() -> Path:
    """The database of the shipped sample set's pages (written once into the cache)."""
    from hallulens_models.embedded import cache_dir

    source = Path(str(files("hallulens_tasks") / "data" / "longwiki" / "wiki_pages.jsonl"))
    raw = source.read_bytes()
    path = cache_dir() / "longwiki" / f"sample-wiki-{hashlib.sha256(raw).hexdigest()[:12]}.db"
    if not path.is_file():
        rows = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        write_db(path, ((row["title"], row["passages"]) for row in rows))
    return path


def _missing_message(path: Path, origin: str) -> str:
    return (
        f"LongWiki verifies claims against FActScore's Wikipedia database {DB_NAME}, and {path} "
        f"({origin}) does not exist; {WHERE_UPSTREAM_GETS_IT}. Set {ENV_WIKI_DB} (or "
        "`hallulens judge --wiki_db`, `hallulens pipeline --db_path`) to its path"
    )


def locate_db(topics: Collection[str]) -> Path:
    """The database to verify the answers about `topics` against (see the module docstring)."""
    chosen = os.environ.get(ENV_WIKI_DB, "").strip()
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise WikiDBError(_missing_message(path, f"${ENV_WIKI_DB}"))
        return path
    path = default_db_path()
    if path.is_file():
        return path
    sample = sample_db()
    with WikiDB(sample) as db:
        covered = all(db.has(topic) for topic in topics)
    if not covered:
        raise WikiDBError(_missing_message(path, "the default"))
    log.warning(
        "!!! LongWiki: %s is not set and %s does not exist, so claims are verified against the "
        "small SAMPLE Wikipedia shipped with lm-eval-hallulens (%s), which holds the sample "
        "set's pages only. !!!",
        ENV_WIKI_DB,
        path,
        sample,
    )
    return sample


def split_passages(text: str) -> list[str]:
    """A page's text as its passages, without the "<s>" / "</s>" markers (as upstream)."""
    return [p.replace("<s>", "").replace("</s>", "").strip() for p in text.split(SEPARATOR)]


class WikiDB:
    """A FActScore-format database, opened read-only and checked."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(documents)")}
        except sqlite3.Error as exc:
            raise WikiDBError(
                f"{self.path}: not a readable SQLite Wikipedia database ({exc})"
            ) from None
        if not {"title", "text"} <= columns:
            self._db.close()
            raise WikiDBError(
                f"{self.path}: not a FActScore-format Wikipedia database (it needs a table "
                "documents(title, text))"
            )
        self.passages = lru_cache(maxsize=4096)(self._passages)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise WikiDBError(f"{self.path}: cannot read: {exc}") from None

    def has(self, title: str) -> bool:
        return bool(self._query("SELECT 1 FROM documents WHERE title = ?", (title,)))

    def _passages(self, title: str) -> tuple[str, ...]:
        """The page's passages in page order ("<s>" markers removed); () for no such page."""
        rows = self._query("SELECT text FROM documents WHERE title = ?", (title,))
        if not rows or not isinstance(rows[0][0], str):
            return ()
        return tuple(split_passages(rows[0][0]))

    def pages_after(self, rowid: int, limit: int) -> list[tuple[int, str, str]]:
        """(rowid, title, text) of up to `limit` pages after `rowid`, in rowid order."""
        return self._query(
            "SELECT rowid, title, text FROM documents WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (rowid, limit),
        )

    def size(self) -> int:
        return self._query("SELECT COUNT(*) FROM documents")[0][0]

    def identity(self) -> str:
        """What an index built from this file is valid for: its size and modification time."""
        stat = self.path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def missing(self, titles: Iterable[str]) -> Iterator[str]:
        return (title for title in titles if not self.has(title))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> WikiDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
