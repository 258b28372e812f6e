"""Write a frozen prompt set: `DIR/TASK/prompts.jsonl` and `DIR/TASK/manifest.json`.

Rows are canonical JSON lines (the task's required fields first in the task table's order, then
extra fields sorted; UTF-8, not ASCII-escaped; "\\n" endings), so the same rows always give
the same bytes. Both files are written to a temporary name and renamed into place: a run
killed half-way leaves the previous set (or none), never a partial file. The set is checked
with the same reader the tasks use before it replaces anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from hallulens_tasks.generation.errors import GenerationError
from hallulens_tasks.prompt_sets import read_prompt_set
from hallulens_tasks.task_table import FAMILIES

DISTRIBUTION = "lm-eval-hallulens"


def canonical_line(row: dict, fields: Sequence[str]) -> str:
    ordered = {key: row[key] for key in fields}
    ordered.update((key, row[key]) for key in sorted(row) if key not in ordered)
    return json.dumps(ordered, ensure_ascii=False)


def package_version() -> str | None:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return None


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class WrittenSet:
    prompts: Path
    manifest: Path
    sha256: str
    rows: int


def write_prompt_set(
    out: str | os.PathLike, task: str, rows: list[dict], manifest: dict
) -> WrittenSet:
    """Write the set; `manifest` gets the sha256 of prompts.jsonl, the row count and the
    package version added."""
    if not rows:
        raise GenerationError(f"{task}: no prompt passed the filters, nothing was written")
    directory = Path(out) / task
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GenerationError(f"cannot create {directory}: {exc}") from None
    data = "".join(canonical_line(row, FAMILIES[task].fields) + "\n" for row in rows).encode(
        "utf-8"
    )
    digest = hashlib.sha256(data).hexdigest()
    check = directory / f".check.{os.getpid()}.jsonl"
    try:
        check.write_bytes(data)
        read_prompt_set(task, check)  # what the task will read; raises on a malformed row
    finally:
        check.unlink(missing_ok=True)
    manifest = {
        **manifest,
        "task": task,
        "rows": len(rows),
        "prompts_sha256": digest,
        "package": {"name": DISTRIBUTION, "version": package_version()},
    }
    prompts_path, manifest_path = directory / "prompts.jsonl", directory / "manifest.json"
    try:
        _replace(prompts_path, data)
        text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        _replace(manifest_path, text.encode("utf-8"))
    except OSError as exc:
        raise GenerationError(f"cannot write the prompt set into {directory}: {exc}") from None
    return WrittenSet(prompts_path, manifest_path, digest, len(rows))
