"""The harness's `samples_<task>_<datetime>.jsonl` files, as `hallulens judge`, `activations
label`, `export-legacy` and the pipeline read them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hallulens_capture.errors import HalluLensError
from hallulens_tasks.jsonl import read_jsonl
from hallulens_tasks.prompt_sets import PromptSetError, check_row
from hallulens_tasks.task_table import SAMPLES_FILE, family_of_task


class SamplesError(HalluLensError, ValueError):
    """A samples file is missing, misnamed or malformed."""


@dataclass
class SamplesFile:
    path: Path
    task: str
    stamp: str  # the run's datetime as in the file name, e.g. 2026-11-24T23-50-34.414382
    rows: list[dict]

    @property
    def timestamp(self) -> str:
        """The run's time as ISO 8601 (the file name replaces ':' with '-')."""
        date, _, clock = self.stamp.partition("T")
        return f"{date}T{clock.replace('-', ':', 2)}"

    def results_file(self) -> Path | None:
        """The harness's results JSON of the same run, when it is next to the samples."""
        path = self.path.with_name(f"results_{self.stamp}.json")
        return path if path.is_file() else None


def response(row: dict, where: str = "sample") -> str:
    """The (first) generation of a sample."""
    resps = row.get("resps")
    while isinstance(resps, list) and resps:
        resps = resps[0]
    if not isinstance(resps, str):
        raise SamplesError(f'{where}: no generation in "resps"')
    return resps


def prompt(row: dict) -> str | None:
    """The exact prompt the model got (`arguments`), as the harness logs it."""
    args = row.get("arguments")
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": prompt, "arg_1": gen_kwargs}}
        first = next(iter(args.values()), None)
        return first.get("arg_0") if isinstance(first, dict) else None
    if isinstance(args, list) and args and isinstance(args[0], list) and args[0]:
        return args[0][0]
    return None


def outcome(row: dict) -> dict | None:
    """The judge's outcome logged in `filtered_resps`, or None for an unjudged sample."""
    filtered = row.get("filtered_resps")
    text = filtered[0] if isinstance(filtered, list) and filtered else filtered
    if not isinstance(text, str) or not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) and "label" in value else None


def read_samples(path: str | Path) -> SamplesFile:
    path = Path(path)
    match = SAMPLES_FILE.match(path.name)
    if match is None:
        raise SamplesError(
            f"{path}: not a harness samples file name (samples_<task>_<datetime>.jsonl)"
        )
    family = family_of_task(match["task"])
    rows = []
    for where, row in read_jsonl(path, SamplesError):
        if not isinstance(row.get("doc"), dict):
            raise SamplesError(f'{where}: not a harness sample (no "doc")')
        if family is not None:  # what judging, labels and exports read of a HalluLens sample
            response(row, where)
            try:
                check_row(family.name, row["doc"], f"{where}: doc")
            except PromptSetError as exc:
                raise SamplesError(str(exc)) from None
        rows.append(row)
    return SamplesFile(path, match["task"], match["stamp"], rows)


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a directory stands for the samples files directly inside it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("samples_*.jsonl"))
            if not found:
                raise SamplesError(f"{p}: no samples_*.jsonl files in this directory")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise SamplesError(f"{p}: no such file or directory")
    return out
