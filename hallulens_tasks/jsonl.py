"""The one JSONL reader: prompt sets, harness samples files, GoodWiki dumps, the demo questions.

Lines end at "\\n" only. `str.splitlines()` would also split at U+2028, U+2029 and U+0085,
which `json.dumps(ensure_ascii=False)` writes raw inside strings, and so cut valid rows apart.
Every problem is one line naming the file and line, raised as the caller's error class.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from hallulens_capture.errors import HalluLensError


def read_jsonl(path: str | Path, error: type[HalluLensError]) -> Iterator[tuple[str, dict]]:
    """(`path:line`, object) for every non-blank line, streamed."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise error(f"{where}: not UTF-8 ({exc.reason})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise error(f"{where}: not valid JSON ({exc.msg})") from None
                except RecursionError:
                    raise error(f"{where}: JSON nested too deeply") from None
                if not isinstance(row, dict):
                    raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield where, row
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None


def jsonl_line(row: object) -> str:
    """One JSONL line (UTF-8 text, not ASCII-escaped, ending in a newline)."""
    return json.dumps(row, ensure_ascii=False) + "\n"
