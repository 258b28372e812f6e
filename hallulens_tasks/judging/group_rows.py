"""Task and group rows of the results JSON from `Rate`s, the same for `lm_eval` and
`hallulens judge`: a group's rate is the pooled ratio over its members' items.

The harness weighs each member of a group by its document count, which also counts the items a
rate leaves out (unreadable judge replies, refused items for `hallu_rate`), so its group rows
drift from the pooled ratio (e.g. 0.533 for a pooled 9/17 = 0.529). Inside `lm_eval`, the judge
filter records each task's rates here (`TASK_RATES`) and `pool_groups` (installed by the
plugin's start-up hook on `lm_eval.api.group.Group.aggregate`) recomputes the rows of groups
whose members are all known. Under data parallelism each rank judges its own share and only
rank 0 aggregates: its record does not cover the task, so the harness's rows are kept and a
warning says so.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping

from hallulens_tasks.judging.scoring import Statistic

log = logging.getLogger(__name__)

FILTER = "judge"  # the filter name of every HalluLens task YAML
# harness task -> (documents judged, rate per metric), from the latest judge pass of the task
TASK_RATES: dict[str, tuple[int, dict[str, Statistic]]] = {}


def metric_entries(rates: Mapping[str, Statistic]) -> dict[str, object]:
    """`<metric>,judge` and `<metric>_stderr,judge` as the harness writes them."""
    out: dict[str, object] = {}
    for name, rate in rates.items():
        out[f"{name},{FILTER}"] = rate.value
        out[f"{name}_stderr,{FILTER}"] = rate.stderr
    return out


def pooled(
    members: Iterable[Mapping[str, Statistic]], metrics: Iterable[str]
) -> dict[str, Statistic]:
    """Each of `metrics` summed over the members that have it."""
    members = list(members)
    out = {}
    for name in metrics:
        having = [m[name] for m in members if name in m]
        if having:
            out[name] = sum(having[1:], having[0])
    return out


def _pool(group, task_metrics: Mapping[str, Mapping], rows: dict) -> dict:
    """`rows` (the harness's row of `group`) with our rates pooled over items."""
    leaves = [t.task_name for t in group.get_all_tasks() if t.task_name in task_metrics]
    ours = [t for t in leaves if t in TASK_RATES]
    if not ours:
        return rows
    if ours != leaves or any(TASK_RATES[t][0] != task_metrics[t].get("sample_len") for t in ours):
        log.warning(
            "group %s: HalluLens rates of some members are not known in this process (data "
            "parallel?): its rows weigh members by document count, not pooled over items",
            group.name,
        )
        return rows
    names = [
        key.partition(",")[0]
        for key in rows
        if key.endswith(f",{FILTER}") and "_stderr," not in key
    ]
    rows.update(metric_entries(pooled((TASK_RATES[t][1] for t in ours), names)))
    return rows


def pool_groups(group_cls: type) -> None:
    """Make `group_cls.aggregate` (lm-eval's Group) pool HalluLens rates over items."""
    original = getattr(group_cls, "aggregate", None)
    if original is None or getattr(original, "_hallulens", False):
        return  # an lm-eval without Group.aggregate keeps its own group rows

    @functools.wraps(original)
    def aggregate(self, task_metrics):
        return _pool(self, task_metrics, original(self, task_metrics))

    aggregate._hallulens = True  # type: ignore[attr-defined]
    group_cls.aggregate = aggregate
