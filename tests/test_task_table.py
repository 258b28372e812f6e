"""The task table is the one declaration of HalluLens tasks; the YAMLs lm-eval reads agree."""

from __future__ import annotations

import pytest

from hallulens_tasks import task_configs
from hallulens_tasks.judging.scoring import SCORINGS, scoring_for_task
from hallulens_tasks.task_table import FAMILIES, family_of_task, shipped_prompt_set

HARNESS = [f for f in FAMILIES.values() if f.in_harness]


def _filter_family(config: dict) -> str:
    [entry] = config["filter_list"]
    [step] = entry["filter"]
    return step["family"]


@pytest.mark.parametrize("family", HARNESS, ids=lambda f: f.name)
def test_yaml_tasks_follow_the_table(family):
    configs = task_configs.configs()
    for name in family.harness_tasks:
        config = configs[name]
        assert config["dataset_kwargs"]["prompt_set"] == family.name
        assert _filter_family(config) == family.name
        subtask = family.subtask(name)
        where = config["dataset_kwargs"].get("where")
        assert where == (None if subtask is None else {subtask.field: subtask.value})
    if family.subtasks:
        assert configs[family.name]["task"] == list(family.harness_tasks)
    assert shipped_prompt_set(family.name).is_file()


def test_every_yaml_task_is_in_the_table():
    leaves = [n for n, c in task_configs.configs().items() if "group" not in c]
    for name in leaves:
        family = family_of_task(name)
        assert family is not None and name in family.harness_tasks, name
    assert sorted(task_configs.leaf_tasks("hallulens")) == sorted(
        t for f in HARNESS for t in f.harness_tasks
    )


def test_every_harness_family_has_scoring_rules():
    assert set(SCORINGS) == {f.name for f in HARNESS}
    assert scoring_for_task("nonsense_mixed_entities_plant") is SCORINGS["nonsense_mixed_entities"]
    assert scoring_for_task("gsm8k") is None
