"""`hallulens judge`: judge a `--predict_only --log_samples` run after the tested model is gone.

Same scoring rules, same judge pass and same per-item metrics as the in-harness filter; writes
the samples again with verdicts, and a results JSON shaped like the harness's (per-task metrics
with stderr under "<metric>,judge", group aggregates under "results" and "groups").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from hallulens_tasks import task_configs
from hallulens_tasks.jsonl import jsonl_line
from hallulens_tasks.judging.group_rows import FILTER, metric_entries, pooled
from hallulens_tasks.judging.judge import judge_task
from hallulens_tasks.judging.longwiki import ENV_K
from hallulens_tasks.judging.scoring import Scoring, Statistic, pooled_rates, scoring_for_task
from hallulens_tasks.judging.wikipedia import ENV_WIKI_DB
from hallulens_tasks.runs.samples import SamplesError, SamplesFile, expand, read_samples, response

log = logging.getLogger(__name__)


@dataclass
class JudgedRun:
    results: dict  # the harness-shaped results JSON
    path: Path  # where it was written


def judge_file(samples: SamplesFile, scoring: Scoring) -> tuple[list[dict], dict[str, Statistic]]:
    """Judge one task's samples: (rows with verdicts and per-item metrics, the task's rates)."""
    docs = [row["doc"] for row in samples.rows]
    outcomes = judge_task(scoring, docs, [response(row) for row in samples.rows])
    items = [scoring.metrics(doc, result) for doc, result in zip(docs, outcomes, strict=True)]
    rows = [
        {
            **{k: v for k, v in row.items() if k not in ("bypass", *row.get("metrics", ()))},
            "filtered_resps": [json.dumps(result, ensure_ascii=False)],
            "filter": FILTER,
            "metrics": list(metrics),
            **metrics,
        }
        for row, result, metrics in zip(samples.rows, outcomes, items, strict=True)
    ]
    return rows, pooled_rates(items)


def _task_row(task: str, rates: dict[str, Statistic], n_docs: int) -> dict:
    alias = task_configs.configs().get(task, {}).get("task_alias", task)
    return {"alias": alias, "name": task, **metric_entries(rates), "sample_len": n_docs}


def group_rows(rates: dict[str, dict[str, Statistic]], sizes: dict[str, int]) -> dict[str, dict]:
    """Rows of every group with members among the judged tasks: pooled over their items."""
    out = {}
    for name, config in task_configs.groups().items():
        leaves = [t for t in task_configs.leaf_tasks(name) if t in rates]
        if not leaves:
            continue
        metrics = [spec["metric"] for spec in config.get("aggregate_metric_list", [])]
        out[name] = {
            "alias": config.get("group_alias", name),
            "name": name,
            "sample_len": sum(sizes[t] for t in leaves),
            **metric_entries(pooled((rates[t] for t in leaves), metrics)),
        }
    return out


def judge_run(paths: list[Path], output_dir: Path | None) -> JudgedRun:
    """Judge every HalluLens samples file in `paths`; write judged files and the results."""
    files = [(f, scoring_for_task(f.task)) for f in map(read_samples, paths)]
    ours = [(f, scoring) for f, scoring in files if scoring is not None]
    for skipped in sorted({f.task for f, scoring in files if scoring is None}):
        log.warning("%s is not a HalluLens task: its samples are left as they are", skipped)
    if not ours:
        raise SamplesError("no HalluLens samples files among the inputs")
    results: dict[str, dict] = {}
    rates: dict[str, dict[str, Statistic]] = {}
    sizes: dict[str, int] = {}
    base: dict = {}
    for samples, scoring in ours:
        out_dir = output_dir or samples.path.parent / "judged"
        out_dir.mkdir(parents=True, exist_ok=True)
        rows, rates[samples.task] = judge_file(samples, scoring)
        sizes[samples.task] = len(rows)
        results[samples.task] = _task_row(samples.task, rates[samples.task], len(rows))
        target = out_dir / samples.path.name
        target.write_text("".join(map(jsonl_line, rows)), encoding="utf-8")
        if not base and samples.results_file():
            base = json.loads(samples.results_file().read_text(encoding="utf-8"))
    groups = group_rows(rates, sizes)
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
    first = ours[0][0]
    out = (output_dir or first.path.parent / "judged") / f"results_{first.stamp}.json"
    out.write_text(json.dumps(judged, indent=2, default=str) + "\n", encoding="utf-8")
    return JudgedRun(judged, out)


def cmd_judge(args: argparse.Namespace) -> int:
    from lm_eval.utils import make_table

    # LongWiki's settings are environment variables (the harness filter reads them too)
    if args.wiki_db:
        os.environ[ENV_WIKI_DB] = args.wiki_db
    if args.k is not None:
        os.environ[ENV_K] = str(args.k)

    run = judge_run(expand(args.samples), Path(args.output_path) if args.output_path else None)
    print(make_table(run.results))
    if run.results["groups"]:
        print(make_table(run.results, "groups"))
    print(f"judged samples and {run.path} written")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """`hallulens judge`."""
    p = commands.add_parser(
        "judge", help="judge HalluLens samples of a --predict_only --log_samples run"
    )
    p.add_argument("samples", nargs="+", help="samples_*.jsonl files, or their directory")
    p.add_argument("--output_path", help="where judged samples go (default: <dir>/judged)")
    p.add_argument(
        "--wiki_db",
        help=f"LongWiki: FActScore's Wikipedia database enwiki-20230401.db (as ${ENV_WIKI_DB})",
    )
    p.add_argument("--k", type=int, help=f"LongWiki: K of Recall@K and F1@K (as ${ENV_K}; 32)")
    p.set_defaults(func=cmd_judge)
