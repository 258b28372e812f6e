"""On-disk cache of judge replies: a judge pass that stops half-way resumes where it stopped.

One SQLite file (WAL, one row per reply, committed as each reply arrives). The key is the
sha256 of everything that determines a reply: judge, template name and version, rendered
prompt, sampling parameters and the attempt number (re-asks after an unparseable reply are
separate entries, so a re-run replays them instead of asking again).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from hallulens_tasks.judge.settings import JudgeError


def cache_key(
    judge: str, template: str, version: str, prompt: str, sampling: dict, attempt: int
) -> str:
    material = json.dumps(
        [judge, template, version, prompt, sampling, attempt],
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


class JudgeCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
                "template TEXT NOT NULL, text TEXT NOT NULL, created REAL NOT NULL)"
            )
        except (OSError, sqlite3.Error) as exc:
            raise JudgeError(f"judge cache {self.path}: {exc}") from None
        self._lock = threading.Lock()

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        keys = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, text FROM replies WHERE key IN ({marks})", chunk
                )
                found.update(rows.fetchall())
        return found

    def put(self, key: str, judge: str, template: str, text: str) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)",
                    (key, judge, template, text, time.time()),
                )
            except sqlite3.Error as exc:
                raise JudgeError(f"judge cache {self.path}: cannot write: {exc}") from None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
