"""`hallulens export-legacy`: judged samples -> the seed's `output/{task}/{model}/` files.

Written so that readers made for upstream HalluLens' files read them unchanged:
`generation.jsonl` (prompt-set fields + `generation`, `model`, `timestamp`; generated entities
also carry upstream's `type_`), `eval_results.json` (upstream's field names, misspellings and
types: rates as numbers, evaluators as strings, per-item lists of booleans aligned with
`generation.jsonl`), `raw_eval_res.jsonl` (the judge's raw text per item) and, for
PreciseWikiQA, upstream's `abstain_eval_raw.jsonl` (`{"eval_res": ...}`, which upstream resumes
from). LongWiki gets upstream's files instead of `raw_eval_res.jsonl`: `output.csv` (one row per
claim, and per sentence without claims, of the answers not refused, with the per-answer and
overall precision, recall and F1), `eval_details.json`, and the raw replies of each stage
(`output_abstain.jsonl`, `output_all_claims.jsonl`, `output_all_parsed_claims.jsonl`,
`output_verification_results.jsonl`), plus an `eval_results.json` that upstream did not write.
The rates are the scoring module's, over the same items as the harness's.

Items whose judge reply could not be read have no verdict, so they are not in those aligned
files (a `null` inside a boolean list turns into False in numpy and breaks pandas masks): they
go to `unparseable.jsonl` with their raw replies, and `judge_unparseable` counts them. The
subtasks of a family share one directory, as upstream ran them as one task.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections import defaultdict
from pathlib import Path

from hallulens_tasks.jsonl import jsonl_line
from hallulens_tasks.judging.scoring import SCORINGS, Statistic, pooled_rates
from hallulens_tasks.runs.samples import (
    SamplesError,
    SamplesFile,
    expand,
    outcome,
    read_samples,
    response,
)
from hallulens_tasks.task_table import family_of_task


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


def _evaluator(items: list[tuple[SamplesFile, dict, dict]]) -> str:
    return ", ".join(sorted({str(result.get("judge")) for _, _, result in items}))


def _raw(result: dict, role: str) -> str:
    return result["judgements"][role]["raw"]


def _eval_results(family: str, model: str, scored: list, rates: dict[str, Statistic]) -> dict:
    """eval_results.json of upstream's `family` over the `scored` (samples, row, outcome)s."""
    labels = [result["label"] for _, _, result in scored]
    value = {name: rate.value for name, rate in rates.items()}
    if family == "precise_wikiqa":
        return {
            "model": model,
            "halu_Rate": value.get("hallu_rate", 0.0),  # upstream: 0 when all were refused
            "refusal_rate": value.get("refusal_rate", 0.0),
            "correct_rate": value.get("correct_rate", 0.0),
            "evaluator_abstantion": _evaluator(scored),
            "evaluator_hallucination": _evaluator(scored),
            "abstantion": [label == "refused" for label in labels],
            "halu_test_res": [label != "correct" for label in labels],
            "abstantion_raw_generation": [_raw(r, "abstention") for _, _, r in scored],
            "is_hallucinated_raw_generation": [_raw(r, "correctness") for _, _, r in scored],
        }
    if family == "longwiki":
        keys = ("precision", "recall_at_k", "f1_at_k", "refusal_rate", "med_n_claims")
        return {
            "model": model,
            **{name: value[name] for name in keys if name in value},
            "k": scored[0][2]["k"] if scored else None,
            "refusal": [label == "refused" for label in labels],
            "evaluator": _evaluator(scored),
        }
    return {
        "model": model,
        "false_acceptance_rate": value.get("false_acceptance_rate", 0.0),
        "refusal_rate": value.get("refusal_rate", 0.0),
        "refusal_eval_raw": [label == "refused" for label in labels],
        "evaluator": _evaluator(scored),
    }


def _raw_files(family: str, results: list[dict]) -> dict[str, list[dict]]:
    """The raw judge replies, one line per item of generation.jsonl, under upstream's names."""
    if family == "precise_wikiqa":
        return {
            "raw_eval_res.jsonl": [
                {"eval_res": _raw(r, "correctness"), "abstain_eval_res": _raw(r, "abstention")}
                for r in results
            ],
            "abstain_eval_raw.jsonl": [{"eval_res": _raw(r, "abstention")} for r in results],
        }
    if family == "longwiki":
        extracted = [s for r in results for s in r["sentences"] if "extraction" in s]
        claims = [c for s in extracted for c in s["claims"] or ()]
        return {
            "output_abstain.jsonl": [{"eval_res": _raw(r, "abstention")} for r in results],
            "output_all_claims.jsonl": [{"eval_res": s["extraction"]["raw"]} for s in extracted],
            "output_all_parsed_claims.jsonl": [{"eval_res": c["claim"]} for c in claims],
            "output_verification_results.jsonl": [{"eval_res": c["raw"]} for c in claims],
        }
    return {"raw_eval_res.jsonl": [{"eval_res": _raw(r, "belief")} for r in results]}


def _generation_row(family: str, model: str, samples: SamplesFile, row: dict) -> dict:
    line = {**row["doc"], "generation": response(row), "model": model}
    line["timestamp"] = samples.timestamp
    if family == "nonsense_generated_entities":
        line["type_"] = row["doc"]["type"]  # upstream's column name
    return line


CSV_COLUMNS = ("prompt", "is_supported", "claim", "sentence", "title", "precision", "recall")
CSV_COLUMNS += ("f1", "k", "n_claims", "overall_recall", "overall_precision", "overall_f1")


def _longwiki_tables(target: Path, model: str, scored: list, rates: dict[str, Statistic]) -> None:
    """Upstream LongWiki's `output.csv` and `eval_details.json`."""
    scoring = SCORINGS["longwiki"]
    names = {"recall": "recall_at_k", "precision": "precision", "f1": "f1_at_k"}
    overall = {f"overall_{n}": rates[m].value for n, m in names.items() if m in rates}
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for _, row, result in scored:
        if result["label"] == "refused":
            continue
        values = scoring.metrics(row["doc"], result)
        answer = {
            "prompt": row["doc"]["prompt"],
            "title": row["doc"]["title"],
            "precision": values["precision"],
            "recall": values["recall_at_k"],
            "f1": values["f1_at_k"],
            "k": result["k"],
            "n_claims": int(values["med_n_claims"]),
            **overall,
        }
        for sentence in (s for s in result["sentences"] if "extraction" in s):
            facts = [(c["supported"], c["claim"]) for c in sentence["claims"]]
            for supported, claim in facts or [(None, "no claims")]:
                writer.writerow(
                    {
                        **answer,
                        "is_supported": supported,
                        "claim": claim,
                        "sentence": sentence["text"],
                    }
                )
    (target / "output.csv").write_text(text.getvalue(), encoding="utf-8")
    details = {
        "output_csv": str(target / "output.csv"),
        "abstain_evaluator": _evaluator(scored),
        "claim_extractor": _evaluator(scored),
        "verifier": _evaluator(scored),
        "k": scored[0][2]["k"] if scored else None,
        "evalauted_model": model,  # upstream's spelling
        "exp_mode": "longwiki",
        "eval_time": scored[0][0].timestamp if scored else None,
    }
    (target / "eval_details.json").write_text(json.dumps(details, indent=2) + "\n", "utf-8")


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(map(jsonl_line, rows))


def export_legacy(sample_paths: list[Path], out: Path, model: str | None = None) -> list[Path]:
    """Write the seed's files per (family, model); returns the directories written."""
    grouped: dict[tuple[str, str], list[tuple[SamplesFile, dict, dict]]] = defaultdict(list)
    for path in sample_paths:
        samples = read_samples(path)
        family = family_of_task(samples.task)
        if family is None:  # a harness task run beside ours
            continue
        for row in samples.rows:
            result = outcome(row)
            if result is None:
                raise SamplesError(
                    f"{path}: doc {row.get('doc_id')} has no judge verdict; judge it first"
                )
            grouped[(family.name, model or model_name(samples))].append((samples, row, result))
    if not grouped:
        raise SamplesError("no judged HalluLens samples among the inputs")
    written = []
    for (family, name), items in sorted(grouped.items()):
        target = out / family / name
        target.mkdir(parents=True, exist_ok=True)
        scoring = SCORINGS[family]
        rates = pooled_rates(scoring.metrics(row["doc"], result) for _, row, result in items)
        scored = [item for item in items if item[2]["label"] != "unparseable"]
        left_out = [item for item in items if item[2]["label"] == "unparseable"]
        _write_jsonl(
            target / "generation.jsonl", (_generation_row(family, name, *i[:2]) for i in scored)
        )
        results = _eval_results(family, name, scored, rates)
        results["judge_unparseable"] = len(left_out)
        (target / "eval_results.json").write_text(
            json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        for filename, raws in _raw_files(family, [r for _, _, r in scored]).items():
            _write_jsonl(target / filename, raws)
        if family == "longwiki":
            _longwiki_tables(target, name, scored, rates)
        _write_jsonl(
            target / "unparseable.jsonl",
            (
                {**_generation_row(family, name, samples, row), "judgements": r["judgements"]}
                for samples, row, r in left_out
            ),
        )
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
