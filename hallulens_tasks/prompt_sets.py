"""Frozen prompt sets: `$HALLULENS_DATA_DIR/<task>/prompts.jsonl`, else the shipped sample.

Row fields are the task table's; extra fields are kept. A malformed set stops the run with one
line naming the file and line: a benchmark silently run on half its items is worse than none.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hallulens_capture.errors import HalluLensError
from hallulens_tasks.jsonl import read_jsonl
from hallulens_tasks.task_table import (
    DOMAIN_TYPES,
    DOMAINS,
    FAMILIES,
    FIELD_TYPES,
    MIXED_TYPES,
    shipped_prompt_set,
)

log = logging.getLogger(__name__)

ENV_DATA_DIR = "HALLULENS_DATA_DIR"


class PromptSetError(HalluLensError, ValueError):
    """A prompt set is missing or malformed."""


def prompt_set_path(task: str, data_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """(path, is_shipped_sample) for `task`; `data_dir` overrides $HALLULENS_DATA_DIR."""
    root = data_dir or os.environ.get(ENV_DATA_DIR)
    if not root:
        return shipped_prompt_set(task), True
    path = Path(root) / task / "prompts.jsonl"
    if not path.is_file():
        raise PromptSetError(
            f"{path} does not exist ({ENV_DATA_DIR}={root}): create it with "
            f"`hallulens generate {task} --out {root}`, or unset {ENV_DATA_DIR} to use the "
            "shipped sample set"
        )
    return path, False


def _domain(row: dict, where: str) -> str:
    domain = row.get("domain")
    if domain is None:
        kind = str(row["type"]).strip().lower()
        domain = next((d for d, kinds in DOMAIN_TYPES.items() if kind in kinds), None)
        if domain is None and not str(row["place"]).strip():
            domain = "product"
    if domain not in DOMAINS:
        raise PromptSetError(
            f"{where}: cannot tell the domain (business, event or product) of type "
            f'{row["type"]!r}; add a "domain" field'
        )
    return domain


_TYPE_NAMES = {str: "a string", int: "an integer"}


def check_row(task: str, row: dict, where: str) -> dict:
    """`row` of `task`'s prompt set, checked (fields, types, values); generated-entity rows get
    their `domain`."""
    required = FAMILIES[task].fields
    missing = [name for name in required if name not in row]
    if missing:
        raise PromptSetError(f"{where}: missing field(s) {', '.join(missing)}")
    for name in required:
        kind, value = FIELD_TYPES[name], row[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PromptSetError(
                f'{where}: "{name}" must be {_TYPE_NAMES[kind]}, not {json.dumps(value)[:40]}'
            )
    if not row["prompt"].strip():
        raise PromptSetError(f'{where}: "prompt" must be a non-empty string')
    if task == "nonsense_mixed_entities" and row["type"] not in MIXED_TYPES:
        raise PromptSetError(
            f"{where}: type {row['type']!r} is not one of {', '.join(MIXED_TYPES)}"
        )
    if task == "nonsense_generated_entities":
        row = {**row, "domain": _domain(row, where)}
    return row


def read_prompt_set(task: str, path: Path) -> list[dict]:
    if task not in FAMILIES:
        raise PromptSetError(f"unknown HalluLens task {task!r}")
    rows = [check_row(task, row, where) for where, row in read_jsonl(path, PromptSetError)]
    if not rows:
        raise PromptSetError(f"{path}: no prompts in the file")
    return rows


def load_prompt_set(task: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    path, shipped = prompt_set_path(task, data_dir)
    rows = read_prompt_set(task, path)
    if shipped:
        log.warning(
            "!!! %s: %s is not set, so this runs the %d-item SAMPLE set shipped with "
            "lm-eval-hallulens (%s), not a HalluLens prompt set: its numbers are not HalluLens "
            "results. Generate a set with `hallulens generate` and point %s at it. !!!",
            task,
            ENV_DATA_DIR,
            len(rows),
            path,
            ENV_DATA_DIR,
        )
    else:
        log.info("%s: %d prompts from %s", task, len(rows), path)
    return rows


def dataset(
    prompt_set: str,
    where: dict | None = None,
    hallulens_data_dir: str | None = None,
    **_metadata,
):
    """`custom_dataset` of the task YAMLs: the set's rows (those matching `where`) as a split.

    lm-eval also passes model_args and --metadata here; `--metadata
    '{"hallulens_data_dir": DIR}'` overrides $HALLULENS_DATA_DIR for one run.
    """
    import datasets

    from hallulens_models.harness_cli import join_harness_cli
    from hallulens_tasks.judging.scoring import SCORINGS

    join_harness_cli()  # a bad prompt set is one line on the lm_eval CLI, not a traceback
    everything = load_prompt_set(prompt_set, hallulens_data_dir)
    SCORINGS[prompt_set].preflight(everything)
    rows = [r for r in everything if all(r.get(k) == v for k, v in (where or {}).items())]
    if not rows:
        raise PromptSetError(_no_rows_message(prompt_set, where or {}, everything))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    try:
        return {"test": datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in columns})}
    except (TypeError, ValueError) as exc:  # pyarrow's errors derive from these
        raise PromptSetError(
            f"{prompt_set}: a field holds values of different types in different rows "
            f"({str(exc).splitlines()[0][:200]}); give each field one type"
        ) from None


def _no_rows_message(family_name: str, where: dict, rows: list[dict]) -> str:
    """Which rows a subtask lacks, and the subtasks the set can run."""
    family = FAMILIES[family_name]
    wanted = ", ".join(f"{k}={v}" for k, v in where.items())
    runnable = [s.name for s in family.subtasks if any(r.get(s.field) == s.value for r in rows)]
    return (
        f"the {family_name} prompt set has no rows with {wanted}: run only the subtasks it "
        f"has rows for (--tasks {','.join(runnable)}), or generate a set with every "
        f"{next(iter(where), 'value')}"
    )
