"""On-disk cache of LLM replies: a pass that stops half-way resumes where it stopped.

One SQLite file (WAL, one row per reply, committed as each reply arrives). The key is the
sha256 of everything that determines a reply: the LLM, template name and version, rendered
prompt, sampling parameters and the attempt number (re-asks after an unparseable judge reply
are separate entries, so a re-run replays them instead of asking again).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from hallulens_tasks.llm.spec import LLMError


def default_cache_path(kind: str) -> Path:
    """`<cache dir>/<kind>-cache.sqlite` (kind: judge, generate)."""
    from hallulens_models.embedded import cache_dir

    return cache_dir() / f"{kind}-cache.sqlite"


def cache_path_setting(value: str | None, env: str, kind: str) -> Path | None:
    """The cache file: `value` (a flag), else `$env`, else the default; `off` means none."""
    chosen = (value or os.environ.get(env) or "").strip()
    if chosen.lower() == "off":
        return None
    return Path(chosen).expanduser() if chosen else default_cache_path(kind)


def cache_key(
    llm: str, template: str, version: str, prompt: str, sampling: dict, attempt: int
) -> str:
    material = json.dumps(
        [llm, template, version, prompt, sampling, attempt], sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


class ReplyCache:
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
            raise LLMError(f"reply cache {self.path}: {exc}") from None
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

    def put(self, key: str, llm: str, template: str, text: str) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)",
                    (key, llm, template, text, time.time()),
                )
            except sqlite3.Error as exc:
                raise LLMError(f"reply cache {self.path}: cannot write: {exc}") from None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
