"""The one table of HalluLens tasks: every other module asks it for names, fields and subtasks.

A *family* is one HalluLens task as upstream ran it: one prompt set (`hallulens generate
NAME`), one judge procedure, one folder of seed files. In the harness a family is a task
(`precise_wikiqa`) or a group of subtasks that split its prompt set by a field
(`nonsense_mixed_entities_plant` takes the rows whose `type` is `plant`). The task YAMLs under
`tasks/` declare the same names for lm-eval; a test checks that they agree with this table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

MIXED_TYPES = ("medicine", "animal", "plant", "bacteria")
# HalluLens' GeneratedEntities domains and their entity types (products: any other type).
DOMAIN_TYPES = {
    "business": ("restaurant", "bar", "bookstore", "cafe", "museum"),
    "event": ("war", "natural disaster", "scientific discovery", "sport event", "pandemic"),
}
DOMAINS = ("business", "event", "product")
# upstream's MixedEntities `--exp` values and the entity types each covers
MIXED_EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "nonsense_all": MIXED_TYPES,
    **{f"nonsense_{kind}": (kind,) for kind in MIXED_TYPES},
}


# the type of each required prompt-set field (a bool is no int here)
FIELD_TYPES: dict[str, type] = {
    "prompt": str,
    "answer": str,
    "title": str,
    "h_score_cat": int,
    "reference": str,
    "name": str,
    "type": str,
    "place": str,
}


@dataclass(frozen=True)
class Subtask:
    """A harness task that takes the family's rows whose `field` equals `value`."""

    name: str
    field: str
    value: str


@dataclass(frozen=True)
class Family:
    name: str
    fields: tuple[str, ...]  # required prompt-set fields, in their canonical order
    default_n: int  # upstream's CLI default of `--N`
    n_means: str  # what `--N` counts
    subtasks: tuple[Subtask, ...] = ()  # empty: the family is one harness task of its own name
    in_harness: bool = True  # has an lm_eval task

    @property
    def harness_tasks(self) -> tuple[str, ...]:
        """Leaf harness tasks of the family."""
        return tuple(s.name for s in self.subtasks) or (self.name,)

    def subtask(self, name: str) -> Subtask | None:
        return next((s for s in self.subtasks if s.name == name), None)


def _split(family: str, field_name: str, values: tuple[str, ...]) -> tuple[Subtask, ...]:
    return tuple(Subtask(f"{family}_{value}", field_name, value) for value in values)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "precise_wikiqa",
            ("prompt", "answer", "title", "h_score_cat", "reference"),
            5000,
            "questions in all",
        ),
        Family(
            "longwiki",
            ("prompt", "title", "h_score_cat", "reference"),
            250,
            "questions in all",
        ),
        Family(
            "nonsense_mixed_entities",
            ("prompt", "name", "type"),
            2000,
            "names per type",
            _split("nonsense_mixed_entities", "type", MIXED_TYPES),
        ),
        Family(
            "nonsense_generated_entities",
            ("prompt", "name", "type", "place"),
            300,
            "names per domain and round-robin sequence",
            _split("nonsense_generated_entities", "domain", DOMAINS),
        ),
    )
}
ENTITY_FAMILIES = ("nonsense_mixed_entities", "nonsense_generated_entities")

# the harness's samples files: samples_<task>_<datetime>.jsonl
SAMPLES_FILE = re.compile(r"^samples_(?P<task>.+)_(?P<stamp>\d{4}-\d{2}-\d{2}T[\d.\-]+)\.jsonl$")


def family_of_task(task: str) -> Family | None:
    """The family of a harness task or group name (`nonsense_mixed_entities_plant` -> mixed
    entities); None for a task that is not HalluLens'."""
    for family in FAMILIES.values():
        if task == family.name or task in family.harness_tasks:
            return family
    return None


def harness_task(family: Family, doc: Mapping) -> str:
    """The harness task of `family` whose rows include `doc`."""
    return next((s.name for s in family.subtasks if doc.get(s.field) == s.value), family.name)


def shipped_prompt_set(family: str) -> Path:
    """The small sample set shipped in the package for `family`."""
    return Path(str(files("hallulens_tasks") / "data" / family / "prompts.jsonl"))
