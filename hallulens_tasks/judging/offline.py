"""`hallulens judge`: judge a `--predict_only --log_samples` run after the tested model is gone.

Same families, same judge pass and same per-item metrics as the in-harness filter; writes the
samples again with verdicts, and a results JSON shaped like the harness's (per-task metrics
with stderr under "<metric>,judge", group aggregates under "results" and "groups").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hallulens_tasks import task_configs
from hallulens_tasks.families import family_of_task
from hallulens_tasks.samples import SamplesError, SamplesFile, read_samples, response

log = logging.getLogger(__name__)

FILTER = "judge"


def _aggregate(values: list[float]) -> tuple[float, float | str]:
    from lm_eval.api.metrics import mean, mean_stderr

    return mean(values), (mean_stderr(values) if len(values) > 1 else "N/A")


def judge_file(samples: SamplesFile) -> tuple[list[dict], dict]:
    """Judge one task's samples: (rows with verdicts and metrics, the task's results entry)."""
    family = family_of_task(samples.task)
    docs = [row["doc"] for row in samples.rows]
    outcomes = family.judge(docs, [response(row) for row in samples.rows])
    per_metric: dict[str, list[float]] = {}
    rows = []
    for row, doc, result in zip(samples.rows, docs, outcomes, strict=True):
        metrics = family.metrics(doc, result)
        for name, value in metrics.items():
            per_metric.setdefault(name, []).append(value)
        rows.append(
            {
                **{k: v for k, v in row.items() if k not in ("bypass", *row.get("metrics", ()))},
                "filtered_resps": [json.dumps(result, ensure_ascii=False)],
                "filter": FILTER,
                "metrics": list(metrics),
                **metrics,
            }
        )
    alias = task_configs.configs().get(samples.task, {}).get("task_alias", samples.task)
    entry: dict = {"alias": alias, "name": samples.task}
    for name, values in per_metric.items():
        value, stderr = _aggregate(values)
        entry[f"{name},{FILTER}"] = value
        entry[f"{name}_stderr,{FILTER}"] = stderr
    entry["sample_len"] = len(rows)
    return rows, entry


def aggregate_groups(results: dict[str, dict]) -> dict[str, dict]:
    """Group rows from leaf-task rows, as the harness computes them (size-weighted, pooled)."""
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

    out = {}
    for name, config in task_configs.groups().items():
        leaves = [t for t in task_configs.leaf_tasks(name) if t in results]
        if not leaves:
            continue
        entry: dict = {
            "alias": config.get("group_alias", name),
            "name": name,
            "sample_len": sum(results[t]["sample_len"] for t in leaves),
        }
        for spec in config.get("aggregate_metric_list", []):
            key = f"{spec['metric']},{FILTER}"
            stderr_key = f"{spec['metric']}_stderr,{FILTER}"
            having = [t for t in leaves if key in results[t]]
            if not having:
                continue
            sizes = [results[t]["sample_len"] for t in having]
            weighted = spec.get("weight_by_size", True)
            entry[key] = aggregate_subtask_metrics(
                [results[t][key] for t in having], sizes, weighted
            )
            stderrs = [results[t][stderr_key] for t in having]
            entry[stderr_key] = (
                pooled_sample_stderr(stderrs, sizes)
                if weighted and "N/A" not in stderrs and sum(sizes) > len(sizes)
                else "N/A"
            )
        out[name] = entry
    return out


def judge_run(paths: list[Path], output_dir: Path | None) -> dict:
    """Judge every HalluLens samples file in `paths`; write judged files; return the results."""
    files = [read_samples(p) for p in paths]
    ours = [f for f in files if family_of_task(f.task) is not None]
    for skipped in sorted({f.task for f in files} - {f.task for f in ours}):
        log.warning("%s is not a HalluLens task: its samples are left as they are", skipped)
    if not ours:
        raise SamplesError("no HalluLens samples files among the inputs")
    results: dict[str, dict] = {}
    base: dict = {}
    for samples in ours:
        out_dir = output_dir or samples.path.parent / "judged"
        out_dir.mkdir(parents=True, exist_ok=True)
        rows, entry = judge_file(samples)
        results[samples.task] = entry
        target = out_dir / samples.path.name
        target.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
        if not base and samples.results_file():
            base = json.loads(samples.results_file().read_text(encoding="utf-8"))
    groups = aggregate_groups(results)
    versions = base.get("versions", {})
    judged = {
        **base,
        "results": {**results, **groups},
        "groups": groups,
        "higher_is_better": {
            name: task_configs.higher_is_better(name) for name in [*results, *groups]
        },
        # a samples file without its run's results JSON still gets a complete table
        "versions": {**{n: task_configs.version(n) for n in [*results, *groups]}, **versions},
        "n-shot": {**{n: 0 for n in results}, **base.get("n-shot", {})},
        "judge": {"filter": FILTER, "judged_by": "hallulens judge"},
    }
    stamp = ours[0].stamp
    out = (output_dir or ours[0].path.parent / "judged") / f"results_{stamp}.json"
    out.write_text(json.dumps(judged, indent=2, default=str) + "\n", encoding="utf-8")
    judged["_path"] = str(out)
    return judged
