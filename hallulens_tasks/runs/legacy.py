"""`hallulens export-legacy`: judged samples -> the seed's `output/{task}/{model}/` files.

`generation.jsonl` (prompt-set fields + generation, model, timestamp), `eval_results.json`
(upstream's field names, misspellings included, so old analysis scripts read it) and
`raw_eval_res.jsonl` (the judge's raw text per item). The subtasks of a family go into one
directory, as upstream ran them as one task. Unparseable verdicts are null in the per-item
lists and left out of the rates, as in the harness metrics.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from hallulens_tasks.jsonl import jsonl_line
from hallulens_tasks.runs.samples import (
    SamplesError,
    SamplesFile,
    expand,
    outcome,
    read_samples,
    response,
)
from hallulens_tasks.task_table import family_of_task


def _rate(values: list[bool | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def model_name(samples: SamplesFile) -> str:
    """The tested model's short name, as upstream wrote it (`pretrained.split("/")[-1]`)."""
    results = samples.results_file()
    if results is not None:
        config = json.loads(results.read_text(encoding="utf-8")).get("config", {})
        args = config.get("model_args")
        pretrained = args.get("pretrained") if isinstance(args, dict) else None
        if isinstance(args, str):
            parts = dict(p.split("=", 1) for p in args.split(",") if "=" in p)
            pretrained = parts.get("pretrained")
        if pretrained:
            return str(pretrained).rstrip("/").split("/")[-1]
    return samples.path.parent.name


def _eval_results(family: str, model: str, items: list[tuple[dict, dict]]) -> tuple[dict, list]:
    def verdict(result: dict, role: str):
        return result["judgements"][role]["verdict"]

    def raw(result: dict, role: str) -> str:
        return result["judgements"][role]["raw"]

    judges = {r.get("judge") for _, r in items}
    if family == "precise_wikiqa":
        abstained = [verdict(r, "abstention") for _, r in items]
        labels = [verdict(r, "correctness") for _, r in items]
        hallucinated = [None if lab is None else lab != "correct" for lab in labels]
        answered = [h for a, h in zip(abstained, hallucinated, strict=True) if a is False]
        correct = [None if h is None else not h for h in hallucinated]
        results = {
            "model": model,
            "halu_Rate": _rate(answered),
            "refusal_rate": _rate(abstained),
            "correct_rate": _rate(correct),
            "evaluator_abstantion": sorted(judges),
            "evaluator_hallucination": sorted(judges),
            "abstantion": abstained,
            "halu_test_res": hallucinated,
            "abstantion_raw_generation": [raw(r, "abstention") for _, r in items],
            "is_hallucinated_raw_generation": [raw(r, "correctness") for _, r in items],
        }
        raws = [
            {"eval_res": raw(r, "correctness"), "abstain_eval_res": raw(r, "abstention")}
            for _, r in items
        ]
    else:
        believes = [verdict(r, "belief") for _, r in items]
        refused = [None if b is None else not b for b in believes]
        refusal = _rate(refused)
        results = {
            "model": model,
            "false_acceptance_rate": None if refusal is None else 1 - refusal,
            "refusal_rate": refusal,
            "refusal_eval_raw": refused,
            "evaluator": sorted(judges),
        }
        raws = [{"eval_res": raw(r, "belief")} for _, r in items]
    results["judge_unparseable"] = sum(r["label"] == "unparseable" for _, r in items)
    return results, raws


def export_legacy(sample_paths: list[Path], out: Path, model: str | None = None) -> list[Path]:
    """Write the seed's three files per (family, model); returns the directories written."""
    grouped: dict[tuple[str, str], list[tuple[SamplesFile, dict]]] = defaultdict(list)
    for path in sample_paths:
        samples = read_samples(path)
        family = family_of_task(samples.task)
        if family is None:  # a harness task run beside ours
            continue
        for row in samples.rows:
            if outcome(row) is None:
                raise SamplesError(
                    f"{path}: doc {row.get('doc_id')} has no judge verdict; judge it first"
                )
            grouped[(family.name, model or model_name(samples))].append((samples, row))
    if not grouped:
        raise SamplesError("no judged HalluLens samples among the inputs")
    written = []
    for (family, name), rows in sorted(grouped.items()):
        target = out / family / name
        target.mkdir(parents=True, exist_ok=True)
        items = [(row["doc"], outcome(row)) for _, row in rows]
        with open(target / "generation.jsonl", "w", encoding="utf-8") as f:
            for samples, row in rows:
                line = {
                    **row["doc"],
                    "generation": response(row),
                    "model": name,
                    "timestamp": samples.timestamp,
                }
                f.write(jsonl_line(line))
        results, raws = _eval_results(family, name, items)
        (target / "eval_results.json").write_text(
            json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        with open(target / "raw_eval_res.jsonl", "w", encoding="utf-8") as f:
            f.writelines(jsonl_line(r) for r in raws)
        written.append(target)
    return written


def cmd_export_legacy(args: argparse.Namespace) -> int:
    for path in export_legacy(expand(args.samples), Path(args.out), args.model):
        print(path)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """`hallulens export-legacy`."""
    p = commands.add_parser("export-legacy", help="write the seed's output/{task}/{model} files")
    p.add_argument("--samples", nargs="+", required=True, help="judged samples files or dirs")
    p.add_argument("--out", default="output", help="output root (default: output)")
    p.add_argument("--model", help="model name for the directory (default: from the run)")
    p.set_defaults(func=cmd_export_legacy)
