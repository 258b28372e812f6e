"""Our task and group YAMLs read as plain data, for the tools that work outside the harness
(`hallulens judge` aggregates groups and marks higher-is-better the way the harness does)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

import yaml

TASK_DIR = Path(str(files("hallulens_tasks") / "tasks"))


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@cache
def configs() -> dict[str, dict]:
    """name -> YAML mapping for every task and group file (includes not merged)."""
    out = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
        out[data["group"] if "group" in data else data["task"]] = data
    return out


def groups() -> dict[str, dict]:
    return {name: c for name, c in configs().items() if "group" in c}


def leaf_tasks(name: str) -> list[str]:
    """Leaf tasks under a group (or the task itself), in YAML order."""
    config = configs().get(name)
    if config is None or "group" not in config:
        return [name]
    return [leaf for child in config["task"] for leaf in leaf_tasks(child)]


def higher_is_better(name: str) -> dict[str, bool]:
    """Per metric of a task, or of a group (from its leaf tasks, which agree)."""
    out: dict[str, bool] = {}
    for task in leaf_tasks(name):
        for metric in configs().get(task, {}).get("metric_list", []):
            out.setdefault(metric["metric"], metric.get("higher_is_better", True))
    return out


def version(name: str) -> object:
    return configs().get(name, {}).get("metadata", {}).get("version", "N/A")
